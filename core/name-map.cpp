#include "core/name-map.h"

#include <algorithm>

#include "core/kohya-format.h"

namespace lora {

// Single-file checkpoints nest the networks sd-scripts names directly:
// sd-scripts strips these prefixes when it loads a checkpoint
// (library/model_util.py for SD 1.x, library/sdxl_model_util.py for SDXL;
// kohya-ss/sd-scripts commit 48d368fa), so a kohya name may match the key
// without them. ComfyUI keeps Flux / SD3 under model.diffusion_model. too.
const std::vector<layout_prefix> layout_prefixes = {
    {"lora_unet_", "", "model.diffusion_model."},               // SDXL (LDM names), Flux / SD3 in ComfyUI files
    {"lora_te_", "", "cond_stage_model.transformer."},          // SD 1.x checkpoint, CLIP text model
    {"lora_te1_", "", "conditioner.embedders.0.transformer."},  // SDXL checkpoint, CLIP-L text model
    // diffusers LoRA files name the pipeline component (core/diffusers-format):
    // a base that is that component's own file has no such prefix
    {"", "unet.", ""},
    {"", "transformer.", ""},
    {"", "text_encoder.", ""},
    {"", "text_encoder_2.", ""},
};

namespace {

std::string mangle(std::string_view path) {
  std::string out(path);
  std::replace(out.begin(), out.end(), '.', '_');
  return out;
}

}  // namespace

name_map::name_map(const std::vector<std::string>& base_tensor_names) {
  for (const std::string& n : base_tensor_names) {
    if (!n.ends_with(".weight") || n.size() == 7) continue;
    std::string module = n.substr(0, n.size() - 7);
    mangled_[mangle(module)].push_back(module);
    modules_.insert(std::move(module));
  }
}

name_lookup name_map::find_path(const std::string& path) const {
  name_lookup out;
  out.looked_for = path;
  if (modules_.count(path)) {
    out.modules.push_back(path);
    return out;
  }
  for (const layout_prefix& row : layout_prefixes) {
    if (!row.scope.empty() || !path.starts_with(row.adapter)) continue;
    const std::string candidate = std::string(row.base) + path.substr(row.adapter.size());
    if (modules_.count(candidate)) {
      out.modules.push_back(candidate);
      return out;
    }
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
  for (const layout_prefix& row : layout_prefixes) {
    const std::string from = mangle(row.adapter);
    if (row.scope != prefix || !key.starts_with(from)) continue;
    auto it = mangled_.find(mangle(row.base) + key.substr(from.size()));
    if (it == mangled_.end()) continue;
    // only paths truly under the base prefix (the mangled form forgets where the dots were)
    for (const std::string& m : it->second)
      if (m.starts_with(row.base)) out.modules.push_back(m);
    if (!out.modules.empty()) return out;
  }
  return out;
}

}  // namespace lora
