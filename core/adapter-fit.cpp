// fit_adapter, fit_error, require_fit (declared in core/adapter.h): how an
// adapter fits a base model, and the one rendering of a misfit.
#include <algorithm>
#include <cstdint>
#include <set>
#include <map>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/adapter.h"
#include "core/lycoris-delta.h"
#include "core/name-map.h"
#include "formats/error.h"
#include "formats/adapter-config.h"

namespace lora {

namespace {

// The last part of a dotted name ("model.embed_tokens.weight" -> "embed_tokens"
// for the module of a weight).
std::string_view module_leaf(std::string_view tensor) {
  if (tensor.ends_with(".weight")) tensor.remove_suffix(7);
  const size_t dot = tensor.rfind('.');
  return dot == std::string_view::npos ? tensor : tensor.substr(dot + 1);
}

// Input embeddings and output heads by transformers' names.
bool is_vocab_tensor(std::string_view tensor) {
  static constexpr std::string_view leaves[] = {"embed_tokens", "wte",     "word_embeddings", "tok_embeddings",
                                                "embed_in",     "lm_head", "embed_out",       "output"};
  const std::string_view leaf = module_leaf(tensor);
  return std::find(std::begin(leaves), std::end(leaves), leaf) != std::end(leaves);
}

// Output heads (the rest of is_vocab_tensor are input embeddings).
bool is_head_leaf(std::string_view leaf) { return leaf == "lm_head" || leaf == "embed_out" || leaf == "output"; }

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

// A module found through a fused table (core/name-map step 3): a rename
// gives it its base module; row slices are kept with it (`name` stays the
// adapter's). False when the table has nothing for it.
bool apply_fused(lora_module& m, const fused_lookup& found, std::vector<fit_problem>& problems) {
  if (found.found.empty()) return false;
  auto where = [](const fused_target& t) {
    return t.whole.empty() ? t.slices.empty() ? std::string("?") : t.slices[0].tensor : t.whole + ".weight";
  };
  if (found.found.size() > 1) {
    problems.push_back({m.name,
                        fmt::format("ambiguous: matches both {} and {}", where(found.found[0]), where(found.found[1])),
                        fit_issue::ambiguous});
    return true;
  }
  const fused_target& t = found.found.front();
  if (!t.problem.empty()) {
    problems.push_back({m.name, fmt::format("{} ({})", t.problem, t.layout), fit_issue::shape});
    return true;
  }
  if (!t.whole.empty()) {
    m.name = t.whole;
    m.target = t.whole + ".weight";
    return true;
  }
  m.slices = t.slices;
  m.delta_shape = t.delta_shape;
  m.target = t.slices.front().tensor;
  return true;
}

// kohya names resolved one by one (m.name becomes the base's dotted path):
// the name as it is, then inside its scope's single-file containers, then
// through the fused tables.
void resolve_kohya(adapter& a, const name_map& names, std::vector<fit_problem>& problems) {
  for (lora_module& m : a.modules) {
    if (!m.target.empty()) continue;  // already resolved
    const name_lookup found = names.find_kohya(m.name);
    if (found.modules.empty() && apply_fused(m, names.find_fused_kohya(m.name), problems)) continue;
    if (found.modules.empty()) {
      problems.push_back({m.name,
                          fmt::format("no base tensor matches {} (looked for a \"<module>.weight\" whose dots read as "
                                      "underscores give \"{}\")",
                                      m.name, found.looked_for),
                          fit_issue::no_base_tensor});
      continue;
    }
    if (found.modules.size() > 1) {
      problems.push_back(
          {m.name, fmt::format("ambiguous: matches both {}.weight and {}.weight", found.modules[0], found.modules[1]),
           fit_issue::ambiguous});
      continue;
    }
    m.name = found.modules.front();
    m.target = m.name + ".weight";
  }
}

// The diffusers pipeline components' adapter prefixes (diffusers
// StableDiffusionLoraLoaderMixin / FluxLoraLoaderMixin save "unet.",
// "transformer.", "text_encoder.", "text_encoder_2."): the one `name` starts
// with, or empty.
std::string_view component_prefix(std::string_view name) {
  static constexpr std::string_view prefixes[] = {"unet.", "transformer.", "text_encoder.", "text_encoder_2."};
  for (std::string_view p : prefixes)
    if (name.starts_with(p)) return p;
  return {};
}

// Dotted paths (PEFT): one base layout for the whole adapter, applied only
// when every tensor the adapter changes or replaces is found under it (with
// `skip_unmatched`: the layout that finds the most, applied to the names it
// finds). A tied base's missing head and a modules_to_save tensor the base
// lacks (a new head: score, classifier) are names the merge creates.
void resolve_paths(adapter& a, const name_map& names, const model_files& base, fit_report& report,
                   bool skip_unmatched) {
  std::vector<std::string> wanted;
  for (const lora_module& m : a.modules) wanted.push_back(m.target);
  for (const saved_tensor& s : a.saved) wanted.push_back(s.target);
  for (const token_rows& t : a.tokens) wanted.push_back(t.target);
  auto also_ok = [&](const std::string& name) {
    if (tied_head_source(base, name)) return true;
    return std::any_of(a.saved.begin(), a.saved.end(), [&](const saved_tensor& s) { return name.ends_with(s.target); });
  };
  const layout_choice choice = names.choose_layout(wanted, also_ok, skip_unmatched);
  if (!choice.ambiguous.empty()) {
    std::vector<std::string> candidates;
    for (const model_layout* l : choice.ambiguous) candidates.emplace_back(l->name);
    report.problems.push_back(
        {a.path, fmt::format("its names fit the base in more than one layout: {}", fmt::join(candidates, "; ")),
         fit_issue::ambiguous});
    return;
  }
  if (choice.layout == nullptr) {
    // modules the base does not hold as they are: through the fused tables
    // (core/name-map step 3: another layout of the same family)
    size_t fused = 0;
    for (lora_module& m : a.modules)
      if (!names.has_tensor(m.target) && !tied_head_source(base, m.target))
        fused += apply_fused(m, names.find_fused(m.name), report.problems);
    if (choice.closest != nullptr && fused == 0) {
      report.closest_layout = fmt::format("{} of {} names are found as a {}, {} as they are", choice.closest_found,
                                          wanted.size(), choice.closest->name, choice.found_as_is);
      // the names it leaves are all of other pipeline components than the
      // ones it finds: a diffusers LoRA into one component's own file
      std::set<std::string_view> found_in, missing_in;
      bool all_components = true;
      for (const std::string& t : wanted) {
        const std::string name = apply_layout(t, choice.closest);
        const bool found = names.has_tensor(name) || also_ok(name);
        const std::string_view c = component_prefix(t);
        all_components = all_components && !c.empty();
        (found ? found_in : missing_in).insert(c);
      }
      bool apart = all_components && !missing_in.empty();
      for (std::string_view c : missing_in) apart = apart && found_in.count(c) == 0;
      if (apart) report.other_components.assign(missing_in.begin(), missing_in.end());
    }
    return;
  }
  report.layout = choice.layout->name;
  // under --skip-unmatched the names it does not find stay the adapter's (the strays)
  auto rewrite = [&](std::string& name) {
    std::string under = apply_layout(name, choice.layout);
    if (!skip_unmatched || names.has_tensor(under) || also_ok(under)) name = std::move(under);
  };
  for (lora_module& m : a.modules) {
    const std::string before = m.target;
    rewrite(m.target);
    if (m.target != before) m.name = apply_layout(m.name, choice.layout);
  }
  for (saved_tensor& s : a.saved) rewrite(s.target);
  for (token_rows& t : a.tokens) rewrite(t.target);
  std::sort(a.saved.begin(), a.saved.end(),
            [](const saved_tensor& x, const saved_tensor& y) { return x.target < y.target; });
}

// Every base tensor row changed by at most one adapter entry (a module with
// slices claims their rows, any other its whole target).
void check_claims(const adapter& a, std::vector<fit_problem>& problems) {
  struct claim {
    int64_t begin, end;
    std::string key;
  };
  std::map<std::string, std::vector<claim>> claimed;  // target -> row ranges and adapter keys
  auto take = [&](const std::string& tensor, int64_t begin, int64_t end, const std::string& key) {
    std::vector<claim>& on = claimed[tensor];
    for (const claim& c : on)
      if (begin < c.end && c.begin < end) {
        problems.push_back({key,
                            c.end - c.begin == INT64_MAX
                                ? fmt::format("{} is also the target of {}", tensor, c.key)
                                : fmt::format("{} rows [{}, {}) are also changed by {}", tensor,
                                              std::max(begin, c.begin), std::min(end, c.end), c.key),
                            fit_issue::conflict});
        return;
      }
    on.push_back({begin, end, key});
  };
  for (const lora_module& m : a.modules) {
    if (m.target.empty()) continue;
    if (m.slices.empty()) take(m.target, 0, INT64_MAX, m.a.info->name);
    for (const row_slice& sl : m.slices) take(sl.tensor, sl.tensor_row, sl.tensor_row + sl.n_rows, m.a.info->name);
  }
  std::map<std::string, std::string> saved_claims;
  for (const saved_tensor& s : a.saved) {
    if (auto on = claimed.find(s.target); on != claimed.end() && !on->second.empty()) {
      problems.push_back({s.tensor.info->name,
                          fmt::format("replaces {}, which {} also changes", s.target, on->second.front().key),
                          fit_issue::conflict});
      continue;
    }
    auto [it, inserted] = saved_claims.emplace(s.target, s.tensor.info->name);
    if (!inserted)
      problems.push_back({s.tensor.info->name, fmt::format("replaces {}, which {} also changes", s.target, it->second),
                          fit_issue::conflict});
  }
}

// A linear delta B A [out, in] on a base [out, in] or, for Conv1D, [in, out];
// decides fan_in_fan_out as PEFT forces it from the layer type.
void check_linear(lora_module& m, const tensor_info& w, const std::optional<std::string>& model_type,
                  std::vector<fit_problem>& problems) {
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
         fit_issue::shape, m.target, w.shape, plain});
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

// Whether the base's output head is its input embedding, as a checkpoint
// with tie_word_embeddings shows it: an input embedding and no lm_head weight.
bool base_ties_embeddings(const model_files& base) {
  bool embedding = false;
  for (const std::string& n : base.tensor_names) {
    if (!n.ends_with(".weight") || !is_vocab_tensor(n)) continue;
    if (module_leaf(n) == "lm_head") return false;
    embedding = true;
  }
  return embedding;
}

// One module's delta shape against its base tensor `w`; sets the kind a 1x1
// conv takes on the base's layout.
void check_shape(lora_module& m, const tensor_info& w, const std::optional<std::string>& model_type,
                 std::vector<fit_problem>& problems) {
  const auto& sa = m.a.info->shape;
  const int64_t out = m.b.info->shape[0];
  switch (m.kind) {
    case module_kind::linear:
      if (w.shape.size() == 4 && w.shape[2] == 1 && w.shape[3] == 1) {
        // a 2-D LoRA on a 1x1 conv: the same bytes as [r, in, 1, 1]
        if (w.shape[0] != out || w.shape[1] != sa[1])
          problems.push_back(
              {m.a.info->name,
               fmt::format("base {} is {}, the LoRA makes [{}, {}, 1, 1]", m.target, shape_text(w.shape), out, sa[1]),
               fit_issue::shape, m.target, w.shape, std::vector<int64_t>{out, sa[1], 1, 1}});
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
             fit_issue::shape, m.target, w.shape, want});
      }
      break;
    }
    case module_kind::embedding: {
      // dW = (B A)^T is [vocab, dim]
      std::vector<int64_t> want{sa[1], out};
      if (w.shape != want)
        problems.push_back(
            {m.a.info->name,
             fmt::format("base {} is {}, the embedding LoRA makes {}", m.target, shape_text(w.shape), shape_text(want)),
             fit_issue::shape, m.target, w.shape, want});
      break;
    }
    case module_kind::parameter: break;  // check_parameter
  }
}

// A module whose rows land in rows of base tensors (m.slices): a linear
// LoRA (a 1x1 conv LoRA reads as one) or a LyCORIS delta whose [rows, cols]
// is the fused table's delta_shape, every slice's tensor with those
// columns, and for a lora_B bias a base bias beside every slice.
void check_slices(lora_module& m, const model_files& base, const std::string& file,
                  std::vector<fit_problem>& problems) {
  const std::string& key = m.a.info->name;
  if (m.dora || m.dora_scale || m.kind == module_kind::embedding || m.fan_in_fan_out) {
    problems.push_back({key,
                        fmt::format("{} changes rows of {}: a {} module cannot", m.name, m.target,
                                    m.dora || m.dora_scale ? "DoRA"
                                    : m.fan_in_fan_out     ? "fan_in_fan_out"
                                                           : "embedding"),
                        fit_issue::shape});
    return;
  }
  int64_t want_in = 1;
  for (size_t i = 1; i < m.delta_shape.size(); ++i) want_in *= m.delta_shape[i];
  const std::vector<int64_t> want{m.delta_shape[0], want_in};
  std::vector<int64_t> made;
  bool fits = false;
  if (m.form != delta_form::low_rank) {
    // LyCORIS: the delta its tensors make, on the same [rows, cols] view
    made = lycoris_delta_shape(m, file);
    fits = lycoris_delta_fits(made, want);
  } else {
    const auto& sa = m.a.info->shape;
    int64_t in = 1;
    for (size_t i = 1; i < sa.size(); ++i) in *= sa[i];
    const bool one_by_one = m.kind != module_kind::conv || (sa.size() == 4 && sa[2] == 1 && sa[3] == 1);
    made = one_by_one ? std::vector<int64_t>{m.b.info->shape[0], in} : sa;
    fits = one_by_one && made == want;
  }
  const row_slice& first = m.slices.front();
  if (!fits) {
    problems.push_back(
        {key,
         fmt::format("base {} rows [{}, {}){} take a delta of {}, the {} makes {}", first.tensor, first.tensor_row,
                     first.tensor_row + first.n_rows,
                     m.slices.size() > 1 ? fmt::format(" and {} more row ranges", m.slices.size() - 1) : std::string(),
                     shape_text(want), m.form != delta_form::low_rank ? delta_form_name(m.form) : "LoRA",
                     shape_text(made)),
         fit_issue::shape, first.tensor, want, made});
    return;
  }
  const int64_t out = m.delta_shape[0];
  m.kind = module_kind::linear;
  for (const row_slice& sl : m.slices) {
    const tensor_ref* w = base.find_ref(sl.tensor);
    if (w == nullptr || w->info->shape.size() != 2 || w->info->shape[1] != want_in ||
        sl.tensor_row + sl.n_rows > w->info->shape[0]) {
      problems.push_back({key,
                          fmt::format("base {} is not a [rows, {}] weight holding rows [{}, {})", sl.tensor, want_in,
                                      sl.tensor_row, sl.tensor_row + sl.n_rows),
                          fit_issue::shape, sl.tensor});
      return;
    }
    if (!m.bias) continue;
    const tensor_ref* b = sl.bias.empty() ? nullptr : base.find_ref(sl.bias);
    if (b == nullptr)
      problems.push_back({m.bias->info->name,
                          fmt::format("the base has no bias beside {} for the lora_B bias (rows [{}, {}))", sl.tensor,
                                      sl.tensor_row, sl.tensor_row + sl.n_rows),
                          fit_issue::no_base_tensor});
    else if (static_cast<int64_t>(b->info->n_elements) != w->info->shape[0] ||
             static_cast<int64_t>(m.bias->info->n_elements) != out)
      problems.push_back(
          {m.bias->info->name,
           fmt::format("base {} is {}, the lora_B bias is {} for rows [{}, {})", sl.bias, shape_text(b->info->shape),
                       shape_text(m.bias->info->shape), sl.tensor_row, sl.tensor_row + sl.n_rows),
           fit_issue::shape});
  }
}

// A LyCORIS delta (core/lycoris-delta) against its base tensor: the same
// [rows, cols] view and kernel; the kind follows the base (never transposed).
void check_lycoris_shape(lora_module& m, const tensor_info& w, const std::string& file,
                         std::vector<fit_problem>& problems) {
  const std::vector<int64_t> made = lycoris_delta_shape(m, file);
  if (!lycoris_delta_fits(made, w.shape)) {
    problems.push_back({m.a.info->name,
                        fmt::format("base {} is {}, the {} makes {}", m.target, shape_text(w.shape),
                                    delta_form_name(m.form), shape_text(made)),
                        fit_issue::shape});
    return;
  }
  m.kind = w.shape.size() == 2 ? module_kind::linear : module_kind::conv;
  m.fan_in_fan_out = false;
}

// transformers models whose fused experts are stored [E, in, out]
// (use_experts_implementation(is_transposed=True): gpt-oss).
constexpr std::string_view transposed_experts_model_types[] = {"gpt_oss"};

// A target_parameters module (PEFT ParamWrapper, tuners/lora/layer.py @
// 5d602fdb) against the parameter `w`: 2-D [out, in] (one expert), or 3-D
// [E, out, in] / [E, in, out] (is_transposed experts) with E = n_experts;
// lora_A [r E, in], lora_B [out, r E]. A square expert is decided by
// model_type (gpt_oss: [E, in, out]), else [E, out, in] (transformers'
// default). Sets fan_in_fan_out for the [E, in, out] layout.
void check_parameter(lora_module& m, const tensor_info& w, const std::optional<std::string>& model_type,
                     std::vector<fit_problem>& problems) {
  const int64_t out = m.b.info->shape[0];
  const int64_t in = m.a.info->shape[1];
  const int64_t e = m.n_experts;
  const bool fits_2d = w.shape.size() == 2 && e == 1 && w.shape == std::vector<int64_t>{out, in};
  const bool plain = w.shape == std::vector<int64_t>{e, out, in};
  const bool transposed = w.shape == std::vector<int64_t>{e, in, out};
  if (!fits_2d && !plain && !transposed) {
    const std::vector<int64_t> made = w.shape.size() == 2 ? std::vector<int64_t>{out, in} : std::vector<int64_t>{e, out, in};
    problems.push_back({m.a.info->name,
                        fmt::format("base parameter {} is {}, the lora.ParamWrapper factors (lora_A {}, lora_B {}, "
                                    "r {}) make {} experts of [{}, {}] (or [{}, {}])",
                                    m.target, shape_text(w.shape), shape_text(m.a.info->shape),
                                    shape_text(m.b.info->shape), m.rank, e, out, in, in, out),
                        fit_issue::shape, m.target, w.shape, made});
    return;
  }
  if (plain && transposed)
    m.fan_in_fan_out = model_type && std::find(std::begin(transposed_experts_model_types),
                                               std::end(transposed_experts_model_types),
                                               *model_type) != std::end(transposed_experts_model_types);
  else
    m.fan_in_fan_out = transposed;
}

// DoRA magnitude length and lora_B bias against the base.
void check_extras(const lora_module& m, const model_files& base, std::vector<fit_problem>& problems) {
  const int64_t out = m.b.info->shape[0];
  if (m.magnitude && static_cast<int64_t>(m.magnitude->info->n_elements) != out)
    problems.push_back({m.magnitude->info->name,
                        fmt::format("DoRA magnitude has {} elements, the delta has {} output features",
                                    m.magnitude->info->n_elements, out),
                        fit_issue::inconsistent});
  if (!m.bias) return;
  const std::string bias_name = m.name + ".bias";
  const tensor_ref* base_b = base.find_ref(bias_name);
  if (base_b == nullptr)
    problems.push_back({m.bias->info->name, fmt::format("the base has no {} for the lora_B bias", bias_name),
                        fit_issue::no_base_tensor});
  else if (base_b->info->shape != m.bias->info->shape)
    problems.push_back({m.bias->info->name,
                        fmt::format("base {} is {}, the lora_B bias is {}", bias_name, shape_text(base_b->info->shape),
                                    shape_text(m.bias->info->shape)),
                        fit_issue::shape});
}

// modules_to_save replace their base tensor: same shape, or an embedding /
// head with more rows (added tokens). A tensor the base lacks is a new head
// (or, on a tied base, the untied lm_head): the merge adds it.
void check_saved(const adapter& a, const model_files& base, std::vector<fit_problem>& problems) {
  for (const saved_tensor& s : a.saved) {
    const tensor_ref* base_t = base.find_ref(s.target);
    if (base_t == nullptr)
      if (const std::optional<std::string> e = tied_head_source(base, s.target)) base_t = base.find_ref(*e);
    if (base_t == nullptr || base_t->info->shape == s.tensor.info->shape) continue;
    if (!saved_shape_ok(s.target, base_t->info->shape, s.tensor.info->shape))
      problems.push_back({s.tensor.info->name,
                          fmt::format("base {} is {}, the saved module is {}", s.target,
                                      shape_text(base_t->info->shape), shape_text(s.tensor.info->shape)),
                          fit_issue::shape, s.target, base_t->info->shape, s.tensor.info->shape});
  }
}

// trainable_token_indices: the rows replace rows of a 2-D base weight of the
// same width, every index in range; no LoRA module or modules_to_save tensor
// changes that weight too (PEFT refuses modules_to_save beside it; a LoRA on
// the same embedding has no defined order), nor, on a tied base, the head
// that follows the embedding.
void check_tokens(const adapter& a, const model_files& base, std::vector<fit_problem>& problems) {
  for (const token_rows& t : a.tokens) {
    const std::string& key = t.values.info->name;
    const tensor_ref* w = base.find_ref(t.target);
    if (w == nullptr) {
      problems.push_back({key, fmt::format("the base has no tensor {} (trainable_token_indices)", t.target),
                          fit_issue::no_base_tensor, t.target});
      continue;
    }
    const auto& ws = w->info->shape;
    const auto& vs = t.values.info->shape;
    if (ws.size() != 2 || vs[1] != ws[1]) {
      problems.push_back({key,
                          fmt::format("base {} is {}, the trainable tokens delta is {} (rows of width {})", t.target,
                                      shape_text(ws), shape_text(vs), vs[1]),
                          fit_issue::shape, t.target, ws, std::vector<int64_t>{ws.empty() ? 0 : ws[0], vs[1]}});
      continue;
    }
    for (int64_t i : t.indices)
      if (i >= ws[0]) {
        problems.push_back({key,
                            fmt::format("token index {} is out of range: base {} has {} rows", i, t.target, ws[0]),
                            fit_issue::inconsistent, t.target});
        break;
      }
    const bool tied_head = base_ties_embeddings(base) && !is_head_leaf(module_leaf(t.target));
    for (const lora_module& m : a.modules)
      if (m.target == t.target || (tied_head && tied_head_source(base, m.target) == t.target))
        problems.push_back({key,
                            fmt::format("{} is also changed by the LoRA module {}{}: trainable_token_indices beside "
                                        "it is not supported",
                                        t.target, m.name, m.target == t.target ? "" : " (the tied head)"),
                            fit_issue::conflict});
    for (const saved_tensor& s : a.saved)
      if (s.target == t.target || (tied_head && tied_head_source(base, s.target) == t.target))
        problems.push_back({key, fmt::format("{} is also replaced by modules_to_save {}", t.target, s.target),
                            fit_issue::conflict});
  }
}

// A vocabulary difference: an embedding or head whose shapes differ in the
// vocabulary dimension only (dim 0 of the base's [vocab, dim]).
const fit_problem* vocab_problem(const fit_report& report) {
  for (const fit_problem& p : report.problems)
    if (p.issue == fit_issue::shape && is_vocab_tensor(p.target) && p.base_shape.size() == 2 &&
        p.adapter_shape.size() == 2 && p.base_shape[1] == p.adapter_shape[1] && p.base_shape[0] != p.adapter_shape[0])
      return &p;
  return nullptr;
}

// One hint for the whole report, from what its problems show.
std::string fit_hint(const fit_report& report) {
  auto first = [&](fit_issue kind) -> const fit_problem* {
    for (const fit_problem& p : report.problems)
      if (p.issue == kind) return &p;
    return nullptr;
  };
  const fit_problem* missing = first(fit_issue::no_base_tensor);
  const fit_problem* shape = first(fit_issue::shape);
  if (!report.other_components.empty())
    return fmt::format(
        "the adapter's {} modules belong to another component; merge into the pipeline folder, or pass "
        "--skip-unmatched",
        fmt::join(report.other_components, " and "));
  if (!report.closest_layout.empty())
    return fmt::format("the names differ from the base's by a prefix: {}; none of the known layouts fits them all",
                       report.closest_layout);
  if (const fit_problem* v = vocab_problem(report))
    return fmt::format(
        "the vocabularies differ: the base's {} has {} rows, the adapter's {}; an adapter trained with "
        "added tokens saves its resized embeddings in modules_to_save",
        v->target, v->base_shape[0], v->adapter_shape[0]);
  if (missing != nullptr && report.base_ties_embeddings && module_leaf(missing->target) == "lm_head")
    return fmt::format("the base ties its output head to the input embedding and stores no {}", missing->target);
  if (shape != nullptr && !shape->base_shape.empty()) {
    // the first problem already shows its shapes; name them when it is another one
    if (shape == &report.problems.front())
      return "does the adapter belong to this base model? its shapes are a model of another size or family";
    return fmt::format(
        "does the adapter belong to this base model? its shapes are a model of another size or "
        "family: base {} is {}, the adapter makes {}",
        shape->target, shape_text(shape->base_shape), shape_text(shape->adapter_shape));
  }
  if (shape != nullptr) return "does the adapter belong to this base model?";
  if (missing != nullptr && report.n_targets > 0) {
    size_t n_missing = 0;
    for (const fit_problem& p : report.problems) n_missing += p.issue == fit_issue::no_base_tensor;
    if (n_missing >= report.n_targets)
      return fmt::format(
          "does the adapter belong to this base model? none of its {} targets is in the base "
          "(first {}): a model of another family or layout",
          report.n_targets, missing->target.empty() ? missing->key : missing->target);
  }
  if (missing != nullptr) return "does the adapter belong to this base model?";
  if (first(fit_issue::orientation) != nullptr)
    return "set fan_in_fan_out in adapter_config.json, or give the base a config.json with its model_type";
  return {};
}

}  // namespace

bool stored_in_out(const std::optional<std::string>& model_type, std::string_view module) {
  return is_conv1d_model_type(model_type) && conv1d_style_name(module);
}

std::optional<std::string> tied_head_source(const model_files& base, const std::string& target) {
  if (module_leaf(target) != "lm_head" || !target.ends_with(".weight") || base.find_ref(target) != nullptr ||
      !base_ties_embeddings(base))
    return std::nullopt;
  for (const std::string& n : base.tensor_names)
    if (n.ends_with(".weight") && is_vocab_tensor(n) && !is_head_leaf(module_leaf(n))) return n;
  return std::nullopt;
}

bool saved_shape_ok(const std::string& target, const std::vector<int64_t>& base_shape,
                    const std::vector<int64_t>& saved_shape) {
  if (saved_shape == base_shape) return true;
  return target.ends_with(".weight") && is_vocab_tensor(target) && base_shape.size() == 2 && saved_shape.size() == 2 &&
         saved_shape[1] == base_shape[1] && saved_shape[0] > base_shape[0];
}

fit_report fit_adapter(adapter& a, const model_files& base, bool skip_unmatched) {
  fit_report report;
  auto& problems = report.problems;
  std::optional<std::string> model_type;
  if (!base.config_path.empty()) model_type = read_model_type(base.config_path);

  const name_map names(base.tensor_names, [&base](const std::string& n) -> const std::vector<int64_t>* {
    const tensor_ref* t = base.find_ref(n);
    return t ? &t->info->shape : nullptr;
  });
  report.n_targets = a.modules.size() + a.saved.size() + a.tokens.size();
  report.base_ties_embeddings = base_ties_embeddings(base);
  if (a.format == adapter_format::kohya)
    resolve_kohya(a, names, problems);
  else
    resolve_paths(a, names, base, report, skip_unmatched);
  std::sort(a.modules.begin(), a.modules.end(),
            [](const lora_module& x, const lora_module& y) { return x.name < y.name; });
  check_claims(a, problems);
  for (lora_module& m : a.modules) {
    if (m.target.empty()) continue;
    if (!m.slices.empty()) {
      check_slices(m, base, a.weights_path, problems);
      continue;
    }
    const tensor_ref* base_w = base.find_ref(m.target);
    // a tied base's head: the delta applies to the embedding's values
    if (base_w == nullptr)
      if (const std::optional<std::string> e = tied_head_source(base, m.target)) base_w = base.find_ref(*e);
    if (base_w == nullptr) {
      problems.push_back({m.a.info->name,
                          m.kind == module_kind::parameter
                              ? fmt::format("the base has no parameter {} (named by target_parameters)", m.target)
                              : fmt::format("the base has no tensor {}", m.target),
                          fit_issue::no_base_tensor, m.target});
      continue;
    }
    if (m.kind == module_kind::parameter)
      check_parameter(m, *base_w->info, model_type, problems);
    else if (m.form != delta_form::low_rank)
      check_lycoris_shape(m, *base_w->info, a.weights_path, problems);
    else
      check_shape(m, *base_w->info, model_type, problems);
    check_extras(m, base, problems);
  }
  check_saved(a, base, problems);
  check_tokens(a, base, problems);
  return report;
}

error fit_error(const std::string& adapter_path, const std::string& base_path, const fit_report& report) {
  const size_t n = report.problems.size();
  if (n == 0)
    return errors::invalid(adapter_path, "", fmt::format("does not fit {}: no problem was reported", base_path));
  const fit_problem& first = report.problems.front();
  std::string what =
      n == 1 ? fmt::format("does not fit {}: 1 problem: {}: {}", base_path, first.key, first.what)
             : fmt::format("does not fit {}: {} problems, first {}: {}", base_path, n, first.key, first.what);
  if (const std::string hint = fit_hint(report); !hint.empty()) what += fmt::format(" ({})", hint);
  return errors::invalid(adapter_path, "", what);
}

void require_whole_targets(const adapter& a, std::string_view command) {
  for (const lora_module& m : a.modules)
    if (!m.slices.empty())
      throw errors::invalid(
          a.path, m.a.info->name,
          fmt::format("{}: module {} changes rows [{}, {}) of the base's fused {}; the base has no "
                      "module of its own for it (merge and verify apply it; {} without --base "
                      "keeps the adapter's names)",
                      command, m.name, m.slices.front().tensor_row,
                      m.slices.front().tensor_row + m.slices.front().n_rows, m.slices.front().tensor, command));
}

void require_fit(adapter& a, const model_files& base) {
  const fit_report report = fit_adapter(a, base);
  if (!report.ok()) throw fit_error(a.path, base.path, report);
}

std::vector<std::string> require_fit_skipping(adapter& a, const model_files& base) {
  fit_report report = fit_adapter(a, base, true);
  // the keys a module that maps to nothing is reported under: its kohya name
  // (resolve_kohya) or its A factor's key (a dotted target the base lacks)
  std::set<std::string> unmatched;
  for (const fit_problem& p : report.problems)
    if (p.issue == fit_issue::no_base_tensor) unmatched.insert(p.key);
  std::vector<std::string> skipped;
  std::vector<lora_module> kept;
  for (lora_module& m : a.modules) {
    if (unmatched.count(m.name) || unmatched.count(m.a.info->name)) {
      skipped.push_back(m.name);
      unmatched.erase(m.name);
      unmatched.erase(m.a.info->name);
      continue;
    }
    kept.push_back(std::move(m));
  }
  a.modules = std::move(kept);
  // every other problem still refuses the adapter
  std::vector<fit_problem> rest;
  for (fit_problem& p : report.problems)
    if (p.issue != fit_issue::no_base_tensor || unmatched.count(p.key)) rest.push_back(std::move(p));
  report.problems = std::move(rest);
  if (!report.ok()) throw fit_error(a.path, base.path, report);
  if (a.modules.empty() && a.saved.empty())
    throw errors::invalid(
        a.path, "",
        fmt::format("no module of the adapter matches a tensor of {} ({} skipped)", base.path, skipped.size()));
  std::sort(skipped.begin(), skipped.end());
  return skipped;
}

}  // namespace lora
