// core/delta: every layout (linear, fan_in_fan_out, embedding, conv 1x1 and
// kxk), DoRA per row and per column, lora_bias and the shape checks, against a
// reference written out index by index in double precision.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/delta.h"
#include "core/dtype.h"
#include "formats/error.h"
#include "tests/merge-testing.h"

using namespace lora;
using namespace lora::testing;

namespace {

enum class layout { linear, fan_in_fan_out, embedding, conv };

// A module's tensors written to a file, and the module pointing into it.
struct module_fixture {
  temp_dir dir;
  std::unique_ptr<safetensors_file> file;
  lora_module module;
  std::vector<int64_t> target_shape;
  std::vector<double> w0;  // the base tensor, as stored (f32)
  std::vector<double> a, b, m, bias;
};

// out, in: the module's output and input features; kh x kw kernel for conv.
module_fixture make_module(layout kind, int64_t out, int64_t in, int64_t r, dtype factor_type, uint32_t seed,
                           bool dora = false, int64_t kh = 1, int64_t kw = 1) {
  module_fixture fx;
  std::vector<int64_t> a_shape{r, in}, b_shape{out, r};
  switch (kind) {
    case layout::linear: fx.target_shape = {out, in}; break;
    case layout::fan_in_fan_out: fx.target_shape = {in, out}; break;
    case layout::embedding: fx.target_shape = {in, out}; break;  // [vocab, dim]: in = vocab, out = dim
    case layout::conv:
      fx.target_shape = {out, in, kh, kw};
      a_shape = {r, in, kh, kw};
      b_shape = {out, r, 1, 1};
      break;
  }
  std::vector<test_tensor> tensors{
      random_tensor("w0", dtype::F32, fx.target_shape, seed),
      random_tensor("A", factor_type, a_shape, seed + 1),
      random_tensor("B", factor_type, b_shape, seed + 2),
      random_tensor("m", factor_type, {out}, seed + 3, 0.5, 2.0),
      random_tensor("bias", factor_type, {out}, seed + 4),
  };
  write_safetensors(fx.dir / "m.safetensors", tensors);
  fx.file = std::make_unique<safetensors_file>(fx.dir / "m.safetensors");
  fx.w0 = read_f64(*fx.file, "w0");
  fx.a = read_f64(*fx.file, "A");
  fx.b = read_f64(*fx.file, "B");
  fx.m = read_f64(*fx.file, "m");
  fx.bias = read_f64(*fx.file, "bias");

  lora_module& mod = fx.module;
  mod.name = "layer.proj";
  mod.target = "layer.proj.weight";
  mod.kind = kind == layout::embedding ? module_kind::embedding
             : kind == layout::conv    ? module_kind::conv
                                       : module_kind::linear;
  mod.fan_in_fan_out = kind == layout::fan_in_fan_out;
  mod.a = tensor_ref{fx.file.get(), &fx.file->at("A")};
  mod.b = tensor_ref{fx.file.get(), &fx.file->at("B")};
  mod.rank = r;
  mod.alpha = 3.0 * static_cast<double>(r);
  mod.scale = 3.0;
  mod.dora = dora;
  if (dora) mod.magnitude = tensor_ref{fx.file.get(), &fx.file->at("m")};
  mod.bias = tensor_ref{fx.file.get(), &fx.file->at("bias")};
  return fx;
}

// dW written out index by index from the formulas (double, times weight * s).
std::vector<double> reference_delta(layout kind, const std::vector<double>& a, const std::vector<double>& b,
                                    int64_t out, int64_t in, int64_t r, double ws, int64_t kh = 1, int64_t kw = 1) {
  std::vector<double> d(static_cast<size_t>(out * in * kh * kw), 0.0);
  auto A = [&](int64_t k, int64_t i) { return a[static_cast<size_t>(k * in + i)]; };
  auto B = [&](int64_t o, int64_t k) { return b[static_cast<size_t>(o * r + k)]; };
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      if (kind == layout::conv) {
        for (int64_t h = 0; h < kh; ++h)
          for (int64_t w = 0; w < kw; ++w) {
            double s = 0;
            for (int64_t k = 0; k < r; ++k) s += B(o, k) * a[static_cast<size_t>(((k * in + i) * kh + h) * kw + w)];
            d[static_cast<size_t>(((o * in + i) * kh + h) * kw + w)] = ws * s;
          }
        continue;
      }
      double s = 0;
      for (int64_t k = 0; k < r; ++k) s += B(o, k) * A(k, i);
      if (kind == layout::linear)
        d[static_cast<size_t>(o * in + i)] = ws * s;
      else
        d[static_cast<size_t>(i * out + o)] = ws * s;  // stored [in, out] / [vocab, dim]
    }
  return d;
}

// |x - ref| <= tol * (|w0| + |ws| * sum_k |B||A|): a bound on f32 rounding of a
// length-r dot product added to w0.
std::vector<double> magnitude_bound(layout kind, const module_fixture& fx, int64_t out, int64_t in, int64_t r,
                                    double ws, int64_t kh = 1, int64_t kw = 1) {
  std::vector<double> abs_a, abs_b;  // reference_delta on |A|, |B|
  for (double v : fx.a) abs_a.push_back(std::fabs(v));
  for (double v : fx.b) abs_b.push_back(std::fabs(v));
  std::vector<double> bound = reference_delta(kind, abs_a, abs_b, out, in, r, std::fabs(ws), kh, kw);
  for (size_t i = 0; i < bound.size(); ++i) bound[i] += std::fabs(fx.w0[i]);
  return bound;
}

void check_layout(layout kind, int64_t out, int64_t in, int64_t r, dtype factor_type, int64_t kh = 1, int64_t kw = 1) {
  module_fixture fx = make_module(kind, out, in, r, factor_type, 11, false, kh, kw);
  const double weight = 0.75;
  const double ws = weight * fx.module.scale;
  std::vector<double> want = reference_delta(kind, fx.a, fx.b, out, in, r, ws, kh, kw);
  std::vector<double> bound = magnitude_bound(kind, fx, out, in, r, ws, kh, kw);
  for (size_t i = 0; i < want.size(); ++i) want[i] += fx.w0[i];

  // f32: in row blocks of 3 (uneven at the end), sgemm with beta = 1
  delta_factors f = load_delta_factors(fx.module, fx.target_shape, "m.safetensors");
  const int64_t n_rows = fx.target_shape[0];
  const size_t n_cols = static_cast<size_t>(f.n_cols);
  std::vector<float> w(fx.w0.begin(), fx.w0.end());
  for (int64_t rb = 0; rb < n_rows; rb += 3) {
    const int64_t re = std::min(n_rows, rb + 3);
    add_delta_rows(f, weight, rb, re, w.data() + static_cast<size_t>(rb) * n_cols);
  }
  const double tol = static_cast<double>(r + 2) * 6e-8;  // (r + 2) f32 roundings
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i)
    if (std::fabs(static_cast<double>(w[i]) - want[i]) > tol * bound[i]) ++bad;
  CHECK(bad == 0);

  // f64: the exact path, whole tensor at once
  delta_factors_f64 f64 = load_delta_factors_f64(fx.module, fx.target_shape, "m.safetensors");
  std::vector<double> wd = fx.w0;
  add_delta_rows(f64, weight, 0, n_rows, wd.data());
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(wd[i] - want[i]) / (bound[i] + 1e-300));
  CHECK(worst < 1e-14);

  // the delta is not zero: the test can fail
  double norm = 0;
  for (size_t i = 0; i < want.size(); ++i) norm += std::fabs(want[i] - fx.w0[i]);
  CHECK(norm > 1.0);
}

}  // namespace

TEST_CASE("linear: W0 + s B A, f32 BLAS in row blocks and f64 reference") {
  check_layout(layout::linear, 37, 53, 5, dtype::F32);
  check_layout(layout::linear, 64, 16, 8, dtype::BF16);
  check_layout(layout::linear, 7, 129, 1, dtype::F16);
}

TEST_CASE("fan_in_fan_out: target stored [in, out], dW = s (B A)^T") {
  check_layout(layout::fan_in_fan_out, 37, 53, 5, dtype::F32);
  check_layout(layout::fan_in_fan_out, 96, 32, 8, dtype::BF16);
}

TEST_CASE("embedding: A [r, vocab], B [dim, r], dW = s (B A)^T stored [vocab, dim]") {
  check_layout(layout::embedding, 24, 101, 4, dtype::F32);  // dim 24, vocab 101
  check_layout(layout::embedding, 16, 50, 8, dtype::F16);
}

TEST_CASE("conv: dW[o,i,h,w] = s sum_r B[o,r] A[r,i,h,w], 1x1 and 3x3") {
  check_layout(layout::conv, 12, 8, 4, dtype::F32, 1, 1);
  check_layout(layout::conv, 12, 8, 4, dtype::F16, 3, 3);
  check_layout(layout::conv, 5, 3, 2, dtype::BF16, 3, 1);
}

namespace {

// DoRA results against the double reference `want`: the f32 path within
// 1e-5 and the f64 path within 1e-13 of the largest |want|.
void check_dora_result(const std::vector<float>& w, const std::vector<double>& wd, const std::vector<double>& want) {
  double worst32 = 0, worst64 = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    scale = std::max(scale, std::fabs(want[i]));
    worst32 = std::max(worst32, std::fabs(w[i] - want[i]));
    worst64 = std::max(worst64, std::fabs(wd[i] - want[i]));
  }
  CHECK(worst32 < 1e-5 * scale);
  CHECK(worst64 < 1e-13 * scale);
}

}  // namespace

TEST_CASE("DoRA per row (linear, conv): W = m / ||V_row|| V, V = W0 + s B A") {
  for (layout kind : {layout::linear, layout::conv}) {
    const int64_t out = 19, in = 23, r = 4, kh = kind == layout::conv ? 3 : 1;
    module_fixture fx = make_module(kind, out, in, r, dtype::F32, 21, true, kh, kh);
    const double weight = 1.0;
    std::vector<double> v = reference_delta(kind, fx.a, fx.b, out, in, r, weight * fx.module.scale, kh, kh);
    for (size_t i = 0; i < v.size(); ++i) v[i] += fx.w0[i];
    const size_t n_cols = v.size() / static_cast<size_t>(out);
    std::vector<double> want(v.size());
    for (size_t o = 0; o < static_cast<size_t>(out); ++o) {
      double sq = 0;
      for (size_t j = 0; j < n_cols; ++j) sq += v[o * n_cols + j] * v[o * n_cols + j];
      for (size_t j = 0; j < n_cols; ++j) want[o * n_cols + j] = fx.m[o] / std::sqrt(sq) * v[o * n_cols + j];
    }
    // f32 in blocks of 5 rows; f64 whole
    delta_factors f = load_delta_factors(fx.module, fx.target_shape, "m");
    CHECK_FALSE(f.needs_whole_tensor());
    std::vector<float> w(fx.w0.begin(), fx.w0.end());
    for (int64_t rb = 0; rb < out; rb += 5)
      apply_module_rows(f, weight, rb, std::min<int64_t>(out, rb + 5), w.data() + static_cast<size_t>(rb) * n_cols);
    delta_factors_f64 f64 = load_delta_factors_f64(fx.module, fx.target_shape, "m");
    std::vector<double> wd = fx.w0;
    apply_module_rows(f64, weight, 0, out, wd.data());
    check_dora_result(w, wd, want);
    // the magnitude really rescales: row norms equal m
    for (size_t o = 0; o < static_cast<size_t>(out); ++o) {
      double sq = 0;
      for (size_t j = 0; j < n_cols; ++j) sq += wd[o * n_cols + j] * wd[o * n_cols + j];
      CHECK(std::sqrt(sq) == doctest::Approx(fx.m[o]).epsilon(1e-12));
    }
  }
}

TEST_CASE("DoRA per column (fan_in_fan_out, embedding): norm per output feature over the input") {
  for (layout kind : {layout::fan_in_fan_out, layout::embedding}) {
    const int64_t out = 17, in = 29, r = 3;  // stored [in, out]
    module_fixture fx = make_module(kind, out, in, r, dtype::BF16, 31, true);
    const double weight = 0.5;
    std::vector<double> v = reference_delta(kind, fx.a, fx.b, out, in, r, weight * fx.module.scale);
    for (size_t i = 0; i < v.size(); ++i) v[i] += fx.w0[i];
    std::vector<double> want(v.size());
    for (size_t o = 0; o < static_cast<size_t>(out); ++o) {
      double sq = 0;
      for (size_t i = 0; i < static_cast<size_t>(in); ++i) sq += v[i * out + o] * v[i * out + o];
      for (size_t i = 0; i < static_cast<size_t>(in); ++i) want[i * out + o] = fx.m[o] / std::sqrt(sq) * v[i * out + o];
    }
    delta_factors f = load_delta_factors(fx.module, fx.target_shape, "m");
    CHECK(f.needs_whole_tensor());
    std::vector<float> w(fx.w0.begin(), fx.w0.end());
    // a partial block is refused: the norm needs every row
    CHECK_THROWS_AS(apply_module_rows(f, weight, 0, 5, w.data()), lora::error);
    apply_module_rows(f, weight, 0, in, w.data());
    delta_factors_f64 f64 = load_delta_factors_f64(fx.module, fx.target_shape, "m");
    std::vector<double> wd = fx.w0;
    apply_module_rows(f64, weight, 0, in, wd.data());
    check_dora_result(w, wd, want);
  }
}

TEST_CASE(
    "DoRA in two block passes: add_dora_norms_sq, then apply_module_rows with the norms (per row and per column)") {
  for (layout kind : {layout::linear, layout::fan_in_fan_out, layout::embedding}) {
    CAPTURE(static_cast<int>(kind));
    const int64_t out = 17, in = 29, r = 3;
    module_fixture fx = make_module(kind, out, in, r, dtype::F32, 41, true);
    const bool per_column = kind != layout::linear;
    const int64_t n_rows = fx.target_shape[0];
    const size_t n_cols = static_cast<size_t>(fx.target_shape[1]);
    const double weight = 0.8;
    // the double reference: V = W0 + w s dW, W = m / ||V_o|| V per output feature o
    std::vector<double> v = reference_delta(kind, fx.a, fx.b, out, in, r, weight * fx.module.scale);
    for (size_t i = 0; i < v.size(); ++i) v[i] += fx.w0[i];
    std::vector<double> want(v.size());
    for (size_t o = 0; o < static_cast<size_t>(out); ++o) {
      auto at = [&](size_t j) { return per_column ? j * n_cols + o : o * n_cols + j; };
      double sq = 0;
      for (size_t j = 0; j < static_cast<size_t>(in); ++j) sq += v[at(j)] * v[at(j)];
      for (size_t j = 0; j < static_cast<size_t>(in); ++j) want[at(j)] = fx.m[o] / std::sqrt(sq) * v[at(j)];
    }
    // blocks of 4 rows (uneven at the end): pass 1 the norms of V, pass 2 the values
    auto two_passes = [&](const auto& f, auto w) {
      using T = typename decltype(w)::value_type;
      std::vector<double> sq(static_cast<size_t>(out), 0.0);
      for (int64_t rb = 0; rb < n_rows; rb += 4) {
        const int64_t re = std::min(n_rows, rb + 4);
        std::vector<T> block(w.begin() + rb * static_cast<int64_t>(n_cols),
                             w.begin() + re * static_cast<int64_t>(n_cols));
        add_delta_rows(f, weight, rb, re, block.data());
        add_dora_norms_sq(f, rb, re, block.data(), sq);
      }
      for (int64_t rb = 0; rb < n_rows; rb += 4)
        apply_module_rows(f, weight, rb, std::min(n_rows, rb + 4), w.data() + static_cast<size_t>(rb) * n_cols, sq);
      return w;
    };
    const delta_factors f = load_delta_factors(fx.module, fx.target_shape, "m");
    const delta_factors_f64 f64 = load_delta_factors_f64(fx.module, fx.target_shape, "m");
    CHECK(f.needs_whole_tensor() == per_column);
    const std::vector<float> w = two_passes(f, std::vector<float>(fx.w0.begin(), fx.w0.end()));
    const std::vector<double> wd = two_passes(f64, fx.w0);
    check_dora_result(w, wd, want);
    // the same values as the whole-tensor call, bit for bit
    std::vector<float> whole(fx.w0.begin(), fx.w0.end());
    apply_module_rows(f, weight, 0, n_rows, whole.data());
    std::vector<double> whole64 = fx.w0;
    apply_module_rows(f64, weight, 0, n_rows, whole64.data());
    CHECK(w == whole);
    CHECK(wd == whole64);
    // norms of the wrong size are refused
    std::vector<double> short_sq(static_cast<size_t>(out) - 1, 1.0), tmp = fx.w0;
    CHECK_THROWS_AS(add_dora_norms_sq(f64, 0, 1, tmp.data(), short_sq), lora::error);
    CHECK_THROWS_AS(apply_module_rows(f64, weight, 0, 1, tmp.data(), short_sq), lora::error);
  }
}

TEST_CASE("lora_bias: bias + w s b") {
  module_fixture fx = make_module(layout::linear, 9, 4, 2, dtype::F16, 41);
  std::vector<double> base = random_values(9, 5);
  std::vector<double> got = base;
  add_bias_delta(fx.module, 0.5, std::span<double>(got), "m");
  for (size_t i = 0; i < 9; ++i) CHECK(got[i] == doctest::Approx(base[i] + 0.5 * 3.0 * fx.bias[i]).epsilon(1e-15));
  std::vector<float> wrong(8, 0.0f);
  CHECK_THROWS_AS(add_bias_delta(fx.module, 1.0, std::span<float>(wrong), "m"), lora::error);
}

TEST_CASE("shape and dtype checks name the module and exit 3 (load_delta_factors and check_delta_factors alike)") {
  module_fixture fx = make_module(layout::linear, 8, 6, 2, dtype::F32, 51);
  auto expect_invalid = [&](const lora_module& m, const std::vector<int64_t>& shape, const std::string& text) {
    for (const bool convert : {true, false}) {
      CAPTURE(convert);
      try {
        if (convert)
          (void)load_delta_factors(m, shape, "adapter.safetensors");
        else
          check_delta_factors(m, shape, "adapter.safetensors");
        FAIL("no error for " << text);
      } catch (const lora::error& e) {
        CHECK(e.code() == exit_code::invalid_input);
        CHECK_MESSAGE(std::string(e.what()).find("layer.proj") != std::string::npos, e.what());
        CHECK_MESSAGE(std::string(e.what()).find(text) != std::string::npos, e.what());
      }
    }
  };
  CHECK_NOTHROW(check_delta_factors(fx.module, {8, 6}, "a"));
  expect_invalid(fx.module, {9, 6}, "[9, 6]");  // B has 8 rows
  expect_invalid(fx.module, {8, 7}, "[8, 7]");  // A has 6 columns
  expect_invalid(fx.module, {6, 8}, "[6, 8]");  // transposed base, flag not set
  lora_module wrong_rank = fx.module;
  wrong_rank.rank = 3;
  expect_invalid(wrong_rank, {8, 6}, "rank");
  lora_module fif = fx.module;
  fif.fan_in_fan_out = true;
  CHECK_NOTHROW((void)load_delta_factors(fif, {6, 8}, "a"));
  CHECK_NOTHROW(check_delta_factors(fif, {6, 8}, "a"));
  expect_invalid(fif, {8, 6}, "fan_in_fan_out");
  lora_module dora = fx.module;
  dora.dora = true;
  expect_invalid(dora, {8, 6}, "lora_magnitude_vector");
  dora.magnitude = tensor_ref{fx.file.get(), &fx.file->at("bias")};  // [8]: fits
  CHECK_NOTHROW((void)load_delta_factors(dora, {8, 6}, "a"));
  CHECK_NOTHROW(check_delta_factors(dora, {8, 6}, "a"));
  dora.magnitude = tensor_ref{fx.file.get(), &fx.file->at("A")};  // [2, 6]: 12 values
  expect_invalid(dora, {8, 6}, "magnitudes");

  // a conv kernel that differs from the target's
  module_fixture conv = make_module(layout::conv, 4, 3, 2, dtype::F32, 61, false, 3, 3);
  CHECK_NOTHROW(check_delta_factors(conv.module, {4, 3, 3, 3}, "a"));
  for (const bool convert : {true, false}) {
    try {
      if (convert)
        (void)load_delta_factors(conv.module, {4, 3, 1, 9}, "a");
      else
        check_delta_factors(conv.module, {4, 3, 1, 9}, "a");
      FAIL("kernel mismatch accepted");
    } catch (const lora::error& e) {
      CHECK(e.code() == exit_code::invalid_input);
    }
  }

  // a factor stored as I32 cannot be multiplied
  temp_dir dir;
  {
    std::vector<tensor_spec> specs{{"A", dtype::I32, {2, 6}}, {"B", dtype::F32, {8, 2}}};
    safetensors_layout l = plan_safetensors(specs, std::nullopt);
    std::vector<uint8_t> zeros(64, 0);
    write_bytes(dir / "i.safetensors", serialize_safetensors(l, [&](const tensor_info& t) {
                  return std::span<const uint8_t>(zeros.data(), t.n_bytes());
                }));
  }
  safetensors_file ifile(dir / "i.safetensors");
  lora_module im = fx.module;
  im.a = tensor_ref{&ifile, &ifile.at("A")};
  im.b = tensor_ref{&ifile, &ifile.at("B")};
  expect_invalid(im, {8, 6}, "I32");
}

TEST_CASE("exact_rounding: a merged f32 block rounds to BF16 / F16 as W0 + sum_k w_k dW_k in double does") {
  for (layout kind : {layout::linear, layout::fan_in_fan_out}) {
    const int64_t out = 150, in = 211, r = 6;
    module_fixture fx = make_module(kind, out, in, r, dtype::F32, 91);
    const delta_factors f = load_delta_factors(fx.module, fx.target_shape, "adapter");
    const std::vector<double> weights{0.7, -1.3};  // the module twice, as two adapters
    const std::vector<double> d = reference_delta(kind, fx.a, fx.b, out, in, r, fx.module.scale);
    const int64_t n_rows = fx.target_shape[0], n_cols = fx.target_shape[1];
    const tensor_info& w0_info = fx.file->at("w0");
    const std::span<const uint8_t> w0_bytes = fx.file->data(w0_info);
    for (dtype type : {dtype::BF16, dtype::F16}) {
      const exact_rounding rounding({&f, &f}, weights, type);
      // in two row blocks, as merge does
      for (int64_t rb = 0; rb < n_rows; rb += 97) {
        const int64_t re = std::min(n_rows, rb + 97);
        const size_t n = static_cast<size_t>((re - rb) * n_cols);
        std::vector<float> block(n);
        to_f32(dtype::F32, w0_bytes.subspan(static_cast<size_t>(rb * n_cols) * 4, n * 4), block);
        for (double w : weights) add_delta_rows(f, w, rb, re, block.data());
        std::vector<uint8_t> got(2 * n);
        rounding.round_rows(dtype::F32, w0_bytes.subspan(static_cast<size_t>(rb * n_cols) * 4, n * 4), rb, re,
                            block.data(), got);
        size_t wrong = 0;
        for (size_t e = 0; e < n; ++e) {
          const size_t at = static_cast<size_t>(rb * n_cols) + e;
          const double exact = fx.w0[at] + (weights[0] + weights[1]) * d[at];
          const uint16_t want = type == dtype::BF16 ? f64_to_bf16(exact) : f64_to_f16(exact);
          uint16_t h = 0;
          std::memcpy(&h, got.data() + 2 * e, 2);
          wrong += h != want;
        }
        CHECK(wrong == 0);
      }
    }
    CHECK(thrown([&] { exact_rounding({&f}, {1.0}, dtype::F32); }).code() == exit_code::invalid_input);
  }
}

TEST_CASE("fused rows: a module's delta rows placed in rows of a larger tensor (add_slice_rows, exact_rounding)") {
  // a [24, 40] module whose rows land in a [40, 40] tensor as two slices in swapped order
  // (module rows 0..11 -> tensor rows 20..31, 12..23 -> 8..19); tensor rows 0..7 and 32..39 untouched
  const int64_t out = 24, in = 40, r = 4, n_rows = 40;
  module_fixture fx = make_module(layout::linear, out, in, r, dtype::F32, 57);
  fx.module.slices = {{"fused.weight", "fused.bias", 20, 0, 12}, {"fused.weight", "fused.bias", 8, 12, 12}};
  fx.module.delta_shape = {out, in};
  write_safetensors(fx.dir / "fused.safetensors", {random_tensor("fused", dtype::F32, {n_rows, in}, 58),
                                                   random_tensor("fused_bias", dtype::F32, {n_rows}, 59)});
  const safetensors_file fused(fx.dir / "fused.safetensors");
  const std::vector<double> w0 = read_f64(fused, "fused"), b0 = read_f64(fused, "fused_bias");
  const delta_factors f = load_delta_factors(fx.module, fx.module.delta_shape, "adapter");
  const delta_factors_f64 f64 = load_delta_factors_f64(fx.module, fx.module.delta_shape, "adapter");
  const double weight = -0.6;
  const std::vector<double> d = reference_delta(layout::linear, fx.a, fx.b, out, in, r, weight * fx.module.scale);
  // the exact value of every element: W0 + the module row its slice places there
  std::vector<double> want = w0;
  for (const row_slice& s : fx.module.slices)
    for (int64_t k = 0; k < s.n_rows; ++k)
      for (int64_t j = 0; j < in; ++j)
        want[static_cast<size_t>((s.tensor_row + k) * in + j)] += d[static_cast<size_t>((s.module_row + k) * in + j)];
  const std::span<const uint8_t> w0_bytes = fused.data(fused.at("fused"));
  const exact_rounding rounding({&f, &f}, {weight, 0.0}, dtype::BF16, {&fx.module.slices[0], &fx.module.slices[1]},
                                n_rows);
  size_t wrong16 = 0, wrong64 = 0, moved = 0;
  double worst32 = 0;
  for (int64_t rb = 0; rb < n_rows; rb += 7) {  // blocks that cut through both slices
    const int64_t re = std::min(n_rows, rb + 7);
    const size_t n = static_cast<size_t>((re - rb) * in);
    std::vector<float> block(n);
    to_f32(dtype::F32, w0_bytes.subspan(static_cast<size_t>(rb * in) * 4, n * 4), block);
    std::vector<double> block64(w0.begin() + rb * in, w0.begin() + re * in);
    for (const row_slice& s : fx.module.slices) {
      add_slice_rows(f, weight, s, rb, re, block.data());
      add_slice_rows(f64, weight, s, rb, re, block64.data());
    }
    std::vector<uint8_t> got(2 * n);
    rounding.round_rows(dtype::F32, w0_bytes.subspan(static_cast<size_t>(rb * in) * 4, n * 4), rb, re, block.data(),
                        got);
    for (size_t e = 0; e < n; ++e) {
      const size_t at = static_cast<size_t>(rb * in) + e;
      uint16_t h = 0;
      std::memcpy(&h, got.data() + 2 * e, 2);
      wrong16 += h != f64_to_bf16(want[at]);
      wrong64 += std::fabs(block64[e] - want[at]) > 1e-15 * (1 + std::fabs(want[at]));
      worst32 = std::max(worst32, std::fabs(block[e] - want[at]) / (1 + std::fabs(want[at])));
      const int64_t row = static_cast<int64_t>(at) / in;
      if (row < 8 || row >= 32) moved += block[e] != static_cast<float>(w0[at]);  // rows no slice reaches
    }
  }
  CHECK(wrong16 == 0);
  CHECK(wrong64 == 0);
  CHECK(worst32 < 1e-6);
  CHECK(moved == 0);

  // the lora_B bias through the same slices
  std::vector<double> bias = b0, want_b = b0;
  for (const row_slice& s : fx.module.slices) {
    add_bias_slice(fx.module, weight, s, std::span<double>(bias), "adapter");
    for (int64_t k = 0; k < s.n_rows; ++k)
      want_b[static_cast<size_t>(s.tensor_row + k)] +=
          weight * fx.module.scale * fx.bias[static_cast<size_t>(s.module_row + k)];
  }
  for (size_t i = 0; i < bias.size(); ++i) CHECK(bias[i] == doctest::Approx(want_b[i]).epsilon(1e-15));
  // rows outside either vector: exit 3, naming the bias
  const row_slice past{"fused.weight", "fused.bias", 30, 0, 12};
  CHECK(thrown([&] { add_bias_slice(fx.module, 1.0, past, std::span<double>(bias), "adapter"); }).code() ==
        exit_code::invalid_input);
}

namespace {

// PEFT ParamWrapper on a 3-D parameter [E, d1, d2] (tuners/lora/layer.py
// get_delta_weight @ huggingface/peft 5d602fdb), written out index by index:
// A3 = A.reshape(E, r, in), B3 = B.reshape(out, r, E),
// dW[e, o, i] = s sum_k B3[o, k, e] A3[e, k, i] ("e o i"), or dW[e, i, o] ("e i o").
void check_experts(bool transposed) {
  const int64_t e = 3, r = 2, out = 5, in = 4;
  const std::vector<int64_t> target = transposed ? std::vector<int64_t>{e, in, out} : std::vector<int64_t>{e, out, in};
  temp_dir dir;
  write_safetensors(dir / "x.safetensors", {random_tensor("w0", dtype::F32, target, 31),
                                            random_tensor("A", dtype::F32, {r * e, in}, 32),
                                            random_tensor("B", dtype::BF16, {out, r * e}, 33)});
  safetensors_file file(dir / "x.safetensors");
  const std::vector<double> w0 = read_f64(file, "w0"), a = read_f64(file, "A"), b = read_f64(file, "B");
  lora_module m;
  m.name = m.target = "model.layers.0.mlp.experts.gate_up_proj";
  m.kind = module_kind::parameter;
  m.a = tensor_ref{&file, &file.at("A")};
  m.b = tensor_ref{&file, &file.at("B")};
  m.rank = r;
  m.n_experts = e;
  m.scale = 1.5;
  m.fan_in_fan_out = transposed;
  const double weight = 0.5, ws = weight * m.scale;
  std::vector<double> want = w0, bound(w0.size());
  for (int64_t x = 0; x < e; ++x)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) {
        double s = 0, t = 0;
        for (int64_t k = 0; k < r; ++k) {
          const double bv = b[static_cast<size_t>(o * r * e + k * e + x)];
          const double av = a[static_cast<size_t>((x * r + k) * in + i)];
          s += bv * av;
          t += std::fabs(bv * av);
        }
        const size_t at = static_cast<size_t>(transposed ? (x * in + i) * out + o : (x * out + o) * in + i);
        want[at] += ws * s;
        bound[at] = std::fabs(w0[at]) + std::fabs(ws) * t;
      }
  // f32, one expert per block (rows are experts)
  delta_factors f = load_delta_factors(m, target, "x.safetensors");
  CHECK(f.n_rows == e);
  CHECK(f.n_cols == out * in);
  std::vector<float> w(w0.begin(), w0.end());
  for (int64_t x = 0; x < e; ++x) add_delta_rows(f, weight, x, x + 1, w.data() + static_cast<size_t>(x * out * in));
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i)
    if (std::fabs(static_cast<double>(w[i]) - want[i]) > (r + 2) * 6e-8 * bound[i]) ++bad;
  CHECK(bad == 0);
  // f64, all experts at once; delta_element and the row bounds agree with it
  delta_factors_f64 f64 = load_delta_factors_f64(m, target, "x.safetensors");
  std::vector<double> wd = w0;
  add_delta_rows(f64, weight, 0, e, wd.data());
  double worst = 0, element_worst = 0;
  const std::vector<double> rows = delta_row_bounds(f);
  bool bounded = true;
  for (size_t i = 0; i < want.size(); ++i) {
    worst = std::max(worst, std::fabs(wd[i] - want[i]) / (bound[i] + 1e-300));
    const int64_t row = static_cast<int64_t>(i) / (out * in), col = static_cast<int64_t>(i) % (out * in);
    const double d = delta_element(f, row, col);
    element_worst = std::max(element_worst, std::fabs(weight * d - (want[i] - w0[i])) / (bound[i] + 1e-300));
    bounded = bounded && std::fabs(d) <= rows[static_cast<size_t>(row)] * (1 + 1e-12);
  }
  CHECK(worst < 1e-14);
  CHECK(element_worst < 1e-7);
  CHECK(bounded);
  double norm = 0;
  for (size_t i = 0; i < want.size(); ++i) norm += std::fabs(want[i] - w0[i]);
  CHECK(norm > 0.5);  // the delta is not zero: the test can fail

  // one expert's layer product, unmerged: y = w s (x A_e^T) B_e^T against the formed delta
  const std::vector<float> xin = randf(static_cast<size_t>(2 * in), 77);
  for (int64_t x = 0; x < e; ++x) {
    std::vector<float> y(static_cast<size_t>(2 * out), 0.0f);
    add_expert_times(f, x, weight, xin.data(), 2, y.data());
    double err = 0;
    for (int64_t v = 0; v < 2; ++v)
      for (int64_t o = 0; o < out; ++o) {
        double want_y = 0;
        for (int64_t i = 0; i < in; ++i) {
          const size_t at = static_cast<size_t>(transposed ? (x * in + i) * out + o : (x * out + o) * in + i);
          want_y += (want[at] - w0[at]) * xin[static_cast<size_t>(v * in + i)];
        }
        err = std::max(err, std::fabs(y[static_cast<size_t>(v * out + o)] - want_y));
      }
    CHECK(err < 1e-5);
  }
  CHECK(thrown([&] { add_expert_times(f, e, weight, xin.data(), 2, nullptr); }).code() == exit_code::invalid_input);

  // a wrong layout is refused with both shapes named
  m.fan_in_fan_out = !transposed;
  const error err = thrown([&] { (void)load_delta_factors(m, target, "x.safetensors"); });
  CHECK(err.code() == exit_code::invalid_input);
  CHECK(has(err.what(), "3 experts of rank 2"));
}

}  // namespace

TEST_CASE("experts: PEFT ParamWrapper on [E, out, in] and [E, in, out], per-expert A / B layouts") {
  check_experts(false);
  check_experts(true);
}

// LyCORIS weight decomposition (dora_scale) on a LoCon module: V = W0 + s B A
// at multiplier 1, g = m / (||V|| + eps), W' = V g (w = 1) or V (w (g - 1) + 1),
// the norm per output row ([out, 1, 1, 1]) or per input channel over out, kh,
// kw ([1, in, 1, 1]); the reference written out index by index in double.
TEST_CASE("LyCORIS dora_scale: per row and per input channel, multiplier on the rescaling, eps of its dtype") {
  const int64_t out = 7, in = 5, r = 3, k = 3;
  for (dtype ds_type : {dtype::F32, dtype::BF16, dtype::F16})
    for (bool on_out : {true, false})
      for (double weight : {1.0, 0.6, -0.4}) {
        module_fixture fx = make_module(layout::conv, out, in, r, dtype::F32, 31, false, k, k);
        const std::vector<int64_t> ds_shape =
            on_out ? std::vector<int64_t>{out, 1, 1, 1} : std::vector<int64_t>{1, in, 1, 1};
        write_safetensors(fx.dir / "ds.safetensors", {random_tensor("ds", ds_type, ds_shape, 41, 2.0, 6.0)});
        safetensors_file ds_file(fx.dir / "ds.safetensors");
        const std::vector<double> m = read_f64(ds_file, "ds");
        fx.module.bias.reset();
        fx.module.dora_scale = tensor_ref{&ds_file, &ds_file.at("ds")};
        const double eps = ds_type == dtype::BF16 ? 0x1p-7 : ds_type == dtype::F16 ? 0x1p-10 : 0x1p-23;

        // V at multiplier 1, whatever the weight
        std::vector<double> v = reference_delta(layout::conv, fx.a, fx.b, out, in, r, fx.module.scale, k, k);
        for (size_t i = 0; i < v.size(); ++i) v[i] += fx.w0[i];
        const size_t kk = static_cast<size_t>(k * k), n_cols = static_cast<size_t>(in) * kk;
        const size_t n_norms = static_cast<size_t>(on_out ? out : in);
        std::vector<double> sq(n_norms, 0.0);
        for (size_t o = 0; o < static_cast<size_t>(out); ++o)
          for (size_t c = 0; c < static_cast<size_t>(in); ++c)
            for (size_t hw = 0; hw < kk; ++hw) {
              const double x = v[o * n_cols + c * kk + hw];
              sq[on_out ? o : c] += x * x;
            }
        std::vector<double> want(v.size());
        for (size_t o = 0; o < static_cast<size_t>(out); ++o)
          for (size_t c = 0; c < static_cast<size_t>(in); ++c)
            for (size_t hw = 0; hw < kk; ++hw) {
              const size_t at = on_out ? o : c;
              const double g = m[at] / (std::sqrt(sq[at]) + eps);
              const double factor = weight == 1.0 ? g : weight * (g - 1) + 1;
              want[o * n_cols + c * kk + hw] = v[o * n_cols + c * kk + hw] * factor;
            }

        delta_factors_f64 f64 = load_delta_factors_f64(fx.module, fx.target_shape, "m");
        CHECK(f64.dora_lycoris);
        CHECK(f64.needs_whole_tensor() == !on_out);
        CHECK(f64.n_norms() == n_norms);
        CHECK_NOTHROW(check_delta_factors(fx.module, fx.target_shape, "m"));
        // the whole tensor at once
        std::vector<double> wd = fx.w0;
        apply_module_rows(f64, weight, 0, out, wd.data());
        // two passes in blocks of 3 rows: norms of V, then the rescaling
        std::vector<double> norms(f64.n_norms(), 0.0), wb = fx.w0;
        for (int64_t rb = 0; rb < out; rb += 3) {
          const int64_t re = std::min<int64_t>(out, rb + 3);
          std::vector<double> block(wb.begin() + rb * static_cast<int64_t>(n_cols),
                                    wb.begin() + re * static_cast<int64_t>(n_cols));
          add_delta_rows(f64, dora_v_weight(f64, weight), rb, re, block.data());
          add_dora_norms_sq(f64, rb, re, block.data(), norms);
        }
        for (int64_t rb = 0; rb < out; rb += 3)
          apply_module_rows(f64, weight, rb, std::min<int64_t>(out, rb + 3),
                            wb.data() + rb * static_cast<int64_t>(n_cols), norms);
        double worst = 0, worst_b = 0, moved = 0;
        for (size_t i = 0; i < want.size(); ++i) {
          worst = std::max(worst, std::fabs(wd[i] - want[i]) / (std::fabs(want[i]) + 1e-3));
          worst_b = std::max(worst_b, std::fabs(wb[i] - want[i]) / (std::fabs(want[i]) + 1e-3));
          moved = std::max(moved, std::fabs(want[i] - v[i]) / (std::fabs(v[i]) + 1e-3));
        }
        CHECK(worst < 1e-14);
        CHECK(worst_b < 1e-14);
        CHECK(moved > 0.05);  // the rescaling is not the identity: the test can fail
      }
}

TEST_CASE("LyCORIS dora_scale: a shape of neither axis form or a non-float dtype is refused, exit 3, naming it") {
  module_fixture fx = make_module(layout::conv, 6, 4, 2, dtype::F32, 51, false, 3, 3);
  fx.module.bias.reset();
  write_safetensors(
      fx.dir / "ds.safetensors",
      {random_tensor("rows", dtype::F32, {6, 1, 1, 1}, 1), random_tensor("cols", dtype::F32, {1, 4, 1, 1}, 2),
       random_tensor("wide", dtype::F32, {6, 2}, 3), random_tensor("in3", dtype::F32, {1, 4, 3, 1}, 4),
       random_tensor("short", dtype::F32, {5, 1, 1, 1}, 5), random_tensor("flat", dtype::F32, {6}, 6)});
  safetensors_file ds(fx.dir / "ds.safetensors");
  for (const char* ok : {"rows", "cols"}) {
    fx.module.dora_scale = tensor_ref{&ds, &ds.at(ok)};
    CHECK_NOTHROW(check_delta_factors(fx.module, fx.target_shape, "m"));
  }
  for (const char* bad : {"wide", "in3", "short", "flat"}) {
    fx.module.dora_scale = tensor_ref{&ds, &ds.at(bad)};
    const lora::error e = thrown([&] { check_delta_factors(fx.module, fx.target_shape, "m"); });
    CHECK(e.code() == exit_code::invalid_input);
    CHECK(has(e.what(), bad));
    CHECK(has(e.what(), "a norm per output row"));
  }
}
