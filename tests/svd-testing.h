// Matrices with known spectra for the SVD tests (test-svd, test-extract).
#pragma once

#include <Eigen/Dense>

#include <cstdint>
#include <random>

namespace lora::testing {

// Orthonormal columns [rows, cols]: the Q of the QR of a Gaussian drawn from `rng`.
inline Eigen::MatrixXd orthonormal(int64_t rows, int64_t cols, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  Eigen::MatrixXd g(rows, cols);
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) g(i, j) = normal(rng);
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(g);
  return qr.householderQ() * Eigen::MatrixXd::Identity(rows, cols);
}

}  // namespace lora::testing
