#include "formats/hf-config.h"

#include <algorithm>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "formats/error.h"
#include "formats/json.h"
#include "formats/safetensors.h"

namespace lora {

namespace {

using json = nlohmann::json;

// More layers than any real model has (one layer_attention each is allocated).
constexpr int64_t max_hidden_layers = 1 << 16;

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
  if (!it->is_boolean())
    throw errors::invalid(label, "", fmt::format("field {} must be true or false, got {}", field, it->dump()));
  return it->get<bool>();
}

// An integer field >= 0 (qwen2's max_window_layers), `fallback` when absent.
int64_t non_negative(const json& j, const char* field, int64_t fallback, const std::string& label) {
  auto it = j.find(field);
  if (it == j.end()) return fallback;
  if (!it->is_number_integer() || it->get<int64_t>() < 0)
    throw errors::invalid(label, "", fmt::format("field {} must be an integer >= 0, got {}", field, it->dump()));
  return it->get<int64_t>();
}

// ---- rotary embedding parameters (transformers 5.x modeling_rope_utils.py,
// RotaryEmbeddingConfigMixin.standardize_rope_params and the _compute_*_parameters
// readers; zucchini-nlp/transformers@26892c16, a 5.x development snapshot) ----

bool is_known_rope_type(std::string_view t) {
  return t == "default" || t == "linear" || t == "dynamic" || t == "yarn" || t == "longrope" || t == "llama3";
}

// A positive number in a rope dict, named "<where>.<key>" in messages; nullopt
// when absent or null (or 0 with zero_is_absent: HF reads `get(key) or default`).
std::optional<double> rope_number(const json& d, const std::string& where, const char* key, const std::string& label,
                                  bool zero_is_absent = false) {
  auto it = d.find(key);
  if (it == d.end() || it->is_null()) return std::nullopt;
  if (zero_is_absent && it->is_number() && it->get<double>() == 0.0) return std::nullopt;
  if (!it->is_number() || !(it->get<double>() > 0.0))
    throw errors::invalid(label, "",
                          fmt::format("field {}.{} must be a positive number, got {}", where, key, it->dump()));
  return it->get<double>();
}

double rope_required(const json& d, const std::string& where, const char* key, const rope_parameters& p,
                     const std::string& label) {
  std::optional<double> v = rope_number(d, where, key, label);
  if (!v)
    throw errors::invalid(label, "", fmt::format("field {}.{} is missing (rope_type {} needs it)", where, key, p.type));
  return *v;
}

// longrope's short_factor / long_factor: head_dim / 2 positive numbers.
std::vector<double> rope_factor_list(const json& d, const std::string& where, const char* key, int64_t head_dim,
                                     const std::string& label) {
  auto it = d.find(key);
  if (it == d.end() || it->is_null())
    throw errors::invalid(label, "", fmt::format("field {}.{} is missing (rope_type longrope needs it)", where, key));
  std::vector<double> v;
  if (it->is_array())
    for (const json& e : *it) {
      if (!e.is_number() || !(e.get<double>() > 0.0)) break;
      v.push_back(e.get<double>());
    }
  if (!it->is_array() || v.size() != it->size() || static_cast<int64_t>(v.size()) != head_dim / 2)
    throw errors::invalid(label, "",
                          fmt::format("field {}.{} must be a list of {} positive numbers (head_dim / 2), got {}", where,
                                      key, head_dim / 2, it->dump()));
  return v;
}

// The fields each rope_type reads (_compute_<type>_parameters).
void read_rope_type_fields(const json& d, const std::string& where, const hf_config& c, rope_parameters& p,
                           const std::string& label) {
  if (p.type == "linear" || p.type == "dynamic" || p.type == "llama3") {
    p.factor = rope_required(d, where, "factor", p, label);
  } else if (p.type == "yarn" || p.type == "longrope") {
    p.factor = rope_number(d, where, "factor", label);  // null: max_position_embeddings / original
    p.attention_factor = rope_number(d, where, "attention_factor", label);
  }
  if (p.type == "yarn") {
    p.beta_fast = rope_number(d, where, "beta_fast", label, true).value_or(32.0);
    p.beta_slow = rope_number(d, where, "beta_slow", label, true).value_or(1.0);
    p.mscale = rope_number(d, where, "mscale", label, true).value_or(0.0);
    p.mscale_all_dim = rope_number(d, where, "mscale_all_dim", label, true).value_or(0.0);
    p.truncate = boolean(d, "truncate", true, label);
  } else if (p.type == "llama3") {
    p.low_freq_factor = rope_required(d, where, "low_freq_factor", p, label);
    p.high_freq_factor = rope_required(d, where, "high_freq_factor", p, label);
    if (p.high_freq_factor <= p.low_freq_factor)  // the smoothing divides by their difference
      throw errors::invalid(label, "",
                            fmt::format("field {}.high_freq_factor {} must exceed low_freq_factor {}", where,
                                        p.high_freq_factor, p.low_freq_factor));
  } else if (p.type == "longrope") {
    p.short_factor = rope_factor_list(d, where, "short_factor", c.head_dim, label);
    p.long_factor = rope_factor_list(d, where, "long_factor", c.head_dim, label);
  }
}

// One rope dict `d` ("rope_scaling", "rope_parameters" or
// "rope_parameters.<layer type>" in messages) of config `top`.
rope_parameters read_rope(const json& d, const std::string& where, const json& top, const hf_config& c, bool nested,
                          const std::string& label) {
  if (!d.is_object())
    throw errors::invalid(label, "", fmt::format("field {} must be an object, got {}", where, d.dump()));
  rope_parameters p;
  // rope_type, 4.x's "type" as the fallback, else "default"
  auto t = d.find("rope_type");
  if (t == d.end() || t->is_null()) t = d.find("type");
  if (t != d.end() && !t->is_null()) {
    if (!t->is_string())
      throw errors::invalid(label, "", fmt::format("field {}.rope_type must be a string, got {}", where, t->dump()));
    p.type = t->get<std::string>();
  }
  if (!is_known_rope_type(p.type))
    throw errors::invalid(label, "",
                          fmt::format("field {}.rope_type {} is not supported (known: default, linear, dynamic, "
                                      "yarn, longrope, llama3)",
                                      where, p.type));
  // rope_theta: the dict's (5.x), else the top-level field (4.x), else 10000
  p.theta = rope_number(d, where, "rope_theta", label).value_or(number(top, "rope_theta", 10000.0, label));
  // partial_rotary_factor: the Llama family rotates whole heads
  for (const json* src : {&d, &top}) {
    auto it = src->find("partial_rotary_factor");
    if (it != src->end() && !it->is_null() && !(it->is_number() && it->get<double>() == 1.0))
      throw errors::invalid(label, "",
                            fmt::format("field {}partial_rotary_factor {} is not supported (only 1: the forward "
                                        "pass rotates whole heads)",
                                        src == &d ? where + "." : "", it->dump()));
  }
  read_rope_type_fields(d, where, c, p, label);
  // original_max_position_embeddings: the top-level field wins (standardize_rope_params, global dict only)
  if (p.type == "yarn" || p.type == "longrope" || p.type == "llama3") {
    std::optional<int64_t> top_orig =
        nested ? std::nullopt : opt_positive(top, "original_max_position_embeddings", label);
    std::optional<int64_t> own = opt_positive(d, "original_max_position_embeddings", label);
    p.original_max_position_embeddings = top_orig ? *top_orig : own.value_or(c.max_position_embeddings);
  }
  return p;
}

// layer_types when config.json holds it: an array of strings, one per layer.
std::optional<std::vector<std::string>> read_layer_types(const json& j, int64_t n_layers, const std::string& label) {
  auto it = j.find("layer_types");
  if (it == j.end() || it->is_null()) return std::nullopt;
  std::vector<std::string> types;
  if (it->is_array())
    for (const json& e : *it)
      if (e.is_string()) types.push_back(e.get<std::string>());
  if (!it->is_array() || types.size() != it->size() || static_cast<int64_t>(types.size()) != n_layers)
    throw errors::invalid(
        label, "",
        fmt::format("field layer_types must list {} strings (num_hidden_layers), got {}", n_layers, it->dump()));
  return types;
}

// Every layer's rotary embedding: `rope_scaling` (4.x) wins over `rope_parameters`
// (5.x), as convert_rope_params_to_dict's `rope_scaling or self.rope_parameters`;
// a dict whose keys all name layer types holds one dict per layer type.
void read_layer_ropes(const json& j, const std::optional<std::vector<std::string>>& layer_types, hf_config& c,
                      const std::string& label) {
  const json empty = json::object();
  const json* d = &empty;
  std::string where = "rope_parameters";
  for (const char* field : {"rope_parameters", "rope_scaling"}) {
    auto it = j.find(field);
    if (it == j.end() || it->is_null()) continue;
    if (!it->is_object())
      throw errors::invalid(label, "", fmt::format("field {} must be an object, got {}", field, it->dump()));
    if (!it->empty()) d = &*it, where = field;
  }
  bool nested = layer_types && !d->empty();
  for (auto it = d->begin(); nested && it != d->end(); ++it)
    nested = std::find(layer_types->begin(), layer_types->end(), it.key()) != layer_types->end();
  if (!nested) {
    const rope_parameters p = read_rope(*d, where, j, c, false, label);
    for (layer_attention& l : c.layers) l.rope = p;
    return;
  }
  for (size_t l = 0; l < c.layers.size(); ++l) {
    const std::string& type = (*layer_types)[l];
    if (!d->contains(type))
      throw errors::invalid(label, "", fmt::format("field {}.{} is missing (layer {} is {})", where, type, l, type));
    c.layers[l].rope = read_rope(d->at(type), where + "." + type, j, c, true, label);
  }
}

// A sliding_window field: `fallback` when absent (the config class's default), 0 when null.
int64_t window_field(const json& j, int64_t fallback, const std::string& label) {
  if (!j.contains("sliding_window")) return fallback;
  return opt_positive(j, "sliding_window", label).value_or(0);
}

// qwen2's window: sliding_window (Qwen2Config default 4096) only with use_sliding_window.
int64_t qwen2_window(const json& j, const std::string& label) {
  return boolean(j, "use_sliding_window", false, label) ? window_field(j, 4096, label) : 0;
}

// qwen2's layer_types when config.json has none (Qwen2Config.__init__):
// "sliding_attention" for layers i >= max_window_layers (default 28) when a window is set.
std::vector<std::string> qwen2_layer_types(const json& j, int64_t n_layers, const std::string& label) {
  const bool windowed = qwen2_window(j, label) > 0;
  const int64_t first_sliding = non_negative(j, "max_window_layers", 28, label);
  std::vector<std::string> types;
  for (int64_t l = 0; l < n_layers; ++l)
    types.push_back(windowed && l >= first_sliding ? "sliding_attention" : "full_attention");
  return types;
}

// Per-layer sliding windows. mistral (MistralConfig, default 4096): every
// layer. qwen2: layers whose layer_types entry is "sliding_attention". llama: none.
void read_layer_windows(const json& j, const std::optional<std::vector<std::string>>& layer_types, hf_config& c,
                        const std::string& label) {
  if (c.model_type == "mistral") {
    const int64_t w = window_field(j, 4096, label);
    for (layer_attention& l : c.layers) l.sliding_window = w;
  } else if (c.model_type == "qwen2") {
    const int64_t w = qwen2_window(j, label);
    for (size_t l = 0; l < c.layers.size(); ++l) {
      const std::string& type = (*layer_types)[l];
      if (type != "full_attention" && type != "sliding_attention")
        throw errors::invalid(label, "",
                              fmt::format("field layer_types: {} is not supported (full_attention, "
                                          "sliding_attention)",
                                          type));
      const bool sliding = type == "sliding_attention";
      if (sliding && w == 0)  // masking_utils refuses a sliding layer without a window
        throw errors::invalid(label, "",
                              fmt::format("field layer_types names sliding_attention for layer {} but "
                                          "sliding_window is unset (use_sliding_window false or null)",
                                          l));
      c.layers[l].sliding_window = sliding ? w : 0;
    }
  }
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
    throw errors::invalid(
        label, "",
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
      throw errors::invalid(label, "",
                            fmt::format("field hidden_size {} is not a multiple of num_attention_heads {}",
                                        c.hidden_size, c.num_attention_heads));
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0)
    throw errors::invalid(label, "", fmt::format("field head_dim {} is odd: rotary embeddings need pairs", c.head_dim));
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw errors::invalid(label, "",
                          fmt::format("field num_attention_heads {} is not a multiple of num_key_value_heads {}",
                                      c.num_attention_heads, c.num_key_value_heads));

  // numbers and flags (HF's defaults when absent)
  c.rms_norm_eps = number(j, "rms_norm_eps", 1e-6, label);
  const int64_t default_max_pos = c.model_type == "mistral" ? 4096 * 32 : c.model_type == "qwen2" ? 32768 : 2048;
  c.max_position_embeddings = opt_positive(j, "max_position_embeddings", label).value_or(default_max_pos);
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

  // per layer: rotary embedding and sliding window
  if (c.num_hidden_layers > max_hidden_layers)
    throw errors::invalid(label, "",
                          fmt::format("field num_hidden_layers {} exceeds {}", c.num_hidden_layers, max_hidden_layers));
  c.layers.resize(static_cast<size_t>(c.num_hidden_layers));
  std::optional<std::vector<std::string>> layer_types = read_layer_types(j, c.num_hidden_layers, label);
  if (!layer_types && c.model_type == "qwen2") layer_types = qwen2_layer_types(j, c.num_hidden_layers, label);
  read_layer_ropes(j, layer_types, c, label);
  read_layer_windows(j, layer_types, c, label);
  return c;
}

hf_config read_hf_config(const std::string& path) { return parse_hf_config(read_text_file(path), path); }

}  // namespace lora
