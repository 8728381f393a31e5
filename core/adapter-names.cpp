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

std::string_view checkpoint_family_name(checkpoint_family f) noexcept {
  switch (f) {
    case checkpoint_family::sd1: return "sd1";
    case checkpoint_family::sdxl: return "sdxl";
    case checkpoint_family::flux: return "flux";
    case checkpoint_family::other: break;
  }
  return "other";
}

checkpoint_family detect_checkpoint_family(const std::vector<std::string>& tensor_names) {
  bool ldm_unet = false, sd1_te = false, sgm_te = false, bfl = false;
  for (const std::string& n : tensor_names) {
    std::string_view v = n;
    if (v.starts_with("conditioner.embedders.")) sgm_te = true;
    if (v.starts_with("cond_stage_model.")) sd1_te = true;
    if (v.starts_with("model.diffusion_model.")) {
      v.remove_prefix(std::string_view("model.diffusion_model.").size());
      if (v.starts_with("input_blocks.") || v.starts_with("middle_block.") || v.starts_with("output_blocks."))
        ldm_unet = true;
    }
    if (v.starts_with("double_blocks.") || v.starts_with("single_blocks.")) bfl = true;
  }
  if (bfl) return checkpoint_family::flux;
  if (sgm_te) return checkpoint_family::sdxl;
  if (sd1_te || ldm_unet) return checkpoint_family::sd1;
  return checkpoint_family::other;
}

std::string kohya_checkpoint_name(const std::string& path, checkpoint_family family, const std::string& label) {
  for (const kohya_container& c : kohya_containers) {
    if (c.family != family || !path.starts_with(c.base)) continue;
    if (c.kohya.empty())
      throw errors::invalid(
          label, path,
          fmt::format("--format kohya: sd-scripts names {} UNet modules by their diffusers names, and "
                      "the LDM -> diffusers module map is not there yet (use --format peft)",
                      checkpoint_family_name(family)));
    std::string rest = path.substr(c.base.size());
    if (c.kohya == "lora_te2_") {
      // OpenCLIP -> CLIPTextModelWithProjection names, as sd-scripts loads them
      constexpr std::pair<std::string_view, std::string_view> renames[] = {{"transformer.", "text_model.encoder."},
                                                                           {".resblocks.", ".layers."},
                                                                           {".attn.out_proj", ".self_attn.out_proj"},
                                                                           {".mlp.c_fc", ".mlp.fc1"},
                                                                           {".mlp.c_proj", ".mlp.fc2"}};
      for (const auto& [from, to] : renames) {
        const size_t at = from == "transformer." ? (rest.starts_with(from) ? 0 : std::string::npos) : rest.find(from);
        if (at != std::string::npos) rest.replace(at, from.size(), to);
      }
    }
    return kohya_module_name(rest, std::string(c.kohya));
  }
  return {};
}

}  // namespace lora
