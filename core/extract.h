// `lora extract`: a LoRA adapter from the difference of two models.
// For every selected weight whose delta dW = W_tuned - W_base is not zero
// (2-D linear, GPT-2 Conv1D stored [in, out], embedding, conv [out, in, kh, kw]
// flattened to [out, in*kh*kw]): a truncated SVD (core/svd.h), the balanced
// split B = U sqrt(S), A = sqrt(S) V^T, written as a PEFT folder or a kohya
// file, with the measured error of the factors as written. The pipeline is
// select (which deltas, which layout), factorize (ranks: per-module rule or
// one --budget), build (the adapter in memory, then write_adapter).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/progress-event.h"
#include "core/svd.h"
#include "formats/dtype.h"

namespace lora {

enum class extract_format { peft, kohya };

struct extract_options {
  std::string base;   // MODEL: HF folder or .safetensors
  std::string tuned;  // MODEL with the same tensors and shapes
  std::string out;    // PEFT: a folder; kohya: a .safetensors file. Must not exist unless force.
  rank_rule rule;
  // Conv weights ([out, in, kh, kw]): their own rule (--conv-rank); nullopt:
  // `rule`.
  std::optional<rank_rule> conv_rule;
  // > 0: one total of factor parameters, sum over modules of r (rows + cols),
  // spread to minimise the total squared error (greedy on s_i^2 / (rows + cols),
  // never past a module's break-even rank nor rule.max_rank); `rule` is then
  // only the cap. Ranks land in rank_pattern.
  int64_t budget = 0;
  svd_options svd;  // method, seed (each module's seed mixes in its name)
  // Modules to extract: a regex matched against the module path P (tensor
  // "<P>.weight") as ^(.*\.)?(REGEX)$, the rule rank_pattern keys follow
  // (core/module-pattern, RE2 syntax; a regex RE2 refuses is a usage error).
  // Empty: every 2-D linear and conv weight except embeddings and lm_head.
  std::string targets;
  std::optional<dtype> out_dtype;  // factors' dtype; nullopt: the base tensor's
  extract_format format = extract_format::peft;
  // Write deltas that are not extracted (norms, biases, excluded weights, an
  // embedding / lm_head whose vocabulary grew) whole: PEFT modules_to_save, or
  // lora_B.bias for the bias of an extracted module. PEFT only.
  bool save_modules = false;
  int threads = 0;     // BLAS threads; <= 0: all cores
  bool force = false;  // replace an existing `out` (swapped in atomically at the end)
};

// How a module's delta is laid out and written.
//   linear:    [out, in], lora_A [r, in], lora_B [out, r]
//   conv1d:    stored [in, out] (GPT-2 Conv1D): lora_A [r, in], lora_B [out, r], fan_in_fan_out
//   embedding: [vocab, dim], lora_embedding_A [r, vocab], lora_embedding_B [dim, r]
//   conv:      [out, in, kh, kw], lora_A / lora_down [r, in, kh, kw], lora_B / lora_up [out, r, 1, 1]
enum class delta_layout { linear, conv1d, embedding, conv };
std::string_view delta_layout_name(delta_layout l) noexcept;  // "linear" | "conv1d" | "embedding" | "conv"

struct extracted_module {
  std::string name;        // module path P
  std::string tensor;      // "<P>.weight"
  std::string key;         // the name it is written under (kohya: lora_unet_...; PEFT: P)
  bool embedding = false;  // written as lora_embedding_A / _B
  delta_layout layout = delta_layout::linear;
  std::vector<int64_t> shape;  // the stored weight's shape
  int64_t rows = 0, cols = 0;  // the matrix factored: the stored 2-D weight, or conv [out, in*kh*kw]
  int64_t rank = 0;
  svd_method method = svd_method::randomized;  // what ran (a full-width sketch is exact)
  int64_t sketch = 0;                          // randomized: sketch width l
  double delta_norm = 0;                       // ||dW||_F
  double energy = 0;                           // sum_{i<r} s_i^2 / ||dW||_F^2
  double error = 0;                            // measured ||dW - B A||_F / ||dW||_F, factors as written
  bool target_reached = true;                  // false when --max-rank stopped --energy / --max-error
  // Factors r (rows + cols) against the dense delta rows * cols: break_even
  // is the largest rank whose factors are no larger, floor(rows cols / (rows + cols)).
  int64_t break_even = 0;
  bool larger_than_dense = false;  // rank > break_even: the factors outweigh the delta
  // Every singular value the SVD computed, descending (randomized: the sketch
  // width, the first rank + oversample of them trusted; exact: min(rows, cols)).
  std::vector<double> singular_values;
  int64_t params() const noexcept { return rank * (rows + cols); }
};

// A tensor whose delta is not extracted.
struct other_delta {
  std::string tensor;
  std::vector<int64_t> shape;
  std::string reason;     // "not a 2-D weight", "excluded by --targets", "embedding (not selected)", ...
  bool resized = false;   // an embedding / head whose rows differ from the base's (a bigger vocabulary)
  double delta_norm = 0;  // ||dW||_F; resized: over the common rows plus the tuned-only rows
  std::string saved_as;   // empty: not written; else the adapter key
};

struct extract_report {
  std::string out;
  extract_format format = extract_format::peft;
  std::vector<extracted_module> modules;  // base tensor order
  std::vector<other_delta> others;
  int64_t n_tensors = 0;        // tensors in the base
  int64_t n_unchanged = 0;      // identical in both models
  int64_t config_rank = 0;      // r (and lora_alpha) of the config: the most common rank
  double total_delta_norm = 0;  // sqrt(sum ||dW||^2) over extracted modules
  double total_error = 0;       // sqrt(sum ||dW - BA||^2) / total_delta_norm
  double total_energy = 0;      // sum kept energy / sum ||dW||^2
  // The whole model: every delta, extracted, saved whole (kept exactly) or
  // left out (lost whole).
  double model_delta_norm = 0;  // sqrt(sum over every changed tensor of ||dW||^2)
  double saved_norm = 0;        // sqrt(sum ||dW||^2) of deltas saved whole
  double left_out_norm = 0;     // sqrt(sum ||dW||^2) of deltas not written
  double model_energy = 0;      // (extracted kept + saved) / model ||dW||^2
  double model_error = 0;       // sqrt(extracted residual^2 + left out^2) / model_delta_norm
  int64_t params = 0;           // sum of r (rows + cols) over modules
  int64_t budget = 0;           // the --budget asked (0: none)
  std::string family;           // checkpoint family of the base (kohya-format: "other", "sd1", "sdxl", "flux")
  uint64_t out_bytes = 0;       // size of the adapter weights file
};

// Runs the extraction and writes the adapter atomically (a temp folder or
// file beside `out`, renamed at the end; nothing is left on error).
// Throws lora::error: exit 3 when the models do not match (a tensor missing
// on one side, shapes, dtypes that cannot be subtracted, NaN/Inf in a delta),
// when they are identical ("models are identical: nothing to extract"), when
// no 2-D delta is selected, when an embedding / lm_head changed its number of
// rows without --save-modules, and for --format kohya on an SD 1.x UNet key
// outside the LDM layout (core/ldm-names has no diffusers name for it); exit 2 for
// option combinations the format cannot hold; exit 4 on I/O failure.
// Orientation follows core/adapter's stored_in_out (GPT-2 Conv1D: the base's
// config.json model_type and the module name), the rule fit_adapter uses.
// `progress` (may be empty) follows the whole run in bytes of both models
// (total_bytes: every tensor of both, plus the jobs once more with --budget;
// total_items: the base's tensors): called after each tensor the first scan
// compares or measures, after each 64 MiB of a comparison, after each module
// of the --budget pass and after each extracted module; the last call has
// done_items == total_items and done_bytes == total_bytes.
extract_report run_extract(const extract_options& options, const progress_fn& progress);

// The module path P of a tensor name ("x.y.weight" -> "x.y"), and whether a
// 2-D weight is an embedding or the output head (not extracted by default).
std::string module_path(const std::string& tensor);
bool is_embedding_module(const std::string& path);
bool is_output_head(const std::string& path);

}  // namespace lora
