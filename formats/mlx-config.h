// adapter_config.json as mlx_lm (ml-explore/mlx-examples llms/mlx_lm) writes
// it beside adapters.safetensors: the fields that change the math.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lora {

struct mlx_adapter_config {
  // lora_parameters.scale: delta = scale * (x @ lora_a) @ lora_b (mlx_lm's
  // LoRALinear; lora_parameters.alpha, when present, is not read by mlx_lm).
  double scale = 0;
  std::optional<int64_t> rank;    // lora_parameters.rank
  std::string fine_tune_type;     // "lora" | "dora" | "full"; empty when absent (older mlx_lm: lora)
  bool use_dora = false;          // older mlx_lm's flag
  std::vector<std::string> keys;  // lora_parameters.keys, when given
  std::string model;              // the "model" field (base model path or hub id)
};

// Parses mlx_lm's adapter_config.json text. Throws lora::error (exit 3)
// naming `label` and the field: not JSON, no lora_parameters.scale, a field
// of the wrong type.
mlx_adapter_config parse_mlx_adapter_config(const std::string& text, const std::string& label);

}  // namespace lora
