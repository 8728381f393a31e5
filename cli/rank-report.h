// Shared by `lora resize` and `lora combine`: the rank options
// (--rank | --energy | --max-error, --max-rank) and the per-module table.
#pragma once

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/combine.h"
#include "core/resize.h"
#include "formats/error.h"

namespace lora::cli {

struct rank_cli_options {
  std::optional<int64_t> rank;
  std::optional<double> energy;
  std::optional<double> max_error;
  int64_t max_rank = 0;
};

inline void add_rank_options(CLI::App* sub, rank_cli_options& o) {
  auto* rank = sub->add_option("--rank", o.rank, "new rank of every module (at most its current rank)");
  auto* energy = sub->add_option("--energy", o.energy,
                                 "per module, the smallest rank keeping this fraction F of sum s_i^2 (0 < F <= 1)");
  auto* error = sub->add_option("--max-error", o.max_error,
                                "per module, the smallest rank with relative Frobenius error <= E (0 <= E < 1)");
  rank->excludes(energy)->excludes(error);
  energy->excludes(error);
  sub->add_option("--max-rank", o.max_rank, "cap on every module's rank (0: none)")->check(CLI::NonNegativeNumber);
}

// The rule the options ask for; nullopt when none of the three was given.
inline std::optional<rank_rule> make_rank_rule(const rank_cli_options& o) {
  rank_rule rule;
  rule.max_rank = o.max_rank;
  if (o.rank) {
    if (*o.rank < 1) throw errors::usage(fmt::format("--rank {} must be at least 1", *o.rank));
    rule.type = rank_rule::kind::fixed;
    rule.value = static_cast<double>(*o.rank);
  } else if (o.energy) {
    if (!(*o.energy > 0 && *o.energy <= 1))
      throw errors::usage(fmt::format("--energy {} must be in (0, 1]", *o.energy));
    rule.type = rank_rule::kind::energy;
    rule.value = *o.energy;
  } else if (o.max_error) {
    if (!(*o.max_error >= 0 && *o.max_error < 1))
      throw errors::usage(fmt::format("--max-error {} must be in [0, 1)", *o.max_error));
    rule.type = rank_rule::kind::max_error;
    rule.value = *o.max_error;
  } else {
    if (o.max_rank > 0) {
      rule.type = rank_rule::kind::fixed;
      rule.value = static_cast<double>(o.max_rank);
      return rule;
    }
    return std::nullopt;
  }
  return rule;
}

inline nlohmann::ordered_json rank_report_json(const std::vector<module_rank_report>& modules) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (const module_rank_report& m : modules)
    out.push_back({{"module", m.name},
                   {"rank_in", m.rank_in},
                   {"rank_out", m.rank_out},
                   {"energy_kept", m.energy_kept},
                   {"relative_error", m.relative_error},
                   {"measured_error", m.measured_error},
                   {"target_reached", m.target_reached}});
  return out;
}

// One line per module, then a summary line.
inline void print_rank_table(const std::vector<module_rank_report>& modules) {
  size_t width = 6;
  for (const module_rank_report& m : modules) width = std::max(width, m.name.size());
  fmt::print("{:<{}}  {:>7}  {:>8}  {:>10}  {:>10}  {:>10}\n", "module", width, "rank in", "rank out", "energy",
             "rel error", "written");
  int64_t in = 0, out = 0;
  double worst = 0;
  size_t capped = 0;
  for (const module_rank_report& m : modules) {
    fmt::print("{:<{}}  {:>7}  {:>8}  {:>10.6f}  {:>10.3e}  {:>10.3e}{}\n", m.name, width, m.rank_in, m.rank_out,
               m.energy_kept, m.relative_error, m.measured_error, m.target_reached ? "" : "  (capped)");
    in += m.rank_in;
    out += m.rank_out;
    worst = std::max(worst, m.measured_error);
    capped += m.target_reached ? 0 : 1;
  }
  fmt::print("{} modules: total rank {} -> {}, worst relative error {:.3e}{}\n", modules.size(), in, out, worst,
             capped ? fmt::format(", {} capped before reaching the target", capped) : std::string());
}

}  // namespace lora::cli
