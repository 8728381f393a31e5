// core/module-pattern: PEFT's get_pattern_key rule (re.match(rf"(.*\.)?({key})$", path),
// first key in file order wins) in linear time, and the keys RE2 refuses.
#include <doctest/doctest.h>

#include <chrono>
#include <regex>
#include <string>
#include <vector>

#include "core/module-pattern.h"

using lora::first_match;
using lora::module_pattern;
using lora::pattern_error;

namespace {

// The message a key is refused with ("" when it compiles).
std::string refusal(const std::string& key) {
  try {
    module_pattern p(key);
  } catch (const pattern_error& e) {
    return e.what();
  }
  return "";
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A dotted module path of about n characters ending in `.last`.
std::string long_path(size_t n, const std::string& last) {
  std::string p;
  for (int i = 0; p.size() + last.size() < n; ++i) p += "layer" + std::to_string(i % 10) + ".";
  return p + last;
}

}  // namespace

TEST_CASE("module_pattern: a key matches the whole path or the part after a dot") {
  const module_pattern q("q_proj");
  CHECK(q.key() == "q_proj");
  CHECK(q.matches("model.layers.0.self_attn.q_proj"));
  CHECK(q.matches("q_proj"));
  CHECK_FALSE(q.matches("model.layers.0.self_attn.xq_proj"));  // no dot before the key
  CHECK_FALSE(q.matches("xq_proj"));
  CHECK_FALSE(q.matches("model.layers.0.self_attn.q_proj.lora_A"));  // the key must reach the end
  CHECK_FALSE(q.matches("model.q_proj_x"));
  CHECK_FALSE(q.matches(""));

  // a key with dots in it spans several parts; an unescaped dot is any character
  const module_pattern l0(R"(layers\.0\.self_attn\.q_proj)");
  CHECK(l0.matches("model.layers.0.self_attn.q_proj"));
  CHECK_FALSE(l0.matches("model.layers.10.self_attn.q_proj"));
  CHECK_FALSE(l0.matches("model.xlayers.0.self_attn.q_proj"));
  CHECK(module_pattern("layers.0.self_attn.q_proj").matches("model.layersX0Xself_attnXq_proj"));
  CHECK(module_pattern(R"(mlp\..*)").matches("model.layers.3.mlp.up_proj"));
  CHECK(module_pattern("").matches(""));  // PEFT: (.*\.)?()$ matches "" and "x."
  CHECK(module_pattern("").matches("model."));
  CHECK_FALSE(module_pattern("").matches("model"));
}

TEST_CASE("module_pattern: alternation stays inside the key's group") {
  const module_pattern qv("q_proj|v_proj");
  CHECK(qv.matches("model.layers.0.self_attn.q_proj"));
  CHECK(qv.matches("model.layers.0.self_attn.v_proj"));
  CHECK_FALSE(qv.matches("model.layers.0.self_attn.k_proj"));
  CHECK_FALSE(qv.matches("model.layers.0.self_attn.xv_proj"));  // the dot rule applies to every branch
  CHECK_FALSE(qv.matches("model.layers.0.self_attn.q_proj.v"));

  const module_pattern grouped(R"(layers\.(0|1)\.self_attn\.(q|k)_proj)");
  CHECK(grouped.matches("model.layers.1.self_attn.k_proj"));
  CHECK_FALSE(grouped.matches("model.layers.2.self_attn.k_proj"));

  // a key that only compiles once wrapped, by closing our group, is refused
  CHECK(refusal("a)|(b") == "unexpected ): a)|(b");
}

TEST_CASE("first_match: the first key in file order wins") {
  const std::vector<module_pattern> patterns{module_pattern(R"(layers\.0\.self_attn\.q_proj)"),
                                             module_pattern("q_proj"), module_pattern(".*_proj")};
  CHECK(first_match(patterns, "model.layers.0.self_attn.q_proj") == 0u);
  CHECK(first_match(patterns, "model.layers.1.self_attn.q_proj") == 1u);
  CHECK(first_match(patterns, "model.layers.1.self_attn.k_proj") == 2u);
  CHECK_FALSE(first_match(patterns, "model.layers.1.input_layernorm").has_value());
  CHECK_FALSE(first_match({}, "model.q_proj").has_value());
  // the same keys in the other order
  const std::vector<module_pattern> reversed{patterns[2], patterns[1], patterns[0]};
  CHECK(first_match(reversed, "model.layers.0.self_attn.q_proj") == 0u);
}

TEST_CASE("module_pattern: same answers as the backtracking std::regex on short inputs") {
  // std::regex (ECMAScript), what lora used before, as an independent reference on inputs it handles
  const std::vector<std::string> keys{"q_proj",
                                      "q_proj|v_proj",
                                      R"(mlp\..*)",
                                      R"(layers\.[0-9]+\.mlp\.up_proj)",
                                      "(q|k|v)_proj",
                                      R"(\d+\.self_attn\.o_proj)",
                                      "[a-z]+_proj",
                                      "proj",
                                      ".*",
                                      "a*b?",
                                      R"(embed_tokens|lm_head)"};
  const std::vector<std::string> paths{"model.layers.0.self_attn.q_proj",
                                       "model.layers.12.mlp.up_proj",
                                       "model.layers.0.self_attn.xq_proj",
                                       "model.embed_tokens",
                                       "lm_head",
                                       "q_proj",
                                       "model.layers.3.self_attn.o_proj",
                                       "",
                                       "a.",
                                       "aab",
                                       "x.aaab"};
  for (const auto& k : keys) {
    const module_pattern p(k);
    const std::regex reference("(.*\\.)?(" + k + ")", std::regex::ECMAScript);
    for (const auto& path : paths) {
      CAPTURE(k);
      CAPTURE(path);
      CHECK(p.matches(path) == std::regex_match(path, reference));
    }
  }
}

TEST_CASE("module_pattern: (a+)+b against 10,000 a's answers in linear time") {
  const module_pattern evil("(a+)+b");
  const std::string as(10000, 'a');
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_FALSE(evil.matches(as));
  CHECK_FALSE(evil.matches("x." + as + "c"));
  CHECK(evil.matches("x." + as + "b"));
  CHECK(evil.matches(as + "b"));
  const double s = seconds_since(t0);
  MESSAGE("4 matches of (a+)+b on 10,000 characters: " << s * 1e3 << " ms");
  CHECK(s < 2.0);  // measured under 1 ms; std::regex does not finish (2^10000 ways to split the a's)
}

TEST_CASE("module_pattern: a 50,000-character module path, and a 50,000-character key") {
  const std::string path = long_path(50000, "self_attn.q_proj");
  REQUIRE(path.size() >= 50000);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(module_pattern("q_proj").matches(path));
  CHECK(module_pattern(R"(self_attn\.q_proj)").matches(path));
  CHECK_FALSE(module_pattern("k_proj").matches(path));
  CHECK_FALSE(module_pattern("(a+)+b").matches(path));
  // the whole path as a key, dots escaped (what `lora extract` writes for a per-module rank)
  std::string exact;
  for (char c : path) exact += c == '.' ? std::string(R"(\.)") : std::string(1, c);
  const module_pattern whole(exact);
  CHECK(whole.matches(path));
  CHECK(whole.matches("prefix." + path));
  CHECK_FALSE(whole.matches(path.substr(1)));
  CHECK_FALSE(whole.matches("x" + path));
  MESSAGE("50,000-character paths and key: " << seconds_since(t0) * 1e3 << " ms");
  CHECK(seconds_since(t0) < 10.0);  // measured about 0.5 s, mostly the whole-path key (RE2 falls back to its NFA)
}

TEST_CASE("module_pattern: keys RE2 refuses, named by the construct") {
  // each refusal: RE2's own message, then the construct RE2 does not have
  struct refused {
    std::string key, re2_message, construct;
  };
  const std::vector<refused> table{
      {R"((a)\1)", R"(invalid escape sequence: \1)", "a backreference is not supported"},
      {"q_(proj)_\\1", R"(invalid escape sequence: \1)", "a backreference is not supported"},
      {"(?=x)q_proj", "invalid perl operator: (?=", "a lookahead is not supported"},
      {"q_proj(?!x)", "invalid perl operator: (?!", "a lookahead is not supported"},
      {"(?<=self_attn\\.)q_proj", "invalid perl operator: (?<", "a lookbehind is not supported"},
      {"(?<!mlp\\.)q_proj", "invalid perl operator: (?<", "a lookbehind is not supported"},
      {"(?>q_proj)", "invalid perl operator: (?>", "an atomic group is not supported"},
      {"a++", "bad repetition operator: ++", "a possessive quantifier is not supported"},
      {"q_proj*+", "bad repetition operator: *+", "a possessive quantifier is not supported"},
      {"(?<name>q)_proj", "invalid perl operator: (?<", "a (?<name>...) group (write (?P<name>...)) is not supported"},
      {R"(\pL{1000})", "pattern too large - compile failed", "a pattern larger than 8 MiB compiled is not supported"},
  };
  for (const auto& r : table) {
    CAPTURE(r.key);
    const std::string what = refusal(r.key);
    CHECK(what == r.re2_message + " (" + r.construct + ": patterns are matched by RE2, in linear time)");
  }
  // plain syntax errors: RE2's message alone
  CHECK(refusal("q(") == "missing ): q(");
  CHECK(refusal("[z-a]") == "invalid character class range: z-a");
  CHECK(refusal("a{2,1}") == "invalid repetition size: {2,1}");
  CHECK(refusal("\\") == "trailing \\");
  // what RE2 does have keeps working
  CHECK(module_pattern("(?P<n>q)_proj").matches("model.q_proj"));
  CHECK(module_pattern("(?i)Q_PROJ").matches("model.q_proj"));
  CHECK(module_pattern(R"(layers\.\d+\.mlp\.(?:up|down)_proj)").matches("model.layers.7.mlp.down_proj"));
}
