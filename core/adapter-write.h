// Writing an adapter to disk, atomically: a PEFT folder (adapter_config.json
// + adapter_model.safetensors) or a kohya / sd-scripts single .safetensors
// file. The one place that names the keys an adapter is saved under and turns
// per-module ranks and alphas into a PEFT config (r, lora_alpha, rank_pattern,
// alpha_pattern). Used by convert, resize and combine (and meant for extract).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/adapter.h"
#include "formats/adapter-config.h"
#include "formats/safetensors.h"

namespace lora {

// One tensor held in memory, in its stored dtype and shape (row-major bytes).
struct tensor_data {
  dtype type = dtype::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// One LoRA module to write. The math is the one of core/delta.h:
// dW = s * B A (viewed per kind), s = lora_scale(alpha, rank, use_rslora).
struct module_data {
  // PEFT output: the dotted module path ("model.layers.0.self_attn.q_proj").
  // kohya output: a kohya name ("lora_unet_..."), or a dotted path that the
  // writer turns into one with the adapter's kohya_prefix.
  std::string name;
  module_kind kind = module_kind::linear;
  tensor_data a;                         // lora_A / lora_embedding_A / lora_down: [r, in(, kh, kw)] or [r, vocab]
  tensor_data b;                         // lora_B / lora_embedding_B / lora_up:   [out, r(, 1, 1)] or [dim, r]
  std::optional<tensor_data> magnitude;  // PEFT DoRA m
  std::optional<tensor_data> bias;       // PEFT lora_B.bias
  int64_t rank = 0;
  double alpha = 0;
};

// modules_to_save: a tensor that replaces the base tensor `target` (PEFT only).
struct saved_data {
  std::string target;
  tensor_data tensor;
};

struct adapter_data {
  adapter_format format = adapter_format::peft;
  bool use_rslora = false;  // PEFT only: s = alpha / sqrt(r)
  // PEFT: fields carried into adapter_config.json (target_modules, task_type,
  // base_model_name_or_path, modules_to_save, fan_in_fan_out, peft_type).
  // r, lora_alpha, rank_pattern, alpha_pattern, use_rslora, use_dora and
  // lora_bias are set by the writer from the modules.
  peft_config config;
  // kohya: the prefix given to dotted module names (names that already carry
  // a kohya prefix are written as they are).
  std::string kohya_prefix = "lora_te_";
  std::vector<module_data> modules;
  std::vector<saved_data> saved;
  std::optional<metadata_map> metadata;  // written as the file's __metadata__
};

// The PEFT config for these modules: r = the most common rank, lora_alpha =
// the most common alpha (ties: the smaller), rank_pattern / alpha_pattern =
// {module path: value} for every module that differs; the other fields from
// data.config. Pure: touches no file.
peft_config make_peft_config(const adapter_data& data);

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
