// Truncated SVD of a dense matrix (a weight delta) and the one place where an
// SVD becomes a LoRA pair: rank choice, randomized and exact SVD, the
// balanced A/B split and the measured residual. Used by `lora extract`, and
// meant for `resize` / `combine`.
//
// Storage: every matrix here is row-major, as safetensors stores it. A matrix
// `a` of m rows and n columns is a span of m * n values.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "formats/error.h"

namespace lora {

enum class svd_method { randomized, exact };
std::string_view svd_method_name(svd_method m) noexcept;  // "randomized" | "exact"

// How the rank of one module is chosen.
//   fixed:     r = value (an integer)
//   energy:    smallest r with sum_{i<r} s_i^2 >= value * ||a||_F^2
//   max_error: smallest r with ||a - a_r||_F / ||a||_F <= value, that is
//              sum_{i<r} s_i^2 >= (1 - value^2) * ||a||_F^2
// always capped by max_rank (0: no cap) and by min(m, n).
struct rank_rule {
  enum class kind { fixed, energy, max_error };
  kind type = kind::fixed;
  double value = 0;
  int64_t max_rank = 0;
};

// Options of the randomized range finder (Halko, Martinsson, Tropp 2011,
// algorithm 4.4: randomized subspace iteration).
struct svd_options {
  svd_method method = svd_method::randomized;
  int64_t oversample = 10;    // sketch width l = k + oversample
  int power_iters = 2;        // passes of A^T, A with a QR after each product
  uint64_t seed = 0;          // Gaussian test matrix; same seed, same result
  int64_t first_sketch = 32;  // energy / error rules: first k tried, then doubled
};

// The leading part of an SVD a ~ u diag(s) vt, truncated to `rank` columns.
struct low_rank_svd {
  int64_t rows = 0, cols = 0;                  // m, n of the input
  int64_t rank = 0;                            // r: columns of u, rows of vt
  std::vector<double> u;                       // [m, r] row-major, orthonormal columns
  std::vector<double> vt;                      // [r, n] row-major, orthonormal rows
  std::vector<double> s;                       // every singular value computed (>= r), descending
  double total_energy = 0;                     // ||a||_F^2, computed exactly from a (not from s)
  double kept_energy = 0;                      // sum_{i<r} s_i^2
  svd_method method = svd_method::randomized;  // what actually ran
  int64_t sketch = 0;                          // randomized: final sketch width l; exact: min(m, n)
  bool target_reached = true;                  // false when max_rank stopped an energy / error rule

  // sum_{i<r} s_i^2 / ||a||_F^2
  double energy_fraction() const noexcept { return total_energy > 0 ? kept_energy / total_energy : 1.0; }
  // sqrt(||a||^2 - sum_{i<r} s_i^2) / ||a||: exact for the exact SVD and for
  // the randomized one (a - Q B_r splits into two orthogonal parts), up to
  // rounding. extract reports the measured residual instead.
  double estimated_error() const noexcept;
};

// The smallest rank satisfying `rule` given singular values `s` (descending,
// possibly only the leading ones) and the exact total energy ||a||_F^2.
// Returns {rank, reached}: reached is false when the cap (or the end of `s`)
// came first; then rank is min(cap, s.size()). Rank is at least 1.
struct rank_choice {
  int64_t rank = 0;
  bool reached = true;
};
rank_choice choose_rank(std::span<const double> s, double total_energy, const rank_rule& rule, int64_t cap);

// Truncated SVD of the f32 matrix a [m, n] for `rule`.
// randomized: Y = A Omega (Omega [n, l] Gaussian from seed), Q = qr(Y), then
// power_iters times Q = qr(A qr(A^T Q)); B^T = A^T Q, B = Ub S Vb^T by gesdd;
// U = Q Ub. All products are sgemm; QR is sgeqrf + sorgqr. With an energy or
// error rule, the sketch doubles (from first_sketch) until the chosen rank lies
// within the first k = l - oversample values, the cap is reached, or l = min(m, n)
// (then the sketch spans the whole range and the result is exact).
// exact: widens a to f64 and calls exact_svd.
// Throws lora::error (exit 3, no file or module: see named_svd_errors) for
// NaN / Inf input (checked before LAPACK runs) or when LAPACK fails ("SVD did
// not converge").
low_rank_svd truncated_svd(std::span<const float> a, int64_t m, int64_t n, const rank_rule& rule,
                           const svd_options& options);

// Exact truncated SVD of the f64 matrix a [m, n] by LAPACK dgesdd.
// Throws lora::error (exit 3, no file or module) for NaN / Inf input, for
// ||a||_F^2 overflowing f64, or when LAPACK fails.
low_rank_svd exact_svd(std::span<const double> a, int64_t m, int64_t n, const rank_rule& rule);

// Runs f() (an SVD of one module's matrix) and gives a lora::error (exit 3)
// it throws without a file (the SVD's own failures above) the adapter or
// model `file` and the `module`, so the one-line message names both. Other
// errors (interrupted, I/O, already named) pass through unchanged.
template <class F>
auto named_svd_errors(const std::string& file, const std::string& module, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const error& e) {
    if (!e.file().empty() || e.code() != exit_code::invalid_input) throw;
    throw errors::invalid(file, module, e.detail());
  }
}

// The balanced LoRA split of a truncated SVD, the one place it is made:
// B = U_r sqrt(S_r) [m, r], A = sqrt(S_r) V_r^T [r, n], so B A = U_r S_r V_r^T
// and the scale is 1 (alpha = r). No clamping.
struct lora_pair {
  int64_t rows = 0, cols = 0, rank = 0;
  std::vector<double> b;  // [m, r] row-major
  std::vector<double> a;  // [r, n] row-major
};
lora_pair split_balanced(const low_rank_svd& svd);

// ||a - b a_factor||_F for a [m, n], b [m, r], a_factor [r, n]: the measured
// residual of the factors as they are written (after rounding). a is
// overwritten by the residual (sgemm / dgemm with beta = 1); sums in f64.
double residual_norm(std::span<float> a, std::span<const float> b, std::span<const float> a_factor, int64_t m,
                     int64_t n, int64_t r);
double residual_norm(std::span<double> a, std::span<const double> b, std::span<const double> a_factor, int64_t m,
                     int64_t n, int64_t r);

// ||a||_F^2, summed in f64 (every norm here goes through it).
double squared_norm(std::span<const float> a);
double squared_norm(std::span<const double> a);

// One module's spectrum for allocate_budget: singular values (descending,
// possibly only the leading ones), the matrix shape and a rank cap.
struct budget_module {
  std::span<const double> s;
  int64_t rows = 0, cols = 0;
  int64_t cap = 0;  // the rank may not exceed min(cap, s.size())
};

// Spreads `budget` factor parameters (sum of r_k (rows_k + cols_k)) over the
// modules to minimise the total squared error sum_k sum_{i >= r_k} s_{k,i}^2:
// greedy on the gain per parameter s_{k,i}^2 / (rows_k + cols_k), taking the
// best next value that still fits. The gains of a module fall with i, so this
// is optimal to within one module step (the knapsack's greedy bound). Returns
// one rank per module (0: none); the sum never exceeds budget. Pure.
std::vector<int64_t> allocate_budget(std::span<const budget_module> modules, int64_t budget);

}  // namespace lora
