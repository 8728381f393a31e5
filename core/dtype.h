// Element conversion between the math dtypes (F16, BF16, F32, F64) and the
// f32 / f64 buffers the math runs on, and the FP8 E4M3 codec (block scales:
// core/fp8). The one place where conversion happens.
// Narrowing always rounds to nearest, ties to even; NaN stays NaN (quiet),
// infinities and signed zeros are kept, subnormals are exact.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <span>

#include "formats/dtype.h"

namespace lora {

float f16_to_f32(uint16_t h) noexcept;
float bf16_to_f32(uint16_t h) noexcept;
uint16_t f32_to_f16(float f) noexcept;
uint16_t f32_to_bf16(float f) noexcept;
// Round a double once, straight to the 16-bit format (no double rounding
// through f32): used for exact references.
uint16_t f64_to_f16(double d) noexcept;
uint16_t f64_to_bf16(double d) noexcept;

// FP8 E4M3, the OCP "FN" variant (torch.float8_e4m3fn, safetensors
// F8_E4M3): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities;
// S.1111.111 is NaN, so the largest finite value is 1.110 x 2^8 = 448;
// subnormals (exponent 0) are m x 2^-9. Follows the OCP 8-bit floating point
// specification (v1.0, 2023) and c10/util/Float8_e4m3fn.h of PyTorch.
inline constexpr double e4m3_max = 448.0;
// Exact (every E4M3 value is an f32); NaN codes (0x7f, 0xff) give a quiet NaN.
float e4m3_to_f32(uint8_t code) noexcept;
// Rounds once to nearest, ties to even. Non-saturating, as torch's cast:
// |d| >= 464 (the midpoint between 448 and 480, itself rounding to even 448)
// has no finite E4M3 value and gives NaN (0x7f, sign kept), as does NaN or
// infinity; the caller that wants saturation clamps to +-448 first (the
// merge's block scale keeps |values| <= 448, and count_nonfinite finds a NaN
// that got through). Signed zeros are kept.
// (Inline: the requantization loop of core/fp8 calls it per element.)
inline uint8_t f64_to_e4m3(double d) noexcept {
  const uint64_t bits = std::bit_cast<uint64_t>(d);
  const uint8_t sign = (bits >> 63) ? 0x80 : 0x00;
  const uint64_t mag = bits & 0x7fffffffffffffffull;
  if (mag >= 0x7ff0000000000000ull) return sign | 0x7f;  // NaN, infinity
  if (mag < 0x3f90000000000000ull) {
    // below 2^-6: multiples of 2^-9, m = |d| x 2^9 rounded to nearest even
    // (exact scaling; nearbyint rounds ties to even); m = 8 is the code of 2^-6
    return sign | static_cast<uint8_t>(std::nearbyint(std::bit_cast<double>(mag) * 512.0));
  }
  // normal: keep 3 of the 52 mantissa bits, rounding to nearest even on the
  // bits: the carry of a mantissa 1.111 + 1 moves into the exponent, as it should
  const uint64_t rounded = mag + ((uint64_t{1} << 48) - 1) + ((mag >> 49) & 1);
  const int64_t exp = static_cast<int64_t>(rounded >> 52) - 1023;  // unbiased, >= -6
  const uint64_t code = static_cast<uint64_t>(exp + 7) << 3 | ((rounded >> 49) & 7);
  // above 448 (0x7e) there is no finite code: 0x7f would be 480, NaN in the FN variant
  return sign | static_cast<uint8_t>(code > 0x7e ? 0x7f : code);
}
inline uint8_t f32_to_e4m3(float f) noexcept { return f64_to_e4m3(static_cast<double>(f)); }

// Decodes src.size() / element-size elements of `type` (F16, BF16, F32, F64;
// bytes may be unaligned) into dst, which must hold exactly that many.
// Throws lora::error (exit 3) for a non-math dtype or a size mismatch.
void to_f32(dtype type, std::span<const uint8_t> src, std::span<float> dst);
void to_f64(dtype type, std::span<const uint8_t> src, std::span<double> dst);

// Encodes src into dst as `type`, rounding once (RNE). dst.size() must be
// src.size() * element size. Throws lora::error (exit 3) as above.
void from_f32(dtype type, std::span<const float> src, std::span<uint8_t> dst);
void from_f64(dtype type, std::span<const double> src, std::span<uint8_t> dst);

// Rounds every value of x once (RNE) to `type` and back to f32, in place: the
// value a tensor of that dtype would hold (F16 / BF16; F32 and F64 leave x
// as it is). Throws lora::error (exit 3) for a non-math dtype.
void round_through(dtype type, std::span<float> x);

// How many values of `bytes` (elements of `type`) are NaN or infinite, by
// their exponent bits (no conversion). 0 for a dtype that is not F16, BF16,
// F32, F64 or F8_E4M3 (NaN codes S.1111.111). Never throws.
uint64_t count_nonfinite(dtype type, std::span<const uint8_t> bytes) noexcept;

// The largest finite value of a math dtype (F16 65504, BF16 ~3.39e38, F32
// ~3.40e38, F64 ~1.80e308). Throws lora::error (exit 3) for another dtype.
double max_finite(dtype type);

// Bytes per element of a math dtype.
int math_dtype_size(dtype type);

}  // namespace lora
