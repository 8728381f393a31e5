#include "formats/dtype.h"

#include <array>

namespace lora {

namespace {
struct dtype_row {
  dtype type;
  std::string_view name;
  int bits;
};
constexpr std::array<dtype_row, n_dtypes> k_dtypes{{
    {dtype::BOOL, "BOOL", 8},
    {dtype::F4, "F4", 4},
    {dtype::F6_E2M3, "F6_E2M3", 6},
    {dtype::F6_E3M2, "F6_E3M2", 6},
    {dtype::U8, "U8", 8},
    {dtype::I8, "I8", 8},
    {dtype::F8_E5M2, "F8_E5M2", 8},
    {dtype::F8_E4M3, "F8_E4M3", 8},
    {dtype::F8_E8M0, "F8_E8M0", 8},
    {dtype::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {dtype::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {dtype::I16, "I16", 16},
    {dtype::U16, "U16", 16},
    {dtype::F16, "F16", 16},
    {dtype::BF16, "BF16", 16},
    {dtype::I32, "I32", 32},
    {dtype::U32, "U32", 32},
    {dtype::F32, "F32", 32},
    {dtype::C64, "C64", 64},
    {dtype::F64, "F64", 64},
    {dtype::I64, "I64", 64},
    {dtype::U64, "U64", 64},
}};
}  // namespace

std::string_view dtype_name(dtype t) noexcept { return k_dtypes[static_cast<size_t>(t)].name; }

std::optional<dtype> parse_dtype(std::string_view name) noexcept {
  for (const auto& row : k_dtypes)
    if (row.name == name) return row.type;
  return std::nullopt;
}

int dtype_bits(dtype t) noexcept { return k_dtypes[static_cast<size_t>(t)].bits; }

std::optional<uint64_t> dtype_bytes(dtype t, uint64_t n_elements) noexcept {
  uint64_t bits = 0;
  if (__builtin_mul_overflow(n_elements, static_cast<uint64_t>(dtype_bits(t)), &bits)) return std::nullopt;
  if (bits % 8 != 0) return std::nullopt;
  return bits / 8;
}

bool dtype_is_math(dtype t) noexcept {
  return t == dtype::F16 || t == dtype::BF16 || t == dtype::F32 || t == dtype::F64;
}

}  // namespace lora
