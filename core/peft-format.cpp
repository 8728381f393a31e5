#include "core/peft-format.h"

#include <algorithm>
#include <map>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/module-pattern.h"
#include "formats/error.h"

namespace lora::peft {

namespace {

bool contains(std::string_view s, std::string_view part) { return s.find(part) != std::string_view::npos; }

struct suffix_role {
  std::string_view suffix;
  peft::role role;
};

// Saved keys have the adapter name stripped; ".default" forms are seen in the
// wild (state dicts saved without get_peft_model_state_dict). DoRA's
// magnitude is saved without ".weight" by PEFT (save_and_load.py removes it
// after the ParameterDict -> ModuleDict refactor); both forms are accepted.
// The first entry of each role is the form written.
const suffix_role suffixes[] = {
    {".lora_A.weight", role::a},
    {".lora_A.default.weight", role::a},
    {".lora_B.weight", role::b},
    {".lora_B.default.weight", role::b},
    {".lora_B.bias", role::bias},
    {".lora_B.default.bias", role::bias},
    {".lora_embedding_A", role::embedding_a},
    {".lora_embedding_A.default", role::embedding_a},
    {".lora_embedding_B", role::embedding_b},
    {".lora_embedding_B.default", role::embedding_b},
    {".lora_magnitude_vector", role::magnitude},
    {".lora_magnitude_vector.weight", role::magnitude},
    {".lora_magnitude_vector.default", role::magnitude},
    {".lora_magnitude_vector.default.weight", role::magnitude},
};

// The tensors found for one module, by role.
using module_parts = std::map<role, const tensor_info*>;

// trainable_token_indices: TrainableTokensWrapper saves its layer's delta as
// "<module>.token_adapter.trainable_tokens_delta" (utils/other.py
// TrainableTokensWrapper.adapter_state_dict_load_map, huggingface/peft @
// 5d602fdb); ".default" forms are accepted as for LoRA keys.
constexpr std::string_view token_suffixes[] = {".token_adapter.trainable_tokens_delta",
                                               ".token_adapter.trainable_tokens_delta.default"};

// Sorts every key of the file into a module part, a modules_to_save tensor
// or a trainable-tokens delta (`tokens`: module path and tensor).
std::map<std::string, module_parts> group_keys(adapter& a,
                                               std::vector<std::pair<std::string, const tensor_info*>>& tokens) {
  const safetensors_file& f = *a.file;
  const std::string& label = a.weights_path;
  std::map<std::string, module_parts> by_module;
  for (const tensor_info& t : f.tensors()) {
    std::string_view key = t.name;
    if (!key.starts_with(prefix))
      throw errors::invalid(label, t.name, fmt::format("PEFT key does not start with \"{}\"", prefix));
    std::string_view rest = key.substr(prefix.size());
    const suffix_role* found = nullptr;
    for (const suffix_role& s : suffixes)
      if (rest.ends_with(s.suffix) && rest.size() > s.suffix.size()) found = &s;
    if (found != nullptr) {
      std::string module(rest.substr(0, rest.size() - found->suffix.size()));
      auto [it, inserted] = by_module[module].emplace(found->role, &t);
      if (!inserted)
        throw errors::invalid(
            label, t.name,
            fmt::format("second {} tensor for module {} (also {})", role_name(found->role), module, it->second->name));
      continue;
    }
    if (const auto* ts = std::find_if(std::begin(token_suffixes), std::end(token_suffixes),
                                      [&rest](std::string_view sfx) { return rest.ends_with(sfx) && rest.size() > sfx.size(); });
        ts != std::end(token_suffixes)) {
      tokens.emplace_back(std::string(rest.substr(0, rest.size() - ts->size())), &t);
      continue;
    }
    if (contains(rest, "trainable_tokens_delta"))
      throw errors::invalid(label, t.name, "unknown trainable tokens key (expected <module>.token_adapter.trainable_tokens_delta)");
    if (contains(rest, "lora_"))
      throw errors::invalid(label, t.name,
                            "unknown LoRA key (expected lora_A.weight, lora_B.weight, lora_B.bias, "
                            "lora_embedding_A/B or lora_magnitude_vector)");
    if ((rest.ends_with(".weight") || rest.ends_with(".bias")) && rest.front() != '.' && !contains(rest, "..")) {
      // modules_to_save (or a trained bias): replaces the base tensor whole
      a.saved.push_back({std::string(rest), tensor_ref{&f, &t}});
      continue;
    }
    throw errors::invalid(label, t.name, "unknown key: neither a LoRA tensor nor a module weight or bias");
  }
  return by_module;
}

// The rank_pattern / alpha_pattern keys, compiled in file order; a key RE2
// cannot compile is refused by name (exit 3).
template <typename V>
std::vector<module_pattern> compile_patterns(const std::vector<std::pair<std::string, V>>& patterns,
                                             const std::string& label, const std::string& field) {
  std::vector<module_pattern> out;
  for (const auto& [key, value] : patterns) {
    try {
      out.emplace_back(key);
    } catch (const pattern_error& e) {
      throw errors::invalid(label, field + "." + key, fmt::format("not a valid regular expression: {}", e.what()));
    }
  }
  return out;
}

// A module's A and B (linear, conv or embedding), kind and rank from their shapes.
lora_module pair_factors(const safetensors_file& f, const std::string& label, const std::string& name,
                         const module_parts& parts) {
  auto get = [&parts](role r) -> const tensor_info* {
    auto it = parts.find(r);
    return it == parts.end() ? nullptr : it->second;
  };
  const tensor_info *la = get(role::a), *lb = get(role::b), *ea = get(role::embedding_a), *eb = get(role::embedding_b);
  const tensor_info* any = parts.begin()->second;
  lora_module m;
  m.name = name;
  m.target = name + ".weight";
  const tensor_info* ta = nullptr;
  const tensor_info* tb = nullptr;
  if ((la || lb) && (ea || eb))
    throw errors::invalid(label, any->name,
                          fmt::format("module {} has both lora_A/lora_B and lora_embedding_A/B", name));
  if (ea || eb) {
    if (!ea) throw errors::invalid(label, eb->name, "lora_embedding_B without its lora_embedding_A");
    if (!eb) throw errors::invalid(label, ea->name, "lora_embedding_A without its lora_embedding_B");
    m.kind = module_kind::embedding;
    ta = ea;
    tb = eb;
  } else {
    if (!la && !lb)
      throw errors::invalid(
          label, any->name,
          fmt::format("{} without lora_A and lora_B for module {}", role_name(parts.begin()->first), name));
    if (!la) throw errors::invalid(label, lb->name, "lora_B without its lora_A");
    if (!lb) throw errors::invalid(label, la->name, "lora_A without its lora_B");
    ta = la;
    tb = lb;
  }

  // shapes: linear / embedding A [r, in], B [out, r]; conv A [r, in, kh, kw], B [out, r, 1, 1]
  const auto& sa = ta->shape;
  const auto& sb = tb->shape;
  if (sa.size() == 4 && m.kind == module_kind::linear) {
    if (sb.size() != 4 || sb[2] != 1 || sb[3] != 1)
      throw errors::invalid(
          label, tb->name,
          fmt::format("conv lora_B must be [out, r, 1, 1], found {} (lora_A is {})", shape_text(sb), shape_text(sa)));
    m.kind = module_kind::conv;
  } else if (sa.size() != 2 || sb.size() != 2) {
    throw errors::invalid(label, ta->name,
                          fmt::format("unsupported shapes {} and {}: expected A [r, in] and B [out, r] (or 4-D conv)",
                                      shape_text(sa), shape_text(sb)));
  }
  if (sa[0] != sb[1])
    throw errors::invalid(label, tb->name,
                          fmt::format("rank disagrees: {} is {} (rank {}), {} is {} (rank {})", ta->name,
                                      shape_text(sa), sa[0], tb->name, shape_text(sb), sb[1]));
  if (sa[0] <= 0) throw errors::invalid(label, ta->name, "rank 0");
  m.rank = sa[0];
  m.a = {&f, ta};
  m.b = {&f, tb};
  return m;
}

// DoRA magnitude and lora_B bias, each checked against the config.
void attach_extras(lora_module& m, const safetensors_file& f, const std::string& label, const module_parts& parts,
                   const peft_config& config, const std::string& config_label) {
  auto get = [&parts](role r) -> const tensor_info* {
    auto it = parts.find(r);
    return it == parts.end() ? nullptr : it->second;
  };
  const tensor_info* mag = get(role::magnitude);
  const tensor_info* bias = get(role::bias);
  const int64_t out = m.b.info->shape[0];
  // DoRA magnitude: one per row of B (linear out, conv out, embedding dim).
  // PEFT stores [out] for linear / embedding and [1, out, 1, 1] for conv
  // (_DoraConvNdLayer's keepdim norm, transposed): any shape of that many
  // elements with at most one dimension above 1 is accepted.
  if (mag) {
    if (!config.use_dora)
      throw errors::invalid(label, mag->name, fmt::format("DoRA magnitude, but {} has use_dora false", config_label));
    int n_big = 0;
    for (int64_t dim : mag->shape) n_big += dim != 1;
    const bool ok = static_cast<int64_t>(mag->n_elements) == out && n_big <= 1 && !mag->shape.empty();
    if (!ok) throw errors::shape_mismatch(label, mag->name, fmt::format("[{}]", out), shape_text(mag->shape));
    m.magnitude = tensor_ref{&f, mag};
    m.dora = true;
  } else if (config.use_dora) {
    throw errors::invalid(
        label, m.a.info->name,
        fmt::format("{} has use_dora true, but module {} has no lora_magnitude_vector", config_label, m.name));
  }
  // bias delta (lora_bias): [out]
  if (bias) {
    if (!config.lora_bias)
      throw errors::invalid(label, bias->name, fmt::format("lora_B bias, but {} has lora_bias false", config_label));
    if (m.kind == module_kind::embedding) throw errors::invalid(label, bias->name, "a bias on an embedding LoRA");
    if (bias->shape.size() != 1 || bias->shape[0] != out)
      throw errors::shape_mismatch(label, bias->name, fmt::format("[{}]", out), shape_text(bias->shape));
    m.bias = tensor_ref{&f, bias};
  }
}

// The config these weights need: LORA, no layer_replication.
peft_config read_lora_config(const std::string& weights_label, const std::string& config_label,
                             const std::function<std::string()>& read_config) {
  if (config_label.empty())
    throw errors::invalid(weights_label, "",
                          "PEFT LoRA weights without adapter_config.json beside them (alpha and options unknown)");
  peft_config config = parse_peft_config(read_config(), config_label);
  if (config.peft_type != "LORA")
    throw errors::invalid(config_label, "peft_type",
                          config.peft_type.empty()
                              ? std::string("missing: only LORA adapters are read")
                              : fmt::format("\"{}\" is not supported: only LORA adapters are read", config.peft_type));
  if (config.layer_replication)
    throw errors::invalid(
        config_label, "layer_replication",
        "the adapter duplicates base layers (layer_replication): merging it into the base is not supported");
  return config;
}

// The module path a saved key names once PEFT's nesting is removed, and the
// nesting depth: "model.layers.0.mlp.experts.base_layer" -> ("...experts", 1).
// A second target parameter on one module wraps the first ParamWrapper in
// another, so the first one's keys gain ".base_layer" (tuners/lora/model.py
// _create_and_replace, huggingface/peft @ 5d602fdb).
std::pair<std::string, int> unwrap_base_layers(std::string name) {
  static constexpr std::string_view seg = ".base_layer";
  int depth = 0;
  for (size_t at = name.find(seg); at != std::string::npos; at = name.find(seg, at)) {
    if (at + seg.size() != name.size() && name[at + seg.size()] != '.') {
      at += seg.size();
      continue;
    }
    name.erase(at, seg.size());
    ++depth;
  }
  return {name, depth};
}

// The order transformers' fused experts register their parameters in
// (gpt-oss GptOssExperts, the 5.x fused Mixtral / Qwen3-MoE experts:
// gate_up_proj before down_proj; transformers models/gpt_oss/modeling_gpt_oss.py).
// PEFT's _inject_parameters (tuners/tuners_utils.py @ 5d602fdb) wraps them in
// module.named_parameters() order, so the first one ends up innermost.
int registration_rank(std::string_view p) {
  static constexpr std::string_view order[] = {"gate_up_proj", "gate_proj", "w1", "up_proj", "w3", "down_proj", "w2"};
  for (size_t i = 0; i < std::size(order); ++i)
    if (p == order[i]) return static_cast<int>(i);
  return static_cast<int>(std::size(order));
}

// target_parameters: for every saved module that is a lora.ParamWrapper, the
// key of the parameter it wraps. PEFT matches "<module>.<parameter>" against
// each entry T as key == T or key.endswith("." + T) (_inject_parameters). The
// wrappers of one module nest in registration order: depth d (d times
// ".base_layer") holds the (n - 1 - d)-th of its n targeted parameters.
std::map<std::string, std::string> parameter_keys(const std::map<std::string, module_parts>& by_module,
                                                  const peft_config& config, const std::string& label,
                                                  const std::string& config_label) {
  std::map<std::string, std::string> out;
  std::map<std::string, std::map<int, std::string>> wrappers;  // module -> depth -> saved name
  for (const auto& [name, parts] : by_module) {
    auto [module, depth] = unwrap_base_layers(name);
    if (config.target_parameters.empty()) {
      if (depth > 0)
        throw errors::invalid(label, parts.begin()->second->name,
                              fmt::format("nested lora.ParamWrapper keys (.base_layer), but {} has no "
                                          "target_parameters",
                                          config_label));
      continue;
    }
    wrappers[module][depth] = name;
  }
  for (const auto& [module, by_depth] : wrappers) {
    // the parameters of `module` that target_parameters names, in registration order
    std::vector<std::string> params;
    for (const std::string& t : config.target_parameters) {
      const size_t dot = t.rfind('.');
      const std::string p = dot == std::string::npos ? t : t.substr(dot + 1);
      const std::string k = module + "." + p;
      if ((k == t || k.ends_with("." + t)) && std::find(params.begin(), params.end(), p) == params.end())
        params.push_back(p);
    }
    std::stable_sort(params.begin(), params.end(), [](const std::string& x, const std::string& y) {
      return registration_rank(x) < registration_rank(y);
    });
    const std::string& first_key = by_depth.begin()->second;
    if (params.empty()) {
      if (by_depth.size() > 1 || by_depth.begin()->first > 0)
        throw errors::invalid(label, std::string(prefix) + first_key,
                              fmt::format("nested lora.ParamWrapper keys, but no entry of {} target_parameters "
                                          "names a parameter of {}",
                                          config_label, module));
      continue;  // a module of target_modules
    }
    const int n = static_cast<int>(by_depth.size());
    if (n != static_cast<int>(params.size()) || by_depth.rbegin()->first != n - 1)
      throw errors::invalid(label, std::string(prefix) + first_key,
                            fmt::format("{} holds {} lora.ParamWrapper(s), but {} target_parameters names {} of its "
                                        "parameters ({}): which keys belong to which parameter cannot be told",
                                        module, n, config_label, params.size(), fmt::join(params, ", ")));
    for (const auto& [depth, name] : by_depth) out[name] = module + "." + params[static_cast<size_t>(n - 1 - depth)];
  }
  return out;
}

// A ParamWrapper module (tuners/lora/layer.py ParamWrapper.update_layer @
// 5d602fdb): lora_A [r * E, in], lora_B [out, r * E] for E experts; r and
// alpha from rank_pattern / alpha_pattern matched against the parameter key
// (PEFT passes it as current_key), else r / lora_alpha; the scale alpha / r
// or alpha / sqrt(r). ParamWrapper refuses DoRA, lora_bias, fan_in_fan_out.
void load_parameter_module(lora_module& m, const std::string& param_key, const peft_config& config,
                           const std::vector<module_pattern>& rank_patterns,
                           const std::vector<module_pattern>& alpha_patterns, const std::string& label,
                           const std::string& config_label) {
  if (m.kind != module_kind::linear || m.bias || m.magnitude)
    throw errors::invalid(label, m.a.info->name,
                          fmt::format("a target_parameters module ({}) takes lora_A / lora_B of 2 dims only",
                                      param_key));
  for (const auto& [on, what] : {std::pair{config.use_dora, "use_dora"}, std::pair{config.lora_bias, "lora_bias"},
                                 std::pair{config.fan_in_fan_out, "fan_in_fan_out"}})
    if (on)
      throw errors::invalid(config_label, what,
                            fmt::format("true, but PEFT's lora.ParamWrapper (target_parameters, {}) refuses it",
                                        param_key));
  const std::optional<size_t> rp = first_match(rank_patterns, param_key);
  const int64_t r = rp ? config.rank_pattern[*rp].second : config.r.value_or(8);
  const int64_t rows = m.a.info->shape[0];
  if (rows % r != 0)
    throw errors::invalid(label, m.a.info->name,
                          fmt::format("{} rows, not a multiple of r = {} (a lora.ParamWrapper on {} stores r * "
                                      "experts rows)",
                                      rows, r, param_key));
  m.name = param_key;
  m.target = param_key;
  m.kind = module_kind::parameter;
  m.rank = r;
  m.n_experts = rows / r;
  const std::optional<size_t> ap = first_match(alpha_patterns, param_key);
  m.alpha = ap ? config.alpha_pattern[*ap].second : config.lora_alpha.value_or(8.0);
  m.scale = lora_scale(m.alpha, m.rank, config.use_rslora);
}

// trainable_token_indices: each saved delta [n, dim] paired with its indices.
// A list names the input embedding (utils/other.py _set_trainable after
// _get_input_embeddings_name, huggingface/peft @ 5d602fdb): one delta; a dict
// {module name: indices} matches a saved path as path == name or path ends
// with "." + name. An entry without a delta is the tied head PEFT skips
// (it follows the embedding's adapter and saves nothing). Rows must equal
// the count of indices, indices must be unique (PEFT's index_copy with a
// repeated index is undefined); range and width are fit_adapter's.
void load_token_rows(adapter& a, const std::vector<std::pair<std::string, const tensor_info*>>& tokens,
                     const peft_config& config, const std::string& config_label) {
  const std::string& label = a.weights_path;
  const auto& entries = config.trainable_token_indices;
  if (!tokens.empty() && entries.empty())
    throw errors::invalid(label, tokens.front().second->name,
                          fmt::format("a trainable tokens delta, but {} has no trainable_token_indices", config_label));
  for (const auto& [name, indices] : entries) {
    std::vector<int64_t> sorted = indices;
    std::sort(sorted.begin(), sorted.end());
    if (auto d = std::adjacent_find(sorted.begin(), sorted.end()); d != sorted.end())
      throw errors::invalid(config_label, name.empty() ? "trainable_token_indices" : "trainable_token_indices." + name,
                            fmt::format("token index {} is listed twice", *d));
  }
  if (config.trainable_tokens_is_list && tokens.size() > 1)
    throw errors::invalid(label, tokens[1].second->name,
                          fmt::format("{} deltas, but {} trainable_token_indices is a list (one embedding)",
                                      tokens.size(), config_label));
  for (const auto& [path, t] : tokens) {
    const std::vector<int64_t>* indices = nullptr;
    for (const auto& [name, list] : entries)
      if (config.trainable_tokens_is_list || path == name || path.ends_with("." + name)) {
        if (indices != nullptr)
          throw errors::invalid(label, t->name, fmt::format("{} matches two trainable_token_indices entries", path));
        indices = &list;
      }
    if (indices == nullptr)
      throw errors::invalid(label, t->name,
                            fmt::format("no entry of {} trainable_token_indices names {}", config_label, path));
    if (t->shape.size() != 2 || t->shape[0] != static_cast<int64_t>(indices->size()))
      throw errors::shape_mismatch(label, t->name,
                                   fmt::format("[{}, dim] (trainable_token_indices lists {} tokens)", indices->size(),
                                               indices->size()),
                                   shape_text(t->shape));
    a.tokens.push_back({path + ".weight", *indices, tensor_ref{a.file.get(), t}});
  }
  std::sort(a.tokens.begin(), a.tokens.end(),
            [](const token_rows& x, const token_rows& y) { return x.target < y.target; });
}

}  // namespace

std::string_view role_name(role r) noexcept {
  switch (r) {
    case role::a: return "lora_A";
    case role::b: return "lora_B";
    case role::embedding_a: return "lora_embedding_A";
    case role::embedding_b: return "lora_embedding_B";
    case role::magnitude: return "lora_magnitude_vector";
    case role::bias: return "lora_B.bias";
  }
  return "";
}

std::string key(const std::string& module, role r) {
  for (const suffix_role& s : suffixes)
    if (s.role == r) return fmt::format("{}{}{}", prefix, module, s.suffix);
  return {};
}

std::string saved_key(const std::string& target) { return fmt::format("{}{}", prefix, target); }

bool is_lora_key(std::string_view k) noexcept {
  return contains(k, ".lora_A.") || contains(k, ".lora_B.") || contains(k, ".lora_embedding_A") ||
         contains(k, ".lora_embedding_B") || contains(k, ".lora_magnitude_vector");
}

void load(adapter& a, const std::string& config_label, const std::function<std::string()>& read_config) {
  a.config = read_lora_config(a.weights_path, config_label, read_config);
  const peft_config& config = *a.config;
  const safetensors_file& f = *a.file;
  const std::string& label = a.weights_path;
  std::vector<std::pair<std::string, const tensor_info*>> tokens;
  const std::map<std::string, module_parts> by_module = group_keys(a, tokens);
  load_token_rows(a, tokens, config, config_label);

  // the patterns, compiled once, in file order
  auto rank_patterns = compile_patterns(config.rank_pattern, config_label, "rank_pattern");
  auto alpha_patterns = compile_patterns(config.alpha_pattern, config_label, "alpha_pattern");
  const std::map<std::string, std::string> wrapped = parameter_keys(by_module, config, label, config_label);
  for (const auto& [name, parts] : by_module) {
    lora_module m = pair_factors(f, label, name, parts);
    if (auto w = wrapped.find(name); w != wrapped.end()) {
      load_parameter_module(m, w->second, config, rank_patterns, alpha_patterns, label, config_label);
      a.modules.push_back(std::move(m));
      continue;
    }
    // rank from the shapes must agree with the config (rank_pattern first)
    if (std::optional<size_t> rp = first_match(rank_patterns, name)) {
      const int64_t want = config.rank_pattern[*rp].second;
      if (want != m.rank)
        throw errors::invalid(label, m.a.info->name,
                              fmt::format("rank {} from the shapes, but {} rank_pattern \"{}\" says {}", m.rank,
                                          config_label, config.rank_pattern[*rp].first, want));
    } else if (config.r && *config.r != m.rank) {
      throw errors::invalid(
          label, m.a.info->name,
          fmt::format("rank {} from the shapes, but {} says r = {}", m.rank, config_label, *config.r));
    }
    // alpha: alpha_pattern, then lora_alpha, then PEFT's default 8
    std::optional<size_t> ap = first_match(alpha_patterns, name);
    m.alpha = ap ? config.alpha_pattern[*ap].second : config.lora_alpha.value_or(8.0);
    m.scale = lora_scale(m.alpha, m.rank, config.use_rslora);
    m.fan_in_fan_out = m.kind == module_kind::linear && config.fan_in_fan_out;
    attach_extras(m, f, label, parts, config, config_label);
    a.modules.push_back(std::move(m));
  }
  // a ParamWrapper's parameter key may also be a saved module path: one name, two modules
  std::map<std::string, const lora_module*> seen;
  for (const lora_module& m : a.modules)
    if (auto [it, fresh] = seen.emplace(m.name, &m); !fresh)
      throw errors::invalid(label, m.a.info->name,
                            fmt::format("{} is also changed by {}", m.name, it->second->a.info->name));
}

keyed_tensors tensors(const adapter_data& d, const std::string& label) {
  keyed_tensors f;
  for (const module_data& m : d.modules) {
    const bool embedding = m.kind == module_kind::embedding;
    f.add(key(m.name, embedding ? role::embedding_a : role::a), m.a, label);
    f.add(key(m.name, embedding ? role::embedding_b : role::b), m.b, label);
    if (m.magnitude) f.add(key(m.name, role::magnitude), *m.magnitude, label);
    if (m.bias) f.add(key(m.name, role::bias), *m.bias, label);
  }
  for (const saved_data& s : d.saved) f.add(saved_key(s.target), s.tensor, label);
  return f;
}

namespace {

// The most common value; ties go to the smaller one.
template <typename T>
T most_common(const std::vector<T>& values) {
  std::map<T, size_t> count;
  for (const T& v : values) ++count[v];
  T best = count.begin()->first;
  size_t best_n = 0;
  for (const auto& [v, n] : count)
    if (n > best_n) best = v, best_n = n;
  return best;
}

}  // namespace

peft_config make_config(const adapter_data& data) {
  peft_config c = data.config;
  if (c.peft_type.empty()) c.peft_type = "LORA";
  c.use_rslora = data.use_rslora;
  c.use_dora = false;
  c.lora_bias = false;
  c.rank_pattern.clear();
  c.alpha_pattern.clear();
  if (data.modules.empty()) return c;

  // the most common rank and alpha are the defaults; the rest go to patterns
  std::vector<int64_t> ranks;
  std::vector<double> alphas;
  for (const module_data& m : data.modules) {
    ranks.push_back(m.rank);
    alphas.push_back(m.alpha);
    c.use_dora = c.use_dora || m.magnitude.has_value();
    c.lora_bias = c.lora_bias || m.bias.has_value();
  }
  c.r = most_common(ranks);
  c.lora_alpha = most_common(alphas);
  for (const module_data& m : data.modules) {
    if (m.rank != *c.r) c.rank_pattern.emplace_back(m.name, m.rank);
    if (m.alpha != *c.lora_alpha) c.alpha_pattern.emplace_back(m.name, m.alpha);
  }
  return c;
}

std::string exact_pattern(const std::string& path) {
  std::string out;
  for (char c : path) {
    if (c == '.') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace lora::peft
