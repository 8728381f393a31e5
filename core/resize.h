// `lora resize`: every module of an adapter re-ranked by the low-rank
// recompression of core/recompress (no full delta is formed).
#pragma once

#include <string>
#include <vector>

#include "core/adapter.h"
#include "core/recompress.h"
#include "core/svd.h"

namespace lora {

struct resize_options {
  std::string adapter;  // PEFT folder / file or kohya file
  std::string out;      // same format as the input
  rank_rule rule;       // fixed / energy / max_error, capped by max_rank
  bool force = false;
};

struct resize_report {
  adapter_format format = adapter_format::peft;
  std::string out;
  std::vector<module_rank_report> modules;
};

// Re-ranks every module (recompress with scale s = the module's scale); the
// output keeps the input's format, dtypes, key forms, metadata (kohya:
// ss_network_dim / ss_network_alpha updated, stale sshs_* hashes dropped),
// DoRA magnitudes and modules_to_save tensors; alpha = new rank (scale 1,
// use_rslora false); a lora_B bias is multiplied by the old scale.
// Throws lora::error: exit 2 (--out exists without force), exit 3 (invalid
// adapter), exit 4 (I/O).
resize_report resize_adapter(const resize_options& options);

}  // namespace lora
