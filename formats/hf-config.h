// A Hugging Face config.json of a decoder-only family the forward pass
// implements (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3,
// mixtral, qwen3_moe, gpt2), parsed into the numbers it needs, with each
// configuration class's defaults (transformers 4.5x configuration_<family>.py;
// 5.x rope_parameters as below).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lora {

// One rotary embedding's parameters: the `rope_parameters` dict of
// transformers 5.x after standardize_rope_params, filled from either
// `rope_scaling` (4.x) with the top-level `rope_theta`, or `rope_parameters`
// (5.x, which holds `rope_theta`). Follows src/transformers/modeling_rope_utils.py
// (RotaryEmbeddingConfigMixin, transformers 5.x as of commit 26892c16 of
// zucchini-nlp/transformers; the 4.x `rope_scaling` field is read as 5.x reads it).
struct rope_parameters {
  std::string type = "default";  // default | linear | dynamic | yarn | longrope | llama3
  double theta = 10000.0;        // rope_theta, the base
  // factor: required by linear, dynamic, llama3; yarn and longrope fall back
  // to max_position_embeddings / original_max_position_embeddings (nullopt).
  std::optional<double> factor;
  std::optional<double> attention_factor;                // yarn, longrope: nullopt = the type's formula
  double beta_fast = 32.0, beta_slow = 1.0;              // yarn (HF: `get(...) or 32`, so 0 and null mean the default)
  double mscale = 0.0, mscale_all_dim = 0.0;             // yarn; 0 = absent (HF tests them for truth)
  bool truncate = true;                                  // yarn: floor/ceil the correction range
  double low_freq_factor = 0.0, high_freq_factor = 0.0;  // llama3
  // yarn, longrope, llama3: the top-level field when the config has one
  // (Phi-3), else the dict's, else max_position_embeddings.
  int64_t original_max_position_embeddings = 0;
  std::vector<double> short_factor, long_factor;  // longrope, head_dim / 2 each
};

// The attention of one decoder layer.
struct layer_attention {
  rope_parameters rope;
  int64_t sliding_window = 0;  // 0: full causal attention; W: key j seen by query i when i - W < j <= i
  bool moe = false;            // the layer's MLP is a mixture of experts (mixtral, qwen3_moe)
};

// The MLP's activation: silu (x sigmoid(x)); gelu_tanh (gelu_pytorch_tanh,
// gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))); gelu (erf).
enum class activation_kind { silu, gelu_tanh, gelu };

struct hf_config {
  std::string path;        // the file, for messages
  std::string model_type;  // one of supported_architectures()
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // default: num_attention_heads
  int64_t head_dim = 0;             // default: hidden_size / num_attention_heads
  int64_t vocab_size = 0;
  double rms_norm_eps = 1e-6;  // the norms' epsilon (gpt2: layer_norm_epsilon, default 1e-5)
  // LlamaConfig's default 2048; MistralConfig 131072; Qwen2Config 32768.
  int64_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  // q/k/v(/o) biases: llama/mistral `attention_bias` (q, k, v and o_proj);
  // qwen2 always has q/k/v biases and none on o_proj.
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;  // llama `mlp_bias`: gate/up/down_proj biases
  activation_kind hidden_act =
      activation_kind::silu;  // hidden_act, gemma's hidden_activation, gpt2's activation_function
  // gemma2 / gemma3_text: attention scale query_pre_attn_scalar^-0.5 (0: head_dim^-0.5)
  double query_pre_attn_scalar = 0;
  // gemma2 (gemma3_text when set): cap * tanh(x / cap) on the attention scores and the logits; 0: none
  double attn_logit_softcapping = 0, final_logit_softcapping = 0;
  // mixtral (num_local_experts) and qwen3_moe (num_experts): the router picks
  // num_experts_per_tok experts of moe_intermediate_size (mixtral: intermediate_size);
  // norm_topk_prob: their softmax weights renormalised to sum 1 (mixtral always)
  int64_t num_experts = 0, num_experts_per_tok = 0, moe_intermediate_size = 0;
  bool norm_topk_prob = false;
  // gpt2: scores / sqrt(head_dim) when scale_attn_weights, and / (layer + 1) when
  // scale_attn_by_inverse_layer_idx
  bool scale_attn_weights = true, scale_attn_by_inverse_layer_idx = false;
  // One per hidden layer: its rotary embedding (5.x may nest rope_parameters
  // per layer type) and sliding window (mistral: every layer unless
  // sliding_window is null; qwen2: layers whose layer_types entry is
  // "sliding_attention", by default those from max_window_layers on when
  // use_sliding_window).
  std::vector<layer_attention> layers;
};

// True for the model_type values the forward pass implements.
bool is_supported_architecture(std::string_view model_type) noexcept;

// The model_type values the forward pass implements, comma-separated, for messages.
std::string_view supported_architectures() noexcept;

// The "model_type" of a config.json text, or nullopt when it has none.
// Throws lora::error (exit 3) when the text is not a JSON object.
std::optional<std::string> parse_model_type(std::string_view json_text, const std::string& label);

// Parses the config.json of a supported family. `label` names the file in messages.
// Throws lora::error (exit 3) naming the file and the field: not JSON, an
// unsupported model_type ("model_type bert is not supported ..."), a missing
// or mistyped required field, non-positive sizes, heads that do not divide
// (hidden_size by heads without head_dim, heads by kv heads), an activation
// other than silu, gelu_pytorch_tanh, gelu_new, gelu; for gpt2
// add_cross_attention; a rope_scaling / rope_parameters whose rope_type is not
// one of default, linear, dynamic, yarn, longrope, llama3 (named), that lacks
// a field its type requires or holds a mistyped one (named, e.g.
// "rope_scaling.factor"), partial_rotary_factor other than 1, longrope
// factor lists not head_dim / 2 long; layer_types of the wrong length or
// with an unknown entry, or naming sliding_attention without a sliding_window.
hf_config parse_hf_config(std::string_view json_text, const std::string& label);

// Reads and parses a config.json file. Throws exit 4 when unreadable, else as above.
hf_config read_hf_config(const std::string& path);

// config.json's "quantization_config", as written (validation of what lora
// supports is core/fp8's). Field names as transformers' quantization configs
// (utils/quantization_config.py, FineGrainedFP8Config) and the DeepSeek-V3 /
// Qwen3-FP8 config.json files write them.
struct quantization_config {
  std::string quant_method;        // "fp8", "gptq", "bitsandbytes", ... ("" when missing)
  std::optional<std::string> fmt;  // "e4m3", "e5m2"; nullopt when absent
  std::optional<std::string> activation_scheme;
  // weight_block_size [rows, cols]; absent: nullopt; present but null or not
  // two integers: block_size_text says what it is (for the refusal)
  std::optional<std::vector<int64_t>> weight_block_size;
  std::string weight_block_size_text;  // the JSON of the field when present
};

// The "quantization_config" object of a config.json text (also inside
// "text_config"), or nullopt when there is none. Throws lora::error (exit 3)
// naming `label` when the text is not a JSON object or the field is not an
// object.
std::optional<quantization_config> parse_quantization_config(std::string_view json_text, const std::string& label);

// Fields a merge changes in the output's config.json (nullopt: kept).
struct config_update {
  std::optional<bool> tie_word_embeddings;  // false: the merged model has its own head
  std::optional<int64_t> vocab_size;        // tokens added by the adapter
  bool remove_quantization_config = false;  // an FP8 model dequantized by merge --dtype
  // "torch_dtype" (and "dtype", transformers 5's name, when the config has it)
  std::optional<std::string> torch_dtype;
  bool empty() const noexcept {
    return !tie_word_embeddings && !vocab_size && !remove_quantization_config && !torch_dtype;
  }
};

// `json_text` (a config.json) with the fields of `update` set, at the top
// level and in a "text_config" object that holds the same field
// (quantization_config removed from both); every other field kept, in its order. Two-space indent and a final newline, as
// transformers writes it. Throws lora::error (exit 3) naming `label` when
// the text is not a JSON object.
std::string update_config_text(std::string_view json_text, const std::string& label, const config_update& update);

}  // namespace lora
