#include "core/name-map.h"

#include <algorithm>

#include "core/kohya-format.h"

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
    {"a diffusers pipeline component's own file (no unet. / transformer. / text_encoder(_2). prefix)",
     {{"unet.", ""}, {"transformer.", ""}, {"text_encoder.", ""}, {"text_encoder_2.", ""}}},
};

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

}  // namespace

name_map::name_map(const std::vector<std::string>& base_tensor_names) {
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
}

layout_choice name_map::choose_layout(const std::vector<std::string>& tensors,
                                      const std::function<bool(const std::string&)>& also_ok) const {
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
  for (const model_layout& layout : model_layouts) {
    const size_t n = found_under(&layout);
    if (n == tensors.size()) out.ambiguous.push_back(&layout);
    if (n > std::max(out.closest_found, out.found_as_is)) out.closest = &layout, out.closest_found = n;
  }
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
