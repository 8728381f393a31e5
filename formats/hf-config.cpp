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

// qwen2 / qwen3 / qwen3_moe: sliding_window (default 4096) only with use_sliding_window.
int64_t qwen_window(const json& j, const std::string& label) {
  return boolean(j, "use_sliding_window", false, label) ? window_field(j, 4096, label) : 0;
}

bool is_qwen(std::string_view t) { return t == "qwen2" || t == "qwen3" || t == "qwen3_moe"; }
bool is_gemma(std::string_view t) { return t == "gemma2" || t == "gemma3_text"; }

// layer_types when config.json has none, as each configuration class derives them:
// qwen2 / qwen3 / qwen3_moe (Qwen2Config.__init__): "sliding_attention" for
// layers i >= max_window_layers (default 28) when a window is set; gemma2
// (Gemma2Config): even layers slide; gemma3_text (Gemma3TextConfig): layers
// with (i + 1) % sliding_window_pattern (default 6) != 0 slide.
std::optional<std::vector<std::string>> derived_layer_types(const json& j, const hf_config& c,
                                                            const std::string& label) {
  std::vector<std::string> types;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    bool sliding = false;
    if (is_qwen(c.model_type)) {
      sliding = qwen_window(j, label) > 0 && l >= non_negative(j, "max_window_layers", 28, label);
    } else if (c.model_type == "gemma2") {
      sliding = (l + 1) % 2 != 0;
    } else if (c.model_type == "gemma3_text") {
      std::optional<int64_t> pattern = opt_positive(j, "sliding_window_pattern", label);
      if (!pattern) pattern = opt_positive(j, "_sliding_window_pattern", label);
      sliding = (l + 1) % pattern.value_or(6) != 0;
    } else {
      return std::nullopt;
    }
    types.push_back(sliding ? "sliding_attention" : "full_attention");
  }
  return types;
}

// Per-layer sliding windows. mistral (MistralConfig, default 4096), mixtral
// and phi3 (default null): every layer. qwen2, qwen3, qwen3_moe, gemma2,
// gemma3_text: layers whose layer_types entry is "sliding_attention". llama, gpt2: none.
void read_layer_windows(const json& j, const std::optional<std::vector<std::string>>& layer_types, hf_config& c,
                        const std::string& label) {
  if (c.model_type == "mistral" || c.model_type == "mixtral" || c.model_type == "phi3") {
    const int64_t w = window_field(j, c.model_type == "mistral" ? 4096 : 0, label);
    for (layer_attention& l : c.layers) l.sliding_window = w;
  } else if (is_qwen(c.model_type) || is_gemma(c.model_type)) {
    const int64_t w = is_qwen(c.model_type) ? qwen_window(j, label) : window_field(j, 4096, label);
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

// gemma3_text in the 4.x form (one rope dict): its sliding layers use the
// default rotary embedding with base rope_local_base_freq (default 10000)
// (modeling_gemma3.py, Gemma3TextModel.rotary_emb_local, transformers 4.5x).
void read_gemma3_local_rope(const json& j, const std::optional<std::vector<std::string>>& layer_types, hf_config& c,
                            const std::string& label) {
  const json* rp = nullptr;
  for (const char* f : {"rope_parameters", "rope_scaling"})
    if (auto it = j.find(f); it != j.end() && it->is_object() && !it->empty()) rp = &*it;
  if (rp && rp->contains("sliding_attention")) return;  // 5.x: nested per layer type, already read
  rope_parameters local;
  local.theta = number(j, "rope_local_base_freq", 10000.0, label);
  for (size_t l = 0; l < c.layers.size(); ++l)
    if ((*layer_types)[l] == "sliding_attention") c.layers[l].rope = local;
}

// The activation: gemma's hidden_activation (default gelu_pytorch_tanh),
// gpt2's activation_function (default gelu_new), else hidden_act (default silu).
void read_activation(const json& j, hf_config& c, const std::string& label) {
  const char* field = is_gemma(c.model_type)   ? "hidden_activation"
                      : c.model_type == "gpt2" ? "activation_function"
                                               : "hidden_act";
  std::string act = is_gemma(c.model_type) ? "gelu_pytorch_tanh" : c.model_type == "gpt2" ? "gelu_new" : "silu";
  auto it = j.find(field);
  if (it != j.end() && !it->is_null()) {
    if (!it->is_string())
      throw errors::invalid(label, "", fmt::format("field {} must be a string, got {}", field, it->dump()));
    act = it->get<std::string>();
  }
  if (act == "silu" || act == "swish")
    c.hidden_act = activation_kind::silu;
  else if (act == "gelu_pytorch_tanh" || act == "gelu_new")
    c.hidden_act = activation_kind::gelu_tanh;
  else if (act == "gelu")
    c.hidden_act = activation_kind::gelu;
  else
    throw errors::invalid(
        label, "",
        fmt::format("field {} {} is not supported (silu, gelu_pytorch_tanh, gelu_new, gelu)", field, it->dump()));
}

// An integer field read under its name or gpt2's (n_embd, n_layer, n_head, n_inner, n_positions).
std::optional<int64_t> opt_size(const json& j, const char* field, const char* gpt2_field, const hf_config& c,
                                const std::string& label) {
  return opt_positive(j, c.model_type == "gpt2" ? gpt2_field : field, label);
}

// The sizes, heads and head_dim.
void read_sizes(const json& j, hf_config& c, const std::string& label) {
  auto required = [&](const char* field, const char* gpt2_field) {
    std::optional<int64_t> v = opt_size(j, field, gpt2_field, c, label);
    if (!v)
      throw errors::invalid(label, "", fmt::format("field {} is missing", c.model_type == "gpt2" ? gpt2_field : field));
    return *v;
  };
  c.hidden_size = required("hidden_size", "n_embd");
  c.num_hidden_layers = required("num_hidden_layers", "n_layer");
  c.num_attention_heads = required("num_attention_heads", "n_head");
  c.vocab_size = positive(j, "vocab_size", label);
  // gpt2: n_inner, default 4 n_embd (GPT2MLP)
  c.intermediate_size = c.model_type == "gpt2" ? opt_positive(j, "n_inner", label).value_or(4 * c.hidden_size)
                                               : positive(j, "intermediate_size", label);
  c.num_key_value_heads = c.model_type == "gpt2"
                              ? c.num_attention_heads
                              : opt_positive(j, "num_key_value_heads", label).value_or(c.num_attention_heads);
  // head_dim: Gemma2Config / Gemma3TextConfig default 256, Qwen3Config 128, else hidden / heads
  std::optional<int64_t> hd = c.model_type == "gpt2" ? std::nullopt : opt_positive(j, "head_dim", label);
  if (!hd && is_gemma(c.model_type)) hd = 256;
  if (!hd && c.model_type == "qwen3") hd = 128;
  if (hd) {
    c.head_dim = *hd;
  } else {
    if (c.hidden_size % c.num_attention_heads != 0)
      throw errors::invalid(label, "",
                            fmt::format("field hidden_size {} is not a multiple of num_attention_heads {}",
                                        c.hidden_size, c.num_attention_heads));
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0 && c.model_type != "gpt2")
    throw errors::invalid(label, "", fmt::format("field head_dim {} is odd: rotary embeddings need pairs", c.head_dim));
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw errors::invalid(label, "",
                          fmt::format("field num_attention_heads {} is not a multiple of num_key_value_heads {}",
                                      c.num_attention_heads, c.num_key_value_heads));
  if (c.num_hidden_layers > max_hidden_layers)
    throw errors::invalid(label, "",
                          fmt::format("field num_hidden_layers {} exceeds {}", c.num_hidden_layers, max_hidden_layers));
}

// A soft-capping field: 0 when absent or null.
double softcap(const json& j, const char* field, double fallback, const std::string& label) {
  if (!j.contains(field)) return fallback;
  return number(j, field, 0.0, label);
}

// Numbers and flags with each configuration class's defaults.
void read_flags(const json& j, hf_config& c, const std::string& label) {
  const std::string& t = c.model_type;
  c.rms_norm_eps = t == "gpt2" ? number(j, "layer_norm_epsilon", 1e-5, label)
                               : number(j, "rms_norm_eps", t == "mixtral" || t == "phi3" ? 1e-5 : 1e-6, label);
  const int64_t default_max_pos = t == "mistral" || t == "mixtral" ? 4096 * 32
                                  : is_qwen(t)                     ? 32768
                                  : t == "gemma2"                  ? 8192
                                  : t == "gemma3_text"             ? 131072
                                  : t == "phi3"                    ? 4096
                                  : t == "gpt2"                    ? 1024
                                                                   : 2048;
  c.max_position_embeddings =
      opt_positive(j, t == "gpt2" ? "n_positions" : "max_position_embeddings", label).value_or(default_max_pos);
  // tie_word_embeddings: PretrainedConfig's default true, which gemma2, gemma3_text and gpt2 keep
  c.tie_word_embeddings = boolean(j, "tie_word_embeddings", is_gemma(t) || t == "gpt2", label);
  if (t == "qwen2") {
    c.qkv_bias = true;  // Qwen2Attention: q/k/v_proj bias=True, o_proj bias=False
  } else if (t == "gpt2") {
    c.qkv_bias = c.o_bias = c.mlp_bias = true;  // Conv1D always has a bias
  } else if (t != "phi3") {                     // Phi3Attention: no biases
    c.qkv_bias = c.o_bias = boolean(j, "attention_bias", false, label);
  }
  if (t == "llama") c.mlp_bias = boolean(j, "mlp_bias", false, label);
  read_activation(j, c, label);
  if (is_gemma(t)) {
    c.query_pre_attn_scalar = number(j, "query_pre_attn_scalar", 256.0, label);
    c.attn_logit_softcapping = softcap(j, "attn_logit_softcapping", t == "gemma2" ? 50.0 : 0.0, label);
    c.final_logit_softcapping = softcap(j, "final_logit_softcapping", t == "gemma2" ? 30.0 : 0.0, label);
  }
  if (t == "gpt2") {
    c.scale_attn_weights = boolean(j, "scale_attn_weights", true, label);
    c.scale_attn_by_inverse_layer_idx = boolean(j, "scale_attn_by_inverse_layer_idx", false, label);
    if (boolean(j, "add_cross_attention", false, label))
      throw errors::invalid(label, "", "field add_cross_attention true is not supported (a decoder-only forward pass)");
  }
}

// mixtral (MixtralConfig: num_local_experts 8, num_experts_per_tok 2, every
// layer) and qwen3_moe (Qwen3MoeConfig: num_experts 128, num_experts_per_tok
// 8, moe_intermediate_size 768, norm_topk_prob false; layer l is sparse when
// l is not in mlp_only_layers and (l + 1) % decoder_sparse_step == 0).
void read_experts(const json& j, hf_config& c, const std::string& label) {
  if (c.model_type == "mixtral") {
    c.num_experts = opt_positive(j, "num_local_experts", label).value_or(8);
    c.num_experts_per_tok = opt_positive(j, "num_experts_per_tok", label).value_or(2);
    c.moe_intermediate_size = c.intermediate_size;
    c.norm_topk_prob = true;  // MixtralSparseMoeBlock: routing_weights /= sum, always
    for (layer_attention& l : c.layers) l.moe = true;
  } else if (c.model_type == "qwen3_moe") {
    c.num_experts = non_negative(j, "num_experts", 128, label);
    c.num_experts_per_tok = opt_positive(j, "num_experts_per_tok", label).value_or(8);
    c.moe_intermediate_size = opt_positive(j, "moe_intermediate_size", label).value_or(768);
    c.norm_topk_prob = boolean(j, "norm_topk_prob", false, label);
    const int64_t step = opt_positive(j, "decoder_sparse_step", label).value_or(1);
    std::vector<int64_t> dense;
    if (auto it = j.find("mlp_only_layers"); it != j.end() && !it->is_null()) {
      if (!it->is_array())
        throw errors::invalid(label, "", fmt::format("field mlp_only_layers must be a list, got {}", it->dump()));
      for (const json& e : *it) {
        if (!e.is_number_integer())
          throw errors::invalid(label, "", fmt::format("field mlp_only_layers holds {}", e.dump()));
        dense.push_back(e.get<int64_t>());
      }
    }
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
      c.layers[static_cast<size_t>(l)].moe =
          c.num_experts > 0 && (l + 1) % step == 0 && std::find(dense.begin(), dense.end(), l) == dense.end();
  }
  if (c.num_experts > 0 && c.num_experts_per_tok > c.num_experts)
    throw errors::invalid(
        label, "",
        fmt::format("field num_experts_per_tok {} exceeds the {} experts", c.num_experts_per_tok, c.num_experts));
}

constexpr std::string_view architectures[] = {"llama",       "mistral", "qwen2",   "qwen3",     "gemma2",
                                              "gemma3_text", "phi3",    "mixtral", "qwen3_moe", "gpt2"};

}  // namespace

bool is_supported_architecture(std::string_view model_type) noexcept {
  return std::find(std::begin(architectures), std::end(architectures), model_type) != std::end(architectures);
}

std::string_view supported_architectures() noexcept {
  return "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral, qwen3_moe, gpt2";
}

std::optional<std::string> parse_model_type(std::string_view json_text, const std::string& label) {
  json j = parse_object(json_text, label);
  auto it = j.find("model_type");
  if (it == j.end() || !it->is_string()) return std::nullopt;
  return it->get<std::string>();
}

std::optional<quantization_config> parse_quantization_config(std::string_view json_text, const std::string& label) {
  // named "config" in messages, as merge's update_config_text names it
  json j = parse_json_bounded(json_text, label, "config");
  if (!j.is_object()) throw errors::invalid(label, "", "config is not a JSON object");
  // at the top level, else inside text_config (multimodal configs)
  const json* qc = nullptr;
  if (auto f = j.find("quantization_config"); f != j.end())
    qc = &*f;
  else if (auto t = j.find("text_config"); t != j.end() && t->is_object())
    if (auto g = t->find("quantization_config"); g != t->end()) qc = &*g;
  if (qc == nullptr) return std::nullopt;
  if (!qc->is_object()) throw errors::invalid(label, "", "field quantization_config is not an object");
  const json* it = qc;
  quantization_config q;
  auto text = [&](const char* key) -> std::optional<std::string> {
    auto f = it->find(key);
    if (f == it->end() || f->is_null()) return std::nullopt;
    if (!f->is_string()) throw errors::invalid(label, "", fmt::format("field quantization_config.{} is not a string", key));
    return f->get<std::string>();
  };
  q.quant_method = text("quant_method").value_or("");
  q.fmt = text("fmt");
  q.activation_scheme = text("activation_scheme");
  if (auto b = it->find("weight_block_size"); b != it->end()) {
    q.weight_block_size_text = b->dump();
    std::vector<int64_t> v;
    if (b->is_array())
      for (const json& x : *b)
        if (x.is_number_integer()) v.push_back(x.get<int64_t>());
    q.weight_block_size = (b->is_array() && v.size() == b->size()) ? v : std::vector<int64_t>{};
  }
  return q;
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
                          fmt::format("model_type {} is not supported (the forward pass implements {})", c.model_type,
                                      supported_architectures()));

  // sizes, numbers and flags (each configuration class's defaults when absent)
  read_sizes(j, c, label);
  read_flags(j, c, label);

  // per layer: rotary embedding, sliding window, experts
  c.layers.resize(static_cast<size_t>(c.num_hidden_layers));
  std::optional<std::vector<std::string>> layer_types = read_layer_types(j, c.num_hidden_layers, label);
  if (!layer_types) layer_types = derived_layer_types(j, c, label);
  if (c.model_type != "gpt2") read_layer_ropes(j, layer_types, c, label);  // gpt2: learned positions
  if (c.model_type == "gemma3_text") read_gemma3_local_rope(j, layer_types, c, label);
  read_layer_windows(j, layer_types, c, label);
  read_experts(j, c, label);
  return c;
}

hf_config read_hf_config(const std::string& path) { return parse_hf_config(read_text_file(path), path); }

std::string update_config_text(std::string_view json_text, const std::string& label, const config_update& update) {
  nlohmann::ordered_json j = parse_ordered_json_bounded(json_text, label, "config");
  if (!j.is_object()) throw errors::invalid(label, "", "config is not a JSON object");
  auto set = [&](const char* key, const nlohmann::ordered_json& value) {
    j[key] = value;
    if (auto t = j.find("text_config"); t != j.end() && t->is_object() && t->contains(key)) (*t)[key] = value;
  };
  if (update.tie_word_embeddings) set("tie_word_embeddings", *update.tie_word_embeddings);
  if (update.vocab_size) set("vocab_size", *update.vocab_size);
  if (update.remove_quantization_config) {
    j.erase("quantization_config");
    if (auto t = j.find("text_config"); t != j.end() && t->is_object()) t->erase("quantization_config");
  }
  if (update.torch_dtype) {
    set("torch_dtype", *update.torch_dtype);
    if (j.contains("dtype")) set("dtype", *update.torch_dtype);
  }
  return j.dump(2) + "\n";
}

}  // namespace lora
