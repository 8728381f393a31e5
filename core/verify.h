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
#include <string_view>
#include <string>
#include <vector>

#include "core/delta.h"
#include "core/progress-event.h"
#include "formats/dtype.h"

namespace lora {

// One adapter that was merged, with its --weight.
struct verify_input {
  std::string path;
  double weight = 1.0;
};

struct verify_options {
  std::string base;
  std::vector<verify_input> adapters;  // as given to lora merge, in its order
  std::string merged;
  std::vector<int64_t> tokens;  // empty: a fixed seeded sequence
  int threads = 0;
  uint64_t seed = 1234;         // layer level: the inputs of every module
  int n_inputs = 4;             // layer level: input vectors per module (>= 1)
  double scale = 1.0;           // lora merge's --scale: multiplies every delta (each weight)
  bool skip_unmatched = false;  // as lora merge's: modules that map to nothing are skipped and listed
};

// What a tensor was checked as, or why it could not be.
enum class tensor_kind {
  merged,     // W0 + sum_k w_k s_k dW_k (DoRA-rescaled)
  replaced,   // modules_to_save
  bias,       // the base bias + sum_k w_k s_k b_k (lora_bias)
  untouched,  // equal to the base (rounded once to the merged dtype when it differs)
  missing,    // in the base, not in the merged model
  extra,      // in the merged model, not in the base
  shape,      // shapes differ
  scale,      // an FP8 block scale rewritten or dropped by the merge: checked through its weight's values
};

// "merged", "replaced", ... as the report prints them.
std::string_view tensor_kind_name(tensor_kind kind) noexcept;

struct tensor_check {
  std::string name;
  tensor_kind kind = tensor_kind::untouched;
  double max_error = 0;  // max |merged - expected|
  double tolerance = 0;  // the per-element tolerance at the worst element
  double ratio = 0;      // max over elements of error / tolerance (> 1 fails)
  uint64_t n_bad = 0;    // elements over their tolerance
  bool ok = true;
  // kind shape: the two shapes (the expected one first: the base's, or a
  // modules_to_save tensor's)
  std::vector<int64_t> base_shape{}, merged_shape{};
};

struct model_check {
  bool ran = false;
  std::string skipped;  // why not, when !ran
  int64_t n_tokens = 0;
  double max_abs = 0, max_rel = 0, tolerance = 0;  // max_rel = max_abs / max |logit|
  double top1_agreement = 0;                       // fraction of positions
  // When the merged model cannot hold the base's values (a narrower dtype): the unmerged side
  // ran on the base weights rounded to it, so that the comparison measures
  // the merge, not the conversion asked for.
  std::optional<dtype> base_rounded_to;
  // then: max |dlogit| / max |logit| that rounding alone causes (the
  // tolerance is at least twice it; see verify.cpp check_model)
  double conversion_rel = 0;
  bool ok = true;
};

// The module kind a layer check ran, and why it could not run.
enum class layer_module { linear, fan_in_fan_out, embedding, conv };
enum class layer_problem { none, missing, shape, dtype };

// One adapted module run on n_inputs seeded inputs, merged against unmerged.
// Inputs: N(0, 1) vectors (linear, fan_in_fan_out, conv flattened to
// in * kh * kw); an embedding's inputs are one-hot token rows (a lookup).
// Per output element: |y_merged - y_ref| <= tolerance (see verify.cpp).
struct layer_check {
  std::string name;  // the module ("model.layers.0.self_attn.q_proj")
  layer_module module = layer_module::linear;
  bool dora = false, bias = false;              // DoRA magnitude, lora_bias
  layer_problem problem = layer_problem::none;  // the merged tensor cannot be run
  size_t n_adapters = 1;                        // adapters that change this module
  double max_abs = 0;                           // max |y_merged - y_ref|
  double max_rel = 0;                           // max_abs / max |y_ref|
  double tolerance = 0;                         // the tolerance of the worst-ratio element
  double ratio = 0;                             // max over output elements of |diff| / tolerance (> 1 fails)
  uint64_t n_bad = 0;                           // output elements over their tolerance
  bool ok = true;
};

// "linear", "fan_in_fan_out", "embedding" or "conv", then "+dora", "+bias";
// or the problem: "missing", "shape", "dtype".
std::string layer_kind_text(const layer_check& c);

struct verify_report {
  // failures that are not values first (missing, shape, extra: an
  // unmatched tensor has no error to rank), then worst ratio first
  std::vector<tensor_check> tensors;
  // checked: every tensor looked at (each base tensor, and each tensor only
  // the merged model has), failed: those not ok, so failed <= checked
  uint64_t n_checked = 0, n_failed = 0;
  std::vector<layer_check> layers;  // one per adapted module, worst ratio first
  uint64_t n_layers_failed = 0;
  // 3-D target_parameters modules (fused experts): no layer check runs for
  // them (the weight level checks every expert's values)
  std::vector<std::string> layers_skipped;
  model_check model;
  // skip_unmatched: the modules that map to nothing, as {adapter path, module name}
  std::vector<std::pair<std::string, std::string>> skipped_modules;
  bool equivalent = true;  // no tensor, layer or model failure
};

// Checks that options.merged is options.base with every adapter merged in
// (W = W0 + sum_k weight_k * scale * s_k B_k A_k, as lora merge computes it).
// Throws lora::error: exit 3 for malformed inputs, an adapter that does not
// fit the base (or a lora_bias module whose base has no bias), a DoRA module
// that shares its tensor with another adapter's; exit 4 when unreadable;
// exit 2 for no adapter, a weight or scale that is not finite, n_inputs < 1.
// Differences are report values. `progress` (may be empty) is called after
// each base tensor's weight and layer checks and after each forward pass of
// the model level, with the bytes of both models read so far (from worker
// threads, serialized).
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
