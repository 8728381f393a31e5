// --dtype same|bf16|f16|f32, shared by the commands that write weights.
#pragma once

#include <optional>
#include <string>

#include <fmt/format.h>

#include "formats/dtype.h"
#include "formats/error.h"

namespace lora::cli {

// nullopt for "same" (keep each tensor's dtype); throws exit 2 otherwise.
inline std::optional<dtype> parse_out_dtype(const std::string& s) {
  if (s == "same") return std::nullopt;
  if (s == "bf16") return dtype::BF16;
  if (s == "f16") return dtype::F16;
  if (s == "f32") return dtype::F32;
  throw errors::usage(fmt::format("--dtype {} is not one of same, bf16, f16, f32", s));
}

}  // namespace lora::cli
