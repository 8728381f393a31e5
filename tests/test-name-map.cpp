// core/name-map: which base module an adapter module changes; and the format
// modules' key grammars read back what they write.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "core/kohya-format.h"
#include "core/name-map.h"
#include "core/peft-format.h"

using namespace lora;

TEST_CASE("dotted paths: found as they are, nothing else") {
  const name_map names({"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
                        "model.norm.weight", "lm_head.weight"});
  CHECK(names.find_path("model.layers.0.self_attn.q_proj").modules ==
        std::vector<std::string>{"model.layers.0.self_attn.q_proj"});
  CHECK(names.find_path("lm_head").modules == std::vector<std::string>{"lm_head"});
  const name_lookup missing = names.find_path("model.layers.1.self_attn.q_proj");
  CHECK(missing.modules.empty());
  CHECK(missing.looked_for == "model.layers.1.self_attn.q_proj");
  // a bias alone does not make a module (the delta changes a weight)
  CHECK(names.find_path("model.layers.0.self_attn").modules.empty());
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

TEST_CASE("every layout row names a known kohya prefix or the dotted scope") {
  for (const layout_prefix& row : layout_prefixes) {
    CHECK((row.scope.empty() || kohya::prefix_of(row.scope) == row.scope));
    // a row changes the name: it adds a container (base) or strips a prefix (adapter)
    CHECK_FALSE((row.base.empty() && row.adapter.empty()));
  }
}

TEST_CASE("diffusers LoRA paths: the component prefix is dropped for one component's file") {
  const name_map unet({"down_blocks.0.attentions.0.proj_in.weight", "text_model.final_layer_norm.weight"});
  CHECK(unet.find_path("unet.down_blocks.0.attentions.0.proj_in").modules ==
        std::vector<std::string>{"down_blocks.0.attentions.0.proj_in"});
  CHECK(unet.find_path("text_encoder.text_model.final_layer_norm").modules ==
        std::vector<std::string>{"text_model.final_layer_norm"});
  // a base that keeps the prefix matches as it is
  const name_map whole({"unet.conv_in.weight", "conv_in.weight"});
  CHECK(whole.find_path("unet.conv_in").modules == std::vector<std::string>{"unet.conv_in"});
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
