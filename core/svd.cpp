#include "core/svd.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <queue>
#include <cmath>
#include <limits>

#include <fmt/format.h>

#include "formats/error.h"

// Layout note. A row-major matrix a [m, n] has the same bytes as the
// column-major matrix a^T [n, m] with leading dimension n. BLAS and LAPACK
// below run column-major on that view (written `At`), so no transposed copy
// of the big matrix is ever made.

namespace lora {

namespace {

// splitmix64: a portable, seedable generator (std::normal_distribution is
// not specified bit for bit across standard libraries).
struct splitmix64 {
  uint64_t state;
  uint64_t next() noexcept {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // uniform in (0, 1]
  double uniform() noexcept { return (static_cast<double>(next() >> 11) + 1.0) * 0x1.0p-53; }
};

// n standard normal values (Box-Muller), fixed by seed.
std::vector<float> gaussian(size_t n, uint64_t seed) {
  std::vector<float> out(n);
  splitmix64 rng{seed};
  for (size_t i = 0; i < n; i += 2) {
    const double r = std::sqrt(-2.0 * std::log(rng.uniform()));
    const double t = 2.0 * M_PI * rng.uniform();
    out[i] = static_cast<float>(r * std::cos(t));
    if (i + 1 < n) out[i + 1] = static_cast<float>(r * std::sin(t));
  }
  return out;
}

// LAPACK's info: > 0 the iteration did not converge, < 0 argument -info was
// illegal (NaN input makes some implementations report either). The caller
// adds the file and module (named_svd_errors).
void check_lapack(int info, const char* routine) {
  if (info > 0) throw errors::invalid("", "", fmt::format("SVD did not converge ({} info {})", routine, info));
  if (info < 0) throw errors::invalid("", "", fmt::format("SVD failed ({}: argument {} illegal)", routine, -info));
}

// Refuses a matrix whose squared norm is not finite: NaN / Inf in it, or
// values so large that their energies overflow f64 (|a| ~ 1e154).
void check_energy(double total) {
  if (!std::isfinite(total))
    throw errors::invalid("", "",
                          "the matrix holds NaN or Inf, or values too large for an SVD (||a||^2 overflows f64)");
}

// Replaces the column-major y [rows, cols] (rows >= cols) by the Q of its QR.
void orthonormalize(std::vector<float>& y, int64_t rows, int64_t cols, std::vector<float>& tau) {
  tau.resize(static_cast<size_t>(cols));
  check_lapack(LAPACKE_sgeqrf(LAPACK_COL_MAJOR, rows, cols, y.data(), rows, tau.data()), "sgeqrf");
  check_lapack(LAPACKE_sorgqr(LAPACK_COL_MAJOR, rows, cols, cols, y.data(), rows, tau.data()), "sorgqr");
}

// sum of a_i^2 in f64, with eight independent partial sums so the loop is
// not bound by the latency of one chain of additions
template <class T>
double sum_squares(std::span<const T> a) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const size_t n = a.size(), n8 = n - n % 8;
  for (size_t i = 0; i < n8; i += 8)
    for (size_t k = 0; k < 8; ++k) acc[k] += static_cast<double>(a[i + k]) * static_cast<double>(a[i + k]);
  for (size_t i = n8; i < n; ++i) acc[i - n8] += static_cast<double>(a[i]) * static_cast<double>(a[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

int64_t rank_cap(const rank_rule& rule, int64_t m, int64_t n) {
  const int64_t full = std::min(m, n);
  return rule.max_rank > 0 ? std::min(rule.max_rank, full) : full;
}

// The randomized SVD with sketch width l (k + oversample, at most min(m, n)):
// returns u [m, l], vt [l, n] (row-major, f32 math widened) and l values.
low_rank_svd randomized_sketch(std::span<const float> a, int64_t m, int64_t n, int64_t l, const svd_options& options) {
  const float* at = a.data();  // column-major [n, m], ld n
  const int64_t full = std::min(m, n);

  // Y = A Omega: [m, l] column-major
  std::vector<float> omega = gaussian(static_cast<size_t>(n * l), options.seed);
  std::vector<float> y(static_cast<size_t>(m * l));
  cblas_sgemm(CblasColMajor, CblasTrans, CblasNoTrans, m, l, n, 1.0f, at, n, omega.data(), n, 0.0f, y.data(), m);
  std::vector<float> tau;
  orthonormalize(y, m, l, tau);

  // power iterations with re-orthonormalization: Z = qr(A^T Q), Q = qr(A Z).
  // Pointless when l = min(m, n): Q then spans the whole range already.
  std::vector<float> z(static_cast<size_t>(n * l));
  if (l < full) {
    for (int it = 0; it < options.power_iters; ++it) {
      cblas_sgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, l, m, 1.0f, at, n, y.data(), m, 0.0f, z.data(), n);
      orthonormalize(z, n, l, tau);
      cblas_sgemm(CblasColMajor, CblasTrans, CblasNoTrans, m, l, n, 1.0f, at, n, z.data(), n, 0.0f, y.data(), m);
      orthonormalize(y, m, l, tau);
    }
  }

  // B^T = A^T Q [n, l]; B^T = Ub S Vb^T, so A ~ Q B = (Q Vb) S Ub^T
  cblas_sgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, l, m, 1.0f, at, n, y.data(), m, 0.0f, z.data(), n);
  std::vector<float> sv(static_cast<size_t>(l));
  std::vector<float> ub(static_cast<size_t>(n * l));
  std::vector<float> vbt(static_cast<size_t>(l * l));
  check_lapack(LAPACKE_sgesdd(LAPACK_COL_MAJOR, 'S', n, l, z.data(), n, sv.data(), ub.data(), n, vbt.data(), l),
               "sgesdd");

  // U^T = Vb^T Q^T [l, m] column-major, which is U [m, l] row-major
  std::vector<float> ut(static_cast<size_t>(l * m));
  cblas_sgemm(CblasColMajor, CblasNoTrans, CblasTrans, l, m, l, 1.0f, vbt.data(), l, y.data(), m, 0.0f, ut.data(), l);

  low_rank_svd out;
  out.rows = m;
  out.cols = n;
  out.rank = l;
  out.method = svd_method::randomized;
  out.sketch = l;
  out.u.assign(ut.begin(), ut.end());
  out.vt.assign(ub.begin(), ub.end());  // Ub [n, l] column-major is V^T [l, n] row-major
  out.s.assign(sv.begin(), sv.end());
  return out;
}

// Keeps the first r columns of u and rows of vt.
void truncate(low_rank_svd& svd, int64_t r) {
  if (r == svd.rank) return;
  std::vector<double> u(static_cast<size_t>(svd.rows * r));
  for (int64_t i = 0; i < svd.rows; ++i) std::copy_n(svd.u.begin() + i * svd.rank, r, u.begin() + i * r);
  svd.u = std::move(u);
  svd.vt.resize(static_cast<size_t>(r * svd.cols));
  svd.rank = r;
}

void finish(low_rank_svd& svd, const rank_choice& choice) {
  truncate(svd, choice.rank);
  svd.target_reached = choice.reached;
  svd.kept_energy = 0;
  for (int64_t i = 0; i < choice.rank; ++i) svd.kept_energy += svd.s[i] * svd.s[i];
}

}  // namespace

std::string_view svd_method_name(svd_method m) noexcept { return m == svd_method::exact ? "exact" : "randomized"; }

double low_rank_svd::estimated_error() const noexcept {
  if (total_energy <= 0) return 0;
  return std::sqrt(std::max(0.0, total_energy - kept_energy) / total_energy);
}

rank_choice choose_rank(std::span<const double> s, double total_energy, const rank_rule& rule, int64_t cap) {
  const int64_t avail = std::min<int64_t>(cap, static_cast<int64_t>(s.size()));
  if (avail < 1) return {0, false};
  if (rule.type == rank_rule::kind::fixed) {
    const int64_t want = static_cast<int64_t>(rule.value);
    return {std::clamp<int64_t>(want, 1, avail), want <= avail};
  }
  // the energy the first r values must reach
  const double fraction = rule.type == rank_rule::kind::energy ? rule.value : 1.0 - rule.value * rule.value;
  const double need = fraction * total_energy * (1.0 - 1e-12);
  double kept = 0;
  for (int64_t r = 1; r <= avail; ++r) {
    kept += s[r - 1] * s[r - 1];
    if (kept >= need) return {r, true};
  }
  return {avail, false};
}

low_rank_svd exact_svd(std::span<const double> a, int64_t m, int64_t n, const rank_rule& rule) {
  const int64_t k = std::min(m, n);
  const double total = sum_squares<double>(a);
  check_energy(total);
  // dgesdd on At [n, m]: At = uu diag(s) vvt, so A = vvt^T diag(s) uu^T:
  // U [m, k] row-major is vvt [k, m] column-major; V^T [k, n] row-major is uu.
  std::vector<double> work(a.begin(), a.end());
  std::vector<double> s(static_cast<size_t>(k));
  std::vector<double> uu(static_cast<size_t>(n * k));
  std::vector<double> vvt(static_cast<size_t>(k * m));
  check_lapack(LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'S', n, m, work.data(), n, s.data(), uu.data(), n, vvt.data(), k),
               "dgesdd");
  work = {};

  low_rank_svd out;
  out.rows = m;
  out.cols = n;
  out.rank = k;
  out.method = svd_method::exact;
  out.sketch = k;
  out.u = std::move(vvt);
  out.vt = std::move(uu);
  out.s = std::move(s);
  out.total_energy = total;
  finish(out, choose_rank(out.s, out.total_energy, rule, rank_cap(rule, m, n)));
  return out;
}

low_rank_svd truncated_svd(std::span<const float> a, int64_t m, int64_t n, const rank_rule& rule,
                           const svd_options& options) {
  if (options.method == svd_method::exact) {
    std::vector<double> wide(a.begin(), a.end());
    return exact_svd(wide, m, n, rule);
  }
  const int64_t full = std::min(m, n);
  const int64_t cap = rank_cap(rule, m, n);
  const double total = sum_squares<float>(a);
  check_energy(total);

  // k: how many values we trust; the sketch holds l = k + oversample
  int64_t k = rule.type == rank_rule::kind::fixed ? std::clamp<int64_t>(static_cast<int64_t>(rule.value), 1, cap)
                                                  : std::min<int64_t>(std::max<int64_t>(options.first_sketch, 1), cap);
  for (;;) {
    const int64_t l = std::min(k + options.oversample, full);
    low_rank_svd out = randomized_sketch(a, m, n, l, options);
    // f32 products of values near the f32 limit overflow (the f64 path does not)
    for (double v : out.s)
      if (!std::isfinite(v))
        throw errors::invalid("", "",
                              "the randomized SVD overflowed f32 (values near the f32 limit): --method exact "
                              "computes it in f64");
    out.total_energy = total;
    rank_choice choice = choose_rank(out.s, total, rule, cap);
    if (rule.type == rank_rule::kind::fixed) choice.rank = std::min(choice.rank, k);
    // the sketch resolves ranks up to k (all of them once l = min(m, n));
    // otherwise grow it and start again
    const bool resolved = choice.rank <= k || l == full;
    if (resolved || k >= cap) {
      if (!resolved || choice.rank > cap) choice = {std::min(k, cap), false};
      finish(out, choice);
      return out;
    }
    k = std::min(2 * k, cap);
  }
}

lora_pair split_balanced(const low_rank_svd& svd) {
  lora_pair out;
  out.rows = svd.rows;
  out.cols = svd.cols;
  out.rank = svd.rank;
  const int64_t r = svd.rank;
  std::vector<double> root(static_cast<size_t>(r));
  for (int64_t j = 0; j < r; ++j) root[j] = std::sqrt(std::max(0.0, svd.s[j]));
  // B = U_r sqrt(S_r)
  out.b.resize(static_cast<size_t>(svd.rows * r));
  for (int64_t i = 0; i < svd.rows; ++i)
    for (int64_t j = 0; j < r; ++j) out.b[i * r + j] = svd.u[i * r + j] * root[j];
  // A = sqrt(S_r) V_r^T
  out.a.resize(static_cast<size_t>(r * svd.cols));
  for (int64_t j = 0; j < r; ++j)
    for (int64_t c = 0; c < svd.cols; ++c) out.a[j * svd.cols + c] = root[j] * svd.vt[j * svd.cols + c];
  return out;
}

double residual_norm(std::span<float> a, std::span<const float> b, std::span<const float> a_factor, int64_t m,
                     int64_t n, int64_t r) {
  // a <- a - B A
  if (r > 0)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, r, -1.0f, b.data(), r, a_factor.data(), n, 1.0f,
                a.data(), n);
  return std::sqrt(sum_squares<float>(a));
}

double residual_norm(std::span<double> a, std::span<const double> b, std::span<const double> a_factor, int64_t m,
                     int64_t n, int64_t r) {
  if (r > 0)
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, r, -1.0, b.data(), r, a_factor.data(), n, 1.0,
                a.data(), n);
  return std::sqrt(sum_squares<double>(a));
}

double squared_norm(std::span<const float> a) { return sum_squares<float>(a); }
double squared_norm(std::span<const double> a) { return sum_squares<double>(a); }

std::vector<int64_t> allocate_budget(std::span<const budget_module> modules, int64_t budget) {
  // max-heap of (gain per parameter of the next value, module)
  std::vector<int64_t> ranks(modules.size(), 0);
  std::priority_queue<std::pair<double, size_t>> next;
  auto push = [&](size_t k) {
    const budget_module& m = modules[k];
    const int64_t r = ranks[k];
    if (r < std::min<int64_t>(m.cap, static_cast<int64_t>(m.s.size())))
      next.push({m.s[r] * m.s[r] / static_cast<double>(m.rows + m.cols), k});
  };
  for (size_t k = 0; k < modules.size(); ++k) push(k);
  int64_t left = budget;
  while (!next.empty()) {
    const size_t k = next.top().second;
    next.pop();
    const int64_t cost = modules[k].rows + modules[k].cols;
    if (cost > left) continue;  // this module no longer fits; smaller ones may
    left -= cost;
    ++ranks[k];
    push(k);
  }
  return ranks;
}

}  // namespace lora
