// Low-rank recompression: the math resize and combine share, next to
// core/svd. For s B A with B [m, r], A [r, n],
//   B = Q_B R_B, A^T = Q_A R_A          (thin QR: Q orthonormal, R small)
//   s B A = Q_B (s R_B R_A^T) Q_A^T      (the core C = s R_B R_A^T, at most r x r)
//   C = U S V^T                          (exact SVD, core/svd.h exact_svd)
//   B' = Q_B U_k sqrt(S_k), A' = sqrt(S_k) V_k^T Q_A^T   (core/svd.h split_balanced)
// so B' A' is the best rank-k approximation of s B A and its singular values
// are those of C. No full m x n delta is ever formed.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/adapter-data.h"
#include "core/svd.h"

namespace lora {

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
// fails (NaN / Inf factors) or the core's norm overflows f64.
recompressed recompress(std::span<const double> b, std::span<const double> a, int64_t m, int64_t n, int64_t r,
                        double scale, const rank_rule& rule);

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

// ||b a||_F for b [m, r], a [r, n] without forming b a (= ||R_B R_A^T||_F).
double low_rank_norm(std::span<const double> b, std::span<const double> a, int64_t m, int64_t n, int64_t r);

// ||delta - b_new a_new||_F / ||delta||_F for delta = scale * old.b old.a and
// new factors as written (a_new [k, ...], b_new [m, k(, 1, 1)] in their
// dtype), through the stacked factors [scale b | -b_new] [a; a_new] (no full
// matrix). `total_energy` = ||delta||_F^2; 0 gives 0.
double measured_error(const factors& old, double scale, const tensor_data& a_new, const tensor_data& b_new, int64_t k,
                      double total_energy);

}  // namespace lora
