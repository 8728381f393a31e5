// dtype names and sizes (formats/dtype) and the f16/bf16/f32/f64 conversions
// (core/dtype), checked exhaustively against references computed here from
// sign, exponent and mantissa in double precision:
// - decoding: all 65,536 patterns of f16 and of bf16, exactly;
// - encoding: every value, every midpoint between neighbours (ties to even)
//   and the values just beside it, plus millions of random f32 patterns
//   (fixed seed) against a round-to-nearest-even reference on the exact
//   table of representable values;
// - f64_to_f16 / f64_to_bf16 round once: inputs built so that rounding
//   through f32 first would land on a midpoint and round the wrong way.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "formats/dtype.h"
#include "formats/error.h"

using namespace lora;

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
double double_of(uint64_t u) {
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

// A 16-bit binary format: 1 sign bit, `exp_bits` exponent bits, `mant_bits` mantissa bits.
struct format16 {
  int exp_bits;
  int mant_bits;
  int bias() const { return (1 << (exp_bits - 1)) - 1; }
  uint16_t inf() const { return static_cast<uint16_t>(((1u << exp_bits) - 1) << mant_bits); }
  // The value of a pattern, from its fields (NaN for NaN patterns).
  double value(uint16_t h) const {
    const bool neg = (h >> 15) & 1;
    const int e = (h >> mant_bits) & ((1 << exp_bits) - 1);
    const int m = h & ((1 << mant_bits) - 1);
    double v;
    if (e == (1 << exp_bits) - 1)
      v = m ? std::numeric_limits<double>::quiet_NaN() : INFINITY;
    else if (e == 0)
      v = std::ldexp(m, 1 - bias() - mant_bits);  // subnormal: m * 2^(emin - mant)
    else
      v = std::ldexp(m + (1 << mant_bits), e - bias() - mant_bits);
    return neg ? -v : v;
  }
  bool is_nan(uint16_t h) const { return (h & 0x7fff) > inf(); }
  bool is_quiet_nan(uint16_t h) const { return is_nan(h) && ((h >> (mant_bits - 1)) & 1); }
  // The first value beyond the largest finite one: 2^(emax + 1); the pattern
  // after max finite (inf) stands for it when rounding.
  double overflow() const { return std::ldexp(1.0, bias() + 1); }
};

constexpr format16 f16{5, 10};
constexpr format16 bf16{8, 7};

// Round-to-nearest-even reference: the exact table of non-negative finite
// values (ascending in pattern order), searched for the two neighbours of |x|.
struct rne_reference {
  format16 fmt;
  std::vector<double> values;  // values[p] for p = 0 .. max finite pattern
  explicit rne_reference(format16 f) : fmt(f) {
    for (uint32_t p = 0; p < f.inf(); ++p) values.push_back(f.value(static_cast<uint16_t>(p)));
    for (size_t i = 1; i < values.size(); ++i) REQUIRE(values[i] > values[i - 1]);
  }
  uint16_t operator()(double x) const {
    REQUIRE(!std::isnan(x));
    const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
    const double a = std::fabs(x);
    if (a >= fmt.overflow()) return sign | fmt.inf();
    // largest p with values[p] <= a
    const size_t p = static_cast<size_t>(std::upper_bound(values.begin(), values.end(), a) - values.begin()) - 1;
    const double lo = values[p];
    if (lo == a) return static_cast<uint16_t>(sign | p);
    const double hi = p + 1 < values.size() ? values[p + 1] : fmt.overflow();  // pattern p + 1 (inf after max)
    const double below = a - lo, above = hi - a;                               // exact (Sterbenz)
    size_t pick = below < above ? p : above < below ? p + 1 : (p % 2 == 0 ? p : p + 1);
    return static_cast<uint16_t>(sign | pick);
  }
};

const rne_reference& ref_f16() {
  static const rne_reference r(f16);
  return r;
}
const rne_reference& ref_bf16() {
  static const rne_reference r(bf16);
  return r;
}

template <typename F>
int code_of(F&& fn) {
  try {
    fn();
  } catch (const lora::error& e) {
    return static_cast<int>(e.code());
  }
  return 0;
}

}  // namespace

// ----------------------------------------------------------------------------
// formats/dtype

TEST_CASE("dtype names, bit sizes and byte counts") {
  const struct {
    const char* name;
    int bits;
  } want[n_dtypes] = {{"BOOL", 8},        {"F4", 4},      {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"U8", 8},
                      {"I8", 8},          {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8},
                      {"F8_E5M2FNUZ", 8}, {"I16", 16},    {"U16", 16},    {"F16", 16},    {"BF16", 16},
                      {"I32", 32},        {"U32", 32},    {"F32", 32},    {"C64", 64},    {"F64", 64},
                      {"I64", 64},        {"U64", 64}};
  for (int i = 0; i < n_dtypes; ++i) {
    const dtype t = static_cast<dtype>(i);
    CAPTURE(want[i].name);
    CHECK(dtype_name(t) == want[i].name);
    CHECK(dtype_bits(t) == want[i].bits);
    CHECK(parse_dtype(want[i].name) == t);
    CHECK(dtype_bytes(t, 8) == static_cast<uint64_t>(want[i].bits));
    CHECK(dtype_bytes(t, 0) == uint64_t{0});
    CHECK(dtype_is_math(t) == (t == dtype::F16 || t == dtype::BF16 || t == dtype::F32 || t == dtype::F64));
  }
  CHECK(!parse_dtype(""));
  CHECK(!parse_dtype("f32"));
  CHECK(!parse_dtype("F32 "));
  CHECK(!parse_dtype("FLOAT"));
  CHECK(dtype_bytes(dtype::F4, 3) == std::nullopt);       // 12 bits
  CHECK(dtype_bytes(dtype::F6_E2M3, 3) == std::nullopt);  // 18 bits
  CHECK(dtype_bytes(dtype::F6_E2M3, 4) == uint64_t{3});
  CHECK(dtype_bytes(dtype::F4, 2) == uint64_t{1});
  CHECK(dtype_bytes(dtype::U64, uint64_t{1} << 61) == std::nullopt);  // 2^67 bits
  CHECK(dtype_bytes(dtype::U8, (uint64_t{1} << 61) - 1) == (uint64_t{1} << 61) - 1);
}

// ----------------------------------------------------------------------------
// decoding: all 65,536 patterns

TEST_CASE("f16_to_f32: every pattern equals the value of its fields") {
  int n_nan = 0;
  for (uint32_t p = 0; p < 65536; ++p) {
    const uint16_t h = static_cast<uint16_t>(p);
    const float got = f16_to_f32(h);
    const double want = f16.value(h);
    CAPTURE(h);
    if (std::isnan(want)) {
      ++n_nan;
      REQUIRE(std::isnan(got));
      CHECK(std::signbit(got) == static_cast<bool>(h & 0x8000));
      CHECK(((bits_of(got) >> 13) & 0x3ff) == (h & 0x3ffu));  // payload kept
    } else {
      REQUIRE(static_cast<double>(got) == want);
      CHECK(std::signbit(got) == static_cast<bool>(h & 0x8000));  // -0 stays -0
    }
  }
  CHECK(n_nan == 2 * 1023);
  CHECK(f16_to_f32(0x3c00) == 1.0f);
  CHECK(f16_to_f32(0x7bff) == 65504.0f);
  CHECK(f16_to_f32(0x0001) == std::ldexp(1.0f, -24));
  CHECK(f16_to_f32(0xfc00) == -INFINITY);
}

TEST_CASE("bf16_to_f32: every pattern equals the value of its fields") {
  for (uint32_t p = 0; p < 65536; ++p) {
    const uint16_t h = static_cast<uint16_t>(p);
    const float got = bf16_to_f32(h);
    const double want = bf16.value(h);
    CAPTURE(h);
    REQUIRE(bits_of(got) == p << 16);
    if (std::isnan(want))
      REQUIRE(std::isnan(got));
    else
      REQUIRE(static_cast<double>(got) == want);
  }
  CHECK(bf16_to_f32(0x3f80) == 1.0f);
  CHECK(bf16_to_f32(0x0001) == std::ldexp(1.0f, -133));
}

// ----------------------------------------------------------------------------
// encoding from f32

TEST_CASE("f32_to_f16 / f32_to_bf16: every value maps to itself, every midpoint ties to even") {
  struct codec {
    const char* name;
    format16 fmt;
    const rne_reference& ref;
    uint16_t (*encode)(float);
  };
  const codec codecs[] = {{"f16", f16, ref_f16(), f32_to_f16}, {"bf16", bf16, ref_bf16(), f32_to_bf16}};
  for (const codec& c : codecs) {
    CAPTURE(c.name);
    int n_ties_up = 0, n_ties_down = 0;
    for (uint32_t s : {0u, 0x8000u}) {
      for (uint32_t p = 0; p <= c.fmt.inf(); ++p) {
        const uint16_t h = static_cast<uint16_t>(s | p);
        CAPTURE(h);
        // the value itself (zeros, subnormals, max, inf)
        REQUIRE(c.encode(static_cast<float>(c.fmt.value(h))) == h);
        if (p == c.fmt.inf()) continue;
        // the midpoint to the next pattern (inf after max) and its two neighbours
        const double lo = std::fabs(c.fmt.value(h));
        const double hi =
            p + 1 == c.fmt.inf() ? c.fmt.overflow() : std::fabs(c.fmt.value(static_cast<uint16_t>(p + 1)));
        const double mid = (lo + hi) / 2;
        const float fmid = static_cast<float>(mid);
        REQUIRE(static_cast<double>(fmid) == mid);  // midpoints are f32 values
        const float sign = s ? -1.0f : 1.0f;
        const uint16_t even = static_cast<uint16_t>(s | (p % 2 == 0 ? p : p + 1));
        REQUIRE(c.encode(sign * fmid) == even);
        REQUIRE(c.ref(sign * mid) == even);
        (even == h ? n_ties_down : n_ties_up)++;
        REQUIRE(c.encode(sign * std::nextafter(fmid, 0.0f)) == h);
        REQUIRE(c.encode(sign * std::nextafter(fmid, INFINITY)) == static_cast<uint16_t>(s | (p + 1)));
      }
    }
    CHECK(n_ties_up > 1000);
    CHECK(n_ties_down > 1000);
  }
  // overflow: 65520 is the midpoint between 65504 and 2^16: ties to even = Inf
  CHECK(f32_to_f16(65519.996f) == 0x7bff);
  CHECK(f32_to_f16(65520.0f) == 0x7c00);
  CHECK(f32_to_f16(-1e30f) == 0xfc00);
  CHECK(f32_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);
  CHECK(f32_to_f16(-0.0f) == 0x8000);
  CHECK(f32_to_bf16(-0.0f) == 0x8000);
  CHECK(f32_to_f16(1e-30f) == 0x0000);
  CHECK(f32_to_f16(-1e-30f) == 0x8000);
}

TEST_CASE("f32_to_f16 / f32_to_bf16 on random f32 patterns match the reference (seed 20261128)") {
  std::mt19937 rng(20261128);
  const format16 fmts[] = {f16, bf16};
  int n_nan = 0;
  const int n_uniform = 3'000'000, n_near = 3'000'000;
  for (int i = 0; i < n_uniform + n_near; ++i) {
    uint32_t u = rng();
    if (i >= n_uniform) {
      // exponents around the f16 range (2^-30 .. 2^17), where its rounding happens
      const uint32_t e = 97 + rng() % 48;
      u = (u & 0x807fffffu) | (e << 23);
    }
    const float f = float_of(u);
    const uint16_t h = f32_to_f16(f), b = f32_to_bf16(f);
    CAPTURE(u);
    if (std::isnan(f)) {
      ++n_nan;
      REQUIRE(fmts[0].is_quiet_nan(h));
      REQUIRE(fmts[1].is_quiet_nan(b));
      REQUIRE((h >> 15) == (u >> 31));
      REQUIRE((b >> 15) == (u >> 31));
      continue;
    }
    REQUIRE(h == ref_f16()(static_cast<double>(f)));
    REQUIRE(b == ref_bf16()(static_cast<double>(f)));
  }
  CHECK(n_nan > 1000);  // uniform patterns hit NaN 1 time in 256
  // signalling NaNs come out quiet
  CHECK(f16.is_quiet_nan(f32_to_f16(float_of(0x7f800001u))));
  CHECK(bf16.is_quiet_nan(f32_to_bf16(float_of(0x7f800001u))));
  CHECK(bf16.is_quiet_nan(f32_to_bf16(float_of(0xff800001u))));
  CHECK(bf16.is_quiet_nan(f32_to_bf16(float_of(0x7f80ffffu))));
}

// ----------------------------------------------------------------------------
// encoding from f64: one rounding

TEST_CASE("f64_to_f16 / f64_to_bf16 round once: inputs where rounding through f32 goes wrong") {
  struct codec {
    const char* name;
    format16 fmt;
    const rne_reference& ref;
    uint16_t (*from64)(double);
    uint16_t (*from32)(float);
  };
  const codec codecs[] = {{"f16", f16, ref_f16(), f64_to_f16, f32_to_f16},
                          {"bf16", bf16, ref_bf16(), f64_to_bf16, f32_to_bf16}};
  for (const codec& c : codecs) {
    CAPTURE(c.name);
    int n_traps = 0;
    for (uint32_t s : {0u, 0x8000u}) {
      const double sign = s ? -1.0 : 1.0;
      for (uint32_t p = 0; p < c.fmt.inf(); ++p) {
        const uint16_t h = static_cast<uint16_t>(s | p), next = static_cast<uint16_t>(s | (p + 1));
        CAPTURE(h);
        REQUIRE(c.from64(c.fmt.value(h)) == h);
        const double lo = std::fabs(c.fmt.value(h));
        const double hi =
            p + 1 == c.fmt.inf() ? c.fmt.overflow() : std::fabs(c.fmt.value(static_cast<uint16_t>(p + 1)));
        const double mid = (lo + hi) / 2;
        // a hair above and below the midpoint: f32 cannot tell them from it
        const double up = sign * (mid + mid * 0x1p-40), down = sign * (mid - mid * 0x1p-40);
        REQUIRE(static_cast<float>(up) == static_cast<float>(sign * mid));
        REQUIRE(static_cast<float>(down) == static_cast<float>(sign * mid));
        REQUIRE(c.from64(up) == next);
        REQUIRE(c.from64(down) == h);
        REQUIRE(c.ref(up) == next);
        REQUIRE(c.ref(down) == h);
        REQUIRE(c.from64(sign * mid) == c.ref(sign * mid));
        // through f32 the tie goes to even: one of the two is then wrong
        if (c.from32(static_cast<float>(up)) != next || c.from32(static_cast<float>(down)) != h) ++n_traps;
      }
    }
    CHECK(n_traps == 2 * static_cast<int>(c.fmt.inf()));
  }
  CHECK(f64_to_f16(65520.0) == 0x7c00);
  CHECK(f64_to_f16(std::nextafter(65520.0, 0.0)) == 0x7bff);
  CHECK(f64_to_f16(1e300) == 0x7c00);
  CHECK(f64_to_f16(-1e300) == 0xfc00);
  CHECK(f64_to_bf16(1e300) == 0x7f80);
  CHECK(f64_to_bf16(-1e39) == 0xff80);
  CHECK(f64_to_f16(-1e-300) == 0x8000);
  CHECK(f64_to_bf16(1e-300) == 0x0000);
  CHECK(f64_to_f16(-0.0) == 0x8000);
  CHECK(f64_to_f16(INFINITY) == 0x7c00);
  CHECK(f64_to_bf16(-INFINITY) == 0xff80);
  CHECK(f16.is_quiet_nan(f64_to_f16(std::numeric_limits<double>::quiet_NaN())));
  CHECK(bf16.is_quiet_nan(f64_to_bf16(-std::numeric_limits<double>::quiet_NaN())));
  CHECK(bf16.is_quiet_nan(f64_to_bf16(double_of(0x7ff0000000000001ull))));  // signalling in, quiet out
  CHECK((f64_to_bf16(-std::numeric_limits<double>::quiet_NaN()) >> 15) == 1);
}

TEST_CASE("f64_to_f16 / f64_to_bf16 on random doubles match the reference (seed 7)") {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 2'000'000; ++i) {
    uint64_t u = rng();
    // exponents from 2^-160 to 2^140: every bf16 and f16 range, under- and overflow
    const uint64_t e = 1023 - 160 + rng() % 300;
    u = (u & 0x800fffffffffffffull) | (e << 52);
    const double d = double_of(u);
    CAPTURE(u);
    REQUIRE(f64_to_f16(d) == ref_f16()(d));
    REQUIRE(f64_to_bf16(d) == ref_bf16()(d));
  }
}

// ----------------------------------------------------------------------------
// spans

TEST_CASE("to_f32 / to_f64 / from_f32 / from_f64 on unaligned spans") {
  std::mt19937 rng(99);
  const size_t n = 257;
  for (dtype t : {dtype::F16, dtype::BF16, dtype::F32, dtype::F64}) {
    CAPTURE(dtype_name(t));
    const size_t es = static_cast<size_t>(math_dtype_size(t));
    CHECK(es * 8 == static_cast<size_t>(dtype_bits(t)));
    // random finite values encoded in t, stored at odd offsets
    std::vector<double> values(n);
    for (size_t i = 0; i < n; ++i) {
      double v = std::ldexp(static_cast<double>(rng()) / 4294967296.0 - 0.5, static_cast<int>(rng() % 20) - 10);
      if (t == dtype::F16) v = f16.value(f64_to_f16(v));
      if (t == dtype::BF16) v = bf16.value(f64_to_bf16(v));
      if (t == dtype::F32) v = static_cast<float>(v);
      values[i] = v;
    }
    std::vector<uint8_t> storage(n * es + 3);
    std::span<uint8_t> bytes(storage.data() + 1, n * es);  // unaligned for every size > 1
    from_f64(t, values, bytes);
    std::vector<float> f32(n);
    std::vector<double> f64(n);
    to_f32(t, bytes, f32);
    to_f64(t, bytes, f64);
    for (size_t i = 0; i < n; ++i) {
      CAPTURE(i);
      REQUIRE(f64[i] == values[i]);
      REQUIRE(static_cast<double>(f32[i]) == static_cast<float>(values[i]));
    }
    // from_f32 writes the same bytes, at another odd offset
    std::vector<uint8_t> storage2(n * es + 3);
    std::span<uint8_t> bytes2(storage2.data() + 3, n * es);
    from_f32(t, f32, bytes2);
    if (t != dtype::F64) CHECK(std::equal(bytes.begin(), bytes.end(), bytes2.begin()));
    // element by element against the scalar functions
    for (size_t i = 0; i < n; ++i) {
      const uint8_t* p = bytes.data() + i * es;
      if (t == dtype::F16 || t == dtype::BF16) {
        uint16_t h;
        std::memcpy(&h, p, 2);
        REQUIRE(h == (t == dtype::F16 ? f32_to_f16(f32[i]) : f32_to_bf16(f32[i])));
      }
    }
  }
  // from_f64 to F32 rounds once (the cast) and from_f32 to F64 is exact
  const double d = 1.0 + 0x1p-24 + 0x1p-40;  // just above a float midpoint
  std::vector<uint8_t> four(5);
  from_f64(dtype::F32, std::span<const double>(&d, 1), std::span<uint8_t>(four.data() + 1, 4));
  float back;
  std::memcpy(&back, four.data() + 1, 4);
  CHECK(back == std::nextafter(1.0f, 2.0f));
  // empty spans are fine
  to_f32(dtype::F16, {}, {});
  from_f64(dtype::BF16, {}, {});
}

// to_f32 / from_f32 run their 16-bit loops as clones built for the CPU's
// vector width (core/vectorize.h): whichever one this CPU picks must give the
// bits of the scalar functions checked above, NaN payloads included.
TEST_CASE("span conversions equal the scalar ones bit for bit (every 16-bit pattern, 4M f32 patterns)") {
  for (dtype t : {dtype::F16, dtype::BF16}) {
    CAPTURE(dtype_name(t));
    std::vector<uint8_t> storage(2 * 65536 + 1);
    for (uint32_t i = 0; i < 65536; ++i) {
      const uint16_t h = static_cast<uint16_t>(i);
      std::memcpy(storage.data() + 1 + 2 * i, &h, 2);
    }
    std::vector<float> out(65536);
    to_f32(t, std::span<const uint8_t>(storage.data() + 1, 2 * 65536), out);
    for (uint32_t i = 0; i < 65536; ++i) {
      CAPTURE(i);
      const uint16_t h = static_cast<uint16_t>(i);
      REQUIRE(bits_of(out[i]) == bits_of(t == dtype::F16 ? f16_to_f32(h) : bf16_to_f32(h)));
    }
  }
  std::mt19937 rng(20261129);
  const size_t n = 4'000'000;
  std::vector<float> values(n);
  for (size_t i = 0; i < n; ++i) {
    uint32_t u = rng();
    if (i % 2 == 1) u = (u & 0x807fffffu) | ((97 + rng() % 48) << 23);  // around the f16 range
    if (i % 1000 == 7) u = (u & 0x80000000u) | 0x7f800000u | (rng() % 3 == 0 ? 0 : (rng() & 0x7fffffu));  // Inf/NaN
    values[i] = float_of(u);
  }
  for (dtype t : {dtype::F16, dtype::BF16}) {
    CAPTURE(dtype_name(t));
    std::vector<uint8_t> bytes(2 * n + 1);
    from_f32(t, values, std::span<uint8_t>(bytes.data() + 1, 2 * n));
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, bytes.data() + 1 + 2 * i, 2);
      if (h != (t == dtype::F16 ? f32_to_f16(values[i]) : f32_to_bf16(values[i]))) {
        CAPTURE(i);
        CAPTURE(bits_of(values[i]));
        REQUIRE(h == (t == dtype::F16 ? f32_to_f16(values[i]) : f32_to_bf16(values[i])));
      }
    }
  }
}

TEST_CASE("conversions refuse non-math dtypes and size mismatches (exit 3)") {
  std::vector<uint8_t> bytes(16);
  std::vector<float> f(2);
  std::vector<double> d(2);
  for (int i = 0; i < n_dtypes; ++i) {
    const dtype t = static_cast<dtype>(i);
    CAPTURE(dtype_name(t));
    if (dtype_is_math(t)) continue;
    CHECK(code_of([&] { math_dtype_size(t); }) == 3);
    CHECK(code_of([&] { to_f32(t, bytes, f); }) == 3);
    CHECK(code_of([&] { to_f64(t, bytes, d); }) == 3);
    CHECK(code_of([&] { from_f32(t, f, bytes); }) == 3);
    CHECK(code_of([&] { from_f64(t, d, bytes); }) == 3);
    try {
      to_f32(t, bytes, f);
    } catch (const lora::error& e) {
      CHECK(e.detail().find(std::string(dtype_name(t))) != std::string::npos);
      CHECK(e.detail().find("not supported for arithmetic") != std::string::npos);
    }
  }
  CHECK(code_of([&] {
          to_f32(dtype::F16, std::span<const uint8_t>(bytes).subspan(0, 3), std::span<float>(f).subspan(0, 1));
        }) == 3);
  CHECK(code_of([&] { to_f64(dtype::F64, bytes, std::span<double>(d).subspan(0, 1)); }) == 3);
  CHECK(code_of([&] { from_f32(dtype::BF16, f, bytes); }) == 3);  // 2 elements, 16 bytes
  CHECK(code_of([&] { from_f64(dtype::F64, d, bytes); }) == 0);
  CHECK(code_of([&] { to_f32(dtype::F32, std::span<const uint8_t>(bytes).subspan(0, 8), f); }) == 0);
}

// ---------------------------------------------------------------- FP8 E4M3 (OCP "FN")

namespace {
// The value of an E4M3 code from its fields (OCP 8-bit FP spec v1.0):
// exponent 0 is subnormal m/8 * 2^-6, else (1 + m/8) * 2^(e-7); S.1111.111 is NaN.
double e4m3_reference(int code) {
  const int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? (m / 8.0) * std::pow(2.0, -6) : (1.0 + m / 8.0) * std::pow(2.0, e - 7);
  return s ? -mag : mag;
}
}  // namespace

TEST_CASE("e4m3_to_f32: all 256 codes equal the value of their fields") {
  int n_nan = 0;
  for (int c = 0; c < 256; ++c) {
    const double want = e4m3_reference(c);
    const float got = e4m3_to_f32(static_cast<uint8_t>(c));
    if (std::isnan(want)) {
      CHECK(std::isnan(got));
      ++n_nan;
      continue;
    }
    CHECK(static_cast<double>(got) == want);
    CHECK(std::signbit(got) == (c >= 128));
  }
  CHECK(n_nan == 2);  // 0x7f, 0xff: no infinities in the FN variant
  CHECK(e4m3_to_f32(0x7e) == 448.0f);
  CHECK(e4m3_to_f32(0x38) == 1.0f);
  CHECK(e4m3_to_f32(0x08) == std::ldexp(1.0f, -6));  // smallest normal
  CHECK(e4m3_to_f32(0x01) == std::ldexp(1.0f, -9));  // smallest subnormal
  CHECK(e4m3_max == 448.0);
}

TEST_CASE("f64_to_e4m3: every value round-trips, every midpoint ties to even, the neighbours of a midpoint round "
          "to the nearer") {
  for (int c = 0; c < 256; ++c) {
    const double v = e4m3_reference(c);
    if (std::isnan(v)) continue;
    CHECK(f64_to_e4m3(v) == c);
    CHECK(f32_to_e4m3(static_cast<float>(v)) == c);
  }
  // positive codes in increasing order: 0x00 .. 0x7e; the same for negatives with the sign bit
  for (int c = 0; c < 0x7e; ++c)
    for (int sign : {0, 0x80}) {
      const double lo = e4m3_reference(sign | c), hi = e4m3_reference(sign | (c + 1));
      const double mid = (lo + hi) / 2;  // exact in double
      const int even = (c % 2 == 0) ? c : c + 1;
      CHECK(f64_to_e4m3(mid) == (sign | even));
      CHECK(f64_to_e4m3(std::nextafter(mid, lo)) == (sign | c));
      CHECK(f64_to_e4m3(std::nextafter(mid, hi)) == (sign | (c + 1)));
    }
}

TEST_CASE("f64_to_e4m3 beyond 448 is NaN (non-saturating, as torch's cast); zeros keep their sign") {
  CHECK(f64_to_e4m3(448.0) == 0x7e);
  CHECK(f64_to_e4m3(463.99) == 0x7e);  // nearer 448 than 480
  CHECK(f64_to_e4m3(464.0) == 0x7e);   // the midpoint to 480 (which would be odd) rounds to even 448
  CHECK(f64_to_e4m3(-464.0) == 0xfe);
  CHECK(f64_to_e4m3(464.0001) == 0x7f);  // would round to 480: no such value, NaN
  CHECK(f64_to_e4m3(-1e6) == 0xff);
  CHECK(f64_to_e4m3(std::numeric_limits<double>::infinity()) == 0x7f);
  CHECK(f64_to_e4m3(-std::numeric_limits<double>::infinity()) == 0xff);
  CHECK((f64_to_e4m3(std::numeric_limits<double>::quiet_NaN()) & 0x7f) == 0x7f);
  CHECK(f64_to_e4m3(0.0) == 0x00);
  CHECK(f64_to_e4m3(-0.0) == 0x80);
  CHECK(f64_to_e4m3(std::ldexp(1.0, -10)) == 0x00);  // half the smallest subnormal: tie to even 0
  CHECK(f64_to_e4m3(std::ldexp(1.5, -10)) == 0x01);
  CHECK(f64_to_e4m3(1e-30) == 0x00);
}

TEST_CASE("f64_to_e4m3 on random doubles equals the nearest value of the table, ties to even (seed 11)") {
  std::vector<std::pair<double, int>> table;  // positive finite values, increasing
  for (int c = 0; c < 0x7f; ++c) table.push_back({e4m3_reference(c), c});
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> u(-470.0, 470.0);
  std::uniform_real_distribution<double> small(-0.02, 0.02);
  for (int i = 0; i < 200000; ++i) {
    const double x = (i % 2) ? u(rng) : small(rng);
    const double a = std::fabs(x);
    int want;
    if (a > 464.0) {
      want = 0x7f;
    } else {
      auto it = std::lower_bound(table.begin(), table.end(), std::make_pair(a, -1));
      if (it == table.end()) it = std::prev(it);
      if (it != table.begin()) {
        const auto lo = *std::prev(it);
        const double dl = a - lo.first, dh = it->first - a;
        if (dl < dh || (dl == dh && lo.second % 2 == 0)) it = std::prev(it);
      }
      want = it->second;
    }
    const int sign = std::signbit(x) ? 0x80 : 0;
    REQUIRE(f64_to_e4m3(x) == (sign | want));
  }
}

TEST_CASE("count_nonfinite counts E4M3 NaN codes") {
  const std::vector<uint8_t> codes{0x00, 0x7f, 0x7e, 0xff, 0xfe, 0x80, 0x7f};
  CHECK(count_nonfinite(dtype::F8_E4M3, codes) == 3);
}
