// The kohya / sd-scripts LoRA format: one .safetensors file, keys
// "<prefix><module path with '.' as '_'>.lora_down.weight" / ".lora_up.weight"
// / ".alpha", metadata ss_*. The one place its key grammar (read and write),
// prefixes, scale rule and file rule live. Follows sd-scripts networks/lora.py
// (LoRAModule lines 71-72, LoRANetwork prefixes lines 870-875; kohya-ss/sd-scripts
// commit 48d368fa, 2026-02-16) and
// networks/resize_lora.py for the metadata of a re-ranked file.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/adapter-data.h"
#include "core/adapter.h"

namespace lora::kohya {

// sd-scripts: lora.py (unet, te, te1/te2 for SDXL), lora_flux.py / lora_sd3.py
// (te1 CLIP-L, te2 CLIP-G, te3 T5). None is a prefix of another.
inline constexpr std::string_view prefixes[] = {"lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_"};

// The known prefix `name` starts with, or "" when none. Borrows nothing: the
// result views a static string.
std::string_view prefix_of(std::string_view name) noexcept;

// The kohya name of a dotted module path: prefix + path with '.' read as '_'
// ("lora_unet_" + "down_blocks.0.attentions.0.proj_in"). A name that already
// starts with a kohya prefix is kept. Pure.
std::string module_name(const std::string& path, const std::string& prefix);

// The prefix sd-scripts gives these dotted module paths: lora_unet_ when one
// of them belongs to a diffusion UNet / DiT (root down_blocks, up_blocks,
// mid_block, transformer_blocks, single_transformer_blocks, input_blocks, ...,
// or a path inside an LDM checkpoint's diffusion_model.), else lora_te_ (a
// text encoder / language model). Follows sd-scripts' networks/lora.py
// (LORA_PREFIX_UNET for the UNet and the DiT networks of lora_flux.py / lora_sd3.py).
std::string auto_prefix(const std::vector<std::string>& module_paths);

// A --kohya-prefix option: "auto" or "" -> auto_prefix(module_paths), else one
// of `prefixes`. Throws lora::error (exit 2) for anything else.
std::string resolve_prefix(const std::string& option, const std::vector<std::string>& module_paths);

// True for a key of this format's grammar (".lora_down." / ".lora_up.").
bool is_lora_key(std::string_view key) noexcept;

// Reads a.file (a kohya file) into a.modules: down [r, in(, kh, kw)] paired
// with up [out, r(, 1, 1)], alpha from the ".alpha" scalar (absent or 0: r, so
// the scale is 1, as sd-scripts' LoRAModule), module names left as kohya
// names for fit_adapter to resolve. Throws lora::error (exit 3) naming the
// file and key: no known prefix, an unknown suffix, a missing half, shapes
// that disagree, rank 0, an alpha that is not a finite float scalar,
// dora_scale (kohya DoRA).
void load(adapter& a);

// The value of an ".alpha" tensor `t` of `f`: a finite float scalar of any
// math dtype. Throws lora::error (exit 3) naming f and t otherwise.
double read_alpha(const safetensors_file& f, const tensor_info& t);

// One LoRA module `name` from its lora_down / lora_up / alpha tensors of `f`
// (each may be null; `label` names the file in messages): kind and rank from
// the shapes, alpha absent or 0 read as r (sd-scripts LoRAModule), scale
// alpha / r. Borrows f and the infos. Throws lora::error (exit 3) as load.
// Used by load and by core/lycoris-format for LoCon modules.
lora_module pair(const safetensors_file& f, const std::string& label, const std::string& name, const tensor_info* down,
                 const tensor_info* up, const tensor_info* alpha);

// The keys and tensors of `data` as a kohya file: lora_down = A, lora_up = B,
// alpha a scalar (F32 when it holds the value exactly, else F64). Borrows
// `data`. Throws lora::error (exit 3, naming `label`) for what the format
// cannot hold: rsLoRA, modules_to_save, embedding LoRA, DoRA, lora_B bias.
keyed_tensors tensors(const adapter_data& data, const std::string& label);

// The metadata of a file whose ranks changed: sd-scripts' ss_network_dim /
// ss_network_alpha ("Dynamic" when they vary, as resize_lora.py writes), the
// model hashes (sshs_*) dropped because they no longer hold, ss_network_module
// "networks.lora" when absent. Pure.
metadata_map metadata_after_rerank(const std::optional<metadata_map>& in, const std::vector<module_data>& modules);

}  // namespace lora::kohya
