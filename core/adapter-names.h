// The names adapter formats give a module: PEFT's key prefix and kohya /
// sd-scripts' prefixes and module names. The one place these spellings live;
// the loader (core/adapter), the writer (core/adapter-write) and the commands
// that choose an output prefix (extract, convert, resize, combine) ask it.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace lora {

// PEFT saves every key as "base_model.model.<module path>.<suffix>".
inline constexpr std::string_view peft_prefix = "base_model.model.";

// sd-scripts: lora.py (unet, te, te1/te2 for SDXL), lora_flux.py / lora_sd3.py
// (te1 CLIP-L, te2 CLIP-G, te3 T5). None is a prefix of another.
inline constexpr std::string_view kohya_prefixes[] = {"lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_"};

// The known kohya prefix `name` starts with, or "" when none. Borrows nothing:
// the result views a static string.
std::string_view kohya_prefix_of(std::string_view name) noexcept;

// The kohya name of a dotted module path: prefix + path with '.' read as '_'
// ("lora_unet_" + "down_blocks.0.attentions.0.proj_in"). A name that already
// starts with a kohya prefix is kept. Pure.
std::string kohya_module_name(const std::string& name, const std::string& prefix);

// The prefix sd-scripts gives these dotted module paths: lora_unet_ when one
// of them belongs to a diffusion UNet / DiT (root down_blocks, up_blocks,
// mid_block, transformer_blocks, single_transformer_blocks, input_blocks, ...,
// or a path inside an LDM checkpoint's diffusion_model.), else lora_te_ (a
// text encoder / language model). Follows sd-scripts' networks/lora.py
// (LORA_PREFIX_UNET for the UNet and the DiT networks of lora_flux.py / lora_sd3.py).
std::string auto_kohya_prefix(const std::vector<std::string>& module_paths);

// A --kohya-prefix option: "auto" or "" -> auto_kohya_prefix(module_paths),
// else one of kohya_prefixes. Throws lora::error (exit 2) for anything else.
std::string resolve_kohya_prefix(const std::string& option, const std::vector<std::string>& module_paths);

}  // namespace lora
