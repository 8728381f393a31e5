// Writing an adapter to disk, atomically: a PEFT folder (adapter_config.json
// + adapter_model.safetensors) or a kohya / sd-scripts single .safetensors
// file. The keys come from the format's module (core/peft-format,
// core/kohya-format); this file only stages, writes, reads back and renames.
// Used by extract, resize, combine and convert.
#pragma once

#include <string>

#include "core/adapter-data.h"

namespace lora {

// Writes `data` to `out`: PEFT -> a folder holding adapter_config.json and
// adapter_model.safetensors; kohya -> one .safetensors file. Everything goes
// to `<out>.tmp-XXXXXX` beside `out` first and is renamed at the end (with
// force, an existing `out` is swapped out and removed); a PEFT folder is then
// read back with load_adapter and every module's rank and scale checked.
// Throws lora::error: exit 2 when `out` exists without force; exit 3 for what
// the format cannot hold (kohya: DoRA, lora_bias, embedding LoRA,
// modules_to_save, rsLoRA; any: two modules with the same key, a dtype that
// is not a byte-sized type); exit 4 on I/O failure. Nothing is left behind on
// error.
void write_adapter(const adapter_data& data, const std::string& out, bool force);

}  // namespace lora
