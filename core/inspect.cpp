#include "core/inspect.h"

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <map>

#include <fmt/format.h>

#include "core/diffusers-format.h"
#include "core/fp8.h"
#include "formats/adapter-config.h"
#include "formats/error.h"
#include "formats/model-files.h"

namespace lora {

namespace fs = std::filesystem;

std::string_view inspect_kind_name(inspect_kind k) noexcept {
  switch (k) {
    case inspect_kind::model: return "model";
    case inspect_kind::adapter: return "adapter";
    case inspect_kind::other_adapter: return "other_adapter";
  }
  return "model";
}

namespace {

// Appends one file and its tensors (data order) to the report.
void add_file(inspect_report& r, const safetensors_file& f, const std::string& name) {
  inspect_file info;
  info.name = name;
  info.path = f.path();
  info.bytes = f.file_size();
  info.header_bytes = f.header().header_len;
  info.n_tensors = f.tensors().size();
  info.metadata = f.metadata();
  r.files.push_back(std::move(info));
  for (const tensor_info& t : f.tensors()) {
    r.tensors.push_back({t.name, t.type, t.shape, t.n_elements, t.n_bytes(), name});
    r.n_parameters += t.n_elements;
    r.n_bytes += t.n_bytes();
  }
}

std::vector<std::string> tensor_names(const safetensors_file& f) {
  std::vector<std::string> names;
  names.reserve(f.tensors().size());
  for (const tensor_info& t : f.tensors()) names.push_back(t.name);
  return names;
}

// What read_fp8_model finds in `m` (nullopt: not quantized), with the
// adapter's targets among the FP8 weights counted when `a` is given.
std::optional<inspect_quantization> describe_quantization(const model_files& m, const adapter* a) {
  fp8_model fp8;
  inspect_quantization q;
  try {
    fp8 = read_fp8_model(m);
  } catch (const error& e) {
    if (e.code() != exit_code::invalid_input) throw;
    q.refused = e.what();
    return q;
  }
  if (!fp8.present) {
    // no block scales at all: F8_E4M3 weights as ComfyUI stores Flux
    for (const std::string& n : m.tensor_names)
      if (const tensor_ref* t = m.find_ref(n); t != nullptr && t->info->type == dtype::F8_E4M3) ++q.n_unscaled;
    if (q.n_unscaled == 0) return std::nullopt;
    q.scheme = fp8_unscaled_what;
    if (a)
      for (const lora_module& mod : a->modules)
        if (const tensor_ref* t = m.find_ref(mod.target); t != nullptr && t->info->type == dtype::F8_E4M3) {
          q.refused = fmt::format("{}: {}: {}", t->file->path(), mod.target, fp8_unscaled_message);
          break;
        }
    return q;
  }
  q.scheme = fp8.config_text;
  q.block_rows = fp8.block.rows;
  q.block_cols = fp8.block.cols;
  q.n_scaled = fp8.scales.size();
  if (a) {
    for (const lora_module& mod : a->modules) q.n_adapted += fp8.scale_of(mod.target) != nullptr;
    for (const saved_tensor& s : a->saved)
      if (fp8.scale_of(s.target) != nullptr) {
        q.needs_dtype = fmt::format("{}: {}: {}", s.tensor.file->path(), s.target, fp8_replaced_message);
        break;
      }
  }
  return q;
}

void inspect_model(inspect_report& r, const std::string& path) {
  model_files m = open_model(path);
  r.kind = inspect_kind::model;
  r.config_path = m.config_path;
  if (!m.config_path.empty()) r.model_type = read_model_type(m.config_path);
  r.index_path = m.index_path;
  r.index_total_size = m.index_total_size;
  for (size_t i = 0; i < m.shards.size(); ++i) add_file(r, m.shards[i], m.shard_names[i]);
  r.quantization = describe_quantization(m, nullptr);
  r.pipeline_index_path = m.pipeline_index_path;
  for (const model_component& c : m.components) {
    inspect_component ic{c.name, c.index_name, c.n_shards, 0, 0, 0, {}};
    std::map<std::string, size_t> types;
    for (size_t s = c.first_shard; s < c.first_shard + c.n_shards; ++s)
      for (const tensor_info& t : m.shards[s].tensors()) {
        ++ic.n_tensors;
        ic.n_parameters += t.n_elements;
        ic.n_bytes += t.n_bytes();
        ++types[std::string(dtype_name(t.type))];
      }
    ic.dtype_counts.assign(types.begin(), types.end());
    r.components.push_back(std::move(ic));
  }
}

void inspect_lora(inspect_report& r, const std::string& path, const std::optional<std::string>& base) {
  r.kind = inspect_kind::adapter;
  r.lora = load_adapter(path);
  const adapter& a = *r.lora;
  r.adapter_kind = adapter_kind_name(a);
  add_file(r, *a.file, fs::path(a.weights_path).filename().string());
  if (a.config) r.config_text = a.config->text;
  if (!base) return;

  // fit to the base, then match every module to its base tensor
  model_files b = open_model(*base);
  r.base_path = *base;
  r.fit = fit_adapter(*r.lora, b);
  r.base_quantization = describe_quantization(b, &*r.lora);
  for (const lora_module& mod : r.lora->modules) {
    inspect_base_match match;
    if (auto ref = mod.target.empty() ? std::nullopt : b.find(mod.target)) {
      match.found = true;
      match.shape = ref->info->shape;
      match.type = ref->info->type;
    }
    r.base_matches.push_back(std::move(match));
  }
}

}  // namespace

inspect_report inspect_path(const std::string& path, const std::optional<std::string>& base) {
  inspect_report r;
  r.path = path;
  std::error_code ec;
  if (!fs::exists(path, ec)) throw errors::io(path, "no such file or folder", ENOENT);

  // a folder: a PEFT adapter (adapter_config.json) or a model
  if (fs::is_directory(path, ec)) {
    fs::path config = fs::path(path) / "adapter_config.json";
    const fs::path diffusers_weights = fs::path(path) / diffusers::weights_name;
    if (!fs::exists(config, ec) && fs::exists(diffusers_weights, ec)) {
      // a diffusers LoRA folder: its one file
      inspect_report inner = inspect_path(diffusers_weights.string(), base);
      inner.path = path;
      return inner;
    }
    if (!fs::exists(config, ec)) {
      inspect_model(r, path);
      return r;
    }
    // the one file rule load_adapter follows (core/adapter.h find_adapter_files)
    const std::string weights = find_adapter_files(path).weights;
    safetensors_file f(weights);
    file_classification c = classify_tensors(tensor_names(f));
    if (c.kind == file_kind::other_adapter) {
      r.kind = inspect_kind::other_adapter;
      r.other_description = c.description;
      r.config_text = read_text_file(config.string());
      add_file(r, f, fs::path(weights).filename().string());
      return r;
    }
    inspect_lora(r, path, base);
    return r;
  }

  // an index file names a sharded model
  if (fs::path(path).extension() == ".json") {
    inspect_model(r, path);
    return r;
  }

  // one .safetensors file: judge it by its tensor names
  safetensors_file f(path);
  file_classification c = classify_tensors(tensor_names(f));
  switch (c.kind) {
    case file_kind::peft_lora:
    case file_kind::kohya_lora:
    case file_kind::lycoris:
    case file_kind::diffusers_lora: {
      try {
        inspect_lora(r, path, base);
      } catch (const error& e) {
        // list what cannot be loaded (with a base, the fit needs the load: rethrow)
        if (base || e.code() != exit_code::invalid_input) throw;
        r = inspect_report{};
        r.path = path;
        r.kind = inspect_kind::other_adapter;
        r.other_description =
            fmt::format("{} that does not load: {}{}{}", c.description, e.tensor().empty() ? "" : e.tensor(),
                        e.tensor().empty() ? "" : ": ", e.detail());
        add_file(r, f, fs::path(path).filename().string());
      }
      break;
    }
    case file_kind::other_adapter:
      r.kind = inspect_kind::other_adapter;
      r.other_description = c.description;
      add_file(r, f, fs::path(path).filename().string());
      break;
    case file_kind::model: inspect_model(r, path); break;
  }
  return r;
}

}  // namespace lora
