// formats/hf-config: the fields and HF's defaults, and each refusal naming its field.
#include <doctest/doctest.h>

#include <string>

#include "formats/error.h"
#include "formats/hf-config.h"
#include "formats/json.h"
#include "tests/test-support.h"

using namespace lora;

namespace {
std::string base_json(const std::string& extra) {
  return R"({"model_type":"llama","hidden_size":64,"intermediate_size":176,"num_hidden_layers":2,)"
         R"("num_attention_heads":4,"vocab_size":256)" + extra + "}";
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
                                R"("num_attention_heads":4,"num_key_value_heads":2,"vocab_size":9,"head_dim":32})", "q");
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
  std::string e = error_of(R"({"model_type":"gpt2"})");
  CHECK(e.find("cfg.json") != std::string::npos);
  CHECK(e.find("model_type gpt2") != std::string::npos);
  CHECK(error_of(R"({"model_type":"llama"})").find("hidden_size") != std::string::npos);
  CHECK(error_of(base_json(R"(,"rope_scaling":{"rope_type":"llama3","factor":8})")).find("rope_scaling") != std::string::npos);
  CHECK(error_of(base_json(R"(,"num_key_value_heads":3)")).find("num_key_value_heads") != std::string::npos);
  CHECK(error_of(base_json(R"(,"hidden_act":"gelu")")).find("hidden_act") != std::string::npos);
  CHECK(error_of(base_json(R"(,"rms_norm_eps":"x")")).find("rms_norm_eps") != std::string::npos);
  CHECK(error_of(base_json(R"(,"vocab_size":-1)")).find("vocab_size") != std::string::npos);
  CHECK(parse_hf_config(base_json(R"(,"rope_scaling":null)"), "c").layers.at(1).rope.type == "default");
}

TEST_CASE("nesting is bounded before anything recurses") {
  // base_json's object is level 1: an extra field of max_json_depth - 1 arrays passes
  std::string head = base_json(R"(,"x":)");
  head.pop_back();  // its "}"
  CHECK(parse_hf_config(lora::testing::nested_json(head, max_json_depth - 1, "}"), "cfg.json").hidden_size == 64);
  const std::string deeper = "cfg.json: config.json has JSON nested deeper than " + std::to_string(max_json_depth) + " levels";
  CHECK(error_of(lora::testing::nested_json(head, max_json_depth, "}")) == deeper);
  CHECK(error_of(lora::testing::nested_json(head, 100000, "}")) == deeper);
  CHECK(error_of(lora::testing::nested_json(head, 100000, "}", /*closed=*/false)) == deeper);
  CHECK(error_of(lora::testing::nested_json(R"({"rms_norm_eps":)", 100000, "}")) == deeper);
  // parse_model_type (verify's path) goes through the same parse
  lora::error e = lora::testing::thrown([&] { parse_model_type(lora::testing::nested_json(head, 100000, "}"), "cfg.json"); });
  CHECK(std::string(e.what()) == deeper);
}
