#include "core/peft-format.h"

#include <algorithm>
#include <map>
#include <vector>

#include <fmt/format.h>

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

// Sorts every key of the file into a module part or a modules_to_save tensor.
std::map<std::string, module_parts> group_keys(adapter& a) {
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
    if (contains(rest, "token_adapter.trainable_tokens_delta"))
      throw errors::invalid(label, t.name, "trainable tokens (trainable_token_indices) are not supported");
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
  const std::map<std::string, module_parts> by_module = group_keys(a);

  // the patterns, compiled once, in file order
  auto rank_patterns = compile_patterns(config.rank_pattern, config_label, "rank_pattern");
  auto alpha_patterns = compile_patterns(config.alpha_pattern, config_label, "alpha_pattern");
  for (const auto& [name, parts] : by_module) {
    lora_module m = pair_factors(f, label, name, parts);
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
