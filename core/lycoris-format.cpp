#include "core/lycoris-format.h"

#include <map>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/kohya-format.h"
#include "core/lycoris-delta.h"
#include "formats/error.h"

namespace lora::lycoris {

bool is_lycoris_key(std::string_view key) noexcept {
  for (std::string_view part : {".hada_w", ".hada_t", ".lokr_w", ".lokr_t", ".lora_mid."})
    if (key.find(part) != std::string_view::npos) return true;
  return false;
}

namespace {

// The suffixes of the format, each with the algorithm it belongs to.
struct suffix {
  std::string_view text;
  delta_form form;  // low_rank for lora_down / lora_up, which LoCon+Tucker shares
};
constexpr suffix suffixes[] = {
    {".lora_down.weight", delta_form::low_rank},
    {".lora_up.weight", delta_form::low_rank},
    {".lora_mid.weight", delta_form::tucker},
    {".hada_w1_a", delta_form::loha},
    {".hada_w1_b", delta_form::loha},
    {".hada_w2_a", delta_form::loha},
    {".hada_w2_b", delta_form::loha},
    {".hada_t1", delta_form::loha},
    {".hada_t2", delta_form::loha},
    {".lokr_w1", delta_form::lokr},
    {".lokr_w1_a", delta_form::lokr},
    {".lokr_w1_b", delta_form::lokr},
    {".lokr_w2", delta_form::lokr},
    {".lokr_w2_a", delta_form::lokr},
    {".lokr_w2_b", delta_form::lokr},
    {".lokr_t2", delta_form::lokr},
    {".alpha", delta_form::low_rank},
    {".dora_scale", delta_form::low_rank},  // any algorithm's (weight decomposition)
};

// One module's tensors by suffix (".hada_w1_a" -> its info).
using parts = std::map<std::string_view, const tensor_info*>;

// Sorts every key of the file into its module.
std::map<std::string, parts> group_keys(const safetensors_file& f, const std::string& label) {
  std::map<std::string, parts> by_module;
  for (const tensor_info& t : f.tensors()) {
    const std::string_view key = t.name;
    const std::string_view prefix = kohya::prefix_of(key);
    if (prefix.empty() || key.size() == prefix.size())
      throw errors::invalid(label, t.name,
                            fmt::format("LyCORIS key without a known prefix ({})", fmt::join(kohya::prefixes, ", ")));
    const suffix* found = nullptr;
    for (const suffix& s : suffixes)
      if (key.ends_with(s.text) && key.size() > s.text.size()) found = &s;
    if (found == nullptr)
      throw errors::invalid(label, t.name,
                            "unknown LyCORIS key (expected lora_down/lora_up/lora_mid .weight, hada_w1_a..hada_t2, "
                            "lokr_w1..lokr_t2, alpha or dora_scale)");
    const std::string module(key.substr(0, key.size() - found->text.size()));
    if (module.find('.') != std::string::npos) throw errors::invalid(label, t.name, "LyCORIS module name contains '.'");
    by_module[module][found->text] = &t;
  }
  return by_module;
}

const tensor_info* get(const parts& p, std::string_view suffix) {
  auto it = p.find(suffix);
  return it == p.end() ? nullptr : it->second;
}

std::optional<tensor_ref> ref(const safetensors_file& f, const parts& p, std::string_view suffix) {
  const tensor_info* t = get(p, suffix);
  if (t == nullptr) return std::nullopt;
  return tensor_ref{&f, t};
}

// The algorithm of a module's tensors; tensors of two algorithms are refused.
delta_form form_of(const std::string& label, const std::string& name, const parts& p) {
  bool loha = false, lokr = false, mid = false;
  for (const auto& [text, info] : p) {
    loha = loha || text.starts_with(".hada_");
    lokr = lokr || text.starts_with(".lokr_");
    mid = mid || text == ".lora_mid.weight";
  }
  const bool lora = get(p, ".lora_down.weight") || get(p, ".lora_up.weight");
  if (loha + lokr + (lora || mid) > 1)
    throw errors::invalid(label, name, "module mixes the tensors of two LyCORIS algorithms (LoHa, LoKr, LoCon)");
  return loha ? delta_form::loha : lokr ? delta_form::lokr : mid ? delta_form::tucker : delta_form::low_rank;
}

// A LoHa, LoKr or LoCon+Tucker module: tensors, rank and scale (rules in the header).
lora_module read_module(const safetensors_file& f, const std::string& label, const std::string& name, const parts& p,
                        delta_form form) {
  lora_module m;
  m.name = name;
  m.form = form;
  lycoris_tensors& l = m.lycoris;
  const tensor_info* rank_from = nullptr;  // the tensor whose first dim is r
  bool scale_one = false;
  switch (form) {
    case delta_form::loha:
      l.w1_a = ref(f, p, ".hada_w1_a"), l.w1_b = ref(f, p, ".hada_w1_b");
      l.w2_a = ref(f, p, ".hada_w2_a"), l.w2_b = ref(f, p, ".hada_w2_b");
      l.t1 = ref(f, p, ".hada_t1"), l.t2 = ref(f, p, ".hada_t2");
      rank_from = get(p, ".hada_w1_b");
      if (!l.w1_a || !l.w1_b) throw errors::invalid(label, name, "LoHa module without hada_w1_a and hada_w1_b");
      m.a = *l.w1_b, m.b = *l.w1_a;
      break;
    case delta_form::lokr:
      l.w1 = ref(f, p, ".lokr_w1"), l.w1_a = ref(f, p, ".lokr_w1_a"), l.w1_b = ref(f, p, ".lokr_w1_b");
      l.w2 = ref(f, p, ".lokr_w2"), l.w2_a = ref(f, p, ".lokr_w2_a"), l.w2_b = ref(f, p, ".lokr_w2_b");
      l.t2 = ref(f, p, ".lokr_t2");
      if (l.w1 && (l.w1_a || l.w1_b))
        throw errors::invalid(label, name, "LoKr module with both lokr_w1 and lokr_w1_a/b");
      if (l.w2 && (l.w2_a || l.w2_b || l.t2))
        throw errors::invalid(label, name, "LoKr module with both lokr_w2 and lokr_w2_a/b");
      if (!(l.w1 || l.w1_b) || !(l.w2 || l.w2_b))
        throw errors::invalid(label, name,
                              "LoKr module without its w1 or w2 part (lokr_w1 / lokr_w1_b, lokr_w2 / lokr_w2_b)");
      rank_from = !l.w1 ? &*l.w1_b->info : !l.w2 ? &*l.w2_b->info : nullptr;
      scale_one = l.w1 && l.w2;
      m.a = l.w1 ? *l.w1 : *l.w1_b, m.b = l.w2 ? *l.w2 : *l.w2_b;
      break;
    case delta_form::tucker: {
      const tensor_info* down = get(p, ".lora_down.weight");
      const tensor_info* up = get(p, ".lora_up.weight");
      if (!down || !up) throw errors::invalid(label, name, "lora_mid without lora_down and lora_up");
      m.a = {&f, down}, m.b = {&f, up};
      l.mid = ref(f, p, ".lora_mid.weight");
      rank_from = down;
      break;
    }
    case delta_form::low_rank: break;
  }
  // the shapes must agree with each other (the target is checked by fit_adapter)
  const std::vector<int64_t> shape = lycoris_delta_shape(m, label);
  m.kind = shape.size() == 2 ? module_kind::linear : module_kind::conv;
  // s = alpha / r, alpha absent or 0 read as r; LoKr with both factors full: s = 1
  m.rank = rank_from ? rank_from->shape[0] : 1;
  const tensor_info* alpha = get(p, ".alpha");
  const double stored = alpha && !scale_one ? kohya::read_alpha(f, *alpha) : 0.0;
  m.alpha = stored == 0.0 ? static_cast<double>(m.rank) : stored;
  m.scale = lora_scale(m.alpha, m.rank, false);
  return m;
}

}  // namespace

void load(adapter& a) {
  const safetensors_file& f = *a.file;
  for (const auto& [name, p] : group_keys(f, a.weights_path)) {
    const delta_form form = form_of(a.weights_path, name, p);
    const tensor_info* dora_scale = get(p, ".dora_scale");
    if (form == delta_form::low_rank && dora_scale && !get(p, ".lora_down.weight") && !get(p, ".lora_up.weight"))
      throw errors::invalid(a.weights_path, dora_scale->name, "dora_scale without the tensors of a LyCORIS module");
    if (form == delta_form::low_rank)
      a.modules.push_back(kohya::pair(f, a.weights_path, name, get(p, ".lora_down.weight"), get(p, ".lora_up.weight"),
                                      get(p, ".alpha")));
    else
      a.modules.push_back(read_module(f, a.weights_path, name, p, form));
    // weight decomposition: its shape, dtype and values are checked by core/delta
    if (dora_scale) a.modules.back().dora_scale = tensor_ref{&f, dora_scale};
  }
}

}  // namespace lora::lycoris
