// `lora combine`: one adapter whose delta is a weighted sum of adapters'
// deltas, exact (ranks concatenated) or recompressed (core/recompress).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "core/adapter.h"
#include "core/recompress.h"
#include "core/svd.h"

namespace lora {

struct combine_input {
  std::string path;
  double weight = 1.0;
};

struct combine_options {
  std::vector<combine_input> adapters;
  std::string out;
  std::optional<rank_rule> rule;         // nullopt: exact (concatenated ranks)
  std::optional<adapter_format> format;  // nullopt: the first adapter's
  std::string base;                      // needed to mix PEFT and kohya inputs
  std::string kohya_prefix = "auto";     // kohya output names for dotted modules
  bool force = false;
};

struct combine_report {
  adapter_format format = adapter_format::peft;
  std::string out;
  bool exact = true;
  dtype out_type = dtype::F32;
  std::vector<module_rank_report> modules;
};

// One adapter whose delta is sum_i w_i dW_i, module by module (a module
// present in some adapters only takes those). Exact mode:
//   B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...], A = [A_1; A_2; ...], alpha = sum r_i
// (scale 1); with a rule, (B, A) is recompressed. Factors are rounded once to
// the inputs' dtype when they all share one, else written in F32; a lora_B
// bias becomes sum_i w_i s_i b_i.
// Throws lora::error: exit 2 (no adapter, weight not finite, PEFT and kohya
// mixed without a base, --out exists); exit 3 (DoRA or modules_to_save in an
// input, a module whose shapes or layout differ between adapters — named,
// an adapter that does not fit --base); exit 4 (I/O).
combine_report combine_adapters(const combine_options& options);

}  // namespace lora
