// core/name-map: which base module an adapter module changes; and the format
// modules' key grammars read back what they write.
#include <doctest/doctest.h>

#include <map>
#include <string>
#include <vector>

#include "core/flux-names.h"
#include "core/fused-rows.h"
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

TEST_CASE("dotted paths, most_found (--skip-unmatched): the layout that finds the most; a tie is ambiguous") {
  // a bare LlamaModel file; the adapter in LlamaForCausalLM names plus lm_head and a stray (layer 9)
  const name_map bare({"layers.0.self_attn.q_proj.weight", "layers.0.mlp.up_proj.weight", "lm_head.weight"});
  const std::vector<std::string> wanted = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                           "lm_head.weight", "model.layers.9.self_attn.q_proj.weight"};
  const layout_choice strict = bare.choose_layout(wanted);
  CHECK(strict.layout == nullptr);  // without most_found: nothing fits every name
  CHECK(strict.closest_found == 3);
  const layout_choice most = bare.choose_layout(wanted, {}, true);
  REQUIRE(most.layout != nullptr);
  CHECK(std::string(most.layout->name) == "bare LlamaModel-style checkpoint (no model. prefix)");
  CHECK(most.ambiguous.empty());
  // names as they are find as many as any layout: no layout
  const name_map as_is({"model.layers.0.self_attn.q_proj.weight", "layers.0.mlp.up_proj.weight"});
  const layout_choice none = as_is.choose_layout(
      {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"}, {}, true);
  CHECK(none.layout == nullptr);
  CHECK(none.ambiguous.empty());
  // two layouts with different rewrites each find one of two names: ambiguous
  const name_map two({"a.weight", "model.transformer.b.weight"});
  const layout_choice tie = two.choose_layout({"transformer.a.weight", "transformer.b.weight"}, {}, true);
  CHECK(tie.layout == nullptr);
  REQUIRE(tie.ambiguous.size() == 2);
  CHECK(std::string(tie.ambiguous[0]->name) == "bare GPT2Model checkpoint (no transformer. prefix)");
  CHECK(std::string(tie.ambiguous[1]->name) == "LlamaForCausalLM-style checkpoint (model. prefix)");
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

// ---------------------------------------------------------------- fused row slices (core/fused-rows)

namespace {

// A name map over `shapes` (name -> shape), with the shapes the fused tables need.
struct shaped_names {
  std::map<std::string, std::vector<int64_t>> shapes;
  name_map names;
  using shape_map = std::map<std::string, std::vector<int64_t>>;
  explicit shaped_names(shape_map s)
      : shapes(std::move(s)), names(keys(shapes), [this](const std::string& n) -> const std::vector<int64_t>* {
          auto it = shapes.find(n);
          return it == shapes.end() ? nullptr : &it->second;
        }) {}
  static std::vector<std::string> keys(const std::map<std::string, std::vector<int64_t>>& m) {
    std::vector<std::string> out;
    for (const auto& kv : m) out.push_back(kv.first);
    return out;
  }
};

// A slice as {tensor, bias, tensor_row, module_row, n_rows} text.
std::string text(const row_slice& s) {
  return s.tensor + "|" + s.bias + "|" + std::to_string(s.tensor_row) + "|" + std::to_string(s.module_row) + "|" +
         std::to_string(s.n_rows);
}
std::vector<std::string> texts(const std::vector<row_slice>& v) {
  std::vector<std::string> out;
  for (const row_slice& s : v) out.push_back(text(s));
  return out;
}

const fused_group* group_of(const fused_layout& l, std::string_view fused_weight) {
  for (const fused_group& g : l.groups)
    if (g.fused_weight == fused_weight) return &g;
  return nullptr;
}

}  // namespace

TEST_CASE("split_rows: equal thirds, q / k / v / mlp, a rename, swapped halves, and the rows that cannot divide") {
  std::string problem;
  const fused_group* qkv = group_of(flux_layouts, "img_attn.qkv.weight");
  REQUIRE(qkv != nullptr);
  const auto thirds = split_rows(*qkv, 24, 8, problem);
  REQUIRE(thirds.size() == 3);
  CHECK(problem.empty());
  for (size_t i = 0; i < 3; ++i) {
    CHECK(thirds[i].part == i);
    CHECK(thirds[i].fused_row == 8 * static_cast<int64_t>(i));
    CHECK(thirds[i].part_row == 0);
    CHECK(thirds[i].n_rows == 8);
  }
  CHECK(split_rows(*qkv, 25, 8, problem).empty());
  CHECK(problem == "its 25 rows do not divide into 3 equal parts (attn.to_q, attn.to_k, attn.to_v)");

  // linear1: q, k, v of the hidden size (its columns) each, the mlp the rest
  const fused_group* linear1 = group_of(flux_layouts, "linear1.weight");
  REQUIRE(linear1 != nullptr);
  problem.clear();
  const auto l1 = split_rows(*linear1, 8 * 3 + 32, 8, problem);
  REQUIRE(l1.size() == 4);
  CHECK(l1[2].fused_row == 16);
  CHECK(l1[3].fused_row == 24);
  CHECK(l1[3].n_rows == 32);
  CHECK(part_rows(l1, 3) == 32);
  CHECK(split_rows(*linear1, 24, 8, problem).empty());
  CHECK(problem ==
        "its 24 rows leave none for proj_mlp after 3 parts of 8 rows (attn.to_q, attn.to_k, attn.to_v, proj_mlp)");

  // norm_out.linear = adaLN_modulation.1 with [shift; scale] read as [scale; shift]
  const fused_group* ada = group_of(flux_layouts, "final_layer.adaLN_modulation.1.weight");
  REQUIRE(ada != nullptr);
  problem.clear();
  const auto halves = split_rows(*ada, 16, 8, problem);
  REQUIRE(halves.size() == 2);
  CHECK(halves[0].fused_row == 0);
  CHECK(halves[0].part_row == 8);
  CHECK(halves[1].fused_row == 8);
  CHECK(halves[1].part_row == 0);
  CHECK(split_rows(*ada, 15, 8, problem).empty());

  const fused_group* proj = group_of(flux_layouts, "img_attn.proj.weight");
  REQUIRE(proj != nullptr);
  const auto whole = split_rows(*proj, 8, 8, problem);
  REQUIRE(whole.size() == 1);
  CHECK(whole[0].n_rows == 8);
}

TEST_CASE("fused: HF CLIP q / k / v (kohya lora_te2_, diffusers text_encoder_2.) into SDXL's OpenCLIP in_proj_weight") {
  const std::string blk = "conditioner.embedders.1.model.transformer.resblocks.2.attn.";
  shaped_names b({{blk + "in_proj_weight", {36, 12}},
                  {blk + "in_proj_bias", {36}},
                  {blk + "out_proj.weight", {12, 12}},
                  {"conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc.weight", {48, 12}}});
  const fused_lookup k = b.names.find_fused_kohya("lora_te2_text_model_encoder_layers_2_self_attn_k_proj");
  REQUIRE(k.found.size() == 1);
  CHECK(texts(k.found[0].slices) == std::vector<std::string>{blk + "in_proj_weight|" + blk + "in_proj_bias|12|0|12"});
  CHECK(k.found[0].delta_shape == std::vector<int64_t>{12, 12});
  CHECK(k.found[0].whole.empty());
  // diffusers' component prefix, and bare paths
  const fused_lookup v = b.names.find_fused("text_encoder_2.text_model.encoder.layers.2.self_attn.v_proj");
  REQUIRE(v.found.size() == 1);
  CHECK(v.found[0].slices.front().tensor_row == 24);
  CHECK(b.names.find_fused("text_model.encoder.layers.2.self_attn.q_proj").found.size() == 1);
  // the renames of the same table: a whole base module
  const fused_lookup fc1 = b.names.find_fused("text_encoder_2.text_model.encoder.layers.2.mlp.fc1");
  REQUIRE(fc1.found.size() == 1);
  CHECK(fc1.found[0].whole == "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc");
  // other prefixes and other layers find nothing
  CHECK(b.names.find_fused_kohya("lora_te1_text_model_encoder_layers_2_self_attn_k_proj").found.empty());
  CHECK(b.names.find_fused_kohya("lora_te2_text_model_encoder_layers_3_self_attn_k_proj").found.empty());

  // rows that do not divide: the answer is the problem, naming the base tensor
  shaped_names odd(shaped_names::shape_map{{blk + "in_proj_weight", {37, 12}}});
  const fused_lookup q = odd.names.find_fused_kohya("lora_te2_text_model_encoder_layers_2_self_attn_q_proj");
  REQUIRE(q.found.size() == 1);
  CHECK(q.found[0].slices.empty());
  CHECK(q.found[0].problem == "base " + blk +
                                  "in_proj_weight is [37, 12]: its 37 rows do not divide into 3 equal parts "
                                  "(self_attn.q_proj, self_attn.k_proj, self_attn.v_proj)");
  // without shapes only renames are indexed
  const name_map bare({blk + "in_proj_weight"});
  CHECK(bare.find_fused_kohya("lora_te2_text_model_encoder_layers_2_self_attn_q_proj").found.empty());
}

TEST_CASE("fused: diffusers Flux modules into a BFL file, bare and under model.diffusion_model.") {
  for (const std::string prefix : {"", "model.diffusion_model."}) {
    shaped_names b({{prefix + "double_blocks.0.img_attn.qkv.weight", {24, 8}},
                    {prefix + "double_blocks.0.img_attn.qkv.bias", {24}},
                    {prefix + "double_blocks.0.txt_attn.qkv.weight", {24, 8}},
                    {prefix + "double_blocks.0.img_attn.proj.weight", {8, 8}},
                    {prefix + "single_blocks.1.linear1.weight", {56, 8}},
                    {prefix + "final_layer.adaLN_modulation.1.weight", {16, 8}},
                    {prefix + "img_in.weight", {8, 16}}});
    const std::string qkv = prefix + "double_blocks.0.img_attn.qkv";
    const fused_lookup v = b.names.find_fused("transformer.transformer_blocks.0.attn.to_v");
    REQUIRE(v.found.size() == 1);
    CHECK(texts(v.found[0].slices) == std::vector<std::string>{qkv + ".weight|" + qkv + ".bias|16|0|8"});
    const fused_lookup add_k = b.names.find_fused("transformer_blocks.0.attn.add_k_proj");  // PEFT: no prefix
    REQUIRE(add_k.found.size() == 1);
    CHECK(add_k.found[0].slices.front().tensor == prefix + "double_blocks.0.txt_attn.qkv.weight");
    CHECK(add_k.found[0].slices.front().bias.empty());  // the base has no txt_attn.qkv.bias
    const fused_lookup mlp = b.names.find_fused("transformer.single_transformer_blocks.1.proj_mlp");
    REQUIRE(mlp.found.size() == 1);
    CHECK(texts(mlp.found[0].slices) == std::vector<std::string>{prefix + "single_blocks.1.linear1.weight||24|0|32"});
    CHECK(mlp.found[0].delta_shape == std::vector<int64_t>{32, 8});
    // norm_out.linear: its first half (scale) is adaLN's second, its second (shift) adaLN's first
    const fused_lookup norm = b.names.find_fused("transformer.norm_out.linear");
    REQUIRE(norm.found.size() == 1);
    const std::string ada = prefix + "final_layer.adaLN_modulation.1.weight";
    CHECK(texts(norm.found[0].slices) == std::vector<std::string>{ada + "||8|0|8", ada + "||0|8|8"});
    CHECK(b.names.find_fused("transformer.transformer_blocks.0.attn.to_out.0").found.at(0).whole ==
          prefix + "double_blocks.0.img_attn.proj");
    CHECK(b.names.find_fused("transformer.x_embedder").found.at(0).whole == prefix + "img_in");
    // the kohya spelling of the diffusers names (lora_unet_ + '_' for '.') reaches the same rows
    CHECK(b.names.find_fused_kohya("lora_unet_transformer_blocks_0_attn_to_v").found.size() == 1);
    CHECK(b.names.find_fused("transformer.transformer_blocks.1.attn.to_v").found.empty());
  }
  // a file holding both (bare and prefixed): two answers, the caller reports the ambiguity
  shaped_names both({{"double_blocks.0.img_attn.qkv.weight", {24, 8}},
                     {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight", {24, 8}}});
  CHECK(both.names.find_fused("transformer_blocks.0.attn.to_q").found.size() == 2);
}

TEST_CASE("fused: BFL modules (kohya lora_unet_) split into a diffusers Flux transformer file") {
  shaped_names b({{"transformer_blocks.0.attn.to_q.weight", {8, 8}},
                  {"transformer_blocks.0.attn.to_q.bias", {8}},
                  {"transformer_blocks.0.attn.to_k.weight", {8, 8}},
                  {"transformer_blocks.0.attn.to_v.weight", {8, 8}},
                  {"transformer_blocks.0.attn.to_out.0.weight", {8, 8}},
                  {"single_transformer_blocks.0.attn.to_q.weight", {8, 8}},
                  {"single_transformer_blocks.0.attn.to_k.weight", {8, 8}},
                  {"single_transformer_blocks.0.attn.to_v.weight", {8, 8}},
                  {"single_transformer_blocks.0.proj_mlp.weight", {32, 8}},
                  {"norm_out.linear.weight", {16, 8}}});
  const fused_lookup qkv = b.names.find_fused_kohya("lora_unet_double_blocks_0_img_attn_qkv");
  REQUIRE(qkv.found.size() == 1);
  CHECK(texts(qkv.found[0].slices) ==
        std::vector<std::string>{"transformer_blocks.0.attn.to_q.weight|transformer_blocks.0.attn.to_q.bias|0|0|8",
                                 "transformer_blocks.0.attn.to_k.weight||0|8|8",
                                 "transformer_blocks.0.attn.to_v.weight||0|16|8"});
  CHECK(qkv.found[0].delta_shape == std::vector<int64_t>{24, 8});
  const fused_lookup l1 = b.names.find_fused_kohya("lora_unet_single_blocks_0_linear1");
  REQUIRE(l1.found.size() == 1);
  CHECK(l1.found[0].delta_shape == std::vector<int64_t>{56, 8});
  CHECK(text(l1.found[0].slices.back()) == "single_transformer_blocks.0.proj_mlp.weight||0|24|32");
  const fused_lookup ada = b.names.find_fused_kohya("lora_unet_final_layer_adaLN_modulation_1");
  REQUIRE(ada.found.size() == 1);
  CHECK(texts(ada.found[0].slices) ==
        std::vector<std::string>{"norm_out.linear.weight||8|0|8", "norm_out.linear.weight||0|8|8"});
  CHECK(b.names.find_fused_kohya("lora_unet_double_blocks_0_img_attn_proj").found.at(0).whole ==
        "transformer_blocks.0.attn.to_out.0");
  // a PEFT adapter with BFL paths reaches the same rows
  CHECK(b.names.find_fused("double_blocks.0.img_attn.qkv").found.size() == 1);
  // a fused module whose parts are not all in the base has no entry
  CHECK(b.names.find_fused_kohya("lora_unet_double_blocks_0_txt_attn_qkv").found.empty());
  // parts that disagree with the table's split (an mlp as wide as q): the problem names the part
  shaped_names odd({{"single_transformer_blocks.0.attn.to_q.weight", {8, 8}},
                    {"single_transformer_blocks.0.attn.to_k.weight", {8, 8}},
                    {"single_transformer_blocks.0.attn.to_v.weight", {6, 8}},
                    {"single_transformer_blocks.0.proj_mlp.weight", {32, 8}}});
  const fused_lookup bad = odd.names.find_fused_kohya("lora_unet_single_blocks_0_linear1");
  REQUIRE(bad.found.size() == 1);
  CHECK(
      bad.found[0].problem ==
      "base single_transformer_blocks.0.attn.to_v.weight is [6, 8], but single_blocks.0.linear1 of 54 rows gives it 8");
}

TEST_CASE("fused_parts: extract --format kohya names SDXL's in_proj_weight rows as sd-scripts' te2 q / k / v") {
  std::string problem;
  const std::string t = "conditioner.embedders.1.model.transformer.resblocks.4.attn.in_proj_weight";
  const std::vector<fused_part> parts = fused_parts(t, {36, 12}, problem);
  CHECK(problem.empty());
  REQUIRE(parts.size() == 3);
  CHECK(parts[0].path == "conditioner.embedders.1.model.text_model.encoder.layers.4.self_attn.q_proj");
  CHECK(parts[1].kohya == "lora_te2_text_model_encoder_layers_4_self_attn_k_proj");
  CHECK(parts[2].row == 24);
  CHECK(parts[2].n_rows == 12);
  // Flux's fused modules keep their own kohya names (lora_flux.py): no parts
  CHECK(fused_parts("double_blocks.0.img_attn.qkv.weight", {24, 8}, problem).empty());
  CHECK(fused_parts("conditioner.embedders.1.model.transformer.resblocks.4.attn.out_proj.weight", {12, 12}, problem)
            .empty());
  CHECK(problem.empty());
  CHECK(fused_parts(t, {37, 12}, problem).empty());
  CHECK(problem == t + " is [37, 12]: its 37 rows do not divide into 3 equal parts (self_attn.q_proj, "
                       "self_attn.k_proj, self_attn.v_proj)");
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

TEST_CASE("SGM UNet names in SDXL diffusers names: sd-scripts' conversion table read the other way") {
  CHECK(sdxl_unet_ldm_to_diffusers("input_blocks.0.0") == "conv_in");
  CHECK(sdxl_unet_ldm_to_diffusers("input_blocks.4.1.transformer_blocks.0.attn1.to_q") ==
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q");
  CHECK(sdxl_unet_ldm_to_diffusers("input_blocks.4.0.in_layers.2") == "down_blocks.1.resnets.0.conv1");
  CHECK(sdxl_unet_ldm_to_diffusers("input_blocks.3.0.op") == "down_blocks.0.downsamplers.0.conv");
  CHECK(sdxl_unet_ldm_to_diffusers("middle_block.2.emb_layers.1") == "mid_block.resnets.1.time_emb_proj");
  CHECK(sdxl_unet_ldm_to_diffusers("output_blocks.2.2.conv") == "up_blocks.0.upsamplers.0.conv");
  CHECK(sdxl_unet_ldm_to_diffusers("label_emb.0.0") == "add_embedding.linear_1");
  CHECK(sdxl_unet_ldm_to_diffusers("out.2") == "conv_out");
  CHECK(sdxl_unet_ldm_to_diffusers("input_blocks.4.0.unknown") == "");
  CHECK(sdxl_unet_ldm_to_diffusers("nothing.here") == "");
  // both directions agree on every module the table names
  for (const char* p : {"down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj", "up_blocks.1.resnets.2.conv_shortcut",
                        "mid_block.attentions.0.proj_in", "time_embedding.linear_1"})
    CHECK(sdxl_unet_ldm_to_diffusers(sdxl_unet_diffusers_to_ldm(p)) == p);
}

TEST_CASE("diffusers LoRA paths (unet., text_encoder.) into SGM and LDM single files: single_file_components") {
  const name_map sgm({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
                      "model.diffusion_model.input_blocks.4.0.in_layers.2.weight",
                      "model.diffusion_model.label_emb.0.0.weight",
                      "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                      "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"});
  auto whole = [](const fused_lookup& l) { return l.found.size() == 1 ? l.found[0].whole : std::string("?"); };
  CHECK(whole(sgm.find_fused("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")) ==
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q");
  CHECK(whole(sgm.find_fused("unet.down_blocks.1.resnets.0.conv1")) == "model.diffusion_model.input_blocks.4.0.in_layers.2");
  CHECK(whole(sgm.find_fused("unet.add_embedding.linear_1")) == "model.diffusion_model.label_emb.0.0");
  CHECK(whole(sgm.find_fused("text_encoder.text_model.encoder.layers.0.self_attn.q_proj")) ==
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj");
  // text_encoder_2. through the OpenCLIP table, once (no second row for it)
  CHECK(whole(sgm.find_fused("text_encoder_2.text_model.encoder.layers.0.mlp.fc1")) ==
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc");
  CHECK(sgm.find_fused("unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q").found.empty());
  CHECK(sgm.find_fused("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").found.empty());  // no component
  // the SD 1.x UNet: the LDM file's modules in diffusers names (ldm_unet_to_diffusers)
  const name_map ldm({"model.diffusion_model.input_blocks.1.1.proj_in.weight",
                      "model.diffusion_model.output_blocks.2.1.conv.weight",
                      "model.diffusion_model.time_embed.0.weight",
                      "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"});
  CHECK(whole(ldm.find_fused("unet.down_blocks.0.attentions.0.proj_in")) ==
        "model.diffusion_model.input_blocks.1.1.proj_in");
  CHECK(whole(ldm.find_fused("unet.up_blocks.0.upsamplers.0.conv")) == "model.diffusion_model.output_blocks.2.1.conv");
  CHECK(whole(ldm.find_fused("unet.time_embedding.linear_1")) == "model.diffusion_model.time_embed.0");
  CHECK(whole(ldm.find_fused("text_encoder.text_model.encoder.layers.0.mlp.fc1")) ==
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1");
  CHECK(ldm.find_fused("unet.add_embedding.linear_1").found.empty());
  // a checkpoint whose CLIP lacks "text_model." (sd-scripts' TEXT_ENCODER_KEY_REPLACEMENTS)
  const name_map old_clip({"cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight",
                           "model.diffusion_model.input_blocks.1.1.proj_in.weight"});
  CHECK(whole(old_clip.find_fused("text_encoder.text_model.encoder.layers.0.self_attn.q_proj")) ==
        "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj");
  CHECK(sd1_clip_to_hf("final_layer_norm") == "text_model.final_layer_norm");
  CHECK(sd1_clip_to_hf("encoderx.y") == "encoderx.y");
  CHECK(sd1_clip_to_hf("text_model.encoder.layers.1.mlp.fc2") == "text_model.encoder.layers.1.mlp.fc2");
  // another family's base (a bare Llama) gets no rows
  const name_map llm({"model.layers.0.self_attn.q_proj.weight"});
  CHECK(llm.find_fused("unet.down_blocks.0.attentions.0.proj_in").found.empty());
}

TEST_CASE("fused: BFL modules split into a diffusers Flux pipeline folder's transformer. component") {
  shaped_names b({{"transformer.transformer_blocks.0.attn.to_q.weight", {8, 8}},
                  {"transformer.transformer_blocks.0.attn.to_k.weight", {8, 8}},
                  {"transformer.transformer_blocks.0.attn.to_v.weight", {8, 8}},
                  {"transformer.single_transformer_blocks.0.attn.to_q.weight", {8, 8}},
                  {"transformer.single_transformer_blocks.0.attn.to_k.weight", {8, 8}},
                  {"transformer.single_transformer_blocks.0.attn.to_v.weight", {8, 8}},
                  {"transformer.single_transformer_blocks.0.proj_mlp.weight", {32, 8}},
                  {"transformer.proj_out.weight", {16, 8}},
                  {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight", {8, 8}}});
  const fused_lookup qkv = b.names.find_fused_kohya("lora_unet_double_blocks_0_img_attn_qkv");
  REQUIRE(qkv.found.size() == 1);
  CHECK(texts(qkv.found[0].slices) == std::vector<std::string>{"transformer.transformer_blocks.0.attn.to_q.weight||0|0|8",
                                                               "transformer.transformer_blocks.0.attn.to_k.weight||0|8|8",
                                                               "transformer.transformer_blocks.0.attn.to_v.weight||0|16|8"});
  const fused_lookup l1 = b.names.find_fused_kohya("lora_unet_single_blocks_0_linear1");
  REQUIRE(l1.found.size() == 1);
  CHECK(text(l1.found[0].slices.back()) == "transformer.single_transformer_blocks.0.proj_mlp.weight||0|24|32");
  CHECK(b.names.find_fused_kohya("lora_unet_final_layer_linear").found.at(0).whole == "transformer.proj_out");
  CHECK(b.names.find_fused_kohya("lora_unet_double_blocks_1_img_attn_qkv").found.empty());
}
