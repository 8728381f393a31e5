// The diffusers LoRA format: one pytorch_lora_weights.safetensors (alone or
// in a folder), no adapter_config.json. Keys name the pipeline component,
// then the module path inside it:
//   "unet.<path>.lora_A.weight" / ".lora_B.weight" (also "transformer.",
//   "text_encoder.", "text_encoder_2."), and the older forms diffusers
//   converts when it loads them: "<path>.lora.down.weight" / ".lora.up.weight",
//   attention processors "<path>.processor.to_q_lora.down.weight" (to_k, to_v,
//   to_out -> to_out.0), text-encoder "<path>.to_q_lora.up.weight" (-> q_proj,
//   ..., to_out -> out_proj) and ".lora_linear_layer.up/down.weight".
// A key without a component prefix (the attention-processor files of
// UNet2DConditionModel.save_attn_procs) belongs to the UNet.
//
// Follows huggingface/diffusers @ 58eb52c0 (2026-08-23):
// utils/state_dict_utils.py (KEYS_TO_ALWAYS_REPLACE ".processor." -> ".",
// UNET_TO_DIFFUSERS for the UNet / transformer, DIFFUSERS_OLD_TO_PEFT and
// DIFFUSERS_TO_PEFT for text encoders; the first matching pattern wins) and
// the scale of loaders/peft.py load_lora_adapter + utils/peft_utils.py
// get_peft_kwargs: without network alphas lora_alpha = r for every module
// (s = 1); with them (lora_pipeline.py FluxLoraLoaderMixin.lora_state_dict
// pops every "<module>.alpha" key as one) lora_alpha / alpha_pattern give
// each module its alpha: s = alpha / r. (StableDiffusionLoraLoaderMixin
// refuses a file with ".alpha" keys: they lack "lora"; we read them as Flux
// does.)
// Module names keep the component prefix ("unet.down_blocks.0...."); the
// name map (core/name-map model_layouts) strips it for a base that is one
// component's file (a UNet diffusion_pytorch_model.safetensors, a text
// encoder's model.safetensors).
#pragma once

#include <string_view>
#include <vector>

#include "core/adapter.h"

namespace lora::diffusers {

// The weights file of a diffusers LoRA folder.
inline constexpr std::string_view weights_name = "pytorch_lora_weights.safetensors";

// The pipeline components whose prefix a key may carry.
inline constexpr std::string_view components[] = {"unet", "transformer", "text_encoder", "text_encoder_2"};

// True when `names` are a diffusers LoRA file: a key of an older form (above),
// or a lora_A / lora_B key whose first component is one of `components`.
bool is_diffusers_file(const std::vector<std::string>& names) noexcept;

// Reads a.file (a diffusers LoRA file) into a.modules: every key converted as
// diffusers converts it, lora_A [r, in(, kh, kw)] paired with lora_B
// [out, r(, 1, 1)], rank from the shapes, alpha from "<module>.alpha" or r.
// Throws lora::error (exit 3) naming the file and key: an unknown key, a
// missing half, shapes that disagree, an alpha without its pair or not a
// finite float scalar, dora_scale / lora_magnitude_vector (DoRA: not read yet),
// lora_adapter_metadata in the file's metadata (not read yet).
void load(adapter& a);

}  // namespace lora::diffusers
