// adapter_config.json (PEFT): the fields that change the math, in file order.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lora {

struct peft_config {
  std::string peft_type;  // "LORA" (others are refused by core/adapter)
  std::optional<int64_t> r;
  std::optional<double> lora_alpha;
  bool use_rslora = false;
  bool use_dora = false;
  bool fan_in_fan_out = false;
  std::vector<std::pair<std::string, int64_t>> rank_pattern;  // file order: first match wins
  std::vector<std::pair<std::string, double>> alpha_pattern;  // file order
  std::vector<std::string> modules_to_save;
  std::vector<std::string> target_modules;  // a list; a single regex string lands as one entry
  bool target_modules_is_regex = false;
  bool lora_bias = false;
  // target_parameters (PEFT >= 0.17): parameters wrapped by lora.ParamWrapper,
  // as "<module path suffix>.<parameter>" ("mlp.experts.gate_up_proj"), file order.
  std::vector<std::string> target_parameters;
  // trainable_token_indices: a list (the input embedding) lands as one entry
  // with an empty module name; a dict {module name: indices} in file order.
  std::vector<std::pair<std::string, std::vector<int64_t>>> trainable_token_indices;
  bool trainable_tokens_is_list = false;
  // "true" / "false" or the method ("pissa", "olora", "loftq", ...): PiSSA /
  // OLoRA / CorDA / LoftQ adapters saved unconverted belong to a residual
  // base, not the original one (shown, not refused).
  std::string init_lora_weights = "true";
  bool layer_replication = false;  // non-null layer_replication (refused by core/adapter)
  std::string base_model_name_or_path;
  std::string task_type;
  std::string text;  // the file's JSON, for display
};

// Parses adapter_config.json text. Unknown fields are kept in `text` only.
// Throws lora::error (exit 3) naming `label` and the field on wrong types.
peft_config parse_peft_config(const std::string& text, const std::string& label);

// Serializes a config as PEFT's save_pretrained writes it: every LoraConfig
// field the math depends on plus PEFT's defaults for the rest, two-space
// indent, keys sorted at every level (PEFT's json.dumps(sort_keys=True) sorts
// rank_pattern / alpha_pattern too), no trailing newline. r / lora_alpha
// default to PEFT's 8; integral alphas are written as integers.
std::string render_peft_config(const peft_config& config);

// The "model_type" of a model's config.json ("gpt2", "llama"); nullopt when
// the file has none (or it is not a string). Throws lora::error: exit 4 when
// unreadable, exit 3 when not a JSON object.
std::optional<std::string> read_model_type(const std::string& config_path);

}  // namespace lora
