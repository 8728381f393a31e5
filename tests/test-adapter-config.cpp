// adapter_config.json: parsing (types, file order of patterns, errors naming
// the field) and rendering as PEFT writes it.
#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "formats/adapter-config.h"
#include "formats/error.h"
#include "formats/json.h"
#include "tests/test-support.h"

namespace fs = std::filesystem;
using namespace lora;
using namespace lora::testing;

TEST_CASE("parse_peft_config reads the fields that change the math") {
  const std::string text = R"({
    "peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": true, "use_dora": false,
    "fan_in_fan_out": true, "lora_bias": true,
    "rank_pattern": {"z_proj": 4, "a_proj": 8, "m.*": 2},
    "alpha_pattern": {"v_proj": 3.5, "k_proj": 7},
    "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["score"],
    "base_model_name_or_path": "org/model", "task_type": "CAUSAL_LM",
    "lora_dropout": 0.05, "unknown_field": {"kept": "in text only"}
  })";
  peft_config c = parse_peft_config(text, "adapter_config.json");
  CHECK(c.peft_type == "LORA");
  REQUIRE(c.r);
  CHECK(*c.r == 16);
  REQUIRE(c.lora_alpha);
  CHECK(*c.lora_alpha == 32.0);
  CHECK(c.use_rslora);
  CHECK_FALSE(c.use_dora);
  CHECK(c.fan_in_fan_out);
  CHECK(c.lora_bias);
  // file order, not sorted order: the first key that matches wins
  REQUIRE(c.rank_pattern.size() == 3);
  CHECK(c.rank_pattern[0] == std::pair<std::string, int64_t>{"z_proj", 4});
  CHECK(c.rank_pattern[1] == std::pair<std::string, int64_t>{"a_proj", 8});
  CHECK(c.rank_pattern[2] == std::pair<std::string, int64_t>{"m.*", 2});
  REQUIRE(c.alpha_pattern.size() == 2);
  CHECK(c.alpha_pattern[0] == std::pair<std::string, double>{"v_proj", 3.5});
  CHECK(c.alpha_pattern[1] == std::pair<std::string, double>{"k_proj", 7.0});
  CHECK(c.target_modules == std::vector<std::string>{"q_proj", "v_proj"});
  CHECK_FALSE(c.target_modules_is_regex);
  CHECK(c.modules_to_save == std::vector<std::string>{"score"});
  CHECK(c.base_model_name_or_path == "org/model");
  CHECK(c.task_type == "CAUSAL_LM");
  CHECK(c.text == text);
  CHECK(c.init_lora_weights == "true");
  CHECK_FALSE(c.layer_replication);
}

TEST_CASE("parse_peft_config: init_lora_weights and layer_replication") {
  CHECK(parse_peft_config(R"({"init_lora_weights": "pissa_niter_4"})", "cfg").init_lora_weights == "pissa_niter_4");
  CHECK(parse_peft_config(R"({"init_lora_weights": false})", "cfg").init_lora_weights == "false");
  CHECK(parse_peft_config(R"({"layer_replication": [[0, 4], [2, 6]]})", "cfg").layer_replication);
  CHECK_FALSE(parse_peft_config(R"({"layer_replication": null})", "cfg").layer_replication);
}

TEST_CASE("parse_peft_config: nulls and absent fields take PEFT's defaults") {
  peft_config c = parse_peft_config(R"({"peft_type": "LORA", "r": null, "lora_alpha": null, "use_rslora": null,
    "rank_pattern": null, "alpha_pattern": {}, "modules_to_save": null, "target_modules": null,
    "task_type": null, "base_model_name_or_path": null})",
                                    "cfg");
  CHECK_FALSE(c.r);
  CHECK_FALSE(c.lora_alpha);
  CHECK_FALSE(c.use_rslora);
  CHECK_FALSE(c.use_dora);
  CHECK_FALSE(c.fan_in_fan_out);
  CHECK_FALSE(c.lora_bias);
  CHECK(c.rank_pattern.empty());
  CHECK(c.alpha_pattern.empty());
  CHECK(c.modules_to_save.empty());
  CHECK(c.target_modules.empty());
  CHECK(c.task_type.empty());
  CHECK(c.base_model_name_or_path.empty());

  peft_config empty = parse_peft_config("{}", "cfg");
  CHECK(empty.peft_type.empty());
  CHECK_FALSE(empty.r);
}

TEST_CASE("parse_peft_config: a target_modules string is one regex") {
  peft_config c = parse_peft_config(R"({"peft_type": "LORA", "target_modules": ".*\\.(q|v)_proj"})", "cfg");
  CHECK(c.target_modules == std::vector<std::string>{".*\\.(q|v)_proj"});
  CHECK(c.target_modules_is_regex);
}

TEST_CASE("parse_peft_config: r written as 8.0 is accepted") {
  peft_config c = parse_peft_config(R"({"r": 8.0, "lora_alpha": 16.5, "rank_pattern": {"x": 2.0}})", "cfg");
  CHECK(*c.r == 8);
  CHECK(*c.lora_alpha == 16.5);
  CHECK(c.rank_pattern[0].second == 2);
}

TEST_CASE("parse_peft_config: wrong types are refused naming the file and the field") {
  struct bad_case {
    const char* json;
    const char* field;
    const char* what;
  };
  const bad_case cases[] = {
      {R"({"r": "8"})", "r", "must be a positive integer, found \"8\""},
      {R"({"r": 0})", "r", "must be a positive integer, found 0"},
      {R"({"r": -4})", "r", "must be a positive integer, found -4"},
      {R"({"r": 8.5})", "r", "must be a positive integer, found 8.5"},
      {R"({"r": true})", "r", "must be a positive integer, found true"},
      {R"({"lora_alpha": "16"})", "lora_alpha", "must be a number, found \"16\""},
      {R"({"lora_alpha": [16]})", "lora_alpha", "must be a number, found [16]"},
      {R"({"use_rslora": "yes"})", "use_rslora", "must be true or false, found \"yes\""},
      {R"({"use_dora": 1})", "use_dora", "must be true or false, found 1"},
      {R"({"fan_in_fan_out": "false"})", "fan_in_fan_out", "must be true or false, found \"false\""},
      {R"({"lora_bias": {}})", "lora_bias", "must be true or false, found {}"},
      {R"({"rank_pattern": ["q_proj", 8]})", "rank_pattern", "must be an object, found [\"q_proj\",8]"},
      {R"({"rank_pattern": {"q_proj": "8"}})", "rank_pattern.q_proj", "must be a positive integer, found \"8\""},
      {R"({"rank_pattern": {"q_proj": 0}})", "rank_pattern.q_proj", "must be a positive integer, found 0"},
      {R"({"alpha_pattern": 3})", "alpha_pattern", "must be an object, found 3"},
      {R"({"alpha_pattern": {"v_proj": null}})", "alpha_pattern.v_proj", "must be a number, found null"},
      {R"({"target_modules": 5})", "target_modules", "must be a list of strings, found 5"},
      {R"({"target_modules": ["q_proj", 5]})", "target_modules", "must be a list of strings, found the element 5"},
      {R"({"modules_to_save": "score"})", "modules_to_save", "must be a list of strings, found \"score\""},
      {R"({"peft_type": 3})", "peft_type", "must be a string, found 3"},
      {R"({"task_type": false})", "task_type", "must be a string, found false"},
      {R"({"base_model_name_or_path": 1})", "base_model_name_or_path", "must be a string, found 1"},
      {R"({"init_lora_weights": 1})", "init_lora_weights", "must be true, false or a method name, found 1"},
      {R"({"layer_replication": "yes"})", "layer_replication", "must be a list, found \"yes\""},
  };
  for (const bad_case& c : cases) {
    CAPTURE(c.json);
    lora::error e = thrown([&] { parse_peft_config(c.json, "dir/adapter_config.json"); });
    CHECK(e.code() == exit_code::invalid_input);
    CHECK(e.file() == "dir/adapter_config.json");
    CHECK(e.tensor() == c.field);
    CHECK(e.detail() == c.what);
    CHECK(std::string(e.what()) == std::string("dir/adapter_config.json: ") + c.field + ": " + c.what);
  }
}

TEST_CASE("parse_peft_config: not JSON, not an object") {
  lora::error e = thrown([] { parse_peft_config("{\"r\": 8,", "cfg.json"); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(has(e.what(), "cfg.json: adapter config is not valid JSON"));
  e = thrown([] { parse_peft_config("[1, 2]", "cfg.json"); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(std::string(e.what()) == "cfg.json: adapter config is not a JSON object");
  e = thrown([] { parse_peft_config("", "cfg.json"); });
  CHECK(e.code() == exit_code::invalid_input);
}

TEST_CASE("parse_peft_config: nesting is bounded before anything recurses") {
  // the document nests 1 (object) + arrays levels; max_json_depth passes
  const std::string head = R"({"peft_type": "LORA", "r": 8, "unknown": )";
  CHECK(parse_peft_config(nested_json(head, max_json_depth - 1, "}"), "cfg.json").r == 8);
  const std::string deeper =
      "cfg.json: adapter config has JSON nested deeper than " + std::to_string(max_json_depth) + " levels";
  lora::error e = thrown([&] { parse_peft_config(nested_json(head, max_json_depth, "}"), "cfg.json"); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(std::string(e.what()) == deeper);
  // 100,000 levels: in a field shown by the error message (json::dump recursed
  // per level and overflowed the stack), in an unknown field, unclosed
  for (const std::string& text : {nested_json(R"({"r": )", 100000, "}"), nested_json(head, 100000, "}"),
                                  nested_json(head, 100000, "}", /*closed=*/false), nested_json("", 100000, "")}) {
    e = thrown([&] { parse_peft_config(text, "cfg.json"); });
    CHECK(e.code() == exit_code::invalid_input);
    CHECK(std::string(e.what()) == deeper);
  }
  // a NUL byte: nlohmann would stop there and ignore the rest
  e = thrown([] { parse_peft_config(std::string("{\"r\": 8}\0{", 10), "cfg.json"); });
  CHECK(std::string(e.what()) == "cfg.json: adapter config is not valid JSON: NUL byte at byte 8");
}

TEST_CASE("read_model_type: nesting is bounded") {
  temp_dir dir;
  auto write = [&](const std::string& text) {
    std::ofstream(dir / "config.json") << text;
    return dir / "config.json";
  };
  CHECK(read_model_type(write(nested_json(R"({"model_type": "gpt2", "x": )", max_json_depth - 1, "}"))) ==
        std::optional<std::string>("gpt2"));
  for (size_t levels : {size_t{max_json_depth}, size_t{100000}}) {
    lora::error e =
        thrown([&] { read_model_type(write(nested_json(R"({"model_type": "gpt2", "x": )", levels, "}"))); });
    CHECK(e.code() == exit_code::invalid_input);
    CHECK(std::string(e.what()) ==
          (dir / "config.json") + ": config has JSON nested deeper than " + std::to_string(max_json_depth) + " levels");
  }
}

TEST_CASE("render_peft_config writes what PEFT writes: sorted keys, two-space indent") {
  peft_config c;
  c.peft_type = "LORA";
  c.r = 8;
  c.lora_alpha = 16;
  c.target_modules = {"q_proj", "v_proj"};
  c.rank_pattern = {{"z", 4}, {"a", 2}};
  c.alpha_pattern = {{"k_proj", 2.5}};
  c.base_model_name_or_path = "org/base";
  c.task_type = "CAUSAL_LM";
  // checked once against python3: json.dumps(d, indent=2, sort_keys=True)
  const std::string want = R"({
  "alpha_pattern": {
    "k_proj": 2.5
  },
  "auto_mapping": null,
  "base_model_name_or_path": "org/base",
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "lora_alpha": 16,
  "lora_bias": false,
  "lora_dropout": 0.0,
  "modules_to_save": null,
  "peft_type": "LORA",
  "r": 8,
  "rank_pattern": {
    "a": 2,
    "z": 4
  },
  "revision": null,
  "target_modules": [
    "q_proj",
    "v_proj"
  ],
  "task_type": "CAUSAL_LM",
  "use_dora": false,
  "use_rslora": false
})";
  CHECK(render_peft_config(c) == want);
}

TEST_CASE("render_peft_config round-trips through parse_peft_config") {
  peft_config c;
  c.peft_type = "LORA";
  c.r = 12;
  c.lora_alpha = 6.25;
  c.use_rslora = true;
  c.use_dora = true;
  c.fan_in_fan_out = true;
  c.lora_bias = true;
  c.target_modules = {".*proj"};
  c.target_modules_is_regex = true;
  c.modules_to_save = {"lm_head", "score"};
  c.rank_pattern = {{"a_proj", 3}};
  c.alpha_pattern = {{"b_proj", 1.5}};
  c.base_model_name_or_path = "caf\xc3\xa9/model";  // non-ASCII is escaped as PEFT's json.dumps does
  const std::string text = render_peft_config(c);
  CHECK(has(text, "\"caf\\u00e9/model\""));
  CHECK(has(text, "\"target_modules\": \".*proj\""));
  peft_config back = parse_peft_config(text, "rendered");
  CHECK(back.peft_type == c.peft_type);
  CHECK(back.r == c.r);
  CHECK(back.lora_alpha == c.lora_alpha);
  CHECK(back.use_rslora);
  CHECK(back.use_dora);
  CHECK(back.fan_in_fan_out);
  CHECK(back.lora_bias);
  CHECK(back.target_modules == c.target_modules);
  CHECK(back.target_modules_is_regex);
  CHECK(back.modules_to_save == c.modules_to_save);
  CHECK(back.rank_pattern == c.rank_pattern);
  CHECK(back.alpha_pattern == c.alpha_pattern);
  CHECK(back.base_model_name_or_path == c.base_model_name_or_path);
  CHECK(back.task_type.empty());
  // every level sorted: nlohmann's ordered parse keeps file order, which must be sorted
  auto j = nlohmann::ordered_json::parse(text);
  std::string prev;
  for (auto it = j.begin(); it != j.end(); ++it) {
    CHECK(prev < it.key());
    prev = it.key();
  }
}

TEST_CASE("render_peft_config: PEFT's defaults when r and alpha are unset") {
  peft_config c;
  auto j = nlohmann::json::parse(render_peft_config(c));
  CHECK(j["r"] == 8);
  CHECK(j["lora_alpha"] == 8);
  CHECK(j["peft_type"] == "LORA");
  CHECK(j["target_modules"].is_null());
  CHECK(j["task_type"].is_null());
}

TEST_CASE("read_model_type") {
  fs::path dir = fs::temp_directory_path() / ("lora-test-config-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir / name) << text;
    return (dir / name).string();
  };
  CHECK(read_model_type(write("a.json", R"({"model_type": "gpt2", "n_embd": 768})")) ==
        std::optional<std::string>("gpt2"));
  CHECK_FALSE(read_model_type(write("b.json", R"({"n_embd": 768})")));
  CHECK_FALSE(read_model_type(write("c.json", R"({"model_type": 3})")));
  lora::error e = thrown([&] { read_model_type(write("d.json", "[1]")); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(has(e.what(), "config is not a JSON object"));
  e = thrown([&] { read_model_type(write("e.json", "{")); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(has(e.what(), "config is not valid JSON"));
  e = thrown([&] { read_model_type((dir / "missing.json").string()); });
  CHECK(e.code() == exit_code::io);
  fs::remove_all(dir);
}

TEST_CASE("parse_peft_config: target_parameters and trainable_token_indices (list and dict)") {
  peft_config c = parse_peft_config(
      R"({"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
          "trainable_token_indices": [3, 1]})",
      "cfg");
  CHECK(c.target_parameters == std::vector<std::string>{"mlp.experts.gate_up_proj", "mlp.experts.down_proj"});
  REQUIRE(c.trainable_token_indices.size() == 1);
  CHECK(c.trainable_tokens_is_list);
  CHECK(c.trainable_token_indices[0].first.empty());
  CHECK(c.trainable_token_indices[0].second == std::vector<int64_t>{3, 1});
  c = parse_peft_config(R"({"trainable_token_indices": {"lm_head": [9], "embed_tokens": [2, 4]}})", "cfg");
  CHECK_FALSE(c.trainable_tokens_is_list);
  REQUIRE(c.trainable_token_indices.size() == 2);
  CHECK(c.trainable_token_indices[0].first == "lm_head");  // file order
  CHECK(c.trainable_token_indices[1].second == std::vector<int64_t>{2, 4});
  CHECK(parse_peft_config(R"({"target_parameters": null, "trainable_token_indices": null})", "cfg")
            .trainable_token_indices.empty());
  const error e = thrown([] { (void)parse_peft_config(R"({"trainable_token_indices": [1, -2]})", "cfg"); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(has(e.what(), "trainable_token_indices: must hold non-negative integers, found -2"));
  CHECK(has(thrown([] { (void)parse_peft_config(R"({"target_parameters": "experts"})", "cfg"); }).what(),
            "target_parameters: must be a list of strings"));
}
