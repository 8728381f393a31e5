// Flux's two checkpoint layouts: Black Forest Labs' (the reference code's
// names, which single-file checkpoints, ComfyUI and sd-scripts' LoRAs use:
// "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1") and diffusers'
// FluxTransformer2DModel ("transformer_blocks.0.attn.to_q",
// "single_transformer_blocks.0.proj_mlp"), as one table for core/name-map.
#pragma once

#include "core/fused-rows.h"

namespace lora {

// Flux BFL (fused) <-> diffusers (parts), every module either names:
//   double_blocks.N.img_attn.qkv   = [attn.to_q; attn.to_k; attn.to_v]            (thirds)
//   double_blocks.N.txt_attn.qkv   = [attn.add_q_proj; add_k_proj; add_v_proj]    (thirds)
//   single_blocks.N.linear1        = [attn.to_q; attn.to_k; attn.to_v; proj_mlp] (hidden, hidden, hidden, rest)
//   img_attn.proj <-> attn.to_out.0, txt_attn.proj <-> attn.to_add_out, img_mlp.0 / .2 <-> ff.net.0.proj /
//   ff.net.2, txt_mlp.* <-> ff_context.*, img_mod.lin <-> norm1.linear, txt_mod.lin <-> norm1_context.linear,
//   single linear2 <-> proj_out, modulation.lin <-> norm.linear; time_in / vector_in / guidance_in
//   in_layer, out_layer <-> time_text_embed.{timestep,text,guidance}_embedder.linear_1 / linear_2,
//   txt_in <-> context_embedder, img_in <-> x_embedder, final_layer.linear <-> proj_out,
//   final_layer.adaLN_modulation.1 = norm_out.linear with its halves swapped (shift, scale).
// BFL bases bare or under ComfyUI's "model.diffusion_model."; diffusers
// bases bare (the transformer's own file) or under "transformer." (a
// pipeline folder, formats/model-files: "<component>.<name>"); adapter paths
// bare (PEFT) or under diffusers' "transformer."; kohya prefix lora_unet_.
// Follows diffusers src/diffusers/loaders/single_file_utils.py
// convert_flux_transformer_checkpoint_to_diffusers (huggingface/diffusers
// @ 58eb52c0), ComfyUI comfy/utils.py flux_to_diffusers (the same table, the
// q / k / v / mlp row offsets) and sd-scripts networks/flux_merge_lora.py
// (kohya-ss/sd-scripts @ 48d368fa).
extern const fused_layout flux_layouts;

}  // namespace lora
