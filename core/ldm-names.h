// Module names of single-file diffusion checkpoints in the names other tools
// give the same modules: the LDM UNet of SD 1.x / 2.x ("input_blocks.1.1.proj_in")
// in diffusers' names ("down_blocks.0.attentions.0.proj_in"), which kohya /
// sd-scripts LoRAs for SD 1.x use, and SDXL's OpenCLIP text encoder
// ("transformer.resblocks.0.mlp.c_fc") in the Hugging Face CLIP names
// sd-scripts converts it to ("text_model.encoder.layers.0.mlp.fc1"). Tables
// for kohya-format's container rows (extract names modules by them, the name
// map resolves kohya names through them).
#pragma once

#include <string>
#include <string_view>

#include "core/fused-rows.h"

namespace lora {

// The diffusers module path of an SD 1.x / 2.x LDM UNet module `path` (below
// `model.diffusion_model.`, no ".weight"), or "" when the path is not a
// module of that layout. Two resnets and one down/upsampler per level
// (layers_per_block 2); resnet parts in_layers.0 -> norm1, in_layers.2 ->
// conv1, emb_layers.1 -> time_emb_proj, out_layers.0 -> norm2, out_layers.3 ->
// conv2, skip_connection -> conv_shortcut; attention blocks keep their inner
// names. Follows sd-scripts library/model_util.py convert_ldm_unet_checkpoint
// and renew_resnet_paths (kohya-ss/sd-scripts commit 48d368fa). Pure.
std::string ldm_unet_to_diffusers(std::string_view path);

// The SDXL LDM (SGM) UNet path of an SDXL diffusers UNet module `path` (below
// a pipeline's `unet.`, no ".weight"), or "" when the path is not a module of
// that layout: the table of sd-scripts library/sdxl_model_util.py
// make_unet_conversion_map (kohya-ss/sd-scripts commit 48d368fa), applied
// as its convert_diffusers_unet_state_dict_to_sdxl applies it (the longest
// table prefix of the path wins): down_blocks.i.resnets.j ->
// input_blocks.(3i+j+1).0 (resnet parts renamed: norm1 -> in_layers.0, ...),
// down_blocks.i.attentions.j -> input_blocks.(3i+j+1).1,
// down_blocks.i.downsamplers.0.conv -> input_blocks.(3i+3).0.op,
// up_blocks.i.resnets.j -> output_blocks.(3i+j).0, up_blocks.i.attentions.j ->
// output_blocks.(3i+j).1, up_blocks.i.upsamplers.0 -> output_blocks.(3i+2).2,
// mid_block, time_embedding, add_embedding (label_emb.0), conv_in, conv_out,
// conv_norm_out. The names SDXL kohya LoRAs use for the UNet
// ("lora_unet_input_blocks_4_1_proj_in"). Pure.
std::string sdxl_unet_diffusers_to_ldm(std::string_view path);

// The SDXL diffusers UNet path of an SGM UNet module `path` (below
// `model.diffusion_model.`, no ".weight"; "input_blocks.4.1.proj_in" ->
// "down_blocks.1.attentions.0.proj_in"), or "" when the path is not a module
// of that layout: the inverse of sdxl_unet_diffusers_to_ldm, the same table
// read the other way as sd-scripts library/sdxl_model_util.py
// convert_sdxl_unet_state_dict_to_diffusers reads it (kohya-ss/sd-scripts
// commit 48d368fa). Pure.
std::string sdxl_unet_ldm_to_diffusers(std::string_view path);

// The Hugging Face CLIPTextModel path of an SD 1.x text encoder module
// `path` (below `cond_stage_model.transformer.`): as it is, with "text_model."
// put before the "embeddings." / "encoder." / "final_layer_norm." of
// checkpoints saved without it (sd-scripts library/model_util.py
// load_checkpoint_with_text_encoder_conversion TEXT_ENCODER_KEY_REPLACEMENTS,
// kohya-ss/sd-scripts commit 48d368fa). Pure.
std::string sd1_clip_to_hf(std::string_view path);

// The Hugging Face CLIPTextModelWithProjection path of an SDXL OpenCLIP text
// encoder module `path` (below `conditioner.embedders.1.model.`):
// transformer.resblocks.N -> text_model.encoder.layers.N, attn.out_proj ->
// self_attn.out_proj, mlp.c_fc -> mlp.fc1, mlp.c_proj -> mlp.fc2; other paths
// as they are. Follows sd-scripts library/sdxl_model_util.py
// convert_sdxl_text_encoder_2_checkpoint. The fused attn.in_proj_weight (q, k,
// v as row thirds) has no module of its own here: open_clip_layouts maps it. Pure.
std::string open_clip_to_hf(std::string_view path);

// SDXL's OpenCLIP text encoder (fused, below "conditioner.embedders.1.model.")
// against Hugging Face CLIPTextModelWithProjection (parts): per layer N,
// transformer.resblocks.N.attn.in_proj_weight / in_proj_bias = [q; k; v] of
// text_model.encoder.layers.N.self_attn.q_proj / k_proj / v_proj (row thirds,
// torch.chunk(w, 3)), and the renames attn.out_proj -> self_attn.out_proj,
// mlp.c_fc -> mlp.fc1, mlp.c_proj -> mlp.fc2. Adapter paths bare or under
// diffusers' "text_encoder_2."; kohya prefix lora_te2_. Only this direction
// (HF-named modules onto an SGM checkpoint). Follows sd-scripts
// library/sdxl_model_util.py convert_sdxl_text_encoder_2_checkpoint (the
// ".attn.in_proj_" chunk into q_proj, k_proj, v_proj; kohya-ss/sd-scripts @ 48d368fa).
extern const fused_layout open_clip_layouts;

}  // namespace lora
