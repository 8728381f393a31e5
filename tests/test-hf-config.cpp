// formats/hf-config: the fields and HF's defaults, and each refusal naming its field.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "formats/error.h"
#include "formats/hf-config.h"
#include "formats/json.h"
#include "tests/test-support.h"

using namespace lora;

namespace {
std::string base_json(const std::string& extra) {
  return R"({"model_type":"llama","hidden_size":64,"intermediate_size":176,"num_hidden_layers":2,)"
         R"("num_attention_heads":4,"vocab_size":256)" +
         extra + "}";
}
std::string error_of(const std::string& text) {
  try {
    parse_hf_config(text, "cfg.json");
  } catch (const lora::error& e) {
    CHECK(e.code() == exit_code::invalid_input);
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("defaults follow transformers") {
  hf_config c = parse_hf_config(base_json(""), "cfg.json");
  CHECK(c.num_key_value_heads == 4);
  CHECK(c.head_dim == 16);
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK(c.layers.at(0).rope.theta == 10000.0);
  CHECK(!c.tie_word_embeddings);
  CHECK(!c.qkv_bias);
  hf_config q = parse_hf_config(R"({"model_type":"qwen2","hidden_size":64,"intermediate_size":8,"num_hidden_layers":1,)"
                                R"("num_attention_heads":4,"num_key_value_heads":2,"vocab_size":9,"head_dim":32})",
                                "q");
  CHECK(q.qkv_bias);
  CHECK(!q.o_bias);
  CHECK(q.head_dim == 32);
}

TEST_CASE("testdata configs") {
  hf_config c = read_hf_config(std::string(LORA_SOURCE_DIR) + "/testdata/tiny-llama/config.json");
  CHECK(c.num_key_value_heads == 2);
  CHECK(c.rms_norm_eps == 1e-5);
  CHECK(read_hf_config(std::string(LORA_SOURCE_DIR) + "/testdata/tiny-llama-tied/config.json").tie_word_embeddings);
}

TEST_CASE("refusals name the file and the field") {
  CHECK(error_of("[1]").find("not a JSON object") != std::string::npos);
  CHECK(error_of("{").find("not valid JSON") != std::string::npos);
  std::string e = error_of(R"({"model_type":"bert"})");
  CHECK(e.find("cfg.json") != std::string::npos);
  CHECK(e.find("model_type bert") != std::string::npos);
  CHECK(error_of(R"({"model_type":"llama"})").find("hidden_size") != std::string::npos);
  CHECK(error_of(base_json(R"(,"rope_scaling":{"rope_type":"llama3","factor":8})")) ==
        "cfg.json: field rope_scaling.low_freq_factor is missing (rope_type llama3 needs it)");
  CHECK(error_of(base_json(R"(,"num_key_value_heads":3)")).find("num_key_value_heads") != std::string::npos);
  CHECK(error_of(base_json(R"(,"hidden_act":"relu")")).find("hidden_act") != std::string::npos);
  CHECK(error_of(base_json(R"(,"rms_norm_eps":"x")")).find("rms_norm_eps") != std::string::npos);
  CHECK(error_of(base_json(R"(,"vocab_size":-1)")).find("vocab_size") != std::string::npos);
  CHECK(parse_hf_config(base_json(R"(,"rope_scaling":null)"), "c").layers.at(1).rope.type == "default");
}

TEST_CASE("nesting is bounded before anything recurses") {
  // base_json's object is level 1: an extra field of max_json_depth - 1 arrays passes
  std::string head = base_json(R"(,"x":)");
  head.pop_back();  // its "}"
  CHECK(parse_hf_config(lora::testing::nested_json(head, max_json_depth - 1, "}"), "cfg.json").hidden_size == 64);
  const std::string deeper =
      "cfg.json: config.json has JSON nested deeper than " + std::to_string(max_json_depth) + " levels";
  CHECK(error_of(lora::testing::nested_json(head, max_json_depth, "}")) == deeper);
  CHECK(error_of(lora::testing::nested_json(head, 100000, "}")) == deeper);
  CHECK(error_of(lora::testing::nested_json(head, 100000, "}", /*closed=*/false)) == deeper);
  CHECK(error_of(lora::testing::nested_json(R"({"rms_norm_eps":)", 100000, "}")) == deeper);
  // parse_model_type (verify's path) goes through the same parse
  lora::error e =
      lora::testing::thrown([&] { parse_model_type(lora::testing::nested_json(head, 100000, "}"), "cfg.json"); });
  CHECK(std::string(e.what()) == deeper);
}

TEST_CASE("rope_scaling (4.x) and rope_parameters (5.x)") {
  // Llama 3.1's rope_scaling
  hf_config c = parse_hf_config(base_json(R"(,"rope_theta":500000.0,"max_position_embeddings":131072,"rope_scaling":)"
                                          R"({"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,)"
                                          R"("original_max_position_embeddings":8192,"rope_type":"llama3"})"),
                                "cfg.json");
  REQUIRE(c.layers.size() == 2);
  for (const layer_attention& l : c.layers) {
    CHECK(l.rope.type == "llama3");
    CHECK(l.rope.theta == 500000.0);
    CHECK(*l.rope.factor == 8.0);
    CHECK(l.rope.high_freq_factor == 4.0);
    CHECK(l.rope.original_max_position_embeddings == 8192);
    CHECK(l.sliding_window == 0);
  }
  CHECK(c.max_position_embeddings == 131072);
  // 5.x: rope_theta inside rope_parameters wins over the default
  c = parse_hf_config(base_json(R"(,"rope_parameters":{"rope_theta":500000,"rope_type":"default"})"), "cfg.json");
  CHECK(c.layers[1].rope.theta == 500000.0);
  CHECK(c.layers[1].rope.type == "default");
  // 4.x "type"; rope_scaling wins over rope_parameters (`rope_scaling or rope_parameters`)
  c = parse_hf_config(
      base_json(R"(,"rope_parameters":{"rope_type":"default"},"rope_scaling":{"type":"linear","factor":2})"), "c");
  CHECK(c.layers[0].rope.type == "linear");
  CHECK(*c.layers[0].rope.factor == 2.0);
  // yarn: original_max_position_embeddings defaults to max_position_embeddings; a top-level one wins
  c = parse_hf_config(base_json(R"(,"max_position_embeddings":512,"rope_scaling":{"rope_type":"yarn","factor":4})"),
                      "c");
  CHECK(c.layers[0].rope.original_max_position_embeddings == 512);
  CHECK(c.layers[0].rope.beta_fast == 32.0);
  c = parse_hf_config(
      base_json(R"(,"original_max_position_embeddings":64,"rope_scaling":{"rope_type":"yarn","factor":4,)"
                R"("original_max_position_embeddings":32})"),
      "c");
  CHECK(c.layers[0].rope.original_max_position_embeddings == 64);
  // nested per layer type (5.x with layer_types)
  c = parse_hf_config(base_json(R"(,"layer_types":["full_attention","sliding_attention"],"rope_parameters":)"
                                R"({"full_attention":{"rope_type":"default","rope_theta":1000000},)"
                                R"("sliding_attention":{"rope_type":"linear","factor":2,"rope_theta":10000}})"),
                      "c");
  CHECK(c.layers[0].rope.type == "default");
  CHECK(c.layers[0].rope.theta == 1000000.0);
  CHECK(c.layers[1].rope.type == "linear");
  CHECK(c.layers[1].sliding_window == 0);  // llama has no sliding window
}

TEST_CASE("rope refusals name config.json's field and the type") {
  CHECK(error_of(base_json(R"(,"rope_scaling":{"rope_type":"su","factor":2})")) ==
        "cfg.json: field rope_scaling.rope_type su is not supported (known: default, linear, dynamic, yarn, longrope, "
        "llama3)");
  CHECK(error_of(base_json(R"(,"rope_parameters":{"rope_type":"mrope","rope_theta":1e6})"))
            .find("rope_parameters.rope_type mrope") != std::string::npos);
  CHECK(error_of(base_json(R"(,"rope_scaling":{"type":"dynamic"})")) ==
        "cfg.json: field rope_scaling.factor is missing (rope_type dynamic needs it)");
  CHECK(error_of(base_json(R"(,"rope_scaling":{"type":"linear","factor":"2"})")).find("rope_scaling.factor must be") !=
        std::string::npos);
  CHECK(error_of(base_json(R"(,"rope_scaling":{"rope_type":"longrope","short_factor":[1],"long_factor":[1]})"))
            .find("rope_scaling.short_factor must be a list of 8 positive numbers") != std::string::npos);
  CHECK(error_of(
            base_json(R"(,"rope_scaling":{"rope_type":"llama3","factor":8,"low_freq_factor":4,"high_freq_factor":1})"))
            .find("high_freq_factor") != std::string::npos);
  CHECK(error_of(base_json(R"(,"partial_rotary_factor":0.5)")).find("partial_rotary_factor") != std::string::npos);
  CHECK(error_of(base_json(R"(,"rope_scaling":[1])")).find("rope_scaling must be an object") != std::string::npos);
  CHECK(
      error_of(base_json(R"(,"layer_types":["full_attention"],"rope_parameters":{"full_attention":{"rope_type":"x"}})"))
          .find("layer_types must list 2 strings") != std::string::npos);
  CHECK(error_of(base_json(
            R"(,"layer_types":["full_attention","sliding_attention"],"rope_parameters":{"full_attention":{}})")) ==
        "cfg.json: field rope_parameters.sliding_attention is missing (layer 1 is sliding_attention)");
}

TEST_CASE("sliding windows: mistral every layer, qwen2 from max_window_layers on") {
  const std::string sizes =
      R"("hidden_size":64,"intermediate_size":8,"num_hidden_layers":3,"num_attention_heads":4,"vocab_size":9)";
  hf_config m = parse_hf_config(R"({"model_type":"mistral",)" + sizes + R"(,"sliding_window":5})", "c");
  for (const layer_attention& l : m.layers) CHECK(l.sliding_window == 5);
  CHECK(parse_hf_config(R"({"model_type":"mistral",)" + sizes + "}", "c").layers[2].sliding_window == 4096);
  CHECK(parse_hf_config(R"({"model_type":"mistral",)" + sizes + R"(,"sliding_window":null})", "c")
            .layers[2]
            .sliding_window == 0);
  hf_config q = parse_hf_config(
      R"({"model_type":"qwen2",)" + sizes + R"(,"sliding_window":5,"use_sliding_window":true,"max_window_layers":1})",
      "c");
  CHECK(q.layers[0].sliding_window == 0);
  CHECK(q.layers[1].sliding_window == 5);
  CHECK(q.layers[2].sliding_window == 5);
  q = parse_hf_config(
      R"({"model_type":"qwen2",)" + sizes + R"(,"sliding_window":5,"use_sliding_window":false,"max_window_layers":0})",
      "c");
  CHECK(q.layers[2].sliding_window == 0);
  q = parse_hf_config(R"({"model_type":"qwen2",)" + sizes +
                          R"(,"use_sliding_window":true,"sliding_window":7,)"
                          R"("layer_types":["sliding_attention","full_attention","sliding_attention"]})",
                      "c");
  CHECK(q.layers[0].sliding_window == 7);
  CHECK(q.layers[1].sliding_window == 0);
  // 5.x nests rope_parameters by qwen2's derived layer_types too
  q = parse_hf_config(
      R"({"model_type":"qwen2",)" + sizes +
          R"(,"sliding_window":5,"use_sliding_window":true,"max_window_layers":2,)"
          R"("rope_parameters":{"full_attention":{"rope_theta":5e5},"sliding_attention":{"rope_type":"linear","factor":2}}})",
      "c");
  CHECK(q.layers[1].rope.theta == 500000.0);
  CHECK(q.layers[2].rope.type == "linear");
  CHECK(q.layers[2].rope.theta == 10000.0);
  CHECK(q.layers[2].sliding_window == 5);
  CHECK(error_of(R"({"model_type":"qwen2",)" + sizes +
                 R"(,"layer_types":["sliding_attention","full_attention","full_attention"]})")
            .find("sliding_window is unset") != std::string::npos);
  CHECK(error_of(R"({"model_type":"qwen2",)" + sizes +
                 R"(,"layer_types":["chunked_attention","full_attention","full_attention"]})")
            .find("chunked_attention is not supported") != std::string::npos);
}

TEST_CASE("the families beyond Llama: each configuration class's defaults") {
  const std::string sizes =
      R"("hidden_size":32,"intermediate_size":48,"num_hidden_layers":6,"num_attention_heads":4,"vocab_size":96)";
  auto parse = [&](const std::string& type, const std::string& extra) {
    return parse_hf_config(R"({"model_type":")" + type + R"(",)" + sizes + extra + "}", "cfg.json");
  };
  // Gemma2Config: head_dim 256, query_pre_attn_scalar 256, soft-caps 50 / 30, even layers slide 4096, tied, gelu tanh
  hf_config g = parse("gemma2", "");
  CHECK(g.head_dim == 256);
  CHECK(g.query_pre_attn_scalar == 256);
  CHECK(g.attn_logit_softcapping == 50);
  CHECK(g.final_logit_softcapping == 30);
  CHECK(g.tie_word_embeddings);
  CHECK(g.hidden_act == activation_kind::gelu_tanh);
  CHECK(g.layers[0].sliding_window == 4096);
  CHECK(g.layers[1].sliding_window == 0);
  CHECK(parse("gemma2", R"(,"attn_logit_softcapping":null)").attn_logit_softcapping == 0);
  // Gemma3TextConfig: layers (i + 1) % 6 != 0 slide on rope_local_base_freq; the others keep rope_theta and scaling
  hf_config g3 = parse("gemma3_text", R"(,"rope_theta":1000000.0,"rope_scaling":{"rope_type":"linear","factor":8.0})");
  CHECK(g3.layers[0].sliding_window == 4096);
  CHECK(g3.layers[0].rope.type == "default");
  CHECK(g3.layers[0].rope.theta == 10000.0);
  CHECK(g3.layers[5].sliding_window == 0);
  CHECK(g3.layers[5].rope.type == "linear");
  CHECK(g3.layers[5].rope.theta == 1000000.0);
  CHECK(g3.final_logit_softcapping == 0);
  CHECK(parse("gemma3_text", R"(,"sliding_window_pattern":2)").layers[1].sliding_window == 0);
  // Qwen3Config: head_dim 128 when absent; qwen3_moe: sparse layers by mlp_only_layers and decoder_sparse_step
  CHECK(parse("qwen3", "").head_dim == 128);
  hf_config m =
      parse("qwen3_moe",
            R"(,"head_dim":8,"num_experts":4,"num_experts_per_tok":2,"mlp_only_layers":[1],"decoder_sparse_step":2)");
  CHECK(m.num_experts == 4);
  CHECK((m.num_experts_per_tok == 2 && m.moe_intermediate_size == 768));
  CHECK(!m.norm_topk_prob);
  CHECK((!m.layers[0].moe && !m.layers[1].moe && !m.layers[2].moe && m.layers[3].moe && m.layers[5].moe));
  // MixtralConfig: every layer sparse, renormalised; no window by default
  hf_config x = parse("mixtral", R"(,"num_local_experts":4)");
  CHECK((x.layers[0].moe && x.norm_topk_prob && x.num_experts_per_tok == 2 && x.layers[0].sliding_window == 0));
  // Phi3Config: no biases; a window on every layer when set
  hf_config p = parse("phi3", R"(,"sliding_window":5,"attention_bias":true)");
  CHECK((!p.qkv_bias && p.layers[3].sliding_window == 5));
  // GPT2Config: n_* names, n_inner 4 n_embd, layer_norm_epsilon, Conv1D biases, tied, gelu_new
  hf_config t = parse_hf_config(R"({"model_type":"gpt2","n_embd":32,"n_layer":2,"n_head":4,"vocab_size":96})", "c");
  CHECK((t.hidden_size == 32 && t.intermediate_size == 128 && t.head_dim == 8 && t.max_position_embeddings == 1024));
  CHECK((t.rms_norm_eps == 1e-5 && t.qkv_bias && t.o_bias && t.mlp_bias && t.tie_word_embeddings));
  CHECK(t.hidden_act == activation_kind::gelu_tanh);
}

TEST_CASE("family refusals name the field") {
  CHECK(error_of(R"({"model_type":"gpt2","n_embd":32,"n_layer":2,"vocab_size":96})") ==
        "cfg.json: field n_head is missing");
  CHECK(error_of(R"({"model_type":"mixtral","hidden_size":32,"intermediate_size":8,"num_hidden_layers":1,)"
                 R"("num_attention_heads":4,"vocab_size":8,"num_local_experts":2,"num_experts_per_tok":3})") ==
        "cfg.json: field num_experts_per_tok 3 exceeds the 2 experts");
  CHECK(error_of(R"({"model_type":"gemma2","hidden_size":32,"intermediate_size":8,"num_hidden_layers":1,)"
                 R"("num_attention_heads":4,"vocab_size":8,"hidden_activation":"relu"})") ==
        "cfg.json: field hidden_activation \"relu\" is not supported (silu, gelu_pytorch_tanh, gelu_new, gelu)");
}

TEST_CASE("update_config_text: the fields set, every other one kept in order") {
  const std::string text =
      R"({"vocab_size": 10, "model_type": "llama", "tie_word_embeddings": true, "rope_theta": 10000.0,
          "text_config": {"vocab_size": 10, "hidden_size": 4}})";
  config_update u;
  u.tie_word_embeddings = false;
  u.vocab_size = 12;
  const std::string out = update_config_text(text, "config.json", u);
  const nlohmann::ordered_json j = nlohmann::ordered_json::parse(out);
  std::vector<std::string> keys;
  for (const auto& [k, v] : j.items()) keys.push_back(k);
  CHECK(keys ==
        std::vector<std::string>{"vocab_size", "model_type", "tie_word_embeddings", "rope_theta", "text_config"});
  CHECK(j["vocab_size"] == 12);
  CHECK(j["tie_word_embeddings"] == false);
  CHECK(j["text_config"]["vocab_size"] == 12);
  CHECK_FALSE(j["text_config"].contains("tie_word_embeddings"));
  CHECK(out.back() == '\n');
  // a field the file lacks is added at the end
  const nlohmann::ordered_json k = nlohmann::ordered_json::parse(update_config_text(R"({"a": 1})", "c", u));
  CHECK(k.dump() == R"({"a":1,"tie_word_embeddings":false,"vocab_size":12})");
  CHECK_THROWS_WITH(update_config_text("[1]", "c.json", u), doctest::Contains("not a JSON object"));
}

TEST_CASE("parse_quantization_config: Qwen3-8B-FP8's object as written, inside text_config, absent, malformed") {
  const std::string qwen3_fp8 =
      R"({"model_type": "qwen3", "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
          "quant_method": "fp8", "weight_block_size": [128, 128]}, "torch_dtype": "bfloat16"})";
  const std::optional<quantization_config> q = parse_quantization_config(qwen3_fp8, "config.json");
  REQUIRE(q);
  CHECK(q->quant_method == "fp8");
  CHECK(q->fmt == "e4m3");
  CHECK(q->activation_scheme == "dynamic");
  CHECK(q->weight_block_size == std::vector<int64_t>{128, 128});
  CHECK(q->weight_block_size_text == "[128,128]");
  // multimodal configs hold it in text_config
  const auto t = parse_quantization_config(R"({"text_config": {"quantization_config": {"quant_method": "fp8"}}})", "c");
  REQUIRE(t);
  CHECK(t->quant_method == "fp8");
  CHECK_FALSE(t->fmt);
  CHECK_FALSE(t->weight_block_size);
  CHECK_FALSE(parse_quantization_config(R"({"model_type": "llama", "text_config": {}})", "c"));
  // null or non-integer block sizes are kept as text for the refusal (core/fp8)
  const auto n = parse_quantization_config(R"({"quantization_config": {"quant_method": "fp8", "weight_block_size": null}})", "c");
  CHECK(n->weight_block_size == std::vector<int64_t>{});
  CHECK(n->weight_block_size_text == "null");
  CHECK(lora::testing::thrown([] { parse_quantization_config(R"({"quantization_config": 3})", "c.json"); }).detail() ==
        "field quantization_config is not an object");
  CHECK(lora::testing::thrown([] {
          parse_quantization_config(R"({"quantization_config": {"quant_method": 8}})", "c.json");
        }).detail() == "field quantization_config.quant_method is not a string");
}

TEST_CASE("update_config_text: an FP8 model dequantized loses quantization_config and gets the dtype asked") {
  config_update u;
  u.remove_quantization_config = true;
  u.torch_dtype = "bfloat16";
  const nlohmann::ordered_json j = nlohmann::ordered_json::parse(update_config_text(
      R"({"model_type": "qwen3", "quantization_config": {"quant_method": "fp8"}, "torch_dtype": "bfloat16",
          "dtype": "float8", "text_config": {"quantization_config": {}}})",
      "config.json", u));
  CHECK(j.dump() == R"({"model_type":"qwen3","torch_dtype":"bfloat16","dtype":"bfloat16","text_config":{}})");
  CHECK_FALSE(u.empty());
}
