// lora verify: is MERGED the base with the adapter merged in? Checked at the
// weight level (every tensor against W0 + s B A, or the base when untouched),
// at the layer level (every adapted module on seeded inputs: W_merged x
// against the unmerged W0 x + s B (A x)) and, for a supported architecture,
// at the model level (logits of the base with the adapter applied unmerged
// against the merged model's).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/delta.h"
#include "core/progress-event.h"

namespace lora {

struct verify_options {
  std::string base, adapter, merged;
  std::vector<int64_t> tokens;  // empty: a fixed seeded sequence
  int threads = 0;
  uint64_t seed = 1234;  // layer level: the inputs of every module
  int n_inputs = 4;      // layer level: input vectors per module (>= 1)
};

struct tensor_check {
  std::string name;
  std::string kind;      // "merged" | "replaced" | "bias" | "untouched" | "missing" | "extra" | "shape"
  double max_error = 0;  // max |merged - expected|
  double tolerance = 0;  // the per-element tolerance at the worst element
  double ratio = 0;      // max over elements of error / tolerance (> 1 fails)
  uint64_t n_bad = 0;    // elements over their tolerance
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

// One adapted module run on n_inputs seeded inputs, merged against unmerged.
// Inputs: N(0, 1) vectors (linear, fan_in_fan_out, conv flattened to
// in * kh * kw); an embedding's inputs are one-hot token rows (a lookup).
// Per output element: |y_merged - y_ref| <= tolerance (see verify.cpp).
struct layer_check {
  std::string name;      // the module ("model.layers.0.self_attn.q_proj")
  std::string kind;      // "linear" | "fan_in_fan_out" | "embedding" | "conv", "+dora", "+bias";
                         // "missing" | "shape" | "dtype" when the merged tensor cannot be run
  double max_abs = 0;    // max |y_merged - y_ref|
  double max_rel = 0;    // max_abs / max |y_ref|
  double tolerance = 0;  // the tolerance of the worst-ratio element
  double ratio = 0;      // max over output elements of |diff| / tolerance (> 1 fails)
  uint64_t n_bad = 0;    // output elements over their tolerance
  bool ok = true;
};

struct verify_report {
  std::vector<tensor_check> tensors;  // worst ratio first
  uint64_t n_checked = 0, n_failed = 0;
  std::vector<layer_check> layers;  // one per adapted module, worst ratio first
  uint64_t n_layers_failed = 0;
  model_check model;
  bool equivalent = true;  // no tensor, layer or model failure
};

// `progress` (may be empty) is called after each base tensor's weight and
// layer checks and after each forward pass of the model level, with the
// bytes of both models read so far (from worker threads, serialized).
// Throws lora::error: exit 3 for malformed inputs or an adapter that does not
// fit the base (or a lora_bias module whose base has no bias), exit 4 when
// unreadable, exit 2 for n_inputs < 1. Differences are report values.
verify_report verify_merge(const verify_options& options, const progress_fn& progress = {});

// The unmerged output of one module, in double, without forming B A:
//   y = W0 x + w s B (A x)                      (w = weight)
//   DoRA: y_o = m_o / ||V_o|| (W0 x + w s B (A x))_o, V = W0 + w s dW formed
//         only for its norm per output feature (row, or column when transposed)
// W0 (`w0`) is the base tensor in its stored layout [n_rows, n_cols]: the
// module maps n_in = n_cols inputs to n_out = n_rows outputs (y = W0 x), or,
// when f.transposed (fan_in_fan_out, embedding), n_in = n_rows to n_out =
// n_cols (y = W0^T x). `x` holds the inputs row-major [n, n_in]; returns
// y [n, n_out]. Throws lora::error (exit 3) when sizes disagree.
std::vector<double> unmerged_layer_output(const delta_factors_f64& f, std::span<const double> w0,
                                          std::span<const double> x, double weight = 1.0);

}  // namespace lora
