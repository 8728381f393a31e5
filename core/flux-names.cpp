#include "core/flux-names.h"

namespace lora {

namespace {

constexpr std::string_view dbl = "double_blocks.", dbl_d = "transformer_blocks.";
constexpr std::string_view sgl = "single_blocks.", sgl_d = "single_transformer_blocks.";

}  // namespace

// one row per group
// clang-format off
const fused_layout flux_layouts = {
    "Flux BFL <-> diffusers",
    {"", "model.diffusion_model."},
    {"", "transformer."},  // a diffusers transformer file, or a pipeline folder's transformer/ component
    {"transformer.", ""},
    "lora_unet_",
    false,  // lora_flux.py names the fused modules (lora_unet_double_blocks_0_img_attn_qkv)
    {
        // double blocks: q / k / v thirds, then renames
        {dbl, dbl_d, "img_attn.qkv.weight", "img_attn.qkv.bias", {"attn.to_q", "attn.to_k", "attn.to_v"},
         row_split::equal},
        {dbl, dbl_d, "txt_attn.qkv.weight", "txt_attn.qkv.bias",
         {"attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"}, row_split::equal},
        {dbl, dbl_d, "img_attn.proj.weight", "img_attn.proj.bias", {"attn.to_out.0"}, row_split::whole},
        {dbl, dbl_d, "txt_attn.proj.weight", "txt_attn.proj.bias", {"attn.to_add_out"}, row_split::whole},
        {dbl, dbl_d, "img_mlp.0.weight", "img_mlp.0.bias", {"ff.net.0.proj"}, row_split::whole},
        {dbl, dbl_d, "img_mlp.2.weight", "img_mlp.2.bias", {"ff.net.2"}, row_split::whole},
        {dbl, dbl_d, "txt_mlp.0.weight", "txt_mlp.0.bias", {"ff_context.net.0.proj"}, row_split::whole},
        {dbl, dbl_d, "txt_mlp.2.weight", "txt_mlp.2.bias", {"ff_context.net.2"}, row_split::whole},
        {dbl, dbl_d, "img_mod.lin.weight", "img_mod.lin.bias", {"norm1.linear"}, row_split::whole},
        {dbl, dbl_d, "txt_mod.lin.weight", "txt_mod.lin.bias", {"norm1_context.linear"}, row_split::whole},
        // single blocks: linear1 = [q; k; v; mlp] (hidden rows each, the mlp the rest), then renames
        {sgl, sgl_d, "linear1.weight", "linear1.bias", {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"},
         row_split::cols_then_rest},
        {sgl, sgl_d, "linear2.weight", "linear2.bias", {"proj_out"}, row_split::whole},
        {sgl, sgl_d, "modulation.lin.weight", "modulation.lin.bias", {"norm.linear"}, row_split::whole},
        // outside the blocks
        {"", "", "time_in.in_layer.weight", "time_in.in_layer.bias", {"time_text_embed.timestep_embedder.linear_1"},
         row_split::whole},
        {"", "", "time_in.out_layer.weight", "time_in.out_layer.bias", {"time_text_embed.timestep_embedder.linear_2"},
         row_split::whole},
        {"", "", "vector_in.in_layer.weight", "vector_in.in_layer.bias", {"time_text_embed.text_embedder.linear_1"},
         row_split::whole},
        {"", "", "vector_in.out_layer.weight", "vector_in.out_layer.bias", {"time_text_embed.text_embedder.linear_2"},
         row_split::whole},
        {"", "", "guidance_in.in_layer.weight", "guidance_in.in_layer.bias",
         {"time_text_embed.guidance_embedder.linear_1"}, row_split::whole},
        {"", "", "guidance_in.out_layer.weight", "guidance_in.out_layer.bias",
         {"time_text_embed.guidance_embedder.linear_2"}, row_split::whole},
        {"", "", "txt_in.weight", "txt_in.bias", {"context_embedder"}, row_split::whole},
        {"", "", "img_in.weight", "img_in.bias", {"x_embedder"}, row_split::whole},
        {"", "", "final_layer.linear.weight", "final_layer.linear.bias", {"proj_out"}, row_split::whole},
        {"", "", "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias", {"norm_out.linear"},
         row_split::swap_halves},
    },
};
// clang-format on

}  // namespace lora
