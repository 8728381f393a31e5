#include "core/name-map.h"

#include <algorithm>

#include <fmt/format.h>

#include "core/flux-names.h"
#include "core/kohya-format.h"
#include "core/ldm-names.h"
#include "formats/safetensors.h"

namespace lora {

// transformers keeps a model's weights under `base_model_prefix` in its task
// classes (GPT2PreTrainedModel: "transformer", LlamaPreTrainedModel: "model")
// and saves the bare class without it (GPT2Model, LlamaModel: the hub's
// gpt2 / distilgpt2 files are bare GPT2Model checkpoints). Multimodal classes
// moved their language model in transformers 4.52 and map the old disk names
// with `_checkpoint_conversion_mapping` (models/llava/modeling_llava.py
// LlavaForConditionalGeneration, the same table in gemma3 and mistral3:
// "^language_model.model" -> "model.language_model", "^language_model.lm_head"
// -> "lm_head", "^vision_tower" -> "model.vision_tower",
// "^multi_modal_projector" -> "model.multi_modal_projector";
// models/qwen2_vl/modeling_qwen2_vl.py Qwen2VLForConditionalGeneration:
// "^visual" -> "model.visual", "^model(?!.(language_model|visual))" ->
// "model.language_model"). Adapters saved by current transformers use the new
// names; checkpoints on disk the old ones; older adapters the old ones too.
const std::vector<model_layout> model_layouts = {
    {"bare GPT2Model checkpoint (no transformer. prefix)", {{"transformer.", ""}}},
    {"GPT2LMHeadModel checkpoint (transformer. prefix)", {{"", "transformer."}}},
    {"bare LlamaModel-style checkpoint (no model. prefix)", {{"model.", ""}}},
    {"LlamaForCausalLM-style checkpoint (model. prefix)", {{"lm_head", "lm_head"}, {"", "model."}}},
    {"multimodal checkpoint on disk before transformers 4.52 (language_model.model.)",
     {{"model.language_model.", "language_model.model."},
      {"lm_head", "language_model.lm_head"},
      {"model.vision_tower.", "vision_tower."},
      {"model.multi_modal_projector.", "multi_modal_projector."}}},
    {"multimodal checkpoint in transformers 4.52+ names (model.language_model.)",
     {{"language_model.model.", "model.language_model."},
      {"language_model.lm_head", "lm_head"},
      {"vision_tower.", "model.vision_tower."},
      {"multi_modal_projector.", "model.multi_modal_projector."}}},
    {"Qwen2-VL checkpoint on disk (model. for the language model, visual.)",
     {{"model.language_model.", "model."}, {"model.visual.", "visual."}}},
    // diffusers LoRA files name the pipeline component (core/diffusers-format):
    // a base that is that component's own file has no such prefix
    {"diffusers pipeline component's own file (no unet. / transformer. / text_encoder(_2). prefix)",
     {{"unet.", ""}, {"transformer.", ""}, {"text_encoder.", ""}, {"text_encoder_2.", ""}}},
};

// diffusers' single-file loader takes a component out of its container
// (src/diffusers/loaders/single_file_utils.py @ 58eb52c0: LDM_UNET_KEY
// "model.diffusion_model.", LDM_CLIP_PREFIX_TO_REMOVE "cond_stage_model.transformer.",
// "conditioner.embedders.0.transformer."), as sd-scripts does
// (library/model_util.py load_checkpoint_with_text_encoder_conversion /
// convert_ldm_unet_checkpoint, library/sdxl_model_util.py
// convert_sdxl_unet_state_dict_to_diffusers; kohya-ss/sd-scripts @ 48d368fa).
const std::vector<single_file_component> single_file_components = {
    {kohya::checkpoint_family::sdxl, "unet.", "model.diffusion_model.", sdxl_unet_ldm_to_diffusers},
    {kohya::checkpoint_family::sdxl, "text_encoder.", "conditioner.embedders.0.transformer.", nullptr},
    {kohya::checkpoint_family::sd1, "unet.", "model.diffusion_model.", ldm_unet_to_diffusers},
    {kohya::checkpoint_family::sd1, "text_encoder.", "cond_stage_model.transformer.", sd1_clip_to_hf},
};

const std::vector<const fused_layout*> fused_layouts = {&open_clip_layouts, &flux_layouts};

std::string apply_layout(const std::string& name, const model_layout* layout) {
  if (layout == nullptr) return name;
  for (const auto& [from, to] : layout->rows)
    if (name.starts_with(from)) return std::string(to) + name.substr(from.size());
  return name;
}

namespace {

std::string mangle(std::string_view path) {
  std::string out(path);
  std::replace(out.begin(), out.end(), '.', '_');
  return out;
}

// A tensor name without ".weight" ("" when it has another ending: in_proj_weight).
std::string module_of(std::string_view weight) {
  return weight.ends_with(".weight") ? std::string(weight.substr(0, weight.size() - 7)) : std::string();
}

// Rows and the product of the other dims.
std::pair<int64_t, int64_t> rows_cols(const std::vector<int64_t>& shape) {
  int64_t cols = 1;
  for (size_t i = 1; i < shape.size(); ++i) cols *= shape[i];
  return {shape.empty() ? 0 : shape[0], cols};
}

}  // namespace

std::vector<fused_part> fused_parts(const std::string& tensor, const std::vector<int64_t>& shape,
                                    std::string& problem) {
  std::vector<fused_part> out;
  if (shape.size() != 2) return out;
  for (const fused_layout* layout : fused_layouts) {
    if (!layout->kohya_names_parts) continue;
    for (std::string_view prefix : layout->fused_prefixes)
      for (const fused_group& g : layout->groups) {
        std::string base_block, parts_block;
        if (g.split == row_split::whole || !match_fused_tensor(g, prefix, tensor, base_block, parts_block)) continue;
        const std::vector<fused_segment> segments = split_rows(g, shape[0], shape[1], problem);
        if (!problem.empty()) {
          problem = fmt::format("{} is {}: {}", tensor, shape_text(shape), problem);
          return {};
        }
        for (const fused_segment& seg : segments) {
          const std::string part = parts_block + std::string(g.parts[seg.part]);
          out.push_back(
              {std::string(prefix) + part, std::string(layout->kohya) + mangle(part), seg.fused_row, seg.n_rows});
        }
        return out;
      }
  }
  return out;
}

// A base in the fused layout: each part of each group found becomes a module
// of the adapter's layout, changing rows of the fused tensor.
void name_map::index_fused(const std::vector<std::string>& names, const fused_layout& layout, size_t which,
                           const shape_lookup& shape_of) {
  for (const std::string& n : names)
    for (std::string_view prefix : layout.fused_prefixes) {
      if (!n.starts_with(prefix)) continue;
      for (const fused_group& g : layout.groups) {
        std::string base_block, parts_block;
        if (!match_fused_tensor(g, prefix, n, base_block, parts_block)) continue;
        const std::string bias = base_block + std::string(g.fused_bias);
        const bool has_bias = tensors_.count(bias) > 0;
        if (g.split == row_split::whole) {
          fused_target t{std::string(layout.name), module_of(n), {}, {}, {}};
          if (t.whole.empty()) continue;
          fused_[which][parts_block + std::string(g.parts[0])].push_back(t);
          continue;
        }
        const std::vector<int64_t>* shape = shape_of ? shape_of(n) : nullptr;
        if (shape == nullptr || shape->empty()) continue;
        const auto [rows, cols] = rows_cols(*shape);
        std::string problem;
        const std::vector<fused_segment> segments = split_rows(g, rows, cols, problem);
        for (size_t i = 0; i < g.parts.size(); ++i) {
          fused_target t{std::string(layout.name), {}, {}, *shape, {}};
          if (!problem.empty()) {
            t.problem = fmt::format("base {} is {}: {}", n, shape_text(*shape), problem);
          } else {
            for (const fused_segment& seg : segments)
              if (seg.part == i) t.slices.push_back({n, has_bias ? bias : "", seg.fused_row, seg.part_row, seg.n_rows});
            t.delta_shape[0] = part_rows(segments, i);
            // in module row order
            std::sort(t.slices.begin(), t.slices.end(),
                      [](const row_slice& x, const row_slice& y) { return x.module_row < y.module_row; });
          }
          fused_[which][parts_block + std::string(g.parts[i])].push_back(std::move(t));
        }
      }
    }
}

// A base in the parts layout: each fused module whose parts are all there
// becomes a module of the adapter's layout, its rows split among the parts.
void name_map::index_parts(const std::vector<std::string>& names, const fused_layout& layout, size_t which,
                           const shape_lookup& shape_of) {
  for (const std::string& n : names)
    for (std::string_view prefix : layout.parts_prefixes) {
      if (!n.starts_with(prefix)) continue;
      for (const fused_group& g : layout.groups) {
        std::string_view index, tail;
        if (!match_block_path(std::string_view(n).substr(prefix.size()), g.parts_block, index, tail) ||
            tail != std::string(g.parts[0]) + ".weight")
          continue;
        const std::string fused_module = module_of(g.fused_weight);
        if (fused_module.empty()) continue;
        const std::string base_block = std::string(prefix) + block_path(g.parts_block, index);
        const std::string key = block_path(g.fused_block, index) + fused_module;
        std::vector<std::string> weights;
        for (std::string_view part : g.parts) weights.push_back(base_block + std::string(part) + ".weight");
        if (!std::all_of(weights.begin(), weights.end(), [&](const std::string& w) { return tensors_.count(w) > 0; }))
          continue;
        if (g.split == row_split::whole) {
          fused_[which][key].push_back({std::string(layout.name), module_of(weights[0]), {}, {}, {}});
          continue;
        }
        // the fused rows are the parts' rows in order; every part has the same columns
        std::vector<const std::vector<int64_t>*> shapes;
        for (const std::string& w : weights) shapes.push_back(shape_of ? shape_of(w) : nullptr);
        if (std::any_of(shapes.begin(), shapes.end(), [](const auto* p) { return p == nullptr || p->empty(); }))
          continue;
        fused_target t{std::string(layout.name), {}, {}, *shapes[0], {}};
        int64_t rows = 0;
        for (size_t i = 0; i < shapes.size(); ++i) {
          if (std::vector<int64_t>(shapes[i]->begin() + 1, shapes[i]->end()) !=
              std::vector<int64_t>(shapes[0]->begin() + 1, shapes[0]->end()))
            t.problem = fmt::format("base {} is {} and {} is {}: the parts of {} differ in their columns", weights[0],
                                    shape_text(*shapes[0]), weights[i], shape_text(*shapes[i]), key);
          rows += (*shapes[i])[0];
        }
        const int64_t cols = rows_cols(*shapes[0]).second;
        std::vector<fused_segment> segments;
        if (t.problem.empty()) {
          std::string problem;
          segments = split_rows(g, rows, cols, problem);
          if (!problem.empty())
            t.problem = fmt::format("the {} rows of {} ({}...): {}", rows, key, weights[0], problem);
        }
        for (size_t i = 0; i < weights.size() && t.problem.empty(); ++i)
          if (part_rows(segments, i) != (*shapes[i])[0])
            t.problem = fmt::format("base {} is {}, but {} of {} rows gives it {}", weights[i], shape_text(*shapes[i]),
                                    key, rows, part_rows(segments, i));
        if (t.problem.empty()) {
          t.delta_shape[0] = rows;
          for (const fused_segment& seg : segments) {
            const std::string bias = base_block + std::string(g.parts[seg.part]) + ".bias";
            t.slices.push_back(
                {weights[seg.part], tensors_.count(bias) ? bias : "", seg.part_row, seg.fused_row, seg.n_rows});
          }
          std::sort(t.slices.begin(), t.slices.end(),
                    [](const row_slice& x, const row_slice& y) { return x.module_row < y.module_row; });
        }
        fused_[which][key].push_back(std::move(t));
      }
    }
}

name_map::name_map(const std::vector<std::string>& base_tensor_names, const shape_lookup& shape_of) {
  for (const std::string& n : base_tensor_names) {
    tensors_.insert(n);
    if (!n.ends_with(".weight") || n.size() == 7) continue;
    std::string module = n.substr(0, n.size() - 7);
    mangled_[mangle(module)].push_back(std::move(module));
  }
  renamed_.resize(std::size(kohya::containers));
  for (size_t i = 0; i < std::size(kohya::containers); ++i) {
    const kohya::container& row = kohya::containers[i];
    if (row.rename == nullptr) continue;
    for (const auto& [key, paths] : mangled_)
      for (const std::string& m : paths) {
        if (!m.starts_with(row.base)) continue;
        const std::string renamed = row.rename(std::string_view(m).substr(row.base.size()));
        if (!renamed.empty()) renamed_[i][mangle(renamed)].push_back(m);
      }
  }
  const kohya::checkpoint_family family = kohya::detect_checkpoint_family(base_tensor_names);
  for (const single_file_component& row : single_file_components) {
    if (row.family != family) continue;
    components_layout_ = fmt::format("diffusers pipeline components in an {} single file",
                                     family == kohya::checkpoint_family::sdxl ? "SGM (SDXL)" : "LDM (SD 1.x / 2.x)");
    for (const std::string& n : base_tensor_names) {
      const std::string m = module_of(n);
      if (m.empty() || !m.starts_with(row.container)) continue;
      const std::string_view rest = std::string_view(m).substr(row.container.size());
      const std::string path = row.rename != nullptr ? row.rename(rest) : std::string(rest);
      if (!path.empty()) components_[std::string(row.component) + path].push_back(m);
    }
  }
  fused_.resize(fused_layouts.size());
  for (size_t i = 0; i < fused_layouts.size(); ++i) {
    index_fused(base_tensor_names, *fused_layouts[i], i, shape_of);
    index_parts(base_tensor_names, *fused_layouts[i], i, shape_of);
    for (const auto& [path, targets] : fused_[i]) {
      std::vector<fused_target>& k = fused_kohya_[std::string(fused_layouts[i]->kohya) + mangle(path)];
      k.insert(k.end(), targets.begin(), targets.end());
    }
  }
}

fused_lookup name_map::find_fused(const std::string& path) const {
  fused_lookup out;
  out.looked_for = path;
  if (auto it = components_.find(path); it != components_.end())
    for (const std::string& m : it->second) out.found.push_back({components_layout_, m, {}, {}, {}});
  for (size_t i = 0; i < fused_layouts.size(); ++i)
    for (std::string_view prefix : fused_layouts[i]->adapter_prefixes) {
      if (!path.starts_with(prefix)) continue;
      auto it = fused_[i].find(path.substr(prefix.size()));
      if (it == fused_[i].end()) continue;
      out.found.insert(out.found.end(), it->second.begin(), it->second.end());
    }
  return out;
}

fused_lookup name_map::find_fused_kohya(const std::string& name) const {
  fused_lookup out;
  out.looked_for = name;
  if (auto it = fused_kohya_.find(name); it != fused_kohya_.end()) out.found = it->second;
  return out;
}

layout_choice name_map::choose_layout(const std::vector<std::string>& tensors,
                                      const std::function<bool(const std::string&)>& also_ok,
                                      bool most_found) const {
  auto found_under = [&](const model_layout* layout) {
    size_t n = 0;
    for (const std::string& t : tensors) {
      const std::string name = apply_layout(t, layout);
      n += tensors_.count(name) > 0 || (also_ok && also_ok(name));
    }
    return n;
  };
  layout_choice out;
  out.found_as_is = found_under(nullptr);
  if (out.found_as_is == tensors.size()) return out;
  std::vector<size_t> found(model_layouts.size());
  for (size_t i = 0; i < model_layouts.size(); ++i) {
    const model_layout& layout = model_layouts[i];
    const size_t n = found[i] = found_under(&layout);
    if (n == tensors.size()) out.ambiguous.push_back(&layout);
    if (n > std::max(out.closest_found, out.found_as_is)) out.closest = &layout, out.closest_found = n;
  }
  // --skip-unmatched: no layout finds every name; the one that finds the most
  // stands (the rest are strays the caller skips)
  if (most_found && out.ambiguous.empty() && out.closest != nullptr)
    for (size_t i = 0; i < model_layouts.size(); ++i)
      if (found[i] == out.closest_found) out.ambiguous.push_back(&model_layouts[i]);
  // layouts that give every name the same rewrite are one answer (a diffusers
  // Flux "transformer." prefix and GPT-2's read alike): the first stands
  auto same_names = [&](const model_layout* x, const model_layout* y) {
    return std::all_of(tensors.begin(), tensors.end(),
                       [&](const std::string& t) { return apply_layout(t, x) == apply_layout(t, y); });
  };
  if (!out.ambiguous.empty())
    out.ambiguous.erase(std::remove_if(out.ambiguous.begin() + 1, out.ambiguous.end(),
                                       [&](const model_layout* l) { return same_names(out.ambiguous.front(), l); }),
                        out.ambiguous.end());
  if (out.ambiguous.size() == 1) {
    out.layout = out.ambiguous.front();
    out.ambiguous.clear();
  }
  return out;
}

name_lookup name_map::find_kohya(const std::string& name) const {
  name_lookup out;
  const std::string_view prefix = kohya::prefix_of(name);
  if (prefix.empty()) return out;
  const std::string key = name.substr(prefix.size());
  out.looked_for = key;
  // the name as it is, then inside each container of its scope
  if (auto it = mangled_.find(key); it != mangled_.end()) {
    out.modules = it->second;
    return out;
  }
  for (size_t i = 0; i < std::size(kohya::containers); ++i) {
    const kohya::container& row = kohya::containers[i];
    if (row.kohya != prefix || (row.base.empty() && row.rename == nullptr)) continue;
    if (row.rename != nullptr) {
      // the module's name in the row's other layout (LDM UNet as diffusers, OpenCLIP as HF CLIP)
      if (auto it = renamed_[i].find(key); it != renamed_[i].end()) {
        out.modules = it->second;
        return out;
      }
      continue;
    }
    auto it = mangled_.find(mangle(row.base) + key);
    if (it == mangled_.end()) continue;
    // only paths truly under the base prefix (the mangled form forgets where the dots were)
    for (const std::string& m : it->second)
      if (m.starts_with(row.base)) out.modules.push_back(m);
    if (!out.modules.empty()) return out;
  }
  return out;
}

}  // namespace lora
