// A Hugging Face config.json for the Llama family (llama, mistral, qwen2),
// parsed into the numbers the forward pass needs.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace lora {

struct hf_config {
  std::string path;        // the file, for messages
  std::string model_type;  // "llama" | "mistral" | "qwen2"
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // default: num_attention_heads
  int64_t head_dim = 0;             // default: hidden_size / num_attention_heads
  int64_t vocab_size = 0;
  double rms_norm_eps = 1e-6;       // LlamaConfig's default
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  // q/k/v(/o) biases: llama/mistral `attention_bias` (q, k, v and o_proj);
  // qwen2 always has q/k/v biases and none on o_proj.
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;  // llama `mlp_bias`: gate/up/down_proj biases
  // Sliding-window attention (mistral, qwen2 with use_sliding_window): 0 = none.
  // The forward pass refuses sequences longer than the window.
  int64_t sliding_window = 0;
};

// True for the model_type values the forward pass implements.
bool is_supported_architecture(std::string_view model_type) noexcept;

// The "model_type" of a config.json text, or nullopt when it has none.
// Throws lora::error (exit 3) when the text is not a JSON object.
std::optional<std::string> parse_model_type(std::string_view json_text, const std::string& label);

// Parses a Llama-family config.json. `label` names the file in messages.
// Throws lora::error (exit 3) naming the file and the field: not JSON, an
// unsupported model_type ("model_type gpt2 is not supported ..."), a missing
// or mistyped required field, non-positive sizes, heads that do not divide
// (hidden_size by heads without head_dim, heads by kv heads), rope_scaling
// other than null / rope_type "default", hidden_act other than silu.
hf_config parse_hf_config(std::string_view json_text, const std::string& label);

// Reads and parses a config.json file. Throws exit 4 when unreadable, else as above.
hf_config read_hf_config(const std::string& path);

}  // namespace lora
