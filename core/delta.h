// The weight delta of one LoRA module, laid out like the base tensor it
// targets. The one place that turns A, B, the scale, the layout flags and
// DoRA's magnitude into numbers: merge, verify and forward all call these.
//
// Every target tensor is viewed as a row-major matrix [n_rows, n_cols] with
// n_rows = shape[0] and n_cols = the product of the other dims. With s the
// module's scale (lora_module::scale) and w a caller weight:
//
//   linear          target [out, in]:          dW = w s B A           A [r, in],    B [out, r]
//   fan_in_fan_out  target [in, out] (Conv1D): dW = w s (B A)^T       A [r, in],    B [out, r]
//   embedding       target [vocab, dim]:       dW = w s (B A)^T       A [r, vocab], B [dim, r]
//   conv            target [out, in, kh, kw]:  dW[o,i,h,w] = w s sum_r B[o,r] A[r,i,h,w]
//                                              A [r, in, kh, kw], B [out, r, 1, 1]
//
//   experts         target [E, out, in]:       dW[e] = w s B_e A_e      A [r E, in],  B [out, r E]
//   experts^T       target [E, in, out]:       dW[e] = w s (B_e A_e)^T  (transformers' is_transposed experts)
//
// Experts are PEFT's lora.ParamWrapper on a 3-D parameter (target_parameters,
// tuners/lora/layer.py get_delta_weight @ huggingface/peft 5d602fdb):
// A_e = A.reshape(E, r, in)[e] (rows e r .. e r + r - 1) and
// B_e = B.reshape(out, r, E)[:, :, e] (columns k E + e): note the two
// layouts differ; einsum("o r e, e r i -> e o i") (or "-> e i o"). The view
// is [E, d1 * d2]: one row per expert. A 2-D parameter is the linear case.
//
// Conv (1x1 and kxk) is the linear case on the [out, in*kh*kw] view. The
// "transposed" layouts (fan_in_fan_out, embedding) compute dW = w s A^T B^T.
//
// DoRA (PEFT, tuners/lora/variants.py + dora.py): V = W + dW;
// W' = (m / ||V||) * V, the L2 norm taken per output feature over all of its
// input elements: per row for linear and conv (m has n_rows entries: [out] or
// PEFT's conv [1, out, 1, 1]), per column for fan_in_fan_out and embedding
// (m has n_cols entries; PEFT builds DoraEmbeddingLayer(fan_in_fan_out=True),
// so an embedding's m is [dim] and its norm runs over the vocabulary).
//
// lora_bias (PEFT): bias' = bias + w s b, b = lora_B.bias [out] (PEFT >= 0.15
// scales the bias as its forward pass does; older releases did not).
//
// LyCORIS forms (lora_module::form: LoHa, LoKr, LoCon with lora_mid): dW =
// w s D with D the module's delta formed in double by core/lycoris-delta
// (formulas and sources there), rows formed on demand; never transposed, no
// PEFT DoRA. The f32 path adds each element as W + (w s D) computed in double
// and rounded once to f32; delta_element is exact in double.
//
// LyCORIS weight decomposition (lora_module::dora_scale, on LoCon, LoHa,
// LoKr; KohakuBlueleaf/LyCORIS @ f49d30d6, lycoris/modules/{locon,loha,lokr}.py
// get_merged_weight + apply_weight_decompose, the same code in all three):
//   V  = W + s D                      (the delta at multiplier 1, whatever w)
//   g  = m / (||V|| + eps)            eps = torch.finfo(dora_scale.dtype).eps:
//                                     2^-23 F32, 2^-7 BF16, 2^-10 F16, 2^-52 F64
//   W' = V * g                        at w = 1
//   W' = V * (w (g - 1) + 1)          otherwise ("scale = multiplier * (scale - 1) + 1")
// so the caller's weight w (adapter weight times --scale: LyCORIS's one
// multiplier) acts on the rescaling, not on the delta; at w = 0 W' = V, not
// W. The axis comes from dora_scale's shape (wd_on_out): [out, 1, ...] one
// norm per output row over its in*kh*kw elements; [1, in, 1, ...] one norm
// per input channel over out*kh*kw elements (columns c*kh*kw .. of the
// [out, in*kh*kw] view). Formed in double; merge runs such tensors on its
// f64 path (one rounding to the output dtype). ComfyUI differs
// (comfy/weight_adapter/base.py weight_decompose): on the output axis it
// takes the norm of the original W, eps follows the base's dtype, and the
// strength is applied as W + strength (W' - W); we follow LyCORIS, which
// trained the files.
//
// Precision: the f32 path runs one cblas_sgemm per row block with alpha = w s
// and beta = 1, accumulating straight into a converted f32 block of W (no
// separately rounded delta). The f64 path is the exact reference: plain
// loops in double, for tests and `lora verify`.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/adapter.h"
#include "formats/dtype.h"
#include "core/lycoris-delta.h"

namespace lora {

// A module's factors converted once (through core/dtype) and checked against
// the target's shape, ready for any number of row blocks. T is float (the
// BLAS path) or double (the exact reference).
template <typename T>
struct delta_factors_t {
  std::string key;     // the module name, for messages
  std::string target;  // the base tensor
  std::vector<int64_t> target_shape;
  int64_t n_rows = 0;  // target shape[0]
  int64_t n_cols = 0;  // product of the other dims
  int64_t rank = 0;
  double scale = 0;         // the module's s (the caller's weight comes on top)
  bool transposed = false;  // dW = s A^T B^T (fan_in_fan_out, embedding)
  bool dora = false;
  // A [rank, k], row-major: k = n_cols (plain) or n_rows (transposed).
  std::vector<T> a;
  // B [m, rank], row-major: m = n_rows (plain) or n_cols (transposed).
  std::vector<T> b;
  // DoRA m: n_rows entries (norm per row) or n_cols entries (per column).
  std::vector<T> magnitude;
  // Experts (a 3-D target_parameters target): n_experts = n_rows = E, each
  // row one expert's [expert_rows, expert_cols] matrix (target shape[1],
  // shape[2]); a holds A_e at e * rank * k (A as stored, [E, r, k]), b holds
  // B_e at e * m * rank ([E, m, r], reordered from B's columns k E + e),
  // with k, m the expert's in / out (transposed: [E, in, out]).
  int64_t n_experts = 0;
  int64_t expert_rows = 0, expert_cols = 0;
  // LyCORIS forms: the delta D (dW = s D); a and b are then empty and rank
  // is the module's (for error bounds). Shared: copies of the factors share it.
  std::shared_ptr<const lycoris_delta> lycoris;
  // LyCORIS weight decomposition (lora_module::dora_scale): `dora` is set and
  // `magnitude` holds dora_scale's values; formula in the header comment.
  bool dora_lycoris = false;
  bool dora_columns = false;  // [1, in, ...]: one norm per input channel
  int64_t dora_group = 1;     // per input channel: columns per norm (kh * kw)
  double dora_eps = 0;        // added to each norm (finfo(dora_scale dtype).eps)

  // Norms per column (PEFT transposed) or per column group (LyCORIS [1, in, ...]).
  bool per_column() const noexcept { return transposed || dora_columns; }
  // DoRA with per-column norms needs every row of V before any row is final.
  bool needs_whole_tensor() const noexcept { return dora && per_column(); }
  // The number of DoRA norms: rows, columns, or input channels.
  size_t n_norms() const noexcept {
    return static_cast<size_t>(!per_column() ? n_rows : transposed ? n_cols : n_cols / dora_group);
  }
};

// The weight V = W + weight' dW is formed at for DoRA: PEFT weight' = w,
// LyCORIS 1 (its multiplier acts on the rescaling). Pure.
template <typename T>
double dora_v_weight(const delta_factors_t<T>& f, double weight) noexcept {
  return f.dora_lycoris ? 1.0 : weight;
}

// The factor DoRA multiplies V's elements of one norm by, from the
// magnitude m, the squared norm ||V||^2 and the caller's weight w: PEFT
// m / ||V||; LyCORIS g = m / (||V|| + eps), w == 1 ? g : w (g - 1) + 1
// (see the header comment). Pure.
template <typename T>
double dora_factor(const delta_factors_t<T>& f, double magnitude, double norm_sq, double weight) noexcept {
  if (!f.dora_lycoris) return magnitude / std::sqrt(norm_sq);
  const double g = magnitude / (std::sqrt(norm_sq) + f.dora_eps);
  return weight == 1.0 ? g : weight * (g - 1.0) + 1.0;
}
using delta_factors = delta_factors_t<float>;
using delta_factors_f64 = delta_factors_t<double>;

// Converts m.a, m.b (and m.magnitude for DoRA, m.dora_scale for LyCORIS
// weight decomposition) and checks them against `target_shape` (the base
// tensor's shape): B's rows and A's columns must match the target's view,
// the rank must agree, a conv A must match the kernel, dora_scale must be
// [out, 1, ...] or [1, in, 1, ...] of the target. `file` names the adapter
// in messages.
// Throws lora::error: exit 3 (shape_mismatch / invalid, naming the adapter
// key) for a disagreeing shape or a dtype that is not F16/BF16/F32/F64.
// Borrows nothing: the factors own their converted copies.
delta_factors load_delta_factors(const lora_module& m, const std::vector<int64_t>& target_shape,
                                 const std::string& file);
delta_factors_f64 load_delta_factors_f64(const lora_module& m, const std::vector<int64_t>& target_shape,
                                         const std::string& file);
// The same checks without converting anything (planning: cheap, whatever
// the adapter's size).
void check_delta_factors(const lora_module& m, const std::vector<int64_t>& target_shape, const std::string& file);

// Scans the module's tensors as stored (lora_A, lora_B, the LyCORIS
// tensors, and the DoRA magnitude, dora_scale and lora_B bias when present) for NaN or infinite values, by
// their bits (nothing converted). Every command runs it in its check phase,
// before computing or writing anything (merge --dry-run included).
// Throws lora::error (exit 3) naming `file` and the first tensor holding one.
void check_finite_factors(const lora_module& m, const std::string& file);

// Adds weight * dW for rows [row_begin, row_end) of the target into w_block,
// which holds exactly those rows: w_block[(i - row_begin) * n_cols + j].
// f32: one cblas_sgemm, alpha = weight * s, beta = 1. f64: plain loops.
// Ignores DoRA (the raw delta; see apply_module_rows). Never throws for
// in-range rows (out-of-range rows throw lora::error exit 3).
void add_delta_rows(const delta_factors& f, double weight, int64_t row_begin, int64_t row_end, float* w_block);
void add_delta_rows(const delta_factors_f64& f, double weight, int64_t row_begin, int64_t row_end, double* w_block);

// The layer product of the delta, for n inputs at once: y[v, o] += weight *
// dW x_v, x [n, n_in] and y [n, n_out] row-major, n_in = n_cols and n_out =
// n_rows (plain) or the reverse (transposed), computed in double without
// forming B A (LoRA: s B (A x)); LyCORIS forms row block by row block of D.
// No DoRA. Never throws.
void add_delta_times(const delta_factors_f64& f, double weight, const double* x, size_t n, double* y);

// Experts (n_experts > 0): one expert's layer product, y[v, o] += weight * s
// sum_k B_e[o, k] (A_e x_v)[k] for n inputs x [n, in] and y [n, out]
// (row-major, f32; A_e [r, in], B_e [out, r] whatever the storage layout),
// without forming the expert's delta: PEFT's ParamWrapper applied unmerged
// to expert `expert`'s linear. Throws lora::error (exit 3) when f holds no
// experts or `expert` is out of range.
void add_expert_times(const delta_factors& f, int64_t expert, double weight, const float* x, int64_t n, float* y);

// One element of the delta in double, dW[row, col] / weight = s * sum_k B A
// in the target's view (exact products of the f32 factors). For re-computing
// the rare elements whose f32 sum lies too close to a rounding boundary of
// the output dtype. No DoRA; row and col must be in range (unchecked).
double delta_element(const delta_factors& f, int64_t row, int64_t col) noexcept;

// For each row i of the target view, a bound on the absolute terms of any of
// its elements: bound[i] >= |s| * sum_k |B A terms| of dW[i, j] for every j
// (|s| sum_k |B[i,k]| max_j |A[k,j]|, transposed alike). With it a caller
// bounds the f32 error of W0 + dW without knowing W0.
std::vector<double> delta_row_bounds(const delta_factors& f);
std::vector<double> delta_row_bounds(const delta_factors_f64& f);  // the same from the f64 factors

// Rounding a merged f32 block once to BF16 or F16 as the exact value
// W0 + sum_k w_k dW_k would round (plain LoRA only: no DoRA, no bias). The
// f32 value R is within 1/2 ulp(R) + (r + 2) u sum|terms| of the exact one
// (u = 2^-24): rounding R and rounding the exact value can differ only when
// R lies that close to a midpoint between two neighbouring 16-bit values.
// Those elements (about 1e-4 of them) are recomputed in double from W0 and
// the factors (delta_element) before rounding. Borrows the factors, which
// must outlive it.
class exact_rounding {
 public:
  // `factors[k]` with `weights[k]` (adapter weight times --scale), all for
  // the same target; `out_type` BF16 or F16 (else throws lora::error exit 3).
  // With `slices` (one per factor, nullptr: the whole target), factor k
  // reaches only the rows its slice places (lora_module::slices), and the
  // target has `n_rows` rows.
  exact_rounding(std::vector<const delta_factors*> factors, std::vector<double> weights, dtype out_type,
                 std::vector<const row_slice*> slices = {}, int64_t n_rows = 0);
  // Rounds rows [row_begin, row_end) of the target (n_cols each), merged in
  // f32 in `merged`, into `out` (2 bytes per element, the rows' bytes in
  // order). `w0` holds the same rows of W0 as stored (type `w0_type`:
  // F16, BF16 or F32). Never throws for sizes that agree.
  void round_rows(dtype w0_type, std::span<const uint8_t> w0, int64_t row_begin, int64_t row_end, const float* merged,
                  std::span<uint8_t> out) const;

 private:
  std::vector<const delta_factors*> factors_;
  std::vector<double> weights_;
  std::vector<const row_slice*> slices_;
  dtype out_type_;
  int64_t n_cols_ = 0;
  std::vector<float> row_bound_;  // per row: (r + 3) sum_k |w_k| bound_k, see suspect() in delta.cpp
};

// Applies the whole module to rows [row_begin, row_end) of W held in w_block
// (W0 plus any earlier adapter's contribution):
//   plain LoRA: W += weight * dW;
//   DoRA:       V = W + weight * dW; W = (m / ||V||) * V (norm per output
//               feature, computed in double);
//   LyCORIS weight decomposition: V = W + dW; W = V * dora_factor (header
//               comment; norms per row or per input channel).
// DoRA with per-column norms (needs_whole_tensor()) requires the whole
// tensor: row_begin == 0 and row_end == n_rows, else throws exit 3.
void apply_module_rows(const delta_factors& f, double weight, int64_t row_begin, int64_t row_end, float* w_block);
void apply_module_rows(const delta_factors_f64& f, double weight, int64_t row_begin, int64_t row_end, double* w_block);

// DoRA in row blocks, first pass: the squared L2 norm of V = W + weight * dW
// per output feature, from rows [row_begin, row_end) of V held in v_block
// (W's rows after add_delta_rows at dora_v_weight): per row, norms_sq[i] =
// sum_j V[i, j]^2 for those rows; per column (needs_whole_tensor()),
// norms_sq[j / group] += sum_i V[i, j]^2 (group 1, or kh*kw for LyCORIS's
// per-input-channel form), so the caller zeroes norms_sq and feeds every
// row block once (rows in increasing order give the sums apply_module_rows
// forms). norms_sq has f.n_norms() entries. Throws
// exit 3 for out-of-range rows or a norms_sq of another size.
void add_dora_norms_sq(const delta_factors& f, int64_t row_begin, int64_t row_end, const float* v_block,
                       std::span<double> norms_sq);
void add_dora_norms_sq(const delta_factors_f64& f, int64_t row_begin, int64_t row_end, const double* v_block,
                       std::span<double> norms_sq);

// apply_module_rows for any row block, DoRA with V's squared norms given
// (add_dora_norms_sq over every row, same weight): V = W + dora_v_weight *
// dW; W = dora_factor(m, norms_sq, weight) * V per norm. The second pass of a
// per-column DoRA done in blocks; the same values as the whole-tensor call.
// Plain LoRA ignores norms_sq. Throws exit 3 as add_dora_norms_sq.
void apply_module_rows(const delta_factors& f, double weight, int64_t row_begin, int64_t row_end, float* w_block,
                       std::span<const double> norms_sq);
void apply_module_rows(const delta_factors_f64& f, double weight, int64_t row_begin, int64_t row_end, double* w_block,
                       std::span<const double> norms_sq);

// lora_bias: bias[o] += weight * s * b[o], b = m.bias (converted through
// core/dtype). Throws exit 3 when m has no bias or its size is not bias.size().
void add_bias_delta(const lora_module& m, double weight, std::span<float> bias, const std::string& file);
void add_bias_delta(const lora_module& m, double weight, std::span<double> bias, const std::string& file);

// A module whose rows land in rows of the target (lora_module::slices):
// adds weight * dW for the rows of [row_begin, row_end) of s.tensor that the
// slice covers, into w_block holding exactly rows [row_begin, row_end):
// w_block[(t - row_begin) * n_cols + j] += weight * dW[t - s.tensor_row +
// s.module_row, j]. `f` holds the module's whole delta (its delta_shape).
// Rows outside the slice are not touched. No DoRA. Never throws for rows in range.
void add_slice_rows(const delta_factors& f, double weight, const row_slice& s, int64_t row_begin, int64_t row_end,
                    float* w_block);
void add_slice_rows(const delta_factors_f64& f, double weight, const row_slice& s, int64_t row_begin, int64_t row_end,
                    double* w_block);

// lora_bias through a slice: bias[t] += weight * s * b[t - s.tensor_row +
// s.module_row] for the slice's rows t of the whole base bias `bias`.
// Throws exit 3 when m has no bias or the rows fall outside either vector.
void add_bias_slice(const lora_module& m, double weight, const row_slice& s, std::span<float> bias,
                    const std::string& file);
void add_bias_slice(const lora_module& m, double weight, const row_slice& s, std::span<double> bias,
                    const std::string& file);

}  // namespace lora
