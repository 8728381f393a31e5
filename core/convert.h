// `lora convert`: an adapter from one format into another (PEFT <-> kohya,
// mlx_lm -> PEFT), factor bytes untouched.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/adapter.h"

namespace lora {

struct convert_options {
  std::string adapter;  // PEFT folder / file, kohya file, mlx_lm folder / file
  adapter_format to = adapter_format::peft;
  std::string out;
  std::string base;                   // model folder / file; required for kohya -> PEFT
  std::string kohya_prefix = "auto";  // lora_unet_ for UNet / DiT module names, else lora_te_
  bool force = false;
};

struct convert_report {
  std::string from;  // "peft" | "kohya" | "mlx"
  adapter_format to = adapter_format::peft;
  std::string out;
  size_t n_modules = 0;
  size_t n_saved = 0;
  int64_t min_rank = 0, max_rank = 0;
  double min_scale = 0, max_scale = 0;  // effective scales as written
};

// Converts an adapter. Factor bytes are copied untouched (MLX: transposed
// element by element, no rounding); per-module rank and alpha are carried
// (PEFT rank_pattern / alpha_pattern <-> kohya per-module .alpha); rsLoRA
// becomes kohya alpha = s * r. kohya -> PEFT resolves the dotted module
// names with fit_adapter against `base` and reshapes factors to the layer
// they fit (a 1x1-conv LoRA on a Linear becomes [r, in]).
// Throws lora::error: exit 2 (kohya -> PEFT without base, --out exists);
// exit 3 (what the target format cannot hold: DoRA, lora_B bias, embedding
// LoRA, modules_to_save or fan_in_fan_out into kohya; an adapter that does
// not fit base; invalid input); exit 4 (I/O).
convert_report convert_adapter(const convert_options& options);

}  // namespace lora
