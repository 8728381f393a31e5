// core/rope: inv_freq and the attention factor per rope_type, parsed from a
// config.json by formats/hf-config, against the float64 numpy reference
// (tests/reference/rope_reference.py, committed as tests/reference/rope-inv-freq.json);
// apply_rope's attention factor.
#include <doctest/doctest.h>

#include <cmath>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/rope.h"
#include "formats/hf-config.h"

using namespace lora;

namespace {
nlohmann::json reference_cases() {
  std::ifstream in(std::string(LORA_SOURCE_DIR) + "/tests/reference/rope-inv-freq.json");
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str());
}
}  // namespace

TEST_CASE("inv_freq and attention factor per rope_type against the float64 reference") {
  const nlohmann::json cases = reference_cases();
  REQUIRE(cases.size() >= 13);
  for (const nlohmann::json& tc : cases) {
    CAPTURE(tc["name"].get<std::string>());
    const hf_config c = parse_hf_config(tc["config"].dump(), "config.json");
    const rope_frequencies f = compute_rope_frequencies(c.layers.at(0).rope, c.head_dim, c.max_position_embeddings,
                                                        tc["seq_len"].get<int64_t>());
    const std::vector<double> want = tc["inv_freq"].get<std::vector<double>>();
    REQUIRE(f.inv_freq.size() == want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      CAPTURE(i);
      CHECK(std::abs(f.inv_freq[i] - want[i]) <= 1e-12 * want[i]);
    }
    CHECK(std::abs(f.attention_factor - tc["attention_factor"].get<double>()) <= 1e-12);
  }
}

TEST_CASE("apply_rope multiplies cos and sin by the attention factor") {
  const int64_t d = 8;
  rope_frequencies f{{0.5, 0.25, 0.125, 0.0625}, 1.5};
  std::vector<float> x(3 * d);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.1f * static_cast<float>(i) - 1.0f;
  const std::vector<float> x0 = x;
  apply_rope(x.data(), 3, 1, d, f);
  for (int64_t p = 0; p < 3; ++p)
    for (int64_t j = 0; j < d / 2; ++j) {
      const double a = static_cast<double>(p) * f.inv_freq[static_cast<size_t>(j)];
      const double x1 = x0[p * d + j], x2 = x0[p * d + j + d / 2];
      CHECK(x[p * d + j] == doctest::Approx(1.5 * (x1 * std::cos(a) - x2 * std::sin(a))).epsilon(1e-6));
      CHECK(x[p * d + j + d / 2] == doctest::Approx(1.5 * (x2 * std::cos(a) + x1 * std::sin(a))).epsilon(1e-6));
    }
}

TEST_CASE("dynamic switches at max_position_embeddings, longrope at original_max_position_embeddings") {
  rope_parameters p;
  p.type = "dynamic";
  p.factor = 2.0;
  const rope_frequencies at = compute_rope_frequencies(p, 16, 8, 8), past = compute_rope_frequencies(p, 16, 8, 9);
  CHECK(at.inv_freq[1] == doctest::Approx(std::pow(10000.0, -2.0 / 16)));
  CHECK(past.inv_freq[1] < at.inv_freq[1]);
  rope_parameters l;
  l.type = "longrope";
  l.original_max_position_embeddings = 8;
  l.short_factor.assign(8, 1.0);
  l.long_factor.assign(8, 4.0);
  CHECK(compute_rope_frequencies(l, 16, 8, 8).inv_freq[0] == 1.0);
  CHECK(compute_rope_frequencies(l, 16, 8, 9).inv_freq[0] == 0.25);
  CHECK(compute_rope_frequencies(l, 16, 8, 9).attention_factor == 1.0);  // factor 8 / 8 = 1
}
