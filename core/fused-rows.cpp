#include "core/fused-rows.h"

#include <charconv>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace lora {

std::vector<fused_segment> split_rows(const fused_group& g, int64_t n_rows, int64_t n_cols, std::string& problem) {
  std::vector<fused_segment> out;
  const int64_t n_parts = static_cast<int64_t>(g.parts.size());
  if (n_rows <= 0 || n_parts == 0) {
    problem = fmt::format("it has {} rows", n_rows);
    return out;
  }
  switch (g.split) {
    case row_split::equal: {
      if (n_rows % n_parts != 0) {
        problem = fmt::format("its {} rows do not divide into {} equal parts ({})", n_rows, n_parts,
                              fmt::join(g.parts, ", "));
        return out;
      }
      const int64_t each = n_rows / n_parts;
      for (int64_t i = 0; i < n_parts; ++i) out.push_back({static_cast<size_t>(i), i * each, 0, each});
      return out;
    }
    case row_split::cols_then_rest: {
      // torch.split(w, (inner, inner, inner, mlp)): inner = the hidden size = n_cols
      const int64_t first = (n_parts - 1) * n_cols;
      if (n_cols <= 0 || first >= n_rows) {
        problem = fmt::format("its {} rows leave none for {} after {} parts of {} rows ({})", n_rows, g.parts.back(),
                              n_parts - 1, n_cols, fmt::join(g.parts, ", "));
        return out;
      }
      for (int64_t i = 0; i + 1 < n_parts; ++i) out.push_back({static_cast<size_t>(i), i * n_cols, 0, n_cols});
      out.push_back({static_cast<size_t>(n_parts - 1), first, 0, n_rows - first});
      return out;
    }
    case row_split::whole: out.push_back({0, 0, 0, n_rows}); return out;
    case row_split::swap_halves: {
      if (n_rows % 2 != 0) {
        problem = fmt::format("its {} rows do not divide into two halves (shift, scale)", n_rows);
        return out;
      }
      const int64_t half = n_rows / 2;
      out.push_back({0, 0, half, half});
      out.push_back({0, half, 0, half});
      return out;
    }
  }
  return out;
}

int64_t part_rows(const std::vector<fused_segment>& segments, size_t part) noexcept {
  int64_t n = 0;
  for (const fused_segment& s : segments) n += s.part == part ? s.n_rows : 0;
  return n;
}

std::string block_path(std::string_view block, std::string_view index) {
  return block.empty() ? std::string() : fmt::format("{}{}.", block, index);
}

bool match_block_path(std::string_view rest, std::string_view block, std::string_view& index, std::string_view& tail) {
  if (block.empty()) {
    index = {};
    tail = rest;
    return true;
  }
  if (!rest.starts_with(block)) return false;
  rest.remove_prefix(block.size());
  const size_t dot = rest.find('.');
  if (dot == 0 || dot == std::string_view::npos) return false;
  int n = 0;
  const auto [ptr, ec] = std::from_chars(rest.data(), rest.data() + dot, n);
  if (ec != std::errc() || ptr != rest.data() + dot) return false;
  index = rest.substr(0, dot);
  tail = rest.substr(dot + 1);
  return true;
}

bool match_fused_tensor(const fused_group& g, std::string_view prefix, std::string_view tensor, std::string& base_block,
                        std::string& parts_block) {
  if (!tensor.starts_with(prefix)) return false;
  std::string_view index, tail;
  if (!match_block_path(tensor.substr(prefix.size()), g.fused_block, index, tail) || tail != g.fused_weight)
    return false;
  base_block = std::string(prefix) + block_path(g.fused_block, index);
  parts_block = block_path(g.parts_block, index);
  return true;
}

}  // namespace lora
