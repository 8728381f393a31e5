// The weight delta of a LyCORIS module whose delta is not B A (LoHa, LoKr,
// LoCon with a Tucker core), computed in double from the module's tensors as
// LyCORIS computes it. core/delta is its only caller: merge, verify and
// forward reach it through load_delta_factors / add_delta_rows /
// delta_element like any LoRA.
//
// Every form is reduced once (at load) to one of three shapes on the target
// viewed as [n_rows, n_cols] (n_cols = in * kh * kw for a conv):
//   product   D = U V                  U [n_rows, r], V [r, n_cols]
//   hadamard  D = (U1 V1) ⊙ (U2 V2)    U1 [n_rows, r1], V1 [r1, n_cols], ...
//   kron      D[i1 c + i2, j1 n2 + j2] = K1[i1, j1] K2[i2, j2]
//                                      K1 [a, b], K2 [c, n2], n_rows = a c, n_cols = b n2
// D is the unscaled delta: dW = s D, s = lora_module::scale.
//
// Sources (KohakuBlueleaf/LyCORIS @ f49d30d6, 2025-10-04):
//   LoHa  lycoris/functional/loha.py make_weight: dW = ((w1a w1b) * (w2a w2b)) * scale;
//         Tucker make_weight_tucker: rebuild_k = einsum("i j ..., j r, i p -> p r ...",
//         t_k, w_k_b, w_k_a), dW = rebuild_1 * rebuild_2 * scale, hada_w_k_a [r, out];
//         without Tucker hada_w_k_a [out, r], hada_w_k_b [r, in*kh*kw].
//   LoKr  lycoris/functional/lokr.py make_kron: w1 unsqueezed to w2's dims, kron(w1, w2);
//         w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b; w2 = lokr_w2, lokr_w2_a @ lokr_w2_b
//         (w2_b [r, d*kh*kw]) or rebuild_tucker(lokr_t2, lokr_w2_a, lokr_w2_b) =
//         einsum("i j ..., i p, j r -> p r ...", t2, w2_a [r, c], w2_b [r, d]).
//   LoCon lycoris/functional/locon.py diff_weight with mid: rebuild_tucker(mid, up^T, down):
//         dW[p, q, h, w] = sum_ij mid[i, j, h, w] up[p, i] down[j, q].
// ComfyUI comfy/weight_adapter/{loha,lokr}.py and base.py (tucker_weight_from_conv)
// compute the same products.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/adapter.h"

namespace lora {

struct lycoris_delta {
  enum class op { product, hadamard, kron };
  op kind = op::product;
  int64_t n_rows = 0, n_cols = 0;
  int64_t r1 = 0, r2 = 0;               // product: r1; hadamard: r1, r2
  std::vector<double> u1, v1;           // product, hadamard
  std::vector<double> u2, v2;           // hadamard
  int64_t a = 0, b = 0, c = 0, n2 = 0;  // kron: K1 [a, b], K2 [c, n2]
  std::vector<double> k1, k2;
};

// The shape of the delta m makes, from its tensors' shapes alone: [out, n]
// with n = in * kh * kw when the tensors do not say the kernel (LoHa, LoKr
// with 2-D factors), or the full [out, in, kh, kw] when they do (a Tucker
// core, a 4-D lokr_w2). For the fit check. Throws lora::error (exit 3)
// naming `file` and the key for tensors whose shapes disagree with each other.
std::vector<int64_t> lycoris_delta_shape(const lora_module& m, const std::string& file);

// Whether a delta of shape `made` (lycoris_delta_shape) changes a tensor of
// shape `target`: the same [rows, cols] view, and the same kernel when both
// shapes say it (a 1x1 kernel fits a 2-D target). Pure.
bool lycoris_delta_fits(const std::vector<int64_t>& made, const std::vector<int64_t>& target) noexcept;

// m's delta reduced as above for a target of `target_shape`, the factors
// decoded through core/dtype into double and their products formed in
// double. With `with_values` false only the shapes are checked (nothing
// decoded). Throws lora::error (exit 3): a shape that does not make the
// target (shape_mismatch naming m.name), a dtype that is not F16/BF16/F32/F64.
// Borrows nothing.
lycoris_delta make_lycoris_delta(const lora_module& m, const std::vector<int64_t>& target_shape,
                                 const std::string& file, bool with_values);

// Rows [row_begin, row_end) of D into out ((row_end - row_begin) * n_cols
// values, row-major). Rows must be in range (unchecked).
void lycoris_rows(const lycoris_delta& d, int64_t row_begin, int64_t row_end, double* out);

// One element D[row, col] in double. In range (unchecked).
double lycoris_element(const lycoris_delta& d, int64_t row, int64_t col) noexcept;

}  // namespace lora
