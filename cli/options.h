// Command-line options shared by several commands: --dtype, and the
// repeatable --adapter / --weight pair.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "formats/dtype.h"
#include "formats/error.h"

namespace lora::cli {

// --dtype same|bf16|f16|f32: nullopt for "same" (keep each tensor's dtype);
// throws exit 2 otherwise.
inline std::optional<dtype> parse_out_dtype(const std::string& s) {
  if (s == "same") return std::nullopt;
  if (s == "bf16") return dtype::BF16;
  if (s == "f16") return dtype::F16;
  if (s == "f32") return dtype::F32;
  throw errors::usage(fmt::format("--dtype {} is not one of same, bf16, f16, f32", s));
}

// --adapter A1 [--adapter A2 ...] with an optional --weight per adapter.
struct weighted_adapters {
  std::vector<std::string> adapters;
  std::vector<double> weights;
};

inline void add_weighted_adapter_options(CLI::App* sub, weighted_adapters& o, const std::string& adapter_help) {
  sub->add_option("--adapter", o.adapters, adapter_help)->required()->expected(1)->take_all();
  sub->add_option("--weight", o.weights, "weight of each --adapter, in the same order (default 1 each)")
      ->expected(1)
      ->take_all();
}

// The adapters paired with their weights as `Input{path, weight}`. Throws
// exit 2 unless there is one weight per adapter, or none (all 1).
template <class Input>
std::vector<Input> weighted_inputs(const weighted_adapters& o) {
  if (!o.weights.empty() && o.weights.size() != o.adapters.size())
    throw errors::usage(fmt::format("{} --weight values for {} --adapter values: give one per adapter, or none",
                                    o.weights.size(), o.adapters.size()));
  std::vector<Input> inputs;
  for (size_t i = 0; i < o.adapters.size(); ++i)
    inputs.push_back({o.adapters[i], o.weights.empty() ? 1.0 : o.weights[i]});
  return inputs;
}

}  // namespace lora::cli
