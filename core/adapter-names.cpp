#include "core/adapter-names.h"

#include <algorithm>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "formats/error.h"

namespace lora {

std::string_view kohya_prefix_of(std::string_view name) noexcept {
  for (std::string_view p : kohya_prefixes)
    if (name.starts_with(p)) return p;
  return {};
}

std::string kohya_module_name(const std::string& name, const std::string& prefix) {
  if (!kohya_prefix_of(name).empty()) return name;
  std::string out = prefix + name;
  std::replace(out.begin() + static_cast<std::ptrdiff_t>(prefix.size()), out.end(), '.', '_');
  return out;
}

std::string auto_kohya_prefix(const std::vector<std::string>& module_paths) {
  static const std::set<std::string, std::less<>> unet_roots = {
      "down_blocks",     "up_blocks",        "mid_block",          "conv_in",
      "conv_out",        "time_embedding",   "add_embedding",      "input_blocks",
      "middle_block",    "output_blocks",    "transformer_blocks", "single_transformer_blocks",
      "time_text_embed", "context_embedder", "x_embedder",         "proj_out",
      "norm_out",        "conv_norm_out",    "diffusion_model"};
  for (const std::string& path : module_paths) {
    const std::string_view root = std::string_view(path).substr(0, path.find('.'));
    if (unet_roots.count(root) || path.find("diffusion_model.") != std::string::npos) return "lora_unet_";
  }
  return "lora_te_";
}

std::string resolve_kohya_prefix(const std::string& option, const std::vector<std::string>& module_paths) {
  if (option.empty() || option == "auto") return auto_kohya_prefix(module_paths);
  if (std::find(std::begin(kohya_prefixes), std::end(kohya_prefixes), option) == std::end(kohya_prefixes))
    throw errors::usage(
        fmt::format("--kohya-prefix {} is not one of auto, {}", option, fmt::join(kohya_prefixes, ", ")));
  return option;
}

}  // namespace lora
