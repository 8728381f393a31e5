#include "core/adapter.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <unordered_map>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/adapter-names.h"
#include "core/dtype.h"
#include "core/module-pattern.h"
#include "formats/error.h"

namespace lora {

namespace fs = std::filesystem;

std::string_view adapter_format_name(adapter_format f) noexcept { return f == adapter_format::peft ? "peft" : "kohya"; }

std::string_view module_kind_name(module_kind k) noexcept {
  switch (k) {
    case module_kind::linear: return "linear";
    case module_kind::embedding: return "embedding";
    case module_kind::conv: return "conv";
  }
  return "linear";
}

// s = alpha / r (LoRA), s = alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023).
double lora_scale(double alpha, int64_t rank, bool rslora) noexcept {
  const double r = static_cast<double>(rank);
  return rslora ? alpha / std::sqrt(r) : alpha / r;
}

// alpha = s * r (LoRA), s * sqrt(r) (rsLoRA).
double alpha_for_scale(double scale, int64_t rank, bool rslora) noexcept {
  const double r = static_cast<double>(rank);
  return rslora ? scale * std::sqrt(r) : scale * r;
}

namespace {

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}
bool starts_with(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }
bool contains(std::string_view s, std::string_view part) { return s.find(part) != std::string_view::npos; }

// ---------------------------------------------------------------------------
// classification

// `<prefix>:<N>:up|down` (cloneofsimo/lora).
bool is_cloneofsimo_key(std::string_view k) {
  size_t c1 = k.find(':');
  if (c1 == std::string_view::npos || c1 == 0) return false;
  size_t c2 = k.find(':', c1 + 1);
  if (c2 == std::string_view::npos || c2 == c1 + 1) return false;
  for (size_t i = c1 + 1; i < c2; ++i)
    if (k[i] < '0' || k[i] > '9') return false;
  std::string_view tail = k.substr(c2 + 1);
  return tail == "up" || tail == "down";
}

struct other_kind {
  std::string_view label;
  bool (*match)(std::string_view);
};

// Adapter kinds that are not plain LoRA, each recognised by a key form.
const other_kind other_kinds[] = {
    {"LoHa (LyCORIS hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b)",
     [](std::string_view k) { return contains(k, "hada_w1") || contains(k, "hada_w2") || contains(k, "hada_t1"); }},
    {"LoKr (LyCORIS lokr_w1, lokr_w2, ...)",
     [](std::string_view k) { return contains(k, ".lokr_w") || contains(k, ".lokr_t"); }},
    {"LoCon/LyCORIS with Tucker decomposition (lora_mid)",
     [](std::string_view k) { return contains(k, ".lora_mid."); }},
    {"LyCORIS full weight difference (diff, diff_b)",
     [](std::string_view k) { return ends_with(k, ".diff") || ends_with(k, ".diff_b"); }},
    {"LyCORIS norm adapter (w_norm, b_norm)",
     [](std::string_view k) { return ends_with(k, ".w_norm") || ends_with(k, ".b_norm"); }},
    {"MLX LoRA (lora_a [in, r], lora_b [r, out])",
     [](std::string_view k) { return ends_with(k, ".lora_a") || ends_with(k, ".lora_b"); }},
    {"diffusers attention-processor LoRA (processor.to_k_lora.down.weight, ...)",
     [](std::string_view k) {
       return contains(k, "_lora.down.") || contains(k, "_lora.up.") || contains(k, ".lora.down.") ||
              contains(k, ".lora.up.") || contains(k, ".lora_linear_layer.");
     }},
    {"cloneofsimo LoRA (<module>:<N>:up / :down)", is_cloneofsimo_key},
    {"IA3 ((IA)^3 ia3_l scaling vectors)", [](std::string_view k) { return contains(k, "ia3_l"); }},
    {"VeRA (vera_lambda_b, vera_lambda_d)",
     [](std::string_view k) { return contains(k, "vera_lambda") || contains(k, "vera_A"); }},
    {"OFT (oft_r)",
     [](std::string_view k) { return contains(k, ".oft_r") || contains(k, ".oft_blocks") || contains(k, ".oft_R"); }},
    {"BOFT (boft_R, boft_s)", [](std::string_view k) { return contains(k, ".boft_"); }},
    {"AdaLoRA (lora_E)", [](std::string_view k) { return contains(k, ".lora_E"); }},
    {"prompt tuning (prompt_embeddings)", [](std::string_view k) { return k == "prompt_embeddings"; }},
    {"adaption prompt (adaption_prompt, adaption_gate)",
     [](std::string_view k) { return contains(k, "adaption_prompt") || contains(k, "adaption_gate"); }},
};

bool is_peft_lora_key(std::string_view k) {
  return contains(k, ".lora_A.") || contains(k, ".lora_B.") || contains(k, ".lora_embedding_A") ||
         contains(k, ".lora_embedding_B") || contains(k, ".lora_magnitude_vector");
}
bool is_kohya_lora_key(std::string_view k) { return contains(k, ".lora_down.") || contains(k, ".lora_up."); }

}  // namespace

file_classification classify_tensors(const std::vector<std::string>& names) {
  // other adapter kinds first: their files may also hold lora_down / lora_A keys
  for (const other_kind& kind : other_kinds)
    for (const std::string& n : names)
      if (kind.match(n)) return {file_kind::other_adapter, fmt::format("{}, e.g. \"{}\"", kind.label, n)};
  for (const std::string& n : names)
    if (is_peft_lora_key(n)) return {file_kind::peft_lora, fmt::format("PEFT LoRA (lora_A / lora_B), e.g. \"{}\"", n)};
  for (const std::string& n : names)
    if (is_kohya_lora_key(n))
      return {file_kind::kohya_lora, fmt::format("kohya / sd-scripts LoRA (lora_down / lora_up), e.g. \"{}\"", n)};
  return {file_kind::model, "no adapter tensors (a model)"};
}

namespace {

// ---------------------------------------------------------------------------
// PEFT

enum class peft_role { a, b, embedding_a, embedding_b, magnitude, bias };

struct peft_suffix {
  std::string_view suffix;
  peft_role role;
};

// Saved keys have the adapter name stripped; ".default" forms are seen in the
// wild (state dicts saved without get_peft_model_state_dict). DoRA's
// magnitude is saved without ".weight" by PEFT (save_and_load.py removes it
// after the ParameterDict -> ModuleDict refactor); both forms are accepted.
const peft_suffix peft_suffixes[] = {
    {".lora_A.weight", peft_role::a},
    {".lora_A.default.weight", peft_role::a},
    {".lora_B.weight", peft_role::b},
    {".lora_B.default.weight", peft_role::b},
    {".lora_B.bias", peft_role::bias},
    {".lora_B.default.bias", peft_role::bias},
    {".lora_embedding_A", peft_role::embedding_a},
    {".lora_embedding_A.default", peft_role::embedding_a},
    {".lora_embedding_B", peft_role::embedding_b},
    {".lora_embedding_B.default", peft_role::embedding_b},
    {".lora_magnitude_vector", peft_role::magnitude},
    {".lora_magnitude_vector.weight", peft_role::magnitude},
    {".lora_magnitude_vector.default", peft_role::magnitude},
    {".lora_magnitude_vector.default.weight", peft_role::magnitude},
};

// The tensors found for one module, by key.
struct module_parts {
  std::map<peft_role, const tensor_info*> parts;
};

std::string_view role_name(peft_role r) {
  switch (r) {
    case peft_role::a: return "lora_A";
    case peft_role::b: return "lora_B";
    case peft_role::embedding_a: return "lora_embedding_A";
    case peft_role::embedding_b: return "lora_embedding_B";
    case peft_role::magnitude: return "lora_magnitude_vector";
    case peft_role::bias: return "lora_B.bias";
  }
  return "";
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

void load_peft(adapter& a, const std::string& config_label) {
  const safetensors_file& f = *a.file;
  const std::string& label = a.weights_path;
  const peft_config& config = *a.config;

  // sort every key into a module part or a modules_to_save tensor
  std::map<std::string, module_parts> by_module;
  for (const tensor_info& t : f.tensors()) {
    std::string_view key = t.name;
    if (!starts_with(key, peft_prefix))
      throw errors::invalid(label, t.name, fmt::format("PEFT key does not start with \"{}\"", peft_prefix));
    std::string_view rest = key.substr(peft_prefix.size());
    const peft_suffix* found = nullptr;
    for (const peft_suffix& s : peft_suffixes)
      if (ends_with(rest, s.suffix) && rest.size() > s.suffix.size()) found = &s;
    if (found != nullptr) {
      std::string module(rest.substr(0, rest.size() - found->suffix.size()));
      auto [it, inserted] = by_module[module].parts.emplace(found->role, &t);
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
    if ((ends_with(rest, ".weight") || ends_with(rest, ".bias")) && rest.front() != '.' && !contains(rest, "..")) {
      // modules_to_save (or a trained bias): replaces the base tensor whole
      a.saved.push_back({std::string(rest), tensor_ref{&f, &t}});
      continue;
    }
    throw errors::invalid(label, t.name, "unknown key: neither a LoRA tensor nor a module weight or bias");
  }

  // the patterns, compiled once, in file order
  auto rank_patterns = compile_patterns(config.rank_pattern, config_label, "rank_pattern");
  auto alpha_patterns = compile_patterns(config.alpha_pattern, config_label, "alpha_pattern");

  // pair A with B for every module
  for (const auto& [name, mp] : by_module) {
    // (clang before 16 cannot capture a structured binding: name the map)
    auto get = [&parts = mp.parts](peft_role r) -> const tensor_info* {
      auto it = parts.find(r);
      return it == parts.end() ? nullptr : it->second;
    };
    const tensor_info* la = get(peft_role::a);
    const tensor_info* lb = get(peft_role::b);
    const tensor_info* ea = get(peft_role::embedding_a);
    const tensor_info* eb = get(peft_role::embedding_b);
    const tensor_info* mag = get(peft_role::magnitude);
    const tensor_info* bias = get(peft_role::bias);
    const tensor_info* any = mp.parts.begin()->second;

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
            fmt::format("{} without lora_A and lora_B for module {}", role_name(mp.parts.begin()->first), name));
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

    // rank from the shapes must agree with the config (rank_pattern first)
    std::optional<size_t> rp = first_match(rank_patterns, name);
    if (rp) {
      int64_t want = config.rank_pattern[*rp].second;
      if (want != m.rank)
        throw errors::invalid(label, ta->name,
                              fmt::format("rank {} from the shapes, but {} rank_pattern \"{}\" says {}", m.rank,
                                          config_label, config.rank_pattern[*rp].first, want));
    } else if (config.r && *config.r != m.rank) {
      throw errors::invalid(
          label, ta->name, fmt::format("rank {} from the shapes, but {} says r = {}", m.rank, config_label, *config.r));
    }

    // alpha: alpha_pattern, then lora_alpha, then PEFT's default 8
    std::optional<size_t> ap = first_match(alpha_patterns, name);
    m.alpha = ap ? config.alpha_pattern[*ap].second : config.lora_alpha.value_or(8.0);
    m.scale = lora_scale(m.alpha, m.rank, config.use_rslora);
    m.fan_in_fan_out = m.kind == module_kind::linear && config.fan_in_fan_out;

    // DoRA magnitude: one per row of B (linear out, conv out, embedding dim).
    // PEFT stores [out] for linear / embedding and [1, out, 1, 1] for conv
    // (_DoraConvNdLayer's keepdim norm, transposed): any shape of that many
    // elements with at most one dimension above 1 is accepted.
    if (mag) {
      if (!config.use_dora)
        throw errors::invalid(label, mag->name, fmt::format("DoRA magnitude, but {} has use_dora false", config_label));
      const int64_t want = sb[0];
      int n_big = 0;
      for (int64_t dim : mag->shape) n_big += dim != 1;
      const bool ok = static_cast<int64_t>(mag->n_elements) == want && n_big <= 1 && !mag->shape.empty();
      if (!ok) throw errors::shape_mismatch(label, mag->name, fmt::format("[{}]", want), shape_text(mag->shape));
      m.magnitude = tensor_ref{&f, mag};
      m.dora = true;
    } else if (config.use_dora) {
      throw errors::invalid(
          label, ta->name,
          fmt::format("{} has use_dora true, but module {} has no lora_magnitude_vector", config_label, name));
    }

    // bias delta (lora_bias): [out]
    if (bias) {
      if (!config.lora_bias)
        throw errors::invalid(label, bias->name, fmt::format("lora_B bias, but {} has lora_bias false", config_label));
      if (m.kind == module_kind::embedding) throw errors::invalid(label, bias->name, "a bias on an embedding LoRA");
      if (bias->shape.size() != 1 || bias->shape[0] != sb[0])
        throw errors::shape_mismatch(label, bias->name, fmt::format("[{}]", sb[0]), shape_text(bias->shape));
      m.bias = tensor_ref{&f, bias};
    }
    a.modules.push_back(std::move(m));
  }
}

// ---------------------------------------------------------------------------
// kohya / sd-scripts

// alpha is a scalar of any float dtype.
double read_alpha(const safetensors_file& f, const tensor_info& t) {
  if (t.n_elements != 1)
    throw errors::invalid(f.path(), t.name, fmt::format("alpha must be a scalar, found shape {}", shape_text(t.shape)));
  if (!dtype_is_math(t.type))
    throw errors::invalid(f.path(), t.name, fmt::format("alpha must be a float, found dtype {}", dtype_name(t.type)));
  double v = 0;
  to_f64(t.type, f.data(t), std::span<double>(&v, 1));
  if (!std::isfinite(v)) throw errors::invalid(f.path(), t.name, "alpha is not finite");
  return v;
}

void load_kohya(adapter& a) {
  const safetensors_file& f = *a.file;
  const std::string& label = a.weights_path;
  struct parts {
    const tensor_info* down = nullptr;
    const tensor_info* up = nullptr;
    const tensor_info* alpha = nullptr;
  };
  std::map<std::string, parts> by_module;

  // sort every key into down / up / alpha of a module
  for (const tensor_info& t : f.tensors()) {
    std::string_view key = t.name;
    bool prefixed = false;
    for (std::string_view p : kohya_prefixes) prefixed = prefixed || (starts_with(key, p) && key.size() > p.size());
    if (!prefixed)
      throw errors::invalid(label, t.name,
                            fmt::format("kohya key without a known prefix ({})", fmt::join(kohya_prefixes, ", ")));
    const tensor_info** slot = nullptr;
    std::string module;
    auto take = [&](std::string_view suffix) {
      if (!ends_with(key, suffix) || key.size() == suffix.size()) return false;
      module = std::string(key.substr(0, key.size() - suffix.size()));
      return true;
    };
    if (take(".lora_down.weight"))
      slot = &by_module[module].down;
    else if (take(".lora_up.weight"))
      slot = &by_module[module].up;
    else if (take(".alpha"))
      slot = &by_module[module].alpha;
    else if (ends_with(key, ".dora_scale"))
      throw errors::invalid(label, t.name, "DoRA in a kohya / LyCORIS file (dora_scale) is not supported");
    else
      throw errors::invalid(label, t.name, "unknown kohya key (expected .lora_down.weight, .lora_up.weight or .alpha)");
    if (module.find('.') != std::string::npos) throw errors::invalid(label, t.name, "kohya module name contains '.'");
    *slot = &t;
  }

  // pair down with up
  for (const auto& [name, p] : by_module) {
    if (!p.down && !p.up) throw errors::invalid(label, p.alpha->name, "alpha without lora_down and lora_up");
    if (!p.down) throw errors::invalid(label, p.up->name, "lora_up without its lora_down");
    if (!p.up) throw errors::invalid(label, p.down->name, "lora_down without its lora_up");
    const auto& sd = p.down->shape;
    const auto& su = p.up->shape;
    lora_module m;
    m.name = name;
    if (sd.size() == 2 && su.size() == 2) {
      m.kind = module_kind::linear;
    } else if (sd.size() == 4 && su.size() == 4 && su[2] == 1 && su[3] == 1) {
      m.kind = module_kind::conv;
    } else {
      throw errors::invalid(label, p.down->name,
                            fmt::format("unsupported shapes: lora_down {}, lora_up {} (expected [r, in] and [out, r], "
                                        "or [r, in, kh, kw] and [out, r, 1, 1])",
                                        shape_text(sd), shape_text(su)));
    }
    if (sd[0] != su[1])
      throw errors::invalid(label, p.up->name,
                            fmt::format("rank disagrees: lora_down is {} (rank {}), lora_up is {} (rank {})",
                                        shape_text(sd), sd[0], shape_text(su), su[1]));
    if (sd[0] <= 0) throw errors::invalid(label, p.down->name, "rank 0");
    m.rank = sd[0];
    m.a = {&f, p.down};
    m.b = {&f, p.up};
    // sd-scripts LoRAModule: alpha = r when absent or 0, so the scale is 1
    double alpha = p.alpha ? read_alpha(f, *p.alpha) : 0.0;
    m.alpha = alpha == 0.0 ? static_cast<double>(m.rank) : alpha;
    m.scale = lora_scale(m.alpha, m.rank, false);
    a.modules.push_back(std::move(m));
  }
}

// Classifies the opened a.file and loads it. `config_label` names
// adapter_config.json (empty: there is none); `read_config` returns its text
// and is called only for a PEFT file (a kohya file ignores a config beside it).
void load_opened(adapter& a, const std::string& config_label, const std::function<std::string()>& read_config) {
  // what kind of file is it
  std::vector<std::string> names;
  names.reserve(a.file->tensors().size());
  for (const tensor_info& t : a.file->tensors()) names.push_back(t.name);
  file_classification c = classify_tensors(names);
  switch (c.kind) {
    case file_kind::model:
      throw errors::invalid(a.weights_path, "",
                            "holds no LoRA tensors (lora_A/lora_B or lora_down/lora_up): is it a model?");
    case file_kind::other_adapter:
      throw errors::invalid(a.weights_path, "", fmt::format("not a LoRA adapter lora can read: {}", c.description));
    case file_kind::kohya_lora:
      a.format = adapter_format::kohya;
      load_kohya(a);
      break;
    case file_kind::peft_lora: {
      a.format = adapter_format::peft;
      if (config_label.empty())
        throw errors::invalid(a.weights_path, "",
                              "PEFT LoRA weights without adapter_config.json beside them (alpha and options unknown)");
      a.config = parse_peft_config(read_config(), config_label);
      if (a.config->peft_type != "LORA")
        throw errors::invalid(
            config_label, "peft_type",
            a.config->peft_type.empty()
                ? std::string("missing: only LORA adapters are read")
                : fmt::format("\"{}\" is not supported: only LORA adapters are read", a.config->peft_type));
      if (a.config->layer_replication)
        throw errors::invalid(
            config_label, "layer_replication",
            "the adapter duplicates base layers (layer_replication): merging it into the base is not supported");
      load_peft(a, config_label);
      break;
    }
  }

  std::sort(a.modules.begin(), a.modules.end(),
            [](const lora_module& x, const lora_module& y) { return x.name < y.name; });
  std::sort(a.saved.begin(), a.saved.end(),
            [](const saved_tensor& x, const saved_tensor& y) { return x.target < y.target; });
}

}  // namespace

adapter load_adapter(const std::string& path) {
  adapter a;
  a.path = path;

  // locate the weights and the config
  std::error_code ec;
  if (!fs::exists(path, ec)) throw errors::io(path, "no such file or folder");
  std::string config_path;
  if (fs::is_directory(path, ec)) {
    fs::path weights = fs::path(path) / "adapter_model.safetensors";
    if (!fs::exists(weights, ec)) {
      if (fs::exists(fs::path(path) / "adapter_model.bin", ec))
        throw errors::invalid(path, "",
                              "adapter_model.bin (pickle) is not read: convert it to adapter_model.safetensors");
      throw errors::invalid(path, "", "folder has no adapter_model.safetensors");
    }
    a.weights_path = weights.string();
    config_path = (fs::path(path) / "adapter_config.json").string();
    if (!fs::exists(config_path, ec)) config_path.clear();
  } else {
    a.weights_path = path;
    fs::path beside = fs::path(path).parent_path() / "adapter_config.json";
    if (fs::exists(beside, ec)) config_path = beside.string();
  }
  a.file = std::make_unique<safetensors_file>(a.weights_path);
  load_opened(a, config_path, [&] { return read_text_file(config_path); });
  return a;
}

adapter load_adapter_bytes(std::span<const uint8_t> weights, const std::string& weights_label,
                           const std::optional<std::string>& config_text, const std::string& config_label) {
  adapter a;
  a.path = weights_label;
  a.weights_path = weights_label;
  a.file = std::make_unique<safetensors_file>(mapped_file::borrow(weights_label, weights));
  load_opened(a, config_text ? config_label : std::string(), [&] { return *config_text; });
  return a;
}

// ---------------------------------------------------------------------------
// fitting to a base model

namespace {

// transformers models whose projections are pytorch_utils.Conv1D (weight
// stored [in, out]): GPT-2 and the models built from its blocks.
constexpr std::string_view conv1d_model_types[] = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"};

bool is_conv1d_model_type(const std::optional<std::string>& t) {
  if (!t) return false;
  return std::find(std::begin(conv1d_model_types), std::end(conv1d_model_types), *t) != std::end(conv1d_model_types);
}

// GPT-2's Conv1D module names: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj.
bool conv1d_style_name(std::string_view module) {
  size_t dot = module.rfind('.');
  std::string_view last = dot == std::string_view::npos ? module : module.substr(dot + 1);
  return last == "c_attn" || last == "c_proj" || last == "c_fc";
}

// Single-file checkpoints nest the networks sd-scripts names directly:
// sd-scripts strips these prefixes when it loads a checkpoint (model_util /
// sdxl_model_util), so a kohya name may match the key without them.
struct container_prefix {
  std::string_view kohya;  // the kohya prefix it applies to
  std::string_view base;   // the checkpoint's key prefix
};
constexpr container_prefix container_prefixes[] = {
    {"lora_unet_", "model.diffusion_model."},               // SDXL (LDM names), Flux/SD3 in ComfyUI files
    {"lora_te_", "cond_stage_model.transformer."},          // SD 1.x checkpoint, CLIP text model
    {"lora_te1_", "conditioner.embedders.0.transformer."},  // SDXL checkpoint, CLIP-L text model
};

// "<module>.weight" keys of the base, their dots read as underscores.
using mangled_index = std::unordered_map<std::string, std::vector<std::string>>;
void add_mangled(mangled_index& index, const std::string& module, size_t skip) {
  std::string mangled = module.substr(skip);
  std::replace(mangled.begin(), mangled.end(), '.', '_');
  index[mangled].push_back(module);
}

void check_linear(lora_module& m, const tensor_info& w, const std::optional<std::string>& model_type,
                  std::vector<fit_problem>& problems) {
  // delta B @ A is [out, in]; the base is [out, in] or, for Conv1D, [in, out]
  const int64_t out = m.b.info->shape[0];
  const int64_t in = m.a.info->shape[1];
  const std::vector<int64_t> plain{out, in};
  const std::vector<int64_t> transposed{in, out};
  const bool fits_plain = w.shape == plain;
  const bool fits_transposed = w.shape == transposed;
  if (!fits_plain && !fits_transposed) {
    problems.push_back(
        {m.a.info->name,
         fmt::format("base {} is {}, the LoRA makes {}", m.target, shape_text(w.shape), shape_text(plain)),
         fit_issue::shape});
    return;
  }
  if (fits_plain != fits_transposed) {
    // not square: the base's layout decides (PEFT forces fan_in_fan_out to
    // the layer type: true for Conv1D, false for nn.Linear)
    m.fan_in_fan_out = fits_transposed;
    return;
  }
  // square: the shapes cannot tell
  if (model_type) {
    m.fan_in_fan_out = stored_in_out(model_type, m.name);
    return;
  }
  if (conv1d_style_name(m.name) && !m.fan_in_fan_out) {
    problems.push_back(
        {m.a.info->name,
         fmt::format("orientation ambiguous: {} is square {}, the name looks like GPT-2 Conv1D (stored [in, out]) "
                     "but fan_in_fan_out is false and the base has no config.json model_type",
                     m.target, shape_text(w.shape)),
         fit_issue::orientation});
  }
  // otherwise the config's fan_in_fan_out stands
}

}  // namespace

bool stored_in_out(const std::optional<std::string>& model_type, std::string_view module) {
  return is_conv1d_model_type(model_type) && conv1d_style_name(module);
}

fit_report fit_adapter(adapter& a, const model_files& base) {
  fit_report report;
  auto& problems = report.problems;
  std::optional<std::string> model_type;
  if (!base.config_path.empty()) model_type = read_model_type(base.config_path);

  // kohya: resolve names by replacing '.' with '_' in every base weight key
  if (a.format == adapter_format::kohya) {
    mangled_index direct;
    std::vector<mangled_index> nested(std::size(container_prefixes));
    for (const std::string& n : base.tensor_names) {
      if (!ends_with(n, ".weight")) continue;
      const std::string module = n.substr(0, n.size() - 7);
      add_mangled(direct, module, 0);
      for (size_t i = 0; i < std::size(container_prefixes); ++i)
        if (starts_with(module, container_prefixes[i].base))
          add_mangled(nested[i], module, container_prefixes[i].base.size());
    }
    for (lora_module& m : a.modules) {
      if (!m.target.empty()) continue;  // already resolved
      const std::string_view prefix = kohya_prefix_of(m.name);
      const std::string key = m.name.substr(prefix.size());
      // the whole key first, then inside the checkpoint's containers
      const std::vector<std::string>* found = nullptr;
      if (auto it = direct.find(key); it != direct.end()) found = &it->second;
      for (size_t i = 0; found == nullptr && i < std::size(container_prefixes); ++i) {
        if (container_prefixes[i].kohya != prefix) continue;
        if (auto it = nested[i].find(key); it != nested[i].end()) found = &it->second;
      }
      if (found == nullptr) {
        problems.push_back(
            {m.name,
             fmt::format("no base tensor matches {} (looked for a \"<module>.weight\" whose dots read as "
                         "underscores give \"{}\")",
                         m.name, key),
             fit_issue::no_base_tensor});
        continue;
      }
      if (found->size() > 1) {
        problems.push_back({m.name,
                            fmt::format("ambiguous: matches both {}.weight and {}.weight", (*found)[0], (*found)[1]),
                            fit_issue::ambiguous});
        continue;
      }
      m.name = (*found)[0];
      m.target = m.name + ".weight";
    }
    std::sort(a.modules.begin(), a.modules.end(),
              [](const lora_module& x, const lora_module& y) { return x.name < y.name; });
  }

  // every target at most once
  std::map<std::string, std::string> claimed;  // target -> adapter key
  for (const lora_module& m : a.modules) {
    if (m.target.empty()) continue;
    auto [it, inserted] = claimed.emplace(m.target, m.a.info->name);
    if (!inserted)
      problems.push_back(
          {m.a.info->name, fmt::format("{} is also the target of {}", m.target, it->second), fit_issue::conflict});
  }
  for (const saved_tensor& s : a.saved) {
    auto [it, inserted] = claimed.emplace(s.target, s.tensor.info->name);
    if (!inserted)
      problems.push_back({s.tensor.info->name, fmt::format("replaces {}, which {} also changes", s.target, it->second),
                          fit_issue::conflict});
  }

  // shapes of every module against its base tensor
  for (lora_module& m : a.modules) {
    if (m.target.empty()) continue;
    const tensor_ref* base_w = base.find_ref(m.target);
    if (base_w == nullptr) {
      problems.push_back(
          {m.a.info->name, fmt::format("the base has no tensor {}", m.target), fit_issue::no_base_tensor});
      continue;
    }
    const tensor_info& w = *base_w->info;
    const auto& sa = m.a.info->shape;
    const auto& sb = m.b.info->shape;
    int64_t out = sb[0];
    switch (m.kind) {
      case module_kind::linear:
        if (w.shape.size() == 4 && w.shape[2] == 1 && w.shape[3] == 1) {
          // a 2-D LoRA on a 1x1 conv: the same bytes as [r, in, 1, 1]
          if (w.shape[0] != out || w.shape[1] != sa[1])
            problems.push_back(
                {m.a.info->name,
                 fmt::format("base {} is {}, the LoRA makes [{}, {}, 1, 1]", m.target, shape_text(w.shape), out, sa[1]),
                 fit_issue::shape});
          else
            m.kind = module_kind::conv;
        } else {
          check_linear(m, w, model_type, problems);
        }
        break;
      case module_kind::conv: {
        std::vector<int64_t> want{out, sa[1], sa[2], sa[3]};
        if (w.shape.size() == 2 && sa[2] == 1 && sa[3] == 1) {
          // a 1x1 conv LoRA on a Linear (sd-scripts merge_lora squeezes it)
          m.kind = module_kind::linear;
          check_linear(m, w, model_type, problems);
        } else if (w.shape != want) {
          problems.push_back(
              {m.a.info->name,
               fmt::format("base {} is {}, the LoRA makes {}", m.target, shape_text(w.shape), shape_text(want)),
               fit_issue::shape});
        }
        break;
      }
      case module_kind::embedding: {
        // dW = (B A)^T is [vocab, dim]
        std::vector<int64_t> want{sa[1], sb[0]};
        if (w.shape != want)
          problems.push_back({m.a.info->name,
                              fmt::format("base {} is {}, the embedding LoRA makes {}", m.target, shape_text(w.shape),
                                          shape_text(want)),
                              fit_issue::shape});
        break;
      }
    }
    if (m.magnitude && static_cast<int64_t>(m.magnitude->info->n_elements) != out)
      problems.push_back({m.magnitude->info->name,
                          fmt::format("DoRA magnitude has {} elements, the delta has {} output features",
                                      m.magnitude->info->n_elements, out),
                          fit_issue::inconsistent});
    if (m.bias) {
      const std::string bias_name = m.name + ".bias";
      const tensor_ref* base_b = base.find_ref(bias_name);
      if (base_b == nullptr)
        problems.push_back({m.bias->info->name, fmt::format("the base has no {} for the lora_B bias", bias_name),
                            fit_issue::no_base_tensor});
      else if (base_b->info->shape != m.bias->info->shape)
        problems.push_back({m.bias->info->name,
                            fmt::format("base {} is {}, the lora_B bias is {}", bias_name,
                                        shape_text(base_b->info->shape), shape_text(m.bias->info->shape)),
                            fit_issue::shape});
    }
  }

  // modules_to_save replace their base tensor: same shape
  for (const saved_tensor& s : a.saved) {
    const tensor_ref* base_t = base.find_ref(s.target);
    if (base_t == nullptr)
      problems.push_back({s.tensor.info->name, fmt::format("the base has no tensor {} to replace", s.target),
                          fit_issue::no_base_tensor});
    else if (base_t->info->shape != s.tensor.info->shape)
      problems.push_back({s.tensor.info->name,
                          fmt::format("base {} is {}, the saved module is {}", s.target,
                                      shape_text(base_t->info->shape), shape_text(s.tensor.info->shape)),
                          fit_issue::shape});
  }
  return report;
}

namespace {

// One hint for the whole report, from the kinds of its problems.
std::string_view fit_hint(const fit_report& report) {
  auto any = [&](std::initializer_list<fit_issue> kinds) {
    return std::any_of(report.problems.begin(), report.problems.end(), [&](const fit_problem& p) {
      return std::find(kinds.begin(), kinds.end(), p.issue) != kinds.end();
    });
  };
  if (any({fit_issue::no_base_tensor, fit_issue::shape})) return "does the adapter belong to this base model?";
  if (any({fit_issue::orientation}))
    return "set fan_in_fan_out in adapter_config.json, or give the base a config.json with its model_type";
  return {};
}

}  // namespace

error fit_error(const std::string& adapter_path, const std::string& base_path, const fit_report& report) {
  const size_t n = report.problems.size();
  if (n == 0)
    return errors::invalid(adapter_path, "", fmt::format("does not fit {}: no problem was reported", base_path));
  const fit_problem& first = report.problems.front();
  std::string what =
      n == 1 ? fmt::format("does not fit {}: 1 problem: {}: {}", base_path, first.key, first.what)
             : fmt::format("does not fit {}: {} problems, first {}: {}", base_path, n, first.key, first.what);
  if (const std::string_view hint = fit_hint(report); !hint.empty()) what += fmt::format(" ({})", hint);
  return errors::invalid(adapter_path, "", what);
}

void require_fit(adapter& a, const model_files& base) {
  const fit_report report = fit_adapter(a, base);
  if (!report.ok()) throw fit_error(a.path, base.path, report);
}

}  // namespace lora
