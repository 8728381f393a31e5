#include "core/recompress.h"

#include <algorithm>
#include <cmath>

#include <Eigen/Dense>
#include <fmt/format.h>

#include "formats/error.h"

namespace lora {

namespace {

using mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using const_map = Eigen::Map<const mat>;

// x [rows, cols] = q [rows, p] r [p, cols], p = min(rows, cols), q orthonormal.
struct thin_qr {
  mat q;
  mat r;
};
thin_qr qr_of(const mat& x) {
  const Eigen::Index p = std::min(x.rows(), x.cols());
  Eigen::HouseholderQR<mat> qr(x);
  thin_qr out;
  out.q = qr.householderQ() * mat::Identity(x.rows(), p);
  out.r = qr.matrixQR().topRows(p).triangularView<Eigen::Upper>();
  return out;
}

}  // namespace

double recompressed::relative_error() const noexcept {
  // sqrt(sum_{i>=k} s_i^2) / ||s B A||: summed from the dropped values, not
  // as total - kept, which cancels to ~sqrt(eps) when nothing is dropped
  if (total_energy <= 0) return 0.0;
  double dropped = 0;
  for (size_t i = static_cast<size_t>(rank); i < s.size(); ++i) dropped += s[i] * s[i];
  return std::sqrt(dropped / total_energy);
}

recompressed recompress(std::span<const double> b, std::span<const double> a, int64_t m, int64_t n, int64_t r,
                        double scale, const rank_rule& rule) {
  // thin QRs: B = Q_B R_B, A^T = Q_A R_A
  const_map bm(b.data(), m, r);
  const_map am(a.data(), r, n);
  thin_qr qb = qr_of(bm);
  thin_qr qa = qr_of(am.transpose());
  // the core C = s R_B R_A^T [p, q] carries every singular value of s B A
  mat core = scale * qb.r * qa.r.transpose();
  if (!std::isfinite(core.squaredNorm()))
    throw errors::invalid("", "",
                          fmt::format("the delta{} is too large: its squared norm overflows f64",
                                      scale == 1.0 ? "" : fmt::format(" s B A (s = {:.3g})", scale)));
  const int64_t p = core.rows(), q = core.cols();
  std::vector<double> c(core.data(), core.data() + core.size());
  low_rank_svd svd = exact_svd(c, p, q, rule);
  lora_pair pair = split_balanced(svd);

  // B' = Q_B (U_k sqrt(S_k)), A' = (sqrt(S_k) V_k^T) Q_A^T
  recompressed out;
  out.rows = m;
  out.cols = n;
  out.rank = pair.rank;
  out.s = svd.s;
  out.total_energy = svd.total_energy;
  out.kept_energy = svd.kept_energy;
  out.target_reached = svd.target_reached;
  const int64_t k = pair.rank;
  mat bn = qb.q * const_map(pair.b.data(), p, k);
  mat an = const_map(pair.a.data(), k, q) * qa.q.transpose();
  out.b.assign(bn.data(), bn.data() + bn.size());
  out.a.assign(an.data(), an.data() + an.size());
  return out;
}

double low_rank_norm(std::span<const double> b, std::span<const double> a, int64_t m, int64_t n, int64_t r) {
  // ||Q_B R_B R_A^T Q_A^T|| = ||R_B R_A^T||
  thin_qr qb = qr_of(const_map(b.data(), m, r));
  thin_qr qa = qr_of(const_map(a.data(), r, n).transpose());
  return (qb.r * qa.r.transpose()).norm();
}

double measured_error(const factors& old, double scale, const tensor_data& a_new, const tensor_data& b_new, int64_t k,
                      double total_energy) {
  if (total_energy <= 0) return 0.0;
  const int64_t m = old.m, n = old.n, r = old.r, w = r + k;
  std::vector<double> an = values_f64(a_new.type, a_new.bytes, k * n);
  std::vector<double> bn = values_f64(b_new.type, b_new.bytes, m * k);
  std::vector<double> bc(static_cast<size_t>(m * w)), ac(static_cast<size_t>(w * n));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < r; ++j) bc[i * w + j] = scale * old.b[i * r + j];
    for (int64_t j = 0; j < k; ++j) bc[i * w + r + j] = -bn[i * k + j];
  }
  std::copy(old.a.begin(), old.a.end(), ac.begin());
  std::copy(an.begin(), an.end(), ac.begin() + r * n);
  return low_rank_norm(bc, ac, m, n, w) / std::sqrt(total_energy);
}

}  // namespace lora
