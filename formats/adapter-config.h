// adapter_config.json (PEFT): the fields that change the math, in file order.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lora {

struct peft_config {
  std::string peft_type;                    // "LORA" (others are refused by core/adapter)
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
  std::string base_model_name_or_path;
  std::string task_type;
  std::string text;  // the file's JSON, for display
};

// Parses adapter_config.json text. Unknown fields are kept in `text` only.
// Throws lora::error (exit 3) naming `label` and the field on wrong types.
peft_config parse_peft_config(const std::string& text, const std::string& label);

// Serializes a config as PEFT writes it (two-space indent, sorted keys).
std::string render_peft_config(const peft_config& config);

}  // namespace lora
