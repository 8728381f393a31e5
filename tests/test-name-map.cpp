// core/name-map: which base module an adapter module changes; and the format
// modules' key grammars read back what they write.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "core/kohya-format.h"
#include "core/ldm-names.h"
#include "core/name-map.h"
#include "core/peft-format.h"

using namespace lora;

TEST_CASE("dotted paths: as they are when every target is found; no layout is tried") {
  const name_map names({"model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"});
  const layout_choice c = names.choose_layout({"model.layers.0.self_attn.q_proj.weight", "lm_head.weight"});
  CHECK(c.layout == nullptr);
  CHECK(c.ambiguous.empty());
  CHECK(c.found_as_is == 2);
  CHECK(names.has_tensor("model.norm.weight"));
  CHECK_FALSE(names.has_tensor("model.norm"));
}

TEST_CASE("dotted paths: GPT2LMHeadModel names onto the hub's bare GPT2Model checkpoint, and the reverse") {
  const name_map bare({"wte.weight", "h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "ln_f.weight"});
  const layout_choice c =
      bare.choose_layout({"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"});
  REQUIRE(c.layout != nullptr);
  CHECK(std::string(c.layout->name) == "bare GPT2Model checkpoint (no transformer. prefix)");
  CHECK(apply_layout("transformer.h.0.attn.c_attn.weight", c.layout) == "h.0.attn.c_attn.weight");
  CHECK(apply_layout("transformer.h.0.attn.c_attn", c.layout) == "h.0.attn.c_attn");

  const name_map full({"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "lm_head.weight"});
  const layout_choice r = full.choose_layout({"h.0.attn.c_attn.weight", "wte.weight"});
  REQUIRE(r.layout != nullptr);
  CHECK(apply_layout("wte.weight", r.layout) == "transformer.wte.weight");
}

TEST_CASE("dotted paths: LlamaModel adapters onto LlamaForCausalLM files and the reverse") {
  const name_map causal({"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"});
  const layout_choice c = causal.choose_layout({"layers.0.self_attn.q_proj.weight", "embed_tokens.weight"});
  REQUIRE(c.layout != nullptr);
  CHECK(apply_layout("layers.0.self_attn.q_proj.weight", c.layout) == "model.layers.0.self_attn.q_proj.weight");
  CHECK(apply_layout("lm_head.weight", c.layout) == "lm_head.weight");  // the head stays where it is

  const name_map bare({"embed_tokens.weight", "layers.0.self_attn.q_proj.weight"});
  const layout_choice r = bare.choose_layout({"model.layers.0.self_attn.q_proj.weight"});
  REQUIRE(r.layout != nullptr);
  CHECK(apply_layout("model.layers.0.self_attn.q_proj.weight", r.layout) == "layers.0.self_attn.q_proj.weight");
}

TEST_CASE("dotted paths: multimodal checkpoints (transformers 4.52 _checkpoint_conversion_mapping)") {
  // Gemma 3 / LLaVA on disk: language_model.model.*, language_model.lm_head; adapters saved by
  // current transformers: model.language_model.*, lm_head
  const name_map disk({"language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight",
                       "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"});
  const layout_choice c =
      disk.choose_layout({"model.language_model.layers.0.self_attn.q_proj.weight", "lm_head.weight"});
  REQUIRE(c.layout != nullptr);
  CHECK(apply_layout("model.language_model.layers.0.self_attn.q_proj.weight", c.layout) ==
        "language_model.model.layers.0.self_attn.q_proj.weight");
  CHECK(apply_layout("lm_head.weight", c.layout) == "language_model.lm_head.weight");
  // Qwen2-VL on disk: model.layers.*, visual.*
  const name_map qwen({"model.layers.0.self_attn.q_proj.weight", "visual.blocks.0.attn.qkv.weight"});
  const layout_choice q = qwen.choose_layout(
      {"model.language_model.layers.0.self_attn.q_proj.weight", "model.visual.blocks.0.attn.qkv.weight"});
  REQUIRE(q.layout != nullptr);
  CHECK(apply_layout("model.visual.blocks.0.attn.qkv.weight", q.layout) == "visual.blocks.0.attn.qkv.weight");
}

TEST_CASE("dotted paths: a layout applies only when every target fits; two that fit are named") {
  // one of the two targets is found under the GPT-2 layout: nothing is applied, the closest is told
  const name_map bare({"h.0.attn.c_attn.weight"});
  const layout_choice partial =
      bare.choose_layout({"transformer.h.0.attn.c_attn.weight", "transformer.h.9.mlp.weight"});
  CHECK(partial.layout == nullptr);
  REQUIRE(partial.closest != nullptr);
  CHECK(partial.closest_found == 1);
  CHECK(partial.found_as_is == 0);
  // a base holding both spellings: the bare-GPT2Model layout (a.weight) and the
  // LlamaForCausalLM layout (model.transformer.a.weight) both fit: neither is chosen
  const name_map both({"a.weight", "model.transformer.a.weight"});
  const layout_choice two = both.choose_layout({"transformer.a.weight"});
  CHECK(two.layout == nullptr);
  REQUIRE(two.ambiguous.size() == 2);
  CHECK(std::string(two.ambiguous[0]->name) == "bare GPT2Model checkpoint (no transformer. prefix)");
  CHECK(std::string(two.ambiguous[1]->name) == "LlamaForCausalLM-style checkpoint (model. prefix)");
}

TEST_CASE("kohya names: the name as it is first, then inside its scope's containers only") {
  const name_map names({
      "down_blocks.0.attentions.0.proj_in.weight",                                       // diffusers UNet
      "model.diffusion_model.input_blocks.1.1.proj_in.weight",                           // LDM / SGM UNet
      "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",         // SD 1.x CLIP
      "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc2.weight",  // SDXL CLIP-L
  });
  CHECK(names.find_kohya("lora_unet_down_blocks_0_attentions_0_proj_in").modules ==
        std::vector<std::string>{"down_blocks.0.attentions.0.proj_in"});
  CHECK(names.find_kohya("lora_unet_input_blocks_1_1_proj_in").modules ==
        std::vector<std::string>{"model.diffusion_model.input_blocks.1.1.proj_in"});
  CHECK(names.find_kohya("lora_te_text_model_encoder_layers_0_mlp_fc1").modules ==
        std::vector<std::string>{"cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1"});
  CHECK(names.find_kohya("lora_te1_text_model_encoder_layers_0_mlp_fc2").modules ==
        std::vector<std::string>{"conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc2"});
  // a container belongs to one scope: lora_te_ does not look inside the SDXL CLIP-L container
  CHECK(names.find_kohya("lora_te_text_model_encoder_layers_0_mlp_fc2").modules.empty());
  // without a known prefix nothing matches
  CHECK(names.find_kohya("lora_x_down_blocks_0_attentions_0_proj_in").modules.empty());
  const name_lookup missing = names.find_kohya("lora_unet_mid_block_proj_in");
  CHECK(missing.modules.empty());
  CHECK(missing.looked_for == "mid_block_proj_in");
}

TEST_CASE("kohya names: two base modules that read alike are both returned (the caller reports ambiguity)") {
  const name_map names({"a.b_c.weight", "a_b.c.weight"});
  const name_lookup both = names.find_kohya("lora_te_a_b_c");
  CHECK(both.modules.size() == 2);
}

TEST_CASE("the container table: every row names a known kohya prefix (or none: not mapped yet)") {
  for (const kohya::container& row : kohya::containers)
    CHECK((row.kohya.empty() || kohya::prefix_of(row.kohya) == row.kohya));
}

TEST_CASE("diffusers LoRA paths: the component prefix is dropped for one component's file") {
  const name_map unet({"down_blocks.0.attentions.0.proj_in.weight", "text_model.final_layer_norm.weight"});
  const layout_choice c = unet.choose_layout(
      {"unet.down_blocks.0.attentions.0.proj_in.weight", "text_encoder.text_model.final_layer_norm.weight"});
  REQUIRE(c.layout != nullptr);
  CHECK(apply_layout("unet.down_blocks.0.attentions.0.proj_in.weight", c.layout) ==
        "down_blocks.0.attentions.0.proj_in.weight");
  CHECK(apply_layout("text_encoder.text_model.final_layer_norm.weight", c.layout) ==
        "text_model.final_layer_norm.weight");
  // a base that keeps the prefix matches as it is
  const name_map whole({"unet.conv_in.weight", "conv_in.weight"});
  const layout_choice w = whole.choose_layout({"unet.conv_in.weight"});
  CHECK(w.layout == nullptr);
  CHECK(w.ambiguous.empty());
  // a diffusers Flux "transformer." prefix reads as GPT-2's does: the same names, one answer, not an ambiguity
  const name_map flux({"transformer_blocks.0.attn.to_q.weight"});
  const layout_choice f = flux.choose_layout({"transformer.transformer_blocks.0.attn.to_q.weight"});
  REQUIRE(f.layout != nullptr);
  CHECK(f.ambiguous.empty());
  CHECK(apply_layout("transformer.transformer_blocks.0.attn.to_q.weight", f.layout) ==
        "transformer_blocks.0.attn.to_q.weight");
}

TEST_CASE("PEFT keys: what the writer names, the reader's grammar recognises") {
  CHECK(peft::key("model.layers.0.mlp.up_proj", peft::role::a) ==
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight");
  CHECK(peft::key("m", peft::role::b) == "base_model.model.m.lora_B.weight");
  CHECK(peft::key("m", peft::role::bias) == "base_model.model.m.lora_B.bias");
  CHECK(peft::key("m", peft::role::embedding_a) == "base_model.model.m.lora_embedding_A");
  CHECK(peft::key("m", peft::role::magnitude) == "base_model.model.m.lora_magnitude_vector");
  CHECK(peft::saved_key("score.weight") == "base_model.model.score.weight");
  for (peft::role r : {peft::role::a, peft::role::b, peft::role::embedding_a, peft::role::embedding_b,
                       peft::role::magnitude, peft::role::bias})
    CHECK(peft::is_lora_key(peft::key("model.x", r)));
  CHECK_FALSE(peft::is_lora_key(peft::saved_key("score.weight")));
  CHECK(peft::exact_pattern("model.layers.0.q") == "model\\.layers\\.0\\.q");
}

TEST_CASE("kohya keys: module names round-trip through the name map") {
  const std::string path = "transformer_blocks.0.attn.to_q";
  const std::string name = kohya::module_name(path, kohya::auto_prefix({path}));
  CHECK(name == "lora_unet_transformer_blocks_0_attn_to_q");
  CHECK(kohya::is_lora_key(name + ".lora_down.weight"));
  const name_map names({path + ".weight"});
  CHECK(names.find_kohya(name).modules == std::vector<std::string>{path});
}

TEST_CASE("LDM UNet (SD 1.x / 2.x) module names in diffusers' names, as sd-scripts converts them") {
  CHECK(ldm_unet_to_diffusers("input_blocks.0.0") == "conv_in");
  CHECK(ldm_unet_to_diffusers("time_embed.0") == "time_embedding.linear_1");
  CHECK(ldm_unet_to_diffusers("time_embed.2") == "time_embedding.linear_2");
  CHECK(ldm_unet_to_diffusers("out.0") == "conv_norm_out");
  CHECK(ldm_unet_to_diffusers("out.2") == "conv_out");
  // down: (index - 1) / 3 is the level, (index - 1) % 3 the layer; layer 2 is the downsampler
  CHECK(ldm_unet_to_diffusers("input_blocks.1.0.in_layers.2") == "down_blocks.0.resnets.0.conv1");
  CHECK(ldm_unet_to_diffusers("input_blocks.2.1.transformer_blocks.0.attn2.to_k") ==
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k");
  CHECK(ldm_unet_to_diffusers("input_blocks.3.0.op") == "down_blocks.0.downsamplers.0.conv");
  CHECK(ldm_unet_to_diffusers("input_blocks.4.0.skip_connection") == "down_blocks.1.resnets.0.conv_shortcut");
  CHECK(ldm_unet_to_diffusers("input_blocks.11.0.emb_layers.1") == "down_blocks.3.resnets.1.time_emb_proj");
  // middle: resnet, attention, resnet
  CHECK(ldm_unet_to_diffusers("middle_block.0.out_layers.3") == "mid_block.resnets.0.conv2");
  CHECK(ldm_unet_to_diffusers("middle_block.1.proj_in") == "mid_block.attentions.0.proj_in");
  CHECK(ldm_unet_to_diffusers("middle_block.2.in_layers.0") == "mid_block.resnets.1.norm1");
  // up: index / 3 the level, index % 3 the layer; the upsampler is .1 without attention, .2 with it
  CHECK(ldm_unet_to_diffusers("output_blocks.0.0.out_layers.0") == "up_blocks.0.resnets.0.norm2");
  CHECK(ldm_unet_to_diffusers("output_blocks.2.1.conv") == "up_blocks.0.upsamplers.0.conv");
  CHECK(ldm_unet_to_diffusers("output_blocks.5.1.proj_out") == "up_blocks.1.attentions.2.proj_out");
  CHECK(ldm_unet_to_diffusers("output_blocks.5.2.conv") == "up_blocks.1.upsamplers.0.conv");
  CHECK(ldm_unet_to_diffusers("output_blocks.11.1.transformer_blocks.0.ff.net.2") ==
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2");
  // not modules of the layout
  CHECK(ldm_unet_to_diffusers("input_blocks.1.0.unknown") == "");
  CHECK(ldm_unet_to_diffusers("label_emb.0.0") == "");
  CHECK(ldm_unet_to_diffusers("input_blocks.x.0.op") == "");
}

TEST_CASE("kohya SD 1.x names resolve into an LDM single file through the same table") {
  const name_map names({"model.diffusion_model.input_blocks.1.1.proj_in.weight",
                        "model.diffusion_model.output_blocks.2.1.conv.weight",
                        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
                        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"});
  CHECK(names.find_kohya("lora_unet_down_blocks_0_attentions_0_proj_in").modules ==
        std::vector<std::string>{"model.diffusion_model.input_blocks.1.1.proj_in"});
  CHECK(names.find_kohya("lora_unet_up_blocks_0_upsamplers_0_conv").modules ==
        std::vector<std::string>{"model.diffusion_model.output_blocks.2.1.conv"});
  CHECK(names.find_kohya("lora_unet_mid_block_resnets_1_time_emb_proj").modules ==
        std::vector<std::string>{"model.diffusion_model.middle_block.2.emb_layers.1"});
  CHECK(names.find_kohya("lora_te_text_model_encoder_layers_0_mlp_fc1").modules ==
        std::vector<std::string>{"cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1"});
  // extract's names are the ones merge resolves
  const std::string path = "model.diffusion_model.input_blocks.1.1.proj_in";
  CHECK(names.find_kohya(kohya::checkpoint_name(path, kohya::checkpoint_family::sd1, "x")).modules ==
        std::vector<std::string>{path});
}

TEST_CASE("SDXL OpenCLIP (te2) names in Hugging Face CLIP names, both directions") {
  CHECK(open_clip_to_hf("transformer.resblocks.3.mlp.c_fc") == "text_model.encoder.layers.3.mlp.fc1");
  CHECK(open_clip_to_hf("transformer.resblocks.3.attn.out_proj") == "text_model.encoder.layers.3.self_attn.out_proj");
  const name_map names({"conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_proj.weight"});
  CHECK(names.find_kohya("lora_te2_text_model_encoder_layers_3_mlp_fc2").modules ==
        std::vector<std::string>{"conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_proj"});
}

TEST_CASE("SDXL diffusers UNet names in LDM names, as sd-scripts' make_unet_conversion_map maps them") {
  CHECK(sdxl_unet_diffusers_to_ldm("conv_in") == "input_blocks.0.0");
  CHECK(sdxl_unet_diffusers_to_ldm("down_blocks.1.attentions.0.proj_in") == "input_blocks.4.1.proj_in");
  CHECK(sdxl_unet_diffusers_to_ldm("down_blocks.1.attentions.1.transformer_blocks.3.attn1.to_q") ==
        "input_blocks.5.1.transformer_blocks.3.attn1.to_q");
  CHECK(sdxl_unet_diffusers_to_ldm("down_blocks.0.resnets.1.conv2") == "input_blocks.2.0.out_layers.3");
  CHECK(sdxl_unet_diffusers_to_ldm("down_blocks.2.resnets.0.conv_shortcut") == "input_blocks.7.0.skip_connection");
  CHECK(sdxl_unet_diffusers_to_ldm("down_blocks.0.downsamplers.0.conv") == "input_blocks.3.0.op");
  CHECK(sdxl_unet_diffusers_to_ldm("mid_block.resnets.1.time_emb_proj") == "middle_block.2.emb_layers.1");
  CHECK(sdxl_unet_diffusers_to_ldm("mid_block.attentions.0.proj_out") == "middle_block.1.proj_out");
  CHECK(sdxl_unet_diffusers_to_ldm("up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2") ==
        "output_blocks.2.1.transformer_blocks.0.ff.net.2");
  CHECK(sdxl_unet_diffusers_to_ldm("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv");
  CHECK(sdxl_unet_diffusers_to_ldm("up_blocks.2.resnets.2.norm1") == "output_blocks.8.0.in_layers.0");
  CHECK(sdxl_unet_diffusers_to_ldm("time_embedding.linear_2") == "time_embed.2");
  CHECK(sdxl_unet_diffusers_to_ldm("add_embedding.linear_1") == "label_emb.0.0");
  CHECK(sdxl_unet_diffusers_to_ldm("conv_norm_out") == "out.0");
  CHECK(sdxl_unet_diffusers_to_ldm("conv_out") == "out.2");
  CHECK(sdxl_unet_diffusers_to_ldm("down_blocks.1.resnets.0.unknown") == "");
  CHECK(sdxl_unet_diffusers_to_ldm("nothing.here") == "");
}

TEST_CASE("kohya names resolve into a diffusers pipeline's components (formats/model-files names)") {
  const name_map names({"unet.down_blocks.1.attentions.0.proj_in.weight", "unet.up_blocks.0.upsamplers.0.conv.weight",
                        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight",
                        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.weight",
                        "transformer.transformer_blocks.0.attn.to_q.weight"});
  // sd-scripts SD 1.x: diffusers names
  CHECK(names.find_kohya("lora_unet_down_blocks_1_attentions_0_proj_in").modules ==
        std::vector<std::string>{"unet.down_blocks.1.attentions.0.proj_in"});
  // SDXL: LDM names
  CHECK(names.find_kohya("lora_unet_input_blocks_4_1_proj_in").modules ==
        std::vector<std::string>{"unet.down_blocks.1.attentions.0.proj_in"});
  CHECK(names.find_kohya("lora_unet_output_blocks_2_2_conv").modules ==
        std::vector<std::string>{"unet.up_blocks.0.upsamplers.0.conv"});
  CHECK(names.find_kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj").modules ==
        std::vector<std::string>{"text_encoder.text_model.encoder.layers.0.self_attn.q_proj"});
  CHECK(names.find_kohya("lora_te1_text_model_encoder_layers_0_self_attn_q_proj").modules ==
        std::vector<std::string>{"text_encoder.text_model.encoder.layers.0.self_attn.q_proj"});
  CHECK(names.find_kohya("lora_te2_text_model_encoder_layers_0_mlp_fc1").modules ==
        std::vector<std::string>{"text_encoder_2.text_model.encoder.layers.0.mlp.fc1"});
  CHECK(names.find_kohya("lora_unet_transformer_blocks_0_attn_to_q").modules ==
        std::vector<std::string>{"transformer.transformer_blocks.0.attn.to_q"});
  CHECK(names.find_kohya("lora_te2_text_model_encoder_layers_0_self_attn_q_proj").modules.empty());
}
