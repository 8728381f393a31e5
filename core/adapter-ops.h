// Adapter-to-adapter pipelines: resize (re-rank every module), combine (one
// adapter whose delta is a weighted sum) and convert (PEFT <-> kohya, MLX ->
// PEFT). None of them forms a full delta B A: a module's delta is handled
// through its factors and a small r x r core.
//
// Low-rank recompression (the math shared by resize and combine): for
// s B A with B [m, r], A [r, n],
//   B = Q_B R_B, A^T = Q_A R_A          (thin QR: Q orthonormal, R small)
//   s B A = Q_B (s R_B R_A^T) Q_A^T      (the core C = s R_B R_A^T, at most r x r)
//   C = U S V^T                          (exact SVD, core/svd.h exact_svd)
//   B' = Q_B U_k sqrt(S_k), A' = sqrt(S_k) V_k^T Q_A^T   (core/svd.h split_balanced)
// so B' A' is the best rank-k approximation of s B A and its singular values
// are those of C. The output scale is 1: alpha = k (rsLoRA is dropped).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/adapter-write.h"
#include "core/adapter.h"
#include "core/svd.h"

namespace lora {

// ---------------------------------------------------------------------------
// math

struct recompressed {
  int64_t rows = 0, cols = 0;  // m, n
  int64_t rank = 0;            // k
  std::vector<double> b;       // [m, k] row-major
  std::vector<double> a;       // [k, n] row-major
  std::vector<double> s;       // the singular values of s B A (all of them), descending
  double total_energy = 0;     // ||s B A||_F^2
  double kept_energy = 0;      // sum_{i<k} s_i^2
  bool target_reached = true;  // false when --max-rank (or the input rank) stopped the rule

  double energy_fraction() const noexcept { return total_energy > 0 ? kept_energy / total_energy : 1.0; }
  // ||s B A - B' A'||_F / ||s B A||_F = sqrt(sum_{i>=k} s_i^2 / total), before rounding
  double relative_error() const noexcept;
};

// Best rank-k factors of scale * b a (b [m, r], a [r, n], row-major, f64),
// k chosen by `rule` (core/svd.h choose_rank on the singular values of the
// core) and never above min(m, n, r). Throws lora::error (exit 3) when LAPACK
// fails (NaN / Inf factors).
recompressed recompress(std::span<const double> b, std::span<const double> a, int64_t m, int64_t n, int64_t r,
                        double scale, const rank_rule& rule);

// ||b a||_F for b [m, r], a [r, n] without forming b a (= ||R_B R_A^T||_F).
double low_rank_norm(std::span<const double> b, std::span<const double> a, int64_t m, int64_t n, int64_t r);

// ---------------------------------------------------------------------------
// reading adapters into memory

// Copies every tensor of a loaded adapter (PEFT or kohya; after fit_adapter
// the names are the dotted module paths) into an adapter_data, bytes
// untouched. kohya modules keep their kohya names until fitted.
adapter_data adapter_to_data(const adapter& a);

// True when `path` is an mlx_lm adapter: a folder with adapters.safetensors
// (and no adapter_model.safetensors), or a .safetensors file whose keys end
// in .lora_a / .lora_b. Throws exit 3 / 4 when the file cannot be parsed.
bool is_mlx_adapter(const std::string& path);

// Reads an mlx_lm LoRA adapter (adapters.safetensors + adapter_config.json)
// as PEFT modules. mlx_lm's LoRALinear computes
//   y = x W^T + scale * (x @ lora_a) @ lora_b,  lora_a [in, r], lora_b [r, out]
// so dW = scale * (lora_a @ lora_b)^T = scale * lora_b^T lora_a^T, that is
// PEFT A = lora_a^T [r, in], B = lora_b^T [out, r], alpha = scale * r (rsLoRA
// off). LoRAEmbedding (lora_a [vocab, r], lora_b [r, dims], dW = scale *
// lora_a @ lora_b) is PEFT's embedding LoRA with the same transposes: a module
// is an embedding when `base` has "<module>.weight" of shape [vocab, dims]
// (not [out, in]) or, without a base, when its last name part is an
// embedding's (embed_tokens, wte, word_embeddings, tok_embeddings, embed_in).
// Throws lora::error (exit 3) naming the file and key: no config or no
// lora_parameters.scale, DoRA / full fine-tunes, a key that is not .lora_a /
// .lora_b, a missing half, shapes that are not [in, r] and [r, out], a rank
// that disagrees with lora_parameters.rank, a module that does not fit `base`.
adapter_data load_mlx_adapter(const std::string& path, const model_files* base);

// ---------------------------------------------------------------------------
// pipelines

// One module's line in a resize / combine report.
struct module_rank_report {
  std::string name;
  int64_t rank_in = 0;  // input rank (combine: the sum over the adapters)
  int64_t rank_out = 0;
  double energy_kept = 1;      // sum_{i<k} s_i^2 / ||delta||^2
  double relative_error = 0;   // ||delta - B'A'|| / ||delta||, exact arithmetic
  double measured_error = 0;   // the same for the factors as written (after rounding to their dtype)
  bool target_reached = true;  // false: --max-rank or the input rank stopped the rule
  // resize only (for its --report): every singular value of s B A, exact,
  // descending, and the shape of B A; empty / 0 for combine
  std::vector<double> singular_values;
  int64_t rows = 0, cols = 0;
};

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

struct convert_options {
  std::string adapter;  // PEFT folder / file, kohya file, mlx_lm folder / file
  adapter_format to = adapter_format::peft;
  std::string out;
  std::string base;                   // model folder / file; required for kohya -> PEFT
  std::string kohya_prefix = "auto";  // lora_unet_ for UNet / DiT module names, else lora_te_
  bool force = false;
};

struct convert_report {
  std::string from;  // "peft" | "kohya" | "mlx"
  adapter_format to = adapter_format::peft;
  std::string out;
  size_t n_modules = 0;
  size_t n_saved = 0;
  int64_t min_rank = 0, max_rank = 0;
  double min_scale = 0, max_scale = 0;  // effective scales as written
};

// Converts an adapter. Factor bytes are copied untouched (MLX: transposed
// element by element, no rounding); per-module rank and alpha are carried
// (PEFT rank_pattern / alpha_pattern <-> kohya per-module .alpha); rsLoRA
// becomes kohya alpha = s * r. kohya -> PEFT resolves the dotted module
// names with fit_adapter against `base` and reshapes factors to the layer
// they fit (a 1x1-conv LoRA on a Linear becomes [r, in]).
// Throws lora::error: exit 2 (kohya -> PEFT without base, --out exists);
// exit 3 (what the target format cannot hold: DoRA, lora_B bias, embedding
// LoRA, modules_to_save or fan_in_fan_out into kohya; an adapter that does
// not fit base; invalid input); exit 4 (I/O).
convert_report convert_adapter(const convert_options& options);

}  // namespace lora
