#include "core/diffusers-format.h"

#include <algorithm>
#include <map>
#include <utility>

#include <fmt/format.h>

#include "core/kohya-format.h"
#include "formats/error.h"

namespace lora::diffusers {

namespace {

using pattern = std::pair<std::string_view, std::string_view>;

// diffusers utils/state_dict_utils.py KEYS_TO_ALWAYS_REPLACE.
constexpr pattern always_replace[] = {{".processor.", "."}};

// UNET_TO_DIFFUSERS (UNet and transformer keys), in its order.
constexpr pattern unet_patterns[] = {
    {".to_out_lora.up", ".to_out.0.lora_B"},
    {".to_out_lora.down", ".to_out.0.lora_A"},
    {".to_q_lora.down", ".to_q.lora_A"},
    {".to_q_lora.up", ".to_q.lora_B"},
    {".to_k_lora.down", ".to_k.lora_A"},
    {".to_k_lora.up", ".to_k.lora_B"},
    {".to_v_lora.down", ".to_v.lora_A"},
    {".to_v_lora.up", ".to_v.lora_B"},
    {".lora.up", ".lora_B"},
    {".lora.down", ".lora_A"},
};

// DIFFUSERS_OLD_TO_PEFT, then the text_projection rows of DIFFUSERS_TO_PEFT
// (its other rows are covered by ".lora_linear_layer.up/down"): text encoders.
constexpr pattern text_encoder_patterns[] = {
    {".to_q_lora.up", ".q_proj.lora_B"},
    {".to_q_lora.down", ".q_proj.lora_A"},
    {".to_k_lora.up", ".k_proj.lora_B"},
    {".to_k_lora.down", ".k_proj.lora_A"},
    {".to_v_lora.up", ".v_proj.lora_B"},
    {".to_v_lora.down", ".v_proj.lora_A"},
    {".to_out_lora.up", ".out_proj.lora_B"},
    {".to_out_lora.down", ".out_proj.lora_A"},
    {".lora_linear_layer.up", ".lora_B"},
    {".lora_linear_layer.down", ".lora_A"},
    {"text_projection.lora.down.weight", "text_projection.lora_A.weight"},
    {"text_projection.lora.up.weight", "text_projection.lora_B.weight"},
};

bool contains(std::string_view s, std::string_view part) { return s.find(part) != std::string_view::npos; }

// The component a key names ("unet" when it names none: attention processors).
std::pair<std::string_view, std::string_view> split_component(std::string_view key) {
  for (std::string_view c : components)
    if (key.size() > c.size() + 1 && key.starts_with(c) && key[c.size()] == '.') return {c, key.substr(c.size() + 1)};
  return {"unet", key};
}

// k with [at, at + n) replaced by `to` (built anew: GCC 12 warns, wrongly, on
// std::string::replace here with -Wrestrict).
std::string replaced(const std::string& k, size_t at, size_t n, std::string_view to) {
  std::string out(k, 0, at);
  out += to;
  out.append(k, at + n, std::string::npos);
  return out;
}

// convert_state_dict: the always-replaced patterns, then the first matching pattern.
std::string convert(std::string_view component, std::string_view rest) {
  std::string k(rest);
  for (const auto& [from, to] : always_replace)
    if (size_t at = k.find(from); at != std::string::npos) k = replaced(k, at, from.size(), to);
  const bool text = component.starts_with("text_encoder");
  auto apply = [&](const auto& table) {
    for (const auto& [from, to] : table)
      if (size_t at = k.find(from); at != std::string::npos) {
        k = replaced(k, at, from.size(), to);
        return;
      }
  };
  if (text)
    apply(text_encoder_patterns);
  else
    apply(unet_patterns);
  return k;
}

bool old_form(std::string_view k) {
  return contains(k, ".lora.down.") || contains(k, ".lora.up.") || contains(k, "_lora.down.") ||
         contains(k, "_lora.up.") || contains(k, ".lora_linear_layer.");
}

struct parts {
  const tensor_info* a = nullptr;
  const tensor_info* b = nullptr;
};

}  // namespace

bool is_diffusers_file(const std::vector<std::string>& names) noexcept {
  for (const std::string& n : names) {
    if (old_form(n)) return true;
    const std::string_view c = split_component(n).first;
    if (n.starts_with(c) && (contains(n, ".lora_A.") || contains(n, ".lora_B."))) return true;
  }
  return false;
}

void load(adapter& a) {
  const safetensors_file& f = *a.file;
  const std::string& label = a.weights_path;
  if (f.metadata() && f.metadata()->count("lora_adapter_metadata"))
    throw errors::invalid(
        label, "",
        "diffusers lora_adapter_metadata (a LoraConfig per component) is not read yet: its alphas and "
        "patterns would change the scale");
  std::map<std::string, parts> by_module;
  std::map<std::string, const tensor_info*> alphas;  // module -> its .alpha
  for (const tensor_info& t : f.tensors()) {
    const auto [component, rest] = split_component(t.name);
    if (t.name.ends_with(".alpha") && t.name.size() > 6) {
      // network alphas (FluxLoraLoaderMixin.lora_state_dict pops every "alpha" key)
      alphas[fmt::format("{}.{}", component, rest.substr(0, rest.size() - 6))] = &t;
      continue;
    }
    if (contains(t.name, "dora_scale") || contains(t.name, "lora_magnitude_vector"))
      throw errors::invalid(label, t.name, "DoRA in a diffusers LoRA file is not supported yet");
    const std::string k = convert(component, rest);
    const tensor_info** slot = nullptr;
    std::string module;
    for (const auto& [suffix, which] : {std::pair{std::string_view(".lora_A.weight"), 0}, {".lora_B.weight", 1}})
      if (k.ends_with(suffix) && k.size() > suffix.size()) {
        module = fmt::format("{}.{}", component, k.substr(0, k.size() - suffix.size()));
        slot = which == 0 ? &by_module[module].a : &by_module[module].b;
      }
    if (slot == nullptr)
      throw errors::invalid(label, t.name,
                            fmt::format("unknown diffusers LoRA key (read as \"{}\"; expected lora_A / lora_B .weight, "
                                        ".lora.down / .lora.up, *_lora.down / *_lora.up or lora_linear_layer)",
                                        k));
    if (*slot != nullptr)
      throw errors::invalid(label, t.name, fmt::format("a second key for {} (also {})", module, (*slot)->name));
    *slot = &t;
  }
  for (const auto& [name, p] : by_module) {
    if (!p.a) throw errors::invalid(label, p.b->name, "lora_B (up) without its lora_A (down)");
    if (!p.b) throw errors::invalid(label, p.a->name, "lora_A (down) without its lora_B (up)");
    const auto& sa = p.a->shape;
    const auto& sb = p.b->shape;
    lora_module m;
    m.name = name;
    m.target = name + ".weight";
    if (sa.size() == 2 && sb.size() == 2)
      m.kind = module_kind::linear;
    else if (sa.size() == 4 && sb.size() == 4 && sb[2] == 1 && sb[3] == 1)
      m.kind = module_kind::conv;
    else
      throw errors::invalid(label, p.a->name,
                            fmt::format("unsupported shapes: down {}, up {} (expected [r, in] and [out, r], or "
                                        "[r, in, kh, kw] and [out, r, 1, 1])",
                                        shape_text(sa), shape_text(sb)));
    if (sa[0] != sb[1] || sa[0] <= 0)
      throw errors::invalid(label, p.b->name,
                            fmt::format("rank disagrees: down is {}, up is {}", shape_text(sa), shape_text(sb)));
    m.rank = sa[0];
    m.a = {&f, p.a};
    m.b = {&f, p.b};
    // get_peft_kwargs: the module's network alpha (lora_alpha / alpha_pattern), else lora_alpha = r: s = alpha / r
    const auto alpha = alphas.find(name);
    m.alpha = alpha == alphas.end() ? static_cast<double>(m.rank) : kohya::read_alpha(f, *alpha->second);
    if (alpha != alphas.end()) alphas.erase(alpha);
    m.scale = lora_scale(m.alpha, m.rank, false);
    a.modules.push_back(std::move(m));
  }
  if (!alphas.empty())
    throw errors::invalid(label, alphas.begin()->second->name, "alpha without its lora_A / lora_B pair");
}

}  // namespace lora::diffusers
