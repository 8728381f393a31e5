#include "formats/hf-config.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "formats/error.h"
#include "formats/json.h"
#include "formats/safetensors.h"

namespace lora {

namespace {

using json = nlohmann::json;

json parse_object(std::string_view text, const std::string& label) {
  json j = parse_json_bounded(text, label, "config.json");
  if (!j.is_object()) throw errors::invalid(label, "", "config.json is not a JSON object");
  return j;
}

// A positive integer field; nullopt when absent or null (the caller decides the default).
std::optional<int64_t> opt_positive(const json& j, const char* field, const std::string& label) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer() || it->get<int64_t>() <= 0)
    throw errors::invalid(label, "", fmt::format("field {} must be a positive integer, got {}", field, it->dump()));
  return it->get<int64_t>();
}

int64_t positive(const json& j, const char* field, const std::string& label) {
  std::optional<int64_t> v = opt_positive(j, field, label);
  if (!v) throw errors::invalid(label, "", fmt::format("field {} is missing", field));
  return *v;
}

double number(const json& j, const char* field, double fallback, const std::string& label) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number() || it->get<double>() <= 0)
    throw errors::invalid(label, "", fmt::format("field {} must be a positive number, got {}", field, it->dump()));
  return it->get<double>();
}

bool boolean(const json& j, const char* field, bool fallback, const std::string& label) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) throw errors::invalid(label, "", fmt::format("field {} must be true or false, got {}", field, it->dump()));
  return it->get<bool>();
}

}  // namespace

bool is_supported_architecture(std::string_view model_type) noexcept {
  return model_type == "llama" || model_type == "mistral" || model_type == "qwen2";
}

std::optional<std::string> parse_model_type(std::string_view json_text, const std::string& label) {
  json j = parse_object(json_text, label);
  auto it = j.find("model_type");
  if (it == j.end() || !it->is_string()) return std::nullopt;
  return it->get<std::string>();
}

hf_config parse_hf_config(std::string_view json_text, const std::string& label) {
  json j = parse_object(json_text, label);
  hf_config c;
  c.path = label;

  // the architecture
  auto mt = j.find("model_type");
  if (mt == j.end() || !mt->is_string()) throw errors::invalid(label, "", "field model_type is missing");
  c.model_type = mt->get<std::string>();
  if (!is_supported_architecture(c.model_type))
    throw errors::invalid(label, "",
                          fmt::format("model_type {} is not supported (the forward pass implements llama, mistral, qwen2)",
                                      c.model_type));

  // sizes
  c.hidden_size = positive(j, "hidden_size", label);
  c.intermediate_size = positive(j, "intermediate_size", label);
  c.num_hidden_layers = positive(j, "num_hidden_layers", label);
  c.num_attention_heads = positive(j, "num_attention_heads", label);
  c.num_key_value_heads = opt_positive(j, "num_key_value_heads", label).value_or(c.num_attention_heads);
  c.vocab_size = positive(j, "vocab_size", label);
  if (auto hd = opt_positive(j, "head_dim", label)) {
    c.head_dim = *hd;
  } else {
    if (c.hidden_size % c.num_attention_heads != 0)
      throw errors::invalid(label, "", fmt::format("field hidden_size {} is not a multiple of num_attention_heads {}",
                                                   c.hidden_size, c.num_attention_heads));
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0) throw errors::invalid(label, "", fmt::format("field head_dim {} is odd: rotary embeddings need pairs", c.head_dim));
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw errors::invalid(label, "", fmt::format("field num_attention_heads {} is not a multiple of num_key_value_heads {}",
                                                 c.num_attention_heads, c.num_key_value_heads));

  // numbers and flags (HF's defaults when absent)
  c.rms_norm_eps = number(j, "rms_norm_eps", 1e-6, label);
  c.rope_theta = number(j, "rope_theta", 10000.0, label);
  c.tie_word_embeddings = boolean(j, "tie_word_embeddings", false, label);
  if (c.model_type == "qwen2") {
    c.qkv_bias = true;  // Qwen2Attention: q/k/v_proj bias=True, o_proj bias=False
  } else {
    c.qkv_bias = c.o_bias = boolean(j, "attention_bias", false, label);
  }
  c.mlp_bias = boolean(j, "mlp_bias", false, label);

  // what the forward pass does not implement is refused, naming the field
  auto act = j.find("hidden_act");
  if (act != j.end() && !act->is_null() && *act != "silu")
    throw errors::invalid(label, "", fmt::format("field hidden_act {} is not supported (only silu)", act->dump()));
  auto rs = j.find("rope_scaling");
  if (rs != j.end() && !rs->is_null()) {
    std::string kind = "?";
    if (rs->is_object()) {
      auto t = rs->find("rope_type");
      if (t == rs->end()) t = rs->find("type");
      if (t != rs->end() && t->is_string()) kind = t->get<std::string>();
    }
    if (kind != "default")
      throw errors::invalid(label, "", fmt::format("field rope_scaling {} is not supported (rope_type {}; only plain "
                                                   "rotary embeddings are implemented)", rs->dump(), kind));
  }
  if (c.model_type == "mistral") {
    c.sliding_window = opt_positive(j, "sliding_window", label).value_or(0);
  } else if (c.model_type == "qwen2" && boolean(j, "use_sliding_window", false, label)) {
    c.sliding_window = opt_positive(j, "sliding_window", label).value_or(0);
  }
  return c;
}

hf_config read_hf_config(const std::string& path) { return parse_hf_config(read_text_file(path), path); }

}  // namespace lora
