// Block-scaled FP8 (core/fp8): dequantization of [out, in] E4M3 weights with
// per-block f32 scales (partial edge blocks), and requantization against a
// double reference: the new scale of every block is max|w| / 448 rounded to
// f32, and every element dequantized is within half an E4M3 unit of w at that
// scale (2^-4 |w| for normals; 2^-10 scale below 2^-6 scale, the subnormal
// step); an all-zero block keeps its old scale; a non-finite block is counted.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/fp8.h"

using namespace lora;

namespace {

// Half an E4M3 unit of the scaled value y = w / s (|y| <= 448), in units of y.
double half_unit(double y) {
  const double a = std::fabs(y);
  if (a < std::ldexp(1.0, -6)) return std::ldexp(1.0, -10);  // subnormal step 2^-9
  return std::ldexp(1.0, std::ilogb(a) - 4);                 // 2^(e-3) / 2
}

}  // namespace

TEST_CASE("fp8_dequantize_rows: each element is its code times its block's scale (edge blocks partial)") {
  const fp8_block block{4, 3};
  const int64_t rows = 10, cols = 7;  // 3 x 3 scale blocks, the last row and column partial
  std::mt19937 rng(3);
  std::vector<uint8_t> q(rows * cols);
  for (auto& c : q) {
    c = static_cast<uint8_t>(rng() & 0xff);
    if ((c & 0x7f) == 0x7f) c = 0x10;  // no NaN codes
  }
  std::vector<float> scales(3 * 3);
  for (size_t i = 0; i < scales.size(); ++i) scales[i] = 0.001f * static_cast<float>(i + 1) + 1e-7f;
  // rows 4..9 only (a row block that starts on a block boundary), and all rows
  for (int64_t rb : {int64_t{0}, int64_t{4}, int64_t{5}}) {
    std::vector<double> out((rows - rb) * cols);
    std::vector<float> outf((rows - rb) * cols);
    const std::span<const uint8_t> part(q.data() + rb * cols, (rows - rb) * cols);
    fp8_dequantize_rows(part, scales, block, cols, rb, rows, out.data());
    fp8_dequantize_rows(part, scales, block, cols, rb, rows, outf.data());
    for (int64_t r = rb; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const double want = static_cast<double>(e4m3_to_f32(q[r * cols + c])) *
                            static_cast<double>(scales[(r / 4) * 3 + c / 3]);
        CHECK(out[(r - rb) * cols + c] == want);
        CHECK(outf[(r - rb) * cols + c] == static_cast<float>(want));
      }
  }
}

TEST_CASE("fp8_quantize_rows: new scales max|w| / 448, elements within half an E4M3 unit, zero block keeps its "
          "scale (seed 5)") {
  const fp8_block block{4, 3};
  const int64_t rows = 10, cols = 7, n_sc = 3, n_sr = 3;
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> w(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) w[r * cols + c] = normal(rng) * std::pow(10.0, (r / 4) - 2.0 + c / 3);
  // block (1, 1): rows 4..7, cols 3..5 all zero
  for (int64_t r = 4; r < 8; ++r)
    for (int64_t c = 3; c < 6; ++c) w[r * cols + c] = 0.0;
  // a tiny value beside a large one: subnormal codes in block (0, 0)
  w[0] = 100.0;
  w[1] = 1.3e-3;  // y = 1.3e-3 * 448 / 100 = 5.8e-3: about 3 x 2^-9, a subnormal code
  const std::vector<float> old_scales(n_sr * n_sc, 0.25f);
  // the whole tensor at once, and in two row blocks split on a block boundary
  for (int64_t split : {rows, int64_t{4}, int64_t{8}}) {
    std::vector<uint8_t> q(rows * cols);
    std::vector<float> scales(n_sr * n_sc);
    uint64_t bad = 0;
    for (int64_t rb = 0; rb < rows; rb = std::min(rows, rb + split)) {
      const int64_t re = std::min(rows, rb + split);
      const int64_t sb = rb / 4, se = (re + 3) / 4;
      bad += fp8_quantize_rows(w.data() + rb * cols, block, cols, rb, re,
                               std::span<const float>(old_scales).subspan(sb * n_sc, (se - sb) * n_sc),
                               std::span<uint8_t>(q).subspan(rb * cols, (re - rb) * cols),
                               std::span<float>(scales).subspan(sb * n_sc, (se - sb) * n_sc));
    }
    CHECK(bad == 0);
    for (int64_t br = 0; br < n_sr; ++br)
      for (int64_t bc = 0; bc < n_sc; ++bc) {
        double amax = 0;
        for (int64_t r = br * 4; r < std::min(rows, br * 4 + 4); ++r)
          for (int64_t c = bc * 3; c < std::min(cols, bc * 3 + 3); ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
        const float want = amax == 0 ? 0.25f : static_cast<float>(amax / 448.0);
        CHECK(scales[br * n_sc + bc] == want);
      }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const double s = scales[(r / 4) * n_sc + c / 3];
        const double truth = w[r * cols + c];
        const double got = static_cast<double>(e4m3_to_f32(q[r * cols + c])) * s;
        // the bound: half a unit of truth / s, at scale s (plus the f32 rounding of s on |y| <= 448)
        CHECK(std::fabs(got - truth) <= half_unit(truth / s) * s * (1 + 1e-6) + 448 * s * 1e-7);
      }
    CHECK(q[1] == 0x03);  // subnormal 3 x 2^-9, not flushed to zero
  }
}

TEST_CASE("fp8_quantize_rows: a non-finite block is counted and gets NaN codes and scale") {
  const fp8_block block{2, 2};
  std::vector<double> w{1.0, std::numeric_limits<double>::infinity(), 2.0, 3.0};
  std::vector<float> old_scales{1.0f};
  std::vector<uint8_t> q(4);
  std::vector<float> scales(1);
  CHECK(fp8_quantize_rows(w.data(), block, 2, 0, 2, old_scales, q, scales) == 1);
  CHECK(std::isnan(scales[0]));
  CHECK(count_nonfinite(dtype::F8_E4M3, q) == 4);
}
