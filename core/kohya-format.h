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
#include "core/ldm-names.h"

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

// The layout of a single-file diffusion checkpoint, judged from its tensor
// names: the family decides which kohya prefix each network gets.
//   sd1:  LDM (SD 1.x): model.diffusion_model. + cond_stage_model.transformer.
//   sdxl: SGM (SDXL): model.diffusion_model. + conditioner.embedders.{0,1}.
//   flux: BFL (Flux): double_blocks. / single_blocks. (optionally under model.diffusion_model.)
//   other: anything else (diffusers folders, Hugging Face models): auto_prefix.
// The family wins in this order: flux (any BFL block), sdxl (conditioner.embedders.),
// sd1 (cond_stage_model. or an LDM UNet without SGM text encoders), other.
//   diffusers: a diffusers pipeline folder (formats/model-files names its
//   tensors "<component>.<name>"): rows of `containers` only, never detected.
enum class checkpoint_family { other, sd1, sdxl, flux, diffusers };
std::string_view checkpoint_family_name(checkpoint_family f) noexcept;  // "other" | "sd1" | "sdxl" | "flux"
// The family of a checkpoint from its tensor names (every key of the base
// model, any order). Pure; borrows nothing. The key layouts follow
// sd-scripts' library/model_util.py (LDM), library/sdxl_model_util.py (SGM)
// and library/flux_utils.py (BFL).
checkpoint_family detect_checkpoint_family(const std::vector<std::string>& tensor_names);

// One row of the container table: in a checkpoint of `family`, a module under
// `base` (a key prefix) is named `kohya` + the rest with '.' read as '_', the
// rest first renamed by `rename` where sd-scripts names the modules by another
// layout (SD 1.x / 2.x UNet: diffusers names; SDXL's OpenCLIP text encoder:
// Hugging Face CLIP names; core/ldm-names). The one table both directions
// use: extract names modules by it, core/name-map resolves kohya names
// through it.
// Follows sd-scripts (kohya-ss/sd-scripts @ 06e89800): library/model_util.py
// and library/sdxl_model_util.py load these containers into the text
// encoders and UNet that networks/lora.py names (LORA_PREFIX_UNET "lora_unet",
// LORA_PREFIX_TEXT_ENCODER "lora_te", "lora_te1" / "lora_te2" for SDXL);
// networks/lora_flux.py names the BFL modules "lora_unet_" + their path.
struct container {
  checkpoint_family family;
  std::string_view base;
  std::string_view kohya;
  std::string (*rename)(std::string_view) = nullptr;  // "" from it: no such module in that layout
};
inline constexpr container containers[] = {
    {checkpoint_family::sdxl, "model.diffusion_model.", "lora_unet_", nullptr},
    {checkpoint_family::sdxl, "conditioner.embedders.0.transformer.", "lora_te1_", nullptr},
    {checkpoint_family::sdxl, "conditioner.embedders.1.model.", "lora_te2_", open_clip_to_hf},
    {checkpoint_family::sd1, "cond_stage_model.transformer.", "lora_te_", nullptr},
    {checkpoint_family::sd1, "model.diffusion_model.", "lora_unet_", ldm_unet_to_diffusers},
    {checkpoint_family::flux, "model.diffusion_model.", "lora_unet_", nullptr},
    {checkpoint_family::flux, "", "lora_unet_", nullptr},
    // a diffusers pipeline: sd-scripts trains SD 1.x / 2.x on a diffusers
    // UNet and CLIPTextModel and names their modules by diffusers / HF paths
    // (networks/lora.py create_modules); SDXL LoRAs name the UNet by its LDM
    // path (sd-scripts loads SDXL through sdxl_model_util's conversion map)
    // and both text encoders by HF CLIP paths; lora_te3_ is SD3's T5
    // (networks/lora_sd3.py), text_encoder_3/ in its pipeline
    {checkpoint_family::diffusers, "unet.", "lora_unet_", nullptr},
    {checkpoint_family::diffusers, "unet.", "lora_unet_", sdxl_unet_diffusers_to_ldm},
    {checkpoint_family::diffusers, "transformer.", "lora_unet_", nullptr},
    {checkpoint_family::diffusers, "text_encoder.", "lora_te_", nullptr},
    {checkpoint_family::diffusers, "text_encoder.", "lora_te1_", nullptr},
    {checkpoint_family::diffusers, "text_encoder_2.", "lora_te2_", nullptr},
    {checkpoint_family::diffusers, "text_encoder_3.", "lora_te3_", nullptr},
};

// The kohya name sd-scripts gives the module `path` (dotted, no ".weight") of a
// checkpoint of `family`: the first row of `containers` for the family whose
// `base` starts `path`, renamed by its `rename`. Returns "" when no row
// applies (family other, or a path outside every container).
// Throws lora::error (exit 3, naming `label` and the module) for a module the
// row's layout has no name for (an SD 1.x UNet key outside the LDM layout).
std::string checkpoint_name(const std::string& path, checkpoint_family family, const std::string& label);

// True for a key of this format's grammar (".lora_down." / ".lora_up.").
bool is_lora_key(std::string_view key) noexcept;

// Reads a.file (a kohya file) into a.modules: down [r, in(, kh, kw)] paired
// with up [out, r(, 1, 1)], alpha from the ".alpha" scalar (absent or 0: r, so
// the scale is 1, as sd-scripts' LoRAModule), module names left as kohya
// names for fit_adapter to resolve. Throws lora::error (exit 3) naming the
// file and key: no known prefix, an unknown suffix, a missing half, shapes
// that disagree, rank 0, an alpha that is not a finite float scalar, a
// dora_scale without its lora_down / lora_up. A "<module>.dora_scale" (the
// LyCORIS key kohya DoRA files use) is kept in lora_module::dora_scale; its
// shape and values are checked by core/delta. sd-scripts (@ 48d368fa,
// networks/) reads no dora_scale: the semantics are LyCORIS's.
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
