// core/stored-gemm: the product x W^T with W decoded one row block at a time,
// against a double-precision reference over the same stored values.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/stored-gemm.h"
#include "formats/mapped-file.h"
#include "test-support.h"

using namespace lora;
using lora::testing::randf;

namespace {

// W [rows, cols] stored as `type` at byte `offset` of the returned buffer
// (offset 1: unaligned for every dtype wider than a byte).
std::vector<uint8_t> store(dtype type, const std::vector<float>& w, size_t offset) {
  const size_t es = static_cast<size_t>(math_dtype_size(type));
  std::vector<uint8_t> buf(offset + w.size() * es + 8);
  from_f32(type, w, std::span<uint8_t>(buf.data() + offset, w.size() * es));
  return buf;
}

// y[t, o] = sum_i x[t, i] W[o, i] in double, W decoded exactly from its bytes;
// also sum_i |x w| per element, for the error bound.
void reference(dtype type, std::span<const uint8_t> bytes, const std::vector<float>& x, int64_t T, int64_t rows,
               int64_t cols, std::vector<double>& y, std::vector<double>& mag) {
  std::vector<double> w(static_cast<size_t>(rows * cols));
  to_f64(type, bytes, w);
  y.assign(static_cast<size_t>(T * rows), 0.0);
  mag.assign(y.size(), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < rows; ++o)
      for (int64_t i = 0; i < cols; ++i) {
        const double p = static_cast<double>(x[t * cols + i]) * w[o * cols + i];
        y[t * rows + o] += p;
        mag[t * rows + o] += std::fabs(p);
      }
}

}  // namespace

TEST_CASE("stored_gemm: F16, BF16, F32, F64 weights, aligned or not, in row blocks, against double") {
  // odd sizes: 37 rows of 29; blocks of 290 elements = 10 rows, so boundaries at rows 10, 20, 30 and a
  // short last block of 7
  const int64_t T = 3, rows = 37, cols = 29;
  const std::vector<float> w = randf(static_cast<size_t>(rows * cols), 1), x = randf(static_cast<size_t>(T * cols), 2);
  stored_gemm_scratch scratch;
  for (dtype type : {dtype::F16, dtype::BF16, dtype::F32, dtype::F64})
    for (size_t offset : {size_t{0}, size_t{1}})
      for (int64_t block : {int64_t{290}, int64_t{0}, int64_t{1}})
        for (int threads : {1, 2}) {
          CAPTURE(dtype_name(type));
          CAPTURE(offset);
          CAPTURE(block);
          CAPTURE(threads);
          const std::vector<uint8_t> buf = store(type, w, offset);
          const std::span<const uint8_t> bytes(buf.data() + offset, w.size() * math_dtype_size(type));
          std::vector<double> want, mag;
          reference(type, bytes, x, T, rows, cols, want, mag);
          std::vector<float> y(static_cast<size_t>(T * rows), NAN);
          stored_gemm({type, bytes, rows, cols}, x.data(), T, y.data(), threads, scratch, block);
          // f32 products and sums of `cols` terms: |error| <= cols * 2^-24 * sum |x w| (the first-order bound)
          for (size_t i = 0; i < y.size(); ++i) CHECK(std::fabs(y[i] - want[i]) <= cols * 0x1p-24 * mag[i]);
        }
}

TEST_CASE("stored_gemm: on_block sees every row once, decoded to f32, and may modify its buffer") {
  const int64_t T = 2, rows = 23, cols = 13;
  const std::vector<float> w = randf(static_cast<size_t>(rows * cols), 3), x = randf(static_cast<size_t>(T * cols), 4);
  for (dtype type : {dtype::BF16, dtype::F32}) {
    CAPTURE(dtype_name(type));
    const std::vector<uint8_t> buf = store(type, w, 0);
    const std::span<const uint8_t> bytes(buf.data(), w.size() * math_dtype_size(type));
    std::vector<float> decoded(w.size());
    to_f32(type, bytes, decoded);
    std::vector<int> seen(static_cast<size_t>(rows), 0);
    std::vector<float> got(w.size(), NAN);
    stored_gemm_scratch scratch;
    std::vector<float> y(static_cast<size_t>(T * rows)), y_plain(y.size());
    stored_gemm({type, bytes, rows, cols}, x.data(), T, y.data(), 2, scratch, 5 * cols,
                [&](int64_t rb, int64_t re, float* block) {
                  CHECK(re - rb <= 5);
                  for (int64_t r = rb; r < re; ++r) {
                    ++seen[static_cast<size_t>(r)];  // distinct rows per block: no race
                    std::memcpy(&got[static_cast<size_t>(r * cols)], block + (r - rb) * cols, cols * sizeof(float));
                  }
                  std::fill(block, block + (re - rb) * cols, 1e30f);  // after the product: no effect on y
                });
    stored_gemm({type, bytes, rows, cols}, x.data(), T, y_plain.data(), 1, scratch, 5 * cols);
    for (int s : seen) CHECK(s == 1);
    CHECK(got == decoded);
    CHECK(y == y_plain);
  }
}

TEST_CASE("stored_gemm: a mapped matrix gives the same result after its pages were released") {
  lora::testing::temp_dir dir;
  const int64_t T = 4, rows = 3000, cols = 67;  // 400 KB of BF16 at an odd offset: whole pages to release
  const std::vector<float> w = randf(static_cast<size_t>(rows * cols), 5), x = randf(static_cast<size_t>(T * cols), 6);
  const std::vector<uint8_t> buf = store(dtype::BF16, w, 3);
  std::ofstream(dir / "w.bin", std::ios::binary).write(reinterpret_cast<const char*>(buf.data()), buf.size());
  mapped_file map(dir / "w.bin");
  const stored_matrix m{dtype::BF16, map.bytes().subspan(3, w.size() * 2), rows, cols, &map};
  stored_gemm_scratch scratch;
  std::vector<float> first(static_cast<size_t>(T * rows)), second(first.size());
  stored_gemm(m, x.data(), T, first.data(), 2, scratch, 1000);
  stored_gemm(m, x.data(), T, second.data(), 2, scratch, 1000);
  CHECK(first == second);
  std::vector<double> want, mag;
  reference(dtype::BF16, m.bytes, x, T, rows, cols, want, mag);
  for (size_t i = 0; i < first.size(); ++i) CHECK(std::fabs(first[i] - want[i]) <= cols * 0x1p-24 * mag[i]);
}

TEST_CASE("stored_gemm: refusals") {
  stored_gemm_scratch scratch;
  std::vector<uint8_t> bytes(12);
  std::vector<float> x(3), y(2);
  // 12 bytes of BF16 are 6 elements, not [2, 2]
  CHECK(lora::testing::thrown([&] {
          stored_gemm({dtype::BF16, bytes, 2, 2}, x.data(), 1, y.data(), 1, scratch);
        }).code() == exit_code::invalid_input);
  CHECK(lora::testing::thrown([&] {
          stored_gemm({dtype::I32, bytes, 1, 3}, x.data(), 1, y.data(), 1, scratch);
        }).code() == exit_code::invalid_input);
  // an empty row: the empty sum
  y.assign(2, NAN);
  stored_gemm({dtype::F32, {}, 2, 0}, x.data(), 1, y.data(), 1, scratch);
  CHECK(y == std::vector<float>{0.0f, 0.0f});
}

TEST_CASE("stored_gemm: block-scaled FP8 weights (edge blocks partial) against double; refusals of bad scales") {
  // 37 x 29 in blocks of 8 x 6: 5 x 5 scales, the last row and column of blocks partial;
  // row blocks of 290 elements (10 rows) do not line up with the scale blocks
  const int64_t T = 3, rows = 37, cols = 29;
  const std::vector<float> x = randf(static_cast<size_t>(T * cols), 2);
  std::vector<uint8_t> q(static_cast<size_t>(rows * cols));
  std::mt19937 rng(9);
  for (auto& c : q) {
    c = static_cast<uint8_t>(rng() & 0xff);
    if ((c & 0x7f) == 0x7f) c = 0x30;  // no NaN codes
  }
  std::vector<float> scales(25);
  for (size_t i = 0; i < scales.size(); ++i) scales[i] = 0.01f * static_cast<float>(i + 1) / 3.0f;
  // the dequantized weights, exactly (an E4M3 value times an f32 fits a double)
  std::vector<double> want(static_cast<size_t>(T * rows), 0.0), mag(want.size(), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < rows; ++o)
      for (int64_t i = 0; i < cols; ++i) {
        const double w = static_cast<double>(e4m3_to_f32(q[o * cols + i])) * scales[(o / 8) * 5 + i / 6];
        const double p = static_cast<double>(x[t * cols + i]) * w;
        want[t * rows + o] += p;
        mag[t * rows + o] += std::fabs(p);
      }
  stored_gemm_scratch scratch;
  for (int64_t block : {int64_t{290}, int64_t{0}, int64_t{1}})
    for (int threads : {1, 2}) {
      stored_matrix m{dtype::F8_E4M3, q, rows, cols};
      m.scales = scales;
      m.block_rows = 8;
      m.block_cols = 6;
      std::vector<float> y(static_cast<size_t>(T * rows), NAN);
      stored_gemm(m, x.data(), T, y.data(), threads, scratch, block);
      // one f32 rounding of each dequantized weight, then f32 products and sums
      for (size_t i = 0; i < y.size(); ++i) CHECK(std::fabs(y[i] - want[i]) <= (cols + 1) * 0x1p-24 * mag[i]);
    }
  std::vector<float> y(static_cast<size_t>(T * rows));
  // F8_E4M3 without scales: no arithmetic; scales of the wrong count: refused
  CHECK(lora::testing::thrown([&] {
          stored_gemm({dtype::F8_E4M3, q, rows, cols}, x.data(), T, y.data(), 1, scratch);
        }).code() == exit_code::invalid_input);
  stored_matrix bad{dtype::F8_E4M3, q, rows, cols};
  bad.scales = std::span<const float>(scales).first(24);
  bad.block_rows = 8;
  bad.block_cols = 6;
  CHECK(lora::testing::thrown([&] { stored_gemm(bad, x.data(), T, y.data(), 1, scratch); }).code() ==
        exit_code::invalid_input);
}
