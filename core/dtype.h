// Element conversion between the math dtypes (F16, BF16, F32, F64) and the
// f32 / f64 buffers the math runs on. The one place where conversion happens.
// Narrowing always rounds to nearest, ties to even; NaN stays NaN (quiet),
// infinities and signed zeros are kept, subnormals are exact.
#pragma once

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
// F32 or F64. Never throws.
uint64_t count_nonfinite(dtype type, std::span<const uint8_t> bytes) noexcept;

// The largest finite value of a math dtype (F16 65504, BF16 ~3.39e38, F32
// ~3.40e38, F64 ~1.80e308). Throws lora::error (exit 3) for another dtype.
double max_finite(dtype type);

// Bytes per element of a math dtype.
int math_dtype_size(dtype type);

}  // namespace lora
