// `lora extract`: a LoRA adapter from the difference of two models.
// For every selected 2-D weight whose delta dW = W_tuned - W_base is not
// zero: a truncated SVD (core/svd.h), the balanced split B = U sqrt(S),
// A = sqrt(S) V^T, written as a PEFT folder or a kohya file, with the
// measured error of the factors as written.
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
  svd_options svd;  // method, seed (each module's seed mixes in its name)
  // Modules to extract: a regex matched against the module path P (tensor
  // "<P>.weight") as ^(.*\.)?(REGEX)$, the rule rank_pattern keys follow
  // (core/module-pattern, RE2 syntax; a regex RE2 refuses is a usage error).
  // Empty: every 2-D linear weight except embeddings and lm_head.
  std::string targets;
  std::optional<dtype> out_dtype;  // factors' dtype; nullopt: the base tensor's
  extract_format format = extract_format::peft;
  // Write deltas that are not extracted (norms, biases, excluded weights)
  // whole: PEFT modules_to_save, or lora_B.bias for the bias of an extracted
  // module. PEFT only.
  bool save_modules = false;
  int threads = 0;     // BLAS threads; <= 0: all cores
  bool force = false;  // replace an existing `out` (swapped in atomically at the end)
};

struct extracted_module {
  std::string name;        // module path P
  std::string tensor;      // "<P>.weight"
  bool embedding = false;  // written as lora_embedding_A / _B
  int64_t rows = 0, cols = 0;
  int64_t rank = 0;
  svd_method method = svd_method::randomized;  // what ran (a full-width sketch is exact)
  int64_t sketch = 0;                          // randomized: sketch width l
  double delta_norm = 0;                       // ||dW||_F
  double energy = 0;                           // sum_{i<r} s_i^2 / ||dW||_F^2
  double error = 0;                            // measured ||dW - B A||_F / ||dW||_F, factors as written
  bool target_reached = true;                  // false when --max-rank stopped --energy / --max-error
};

// A tensor whose delta is not extracted.
struct other_delta {
  std::string tensor;
  std::vector<int64_t> shape;
  std::string reason;  // "not a 2-D weight", "excluded by --targets", "embedding (not selected)", ...
  double delta_norm = 0;
  std::string saved_as;  // empty: not written; else the adapter key
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
  uint64_t out_bytes = 0;       // size of the adapter weights file
};

// Runs the extraction and writes the adapter atomically (a temp folder or
// file beside `out`, renamed at the end; nothing is left on error).
// Throws lora::error: exit 3 when the models do not match (a tensor missing
// on one side, shapes, dtypes that cannot be subtracted, NaN/Inf in a delta),
// when they are identical ("models are identical: nothing to extract") or
// when no 2-D delta is selected; exit 2 for option combinations the format
// cannot hold; exit 4 on I/O failure. `progress` is called after each
// extracted module (may be empty).
extract_report run_extract(const extract_options& options, const progress_fn& progress);

// The module path P of a tensor name ("x.y.weight" -> "x.y"), and whether a
// 2-D weight is an embedding or the output head (not extracted by default).
std::string module_path(const std::string& tensor);
bool is_embedding_module(const std::string& path);
bool is_output_head(const std::string& path);

}  // namespace lora
