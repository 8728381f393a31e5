// Parses a --tokens value ("1,2,3") into token ids. Shared by forward and verify.
#pragma once

#include <charconv>
#include <cstdint>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "formats/error.h"

namespace lora::cli {

// Throws lora::error (exit 2) for an empty list, an empty item or a value that
// is not a non-negative integer.
inline std::vector<int64_t> parse_token_list(const std::string& text) {
  std::vector<int64_t> out;
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    const std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    int64_t v = 0;
    auto [ptr, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (item.empty() || ec != std::errc() || ptr != item.data() + item.size() || v < 0)
      throw errors::usage(
          fmt::format("--tokens {}: '{}' is not a non-negative integer (expected e.g. 1,2,3)", text, item));
    out.push_back(v);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace lora::cli
