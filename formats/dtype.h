// safetensors element types: names, bit sizes and the reference writer's order.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace lora {

// Declared in the reference implementation's enum order: the writer sorts
// tensors by this order, descending, then by name.
enum class dtype : uint8_t {
  BOOL,
  F4,
  F6_E2M3,
  F6_E3M2,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  F8_E8M0,
  F8_E4M3FNUZ,
  F8_E5M2FNUZ,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  C64,
  F64,
  I64,
  U64,
};

inline constexpr int n_dtypes = 22;

// The name as files spell it ("BF16"); parse returns nullopt for unknown names.
std::string_view dtype_name(dtype t) noexcept;
std::optional<dtype> parse_dtype(std::string_view name) noexcept;

// Bits per element (F4: 4, F6_*: 6, BF16: 16, ...).
int dtype_bits(dtype t) noexcept;

// Bytes for n elements, or nullopt when n * bits overflows 64 bits or is not
// a whole number of bytes (sub-byte dtypes with an odd count).
std::optional<uint64_t> dtype_bytes(dtype t, uint64_t n_elements) noexcept;

// True for the dtypes lora does arithmetic on: F16, BF16, F32, F64.
bool dtype_is_math(dtype t) noexcept;

}  // namespace lora
