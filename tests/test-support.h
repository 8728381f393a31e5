// Helpers shared by the unit tests: a temporary folder and catching the
// lora::error an expression throws.
#pragma once

#include <doctest/doctest.h>
#include <stdlib.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "formats/error.h"

namespace lora::testing {

// A fresh folder under $TMPDIR, removed with everything in it on destruction.
struct temp_dir {
  std::string path;
  temp_dir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "lora-test-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  ~temp_dir() {
    if (path.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  temp_dir(temp_dir&& other) noexcept : path(std::move(other.path)) { other.path.clear(); }
  std::string operator/(const std::string& name) const { return path + "/" + name; }
  // every entry's name, sorted (to see that nothing is left behind)
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(path)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
};

// The lora::error `f()` throws; fails the test when it throws none.
template <class F>
lora::error thrown(F&& f) {
  try {
    f();
  } catch (const lora::error& e) {
    return e;
  }
  FAIL("expected a lora::error");
  throw std::logic_error("unreachable");
}

// n floats uniform in [-1, 1), the same for the same seed (mt19937).
inline std::vector<float> randf(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// `head` + a value nested `levels` arrays deep + `tail`: with head `{"x":`
// and tail `}` the document nests levels + 1 deep. Unclosed: no `]` at all.
inline std::string nested_json(const std::string& head, size_t levels, const std::string& tail, bool closed = true) {
  return head + std::string(levels, '[') + (closed ? std::string(levels, ']') + tail : std::string());
}

}  // namespace lora::testing
