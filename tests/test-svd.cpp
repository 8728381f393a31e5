// Truncated SVD (core/svd.h) against an exact double-precision reference
// (Eigen::BDCSVD) on matrices with known spectra: U, V orthonormal from the QR
// of seeded Gaussians, chosen singular values.
#include <doctest/doctest.h>

#include <Eigen/Dense>
#include <Eigen/SVD>

#include <cmath>
#include <random>
#include <vector>

#include "core/svd.h"
#include "tests/svd-testing.h"

using namespace lora;
using lora::testing::orthonormal;
using mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace {

// A = U diag(s) V^T (+ noise * Gaussian), rounded to f32: the matrix under
// test is the f32 one, so the reference SVD runs on its exact f64 widening.
struct test_matrix {
  int64_t m, n;
  std::vector<float> a32;
  mat a;  // a32 widened
};

test_matrix make_matrix(int64_t m, int64_t n, const std::vector<double>& s, double noise, uint64_t seed) {
  const int64_t k = static_cast<int64_t>(s.size());
  std::mt19937_64 rng_u(seed), rng_v(seed + 1);
  mat u = orthonormal(m, k, rng_u);
  mat v = orthonormal(n, k, rng_v);
  mat a = u * Eigen::VectorXd(Eigen::Map<const Eigen::VectorXd>(s.data(), k)).asDiagonal() * v.transpose();
  if (noise > 0) {
    std::mt19937_64 rng(seed + 2);
    std::normal_distribution<double> normal;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) a(i, j) += noise * normal(rng);
  }
  test_matrix t{m, n, std::vector<float>(static_cast<size_t>(m * n)), mat(m, n)};
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      t.a32[i * n + j] = static_cast<float>(a(i, j));
      t.a(i, j) = t.a32[i * n + j];
    }
  return t;
}

std::vector<double> geometric(int64_t k, double first, double ratio) {
  std::vector<double> s(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) s[i] = first * std::pow(ratio, static_cast<double>(i));
  return s;
}

// The reference: singular values of the f64 matrix, descending.
Eigen::VectorXd reference_values(const mat& a) {
  Eigen::BDCSVD<Eigen::MatrixXd> svd(Eigen::MatrixXd(a), Eigen::ComputeThinU | Eigen::ComputeThinV);
  return svd.singularValues();
}

// sqrt(sum_{i>=r} sigma_i^2): the best rank-r error (Eckart-Young).
double optimal_error(const Eigen::VectorXd& sigma, int64_t r) {
  return std::sqrt(sigma.tail(sigma.size() - r).squaredNorm());
}

// ||a - B A|| in f64 from the split factors.
double error_of(const mat& a, const lora_pair& p) {
  Eigen::Map<const mat> b(p.b.data(), p.rows, p.rank);
  Eigen::Map<const mat> af(p.a.data(), p.rank, p.cols);
  return (a - b * af).norm();
}

rank_rule fixed(int64_t r) { return {rank_rule::kind::fixed, static_cast<double>(r), 0}; }

svd_options randomized(uint64_t seed = 7) {
  svd_options o;
  o.method = svd_method::randomized;
  o.seed = seed;
  return o;
}
svd_options exact() {
  svd_options o;
  o.method = svd_method::exact;
  return o;
}

}  // namespace

TEST_CASE("randomized rank-r error is within 1% of the optimal rank-r error") {
  struct spectrum_case {
    const char* what;
    int64_t m, n;
    std::vector<double> s;
    double noise;
    int64_t r;
  };
  const std::vector<spectrum_case> cases = {
      {"fast decay, tall", 300, 120, geometric(100, 1.0, 0.85), 0, 16},
      {"slow decay, wide", 96, 400, geometric(96, 1.0, 0.97), 0, 24},
      {"decay + noise floor", 256, 256, geometric(64, 1.0, 0.9), 1e-3, 32},
      {"flat head then decay", 200, 180,
       [] {
         std::vector<double> s(150, 1.0);
         for (size_t i = 20; i < s.size(); ++i) s[i] = std::pow(0.9, static_cast<double>(i - 20));
         return s;
       }(),
       0, 20},
  };
  for (const auto& c : cases) {
    CAPTURE(c.what);
    test_matrix t = make_matrix(c.m, c.n, c.s, c.noise, 11);
    const Eigen::VectorXd sigma = reference_values(t.a);
    const double best = optimal_error(sigma, c.r);

    low_rank_svd svd = truncated_svd(t.a32, c.m, c.n, fixed(c.r), randomized());
    REQUIRE(svd.rank == c.r);
    CHECK(svd.method == svd_method::randomized);
    const double err = error_of(t.a, split_balanced(svd));
    CAPTURE(err / best);
    CHECK(err <= 1.01 * best);
    CHECK(err >= best * (1 - 1e-6));  // nothing beats Eckart-Young
    // the estimate sqrt(||a||^2 - ||S_r||^2) agrees with the measured error
    const double norm = t.a.norm();
    CHECK(std::abs(svd.estimated_error() * norm - err) <= 1e-3 * norm);
    // leading values: relative 1e-3
    for (int64_t i = 0; i < std::min<int64_t>(c.r, 8); ++i) CHECK(std::abs(svd.s[i] - sigma(i)) <= 1e-3 * sigma(i));
  }
}

TEST_CASE("exact method matches the f64 reference to rounding; vectors up to sign") {
  const int64_t m = 150, n = 90, r = 12;
  test_matrix t = make_matrix(m, n, geometric(90, 2.0, 0.8), 0, 5);
  Eigen::BDCSVD<Eigen::MatrixXd> ref(Eigen::MatrixXd(t.a), Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::VectorXd sigma = ref.singularValues();
  const double norm = t.a.norm();

  low_rank_svd svd = truncated_svd(t.a32, m, n, fixed(r), exact());
  CHECK(svd.method == svd_method::exact);
  REQUIRE(svd.rank == r);
  REQUIRE(svd.s.size() == static_cast<size_t>(std::min(m, n)));
  for (int64_t i = 0; i < r; ++i) CHECK(std::abs(svd.s[i] - sigma(i)) <= 1e-12 * sigma(0));
  const double err = error_of(t.a, split_balanced(svd));
  CHECK(std::abs(err - optimal_error(sigma, r)) <= 1e-12 * norm);

  // singular vectors, up to sign (values are well separated: ratio 0.8)
  for (int64_t j = 0; j < r; ++j) {
    Eigen::VectorXd u(m), v(n);
    for (int64_t i = 0; i < m; ++i) u(i) = svd.u[i * r + j];
    for (int64_t i = 0; i < n; ++i) v(i) = svd.vt[j * n + i];
    const double sign = u.dot(ref.matrixU().col(j)) < 0 ? -1.0 : 1.0;
    CHECK((sign * u - ref.matrixU().col(j)).norm() <= 1e-9);
    CHECK((sign * v - ref.matrixV().col(j)).norm() <= 1e-9);
  }

  // the randomized vectors agree with them too (fast decay: 1e-4)
  low_rank_svd rs = truncated_svd(t.a32, m, n, fixed(r), randomized());
  for (int64_t j = 0; j < 6; ++j) {
    Eigen::VectorXd u(m);
    for (int64_t i = 0; i < m; ++i) u(i) = rs.u[i * r + j];
    const double sign = u.dot(ref.matrixU().col(j)) < 0 ? -1.0 : 1.0;
    CHECK((sign * u - ref.matrixU().col(j)).norm() <= 1e-4);
  }
}

TEST_CASE("the balanced split: B A = U S V^T, B^T B = A A^T = S") {
  const int64_t m = 60, n = 40, r = 5;
  test_matrix t = make_matrix(m, n, geometric(40, 1.0, 0.7), 0, 3);
  low_rank_svd svd = truncated_svd(t.a32, m, n, fixed(r), exact());
  lora_pair p = split_balanced(svd);
  REQUIRE(p.b.size() == static_cast<size_t>(m * r));
  REQUIRE(p.a.size() == static_cast<size_t>(r * n));
  Eigen::Map<const mat> b(p.b.data(), m, r), a(p.a.data(), r, n);
  mat btb = b.transpose() * b, aat = a * a.transpose();
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) {
      const double want = i == j ? svd.s[i] : 0.0;
      CHECK(std::abs(btb(i, j) - want) <= 1e-12);
      CHECK(std::abs(aat(i, j) - want) <= 1e-12);
    }
}

TEST_CASE("choose_rank: energy and error targets, caps") {
  const std::vector<double> s = {4, 2, 1, 1, 0.5};  // energies 16 4 1 1 0.25, total 22.25
  const double total = 22.25;
  CHECK(choose_rank(s, total, {rank_rule::kind::energy, 0.7, 0}, 5).rank == 1);   // 16/22.25 = 0.719
  CHECK(choose_rank(s, total, {rank_rule::kind::energy, 0.72, 0}, 5).rank == 2);  // 20/22.25 = 0.899
  CHECK(choose_rank(s, total, {rank_rule::kind::energy, 0.95, 0}, 5).rank == 4);  // 21 -> 0.944, 22 -> 0.989
  CHECK(choose_rank(s, total, {rank_rule::kind::energy, 1.0, 0}, 5).rank == 5);
  // error E: need sum >= (1 - E^2) total. E = 0.2: 21.36 -> r = 4 (22); E = 0.25: 20.86 -> r = 4 (21)
  CHECK(choose_rank(s, total, {rank_rule::kind::max_error, 0.2, 0}, 5).rank == 4);
  CHECK(choose_rank(s, total, {rank_rule::kind::max_error, 0.25, 0}, 5).rank == 3);  // 21 >= 20.859
  CHECK(choose_rank(s, total, {rank_rule::kind::max_error, 0.5, 0}, 5).rank == 2);   // 16.69: 16 < it <= 20
  // cap stops the rule and says so
  rank_choice c = choose_rank(s, total, {rank_rule::kind::energy, 0.95, 0}, 2);
  CHECK(c.rank == 2);
  CHECK_FALSE(c.reached);
  // values beyond the sketch are unknown: not reached
  c = choose_rank(std::span<const double>(s).first(3), total, {rank_rule::kind::energy, 0.99, 0}, 10);
  CHECK(c.rank == 3);
  CHECK_FALSE(c.reached);
  // fixed ranks are clamped to what exists
  CHECK(choose_rank(s, total, {rank_rule::kind::fixed, 9, 0}, 5).rank == 5);
  CHECK(choose_rank(s, total, {rank_rule::kind::fixed, 3, 0}, 5).rank == 3);
}

TEST_CASE("energy and error targets pick the rank the exact spectrum gives, both methods") {
  // slow decay: the energy targets need ranks beyond the first sketch (32),
  // so the randomized path must grow its sketch
  const int64_t m = 400, n = 300;
  test_matrix t = make_matrix(m, n, geometric(300, 1.0, 0.975), 0, 21);
  const Eigen::VectorXd sigma = reference_values(t.a);
  const double total = sigma.squaredNorm();
  auto reference_rank = [&](double fraction) {
    double kept = 0;
    for (int64_t r = 1; r <= sigma.size(); ++r) {
      kept += sigma(r - 1) * sigma(r - 1);
      if (kept >= fraction * total) return r;
    }
    return static_cast<int64_t>(sigma.size());
  };
  for (double f : {0.5, 0.9, 0.99}) {
    CAPTURE(f);
    const int64_t want = reference_rank(f);
    // the targets must not sit on a boundary for the test to be meaningful
    double below = 0;
    for (int64_t i = 0; i < want - 1; ++i) below += sigma(i) * sigma(i);
    REQUIRE(below < f * total * (1 - 1e-4));
    for (const svd_options& o : {randomized(), exact()}) {
      low_rank_svd e = truncated_svd(t.a32, m, n, {rank_rule::kind::energy, f, 0}, o);
      CHECK(e.rank == want);
      CHECK(e.target_reached);
      CHECK(e.energy_fraction() >= f * (1 - 1e-6));
      const double err_target = std::sqrt(1 - f);
      low_rank_svd x = truncated_svd(t.a32, m, n, {rank_rule::kind::max_error, err_target, 0}, o);
      CHECK(x.rank == want);
      CHECK(error_of(t.a, split_balanced(x)) <= err_target * t.a.norm() * (1 + 1e-5));
    }
  }
  // --max-rank caps the growth and reports the target as not reached
  low_rank_svd capped = truncated_svd(t.a32, m, n, {rank_rule::kind::energy, 0.99, 40}, randomized());
  CHECK(capped.rank == 40);
  CHECK_FALSE(capped.target_reached);
}

TEST_CASE("randomized is deterministic for a seed") {
  const int64_t m = 128, n = 96, r = 10;
  test_matrix t = make_matrix(m, n, geometric(96, 1.0, 0.9), 1e-4, 9);
  low_rank_svd a = truncated_svd(t.a32, m, n, fixed(r), randomized(1));
  low_rank_svd b = truncated_svd(t.a32, m, n, fixed(r), randomized(1));
  low_rank_svd c = truncated_svd(t.a32, m, n, fixed(r), randomized(2));
  CHECK(a.u == b.u);
  CHECK(a.vt == b.vt);
  CHECK(a.s == b.s);
  CHECK(a.u != c.u);  // another seed, another sketch, both accurate
  const double best = optimal_error(reference_values(t.a), r);
  CHECK(error_of(t.a, split_balanced(c)) <= 1.01 * best);
}

TEST_CASE("a sketch as wide as the matrix is exact; rank-deficient input") {
  // rank 3 exactly: any r >= 3 reproduces it to f32 rounding
  const int64_t m = 30, n = 20;
  test_matrix t = make_matrix(m, n, {3.0, 2.0, 1.0}, 0, 4);
  low_rank_svd svd = truncated_svd(t.a32, m, n, fixed(8), randomized());
  CHECK(svd.sketch == 18);
  CHECK(error_of(t.a, split_balanced(svd)) <= 1e-5 * t.a.norm());
  low_rank_svd full = truncated_svd(t.a32, m, n, fixed(15), randomized());
  CHECK(full.sketch == 20);  // l capped at min(m, n)
  CHECK(error_of(t.a, split_balanced(full)) <= 1e-5 * t.a.norm());
}

TEST_CASE("residual_norm measures ||a - B A|| (f32 and f64)") {
  const int64_t m = 50, n = 35, r = 4;
  test_matrix t = make_matrix(m, n, geometric(35, 1.0, 0.8), 0, 8);
  lora_pair p = split_balanced(truncated_svd(t.a32, m, n, fixed(r), exact()));
  const double want = error_of(t.a, p);
  std::vector<double> a64(t.a.data(), t.a.data() + m * n);
  CHECK(std::abs(residual_norm(a64, p.b, p.a, m, n, r) - want) <= 1e-13 * t.a.norm());
  std::vector<float> b32(p.b.begin(), p.b.end()), af32(p.a.begin(), p.a.end());
  std::vector<float> a32 = t.a32;
  mat b(m, r), af(r, n);
  for (int64_t i = 0; i < m * r; ++i) b.data()[i] = b32[i];
  for (int64_t i = 0; i < r * n; ++i) af.data()[i] = af32[i];
  const double want32 = (t.a - b * af).norm();
  CHECK(std::abs(residual_norm(a32, b32, af32, m, n, r) - want32) <= 1e-6 * t.a.norm());
}

TEST_CASE("NaN input is refused with exit 3") {
  std::vector<float> a(20 * 10, 1.0f);
  a[17] = std::nanf("");
  CHECK_THROWS_WITH(truncated_svd(a, 20, 10, fixed(2), randomized()), doctest::Contains("NaN"));
  CHECK_THROWS_WITH(truncated_svd(a, 20, 10, fixed(2), exact()), doctest::Contains("NaN"));
}

TEST_CASE("SVD failures are exit 3 and named_svd_errors names the file and module") {
  const rank_rule rule{rank_rule::kind::fixed, 1, 0};
  std::vector<double> a = {1, 2, 3, 4, 5, 6};
  // NaN, Inf, and finite values whose energy overflows f64: refused before LAPACK runs
  for (double bad : {std::nan(""), static_cast<double>(INFINITY), 1e200}) {
    a[4] = bad;
    try {
      named_svd_errors("adapter.safetensors", "model.q_proj", [&] { return exact_svd(a, 2, 3, rule); });
      FAIL("no error for " << bad);
    } catch (const error& e) {
      CHECK(e.code() == exit_code::invalid_input);
      CHECK(e.file() == "adapter.safetensors");
      CHECK(e.tensor() == "model.q_proj");
      CHECK(e.detail().find("NaN or Inf") != std::string::npos);
    }
  }
  std::vector<float> f = {1, 2, 3, 4, NAN, 6};
  CHECK_THROWS_AS(truncated_svd(f, 2, 3, rule, svd_options{}), error);
  // errors that already name a file pass through untouched
  try {
    named_svd_errors("x", "y", []() -> int { throw errors::invalid("f", "t", "d"); });
  } catch (const error& e) {
    CHECK(e.file() == "f");
    CHECK(e.tensor() == "t");
  }
}
