#include "core/dtype.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "core/vectorize.h"
#include "formats/error.h"

namespace lora {

namespace {
inline uint32_t bits_of(float f) noexcept {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace

float f16_to_f32(uint16_t h) noexcept {
  // shift exponent and mantissa into place, then fix up Inf/NaN and subnormals
  constexpr uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // Inf / NaN
  } else if (exp == 0) {
    o += 1u << 23;  // subnormal: renormalize by float subtraction (exact)
    o = bits_of(float_of(o) - float_of(113u << 23));
  }
  o |= (static_cast<uint32_t>(h) & 0x8000u) << 16;
  return float_of(o);
}

float bf16_to_f32(uint16_t h) noexcept { return float_of(static_cast<uint32_t>(h) << 16); }

uint16_t f32_to_f16(float f) noexcept {
  constexpr uint32_t f32_inf = 255u << 23;
  constexpr uint32_t f16_max = (127u + 16u) << 23;  // 65536: everything above rounds to Inf
  constexpr uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = bits_of(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= f16_max) {
    o = u > f32_inf ? static_cast<uint16_t>(0x7e00u | ((u >> 13) & 0x3ffu)) : 0x7c00u;
  } else if (u < (113u << 23)) {
    // result is subnormal or zero: let the FPU round by adding a magic number
    o = static_cast<uint16_t>(bits_of(float_of(u) + float_of(denorm_magic)) - denorm_magic);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;  // rebias, round half up...
    u += mant_odd;                                          // ...and to even on ties
    o = static_cast<uint16_t>(u >> 13);
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

uint16_t f32_to_bf16(float f) noexcept {
  uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

namespace {
// Rounds d once to a binary format with `mant` explicit mantissa bits,
// minimum normal exponent `emin` and largest finite value `max_finite`;
// the result is exactly representable in f32 for F16 and BF16.
float round_to_format(double d, int mant, int emin, double max_finite) noexcept {
  if (std::isnan(d) || std::isinf(d) || d == 0.0) return static_cast<float>(d);
  const double a = std::fabs(d);
  int e = std::ilogb(a);
  if (e < emin) e = emin;
  const double quantum = std::ldexp(1.0, e - mant);
  double r = std::nearbyint(a / quantum) * quantum;  // exact scaling; RNE
  // a value at or beyond max_finite + half an ulp rounds to infinity
  if (r > max_finite) r = std::numeric_limits<double>::infinity();
  return static_cast<float>(std::copysign(r, d));
}
}  // namespace

uint16_t f64_to_f16(double d) noexcept {
  if (std::isnan(d)) return std::signbit(d) ? 0xfe00u : 0x7e00u;
  return f32_to_f16(round_to_format(d, 10, -14, 65504.0));
}

uint16_t f64_to_bf16(double d) noexcept {
  if (std::isnan(d)) return std::signbit(d) ? 0xffc0u : 0x7fc0u;
  const double max_bf16 = static_cast<double>(float_of(0x7f7f0000u));
  return static_cast<uint16_t>(bits_of(round_to_format(d, 7, -126, max_bf16)) >> 16);
}

namespace {
// The value of every E4M3 code, from its fields: exponent 0 is subnormal
// m x 2^-9, else (8 + m) x 2^(e - 10); S.1111.111 is NaN.
struct e4m3_table {
  float v[256];
  e4m3_table() noexcept {
    for (int code = 0; code < 256; ++code) {
      const int exp = (code >> 3) & 0xf, mant = code & 0x7;
      float x;
      if (exp == 0xf && mant == 0x7)
        x = std::numeric_limits<float>::quiet_NaN();
      else if (exp == 0)
        x = std::ldexp(static_cast<float>(mant), -9);
      else
        x = std::ldexp(static_cast<float>(8 + mant), exp - 10);
      v[code] = (code & 0x80) ? -x : x;
    }
  }
};
const e4m3_table e4m3_values;
}  // namespace

float e4m3_to_f32(uint8_t code) noexcept { return e4m3_values.v[code]; }

int math_dtype_size(dtype type) {
  switch (type) {
    case dtype::F16:
    case dtype::BF16: return 2;
    case dtype::F32: return 4;
    case dtype::F64: return 8;
    default:
      throw errors::invalid(
          "", "", fmt::format("dtype {} is not supported for arithmetic (only F16, BF16, F32, F64)", dtype_name(type)));
  }
}

namespace {
template <typename T>
inline T load(const uint8_t* p) noexcept {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
inline void store(uint8_t* p, T v) noexcept {
  std::memcpy(p, &v, sizeof(T));
}

void check_sizes(dtype type, size_t n_bytes, size_t n_elements) {
  const size_t size = static_cast<size_t>(math_dtype_size(type));
  if (n_bytes != n_elements * size)
    throw errors::invalid(
        "", "", fmt::format("conversion of {} elements of {} given {} bytes", n_elements, dtype_name(type), n_bytes));
}

// The 16-bit <-> f32 (and 16-bit -> f64: verify, extract --method exact)
// loops: the pipelines' inner loops, so built for each vector width (see
// vectorize.h).
LORA_VECTORIZE void decode_f16(const uint8_t* p, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(load<uint16_t>(p + 2 * i));
}
LORA_VECTORIZE void decode_bf16(const uint8_t* p, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(load<uint16_t>(p + 2 * i));
}
LORA_VECTORIZE void decode_f16_f64(const uint8_t* p, double* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(load<uint16_t>(p + 2 * i));
}
LORA_VECTORIZE void decode_bf16_f64(const uint8_t* p, double* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(load<uint16_t>(p + 2 * i));
}
LORA_VECTORIZE void encode_f16(const float* src, uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) store<uint16_t>(p + 2 * i, f32_to_f16(src[i]));
}
LORA_VECTORIZE void encode_bf16(const float* src, uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) store<uint16_t>(p + 2 * i, f32_to_bf16(src[i]));
}

// decode to F (float or double)
template <typename F>
void decode(dtype type, std::span<const uint8_t> src, std::span<F> dst) {
  check_sizes(type, src.size(), dst.size());
  const uint8_t* p = src.data();
  const size_t n = dst.size();
  switch (type) {
    case dtype::F16:
      if constexpr (sizeof(F) == 4)
        decode_f16(p, dst.data(), n);
      else
        decode_f16_f64(p, dst.data(), n);
      break;
    case dtype::BF16:
      if constexpr (sizeof(F) == 4)
        decode_bf16(p, dst.data(), n);
      else
        decode_bf16_f64(p, dst.data(), n);
      break;
    case dtype::F32:
      if constexpr (sizeof(F) == 4)
        std::memcpy(dst.data(), p, 4 * n);
      else
        for (size_t i = 0; i < n; ++i) dst[i] = static_cast<F>(load<float>(p + 4 * i));
      break;
    case dtype::F64:
      if constexpr (sizeof(F) == 8)
        std::memcpy(dst.data(), p, 8 * n);
      else
        for (size_t i = 0; i < n; ++i) dst[i] = static_cast<F>(load<double>(p + 8 * i));
      break;
    default: break;  // unreachable: check_sizes threw
  }
}
}  // namespace

void to_f32(dtype type, std::span<const uint8_t> src, std::span<float> dst) { decode(type, src, dst); }
void to_f64(dtype type, std::span<const uint8_t> src, std::span<double> dst) { decode(type, src, dst); }

void round_through(dtype type, std::span<float> x) {
  if (type == dtype::F32 || type == dtype::F64) return;
  // f32 -> type -> f32, in chunks (x stays the only buffer the caller sees)
  uint8_t tmp[2 * 1024];
  for (size_t at = 0; at < x.size(); at += 1024) {
    const std::span<float> part = x.subspan(at, std::min<size_t>(1024, x.size() - at));
    const std::span<uint8_t> bytes(tmp, part.size() * static_cast<size_t>(math_dtype_size(type)));
    from_f32(type, part, bytes);
    to_f32(type, bytes, part);
  }
}

void from_f32(dtype type, std::span<const float> src, std::span<uint8_t> dst) {
  check_sizes(type, dst.size(), src.size());
  uint8_t* p = dst.data();
  const size_t n = src.size();
  switch (type) {
    case dtype::F16: encode_f16(src.data(), p, n); break;
    case dtype::BF16: encode_bf16(src.data(), p, n); break;
    case dtype::F32: std::memcpy(p, src.data(), 4 * n); break;
    case dtype::F64:
      for (size_t i = 0; i < n; ++i) store<double>(p + 8 * i, static_cast<double>(src[i]));
      break;
    default: break;
  }
}

void from_f64(dtype type, std::span<const double> src, std::span<uint8_t> dst) {
  check_sizes(type, dst.size(), src.size());
  uint8_t* p = dst.data();
  const size_t n = src.size();
  switch (type) {
    case dtype::F16:
      for (size_t i = 0; i < n; ++i) store<uint16_t>(p + 2 * i, f64_to_f16(src[i]));
      break;
    case dtype::BF16:
      for (size_t i = 0; i < n; ++i) store<uint16_t>(p + 2 * i, f64_to_bf16(src[i]));
      break;
    case dtype::F32:
      for (size_t i = 0; i < n; ++i) store<float>(p + 4 * i, static_cast<float>(src[i]));
      break;
    case dtype::F64: std::memcpy(p, src.data(), 8 * n); break;
    default: break;
  }
}

namespace {
// How many of the n 16-bit values at p have all the bits of `exp` set (NaN
// or infinite, given the format's exponent mask).
LORA_VECTORIZE uint64_t count_nonfinite16(const uint8_t* p, size_t n, uint16_t exp) {
  uint64_t count = 0;
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    count += (h & exp) == exp;
  }
  return count;
}
}  // namespace

uint64_t count_nonfinite(dtype type, std::span<const uint8_t> bytes) noexcept {
  uint64_t n = 0;
  const uint8_t* p = bytes.data();
  switch (type) {
    case dtype::BF16:
    case dtype::F16: n = count_nonfinite16(p, bytes.size() / 2, type == dtype::BF16 ? 0x7f80u : 0x7c00u); break;
    case dtype::F32:
      for (size_t i = 0; i + 3 < bytes.size(); i += 4) {
        uint32_t u;
        std::memcpy(&u, p + i, 4);
        n += (u & 0x7f800000u) == 0x7f800000u;
      }
      break;
    case dtype::F64:
      for (size_t i = 0; i + 7 < bytes.size(); i += 8) {
        uint64_t u;
        std::memcpy(&u, p + i, 8);
        n += (u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
      }
      break;
    case dtype::F8_E4M3:
      for (size_t i = 0; i < bytes.size(); ++i) n += (p[i] & 0x7f) == 0x7f;
      break;
    default: break;
  }
  return n;
}

double max_finite(dtype type) {
  switch (type) {
    case dtype::F16: return 65504.0;
    case dtype::BF16: return 0x1.fep127;  // 0x7f7f: the largest f32 with 8 significant bits
    case dtype::F32: return std::numeric_limits<float>::max();
    case dtype::F64: return std::numeric_limits<double>::max();
    default: throw errors::invalid("", "", fmt::format("dtype {} is not F16, BF16, F32 or F64", dtype_name(type)));
  }
}

}  // namespace lora
