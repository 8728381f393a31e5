// lora verify: is MERGED the base with the adapter merged in? Checked at the
// weight level (every tensor against W0 + s B A, or the base when untouched)
// and, for a supported architecture, at the model level (logits of the base
// with the adapter applied unmerged against the merged model's).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lora {

struct verify_options {
  std::string base, adapter, merged;
  std::vector<int64_t> tokens;  // empty: a fixed seeded sequence
  int threads = 0;
};

struct tensor_check {
  std::string name;
  std::string kind;     // "merged" | "replaced" | "bias" | "untouched" | "missing" | "extra" | "shape"
  double max_error = 0;   // max |merged - expected|
  double tolerance = 0;   // the per-element tolerance at the worst element
  double ratio = 0;       // max over elements of error / tolerance (> 1 fails)
  uint64_t n_bad = 0;     // elements over their tolerance
  bool ok = true;
};

struct model_check {
  bool ran = false;
  std::string skipped;  // why not, when !ran
  int64_t n_tokens = 0;
  double max_abs = 0, max_rel = 0, tolerance = 0;  // max_rel = max_abs / max |logit|
  double top1_agreement = 0;                       // fraction of positions
  bool ok = true;
};

struct verify_report {
  std::vector<tensor_check> tensors;  // worst ratio first
  uint64_t n_checked = 0, n_failed = 0;
  model_check model;
  bool equivalent = true;
};

// Throws lora::error: exit 3 for malformed inputs or an adapter that does not
// fit the base, exit 4 when unreadable. Differences are report values.
verify_report verify_merge(const verify_options& options);

}  // namespace lora
