// formats/json: the bounded parse every JSON site uses (limits, NUL bytes,
// duplicate keys, messages) and json_or_text for display.
#include <doctest/doctest.h>

#include <string>

#include <nlohmann/json.hpp>

#include "formats/error.h"
#include "formats/json.h"
#include "tests/test-support.h"

using namespace lora;
using namespace lora::testing;

TEST_CASE("parse_json_bounded: the depth limit counts arrays and objects") {
  CHECK(parse_json_bounded(nested_json("", max_json_depth, ""), "f.json", "doc").is_array());
  CHECK(parse_json_bounded(R"({"a":{"b":[1]}})", "f.json", "doc", {.max_depth = 3})["a"]["b"][0] == 1);
  lora::error e = thrown([] { parse_json_bounded(R"({"a":{"b":[1]}})", "f.json", "doc", {.max_depth = 2}); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(std::string(e.what()) == "f.json: doc has JSON nested deeper than 2 levels");
  for (bool closed : {true, false}) {
    e = thrown([&] { parse_json_bounded(nested_json("", 100000, "", closed), "f.json", "doc"); });
    CHECK(std::string(e.what()) ==
          "f.json: doc has JSON nested deeper than " + std::to_string(max_json_depth) + " levels");
  }
}

TEST_CASE("parse_json_bounded: NUL bytes, syntax, duplicates") {
  lora::error e = thrown([] { parse_json_bounded(std::string("{}\0 x", 5), "f.json", "doc"); });
  CHECK(std::string(e.what()) == "f.json: doc is not valid JSON: NUL byte at byte 2");
  e = thrown([] { parse_json_bounded("{\"a\": 1,}", "f.json", "doc"); });
  CHECK(has(e.what(), "f.json: doc is not valid JSON: parse error at line 1, column 9"));
  e = thrown([] { parse_json_bounded("\"" + std::string(100000, 'a'), "f.json", "doc"); });
  CHECK(std::string(e.what()).size() < 300);  // the quoted token is clipped
  // duplicates: the last wins unless refused (only safetensors headers refuse them)
  CHECK(parse_json_bounded(R"({"a":1,"a":2})", "f.json", "doc")["a"] == 2);
  e = thrown([] { parse_json_bounded(R"({"b":{"a":1,"a":2}})", "f.json", "doc", {.refuse_duplicate_keys = true}); });
  CHECK(e.tensor() == "a");
  CHECK(std::string(e.what()) == "f.json: a: duplicate key in doc");
}

TEST_CASE("parse_ordered_json_bounded keeps the file's key order") {
  nlohmann::ordered_json j = parse_ordered_json_bounded(R"({"z":1,"a":2,"m":3})", "f.json", "doc");
  std::string keys;
  for (auto it = j.begin(); it != j.end(); ++it) keys += it.key();
  CHECK(keys == "zam");
}

TEST_CASE("json_or_text: the value, else the text, always printable") {
  CHECK(json_or_text(R"({"r": 8})")["r"] == 8);
  CHECK(json_or_text("{lora") == "{lora");
  CHECK(json_or_text(nested_json("", 100000, "")).is_string());
  // invalid UTF-8 is replaced, so dump() cannot throw
  nlohmann::ordered_json j = json_or_text("{\"a\": \"\x85\"");
  CHECK(j.dump() == "\"{\\\"a\\\": \\\"\xEF\xBF\xBD\\\"\"");
}
