// fit_adapter, fit_error, require_fit (declared in core/adapter.h): how an
// adapter fits a base model, and the one rendering of a misfit.
#include <algorithm>
#include <map>

#include <fmt/format.h>

#include "core/adapter.h"
#include "core/lycoris-delta.h"
#include "core/name-map.h"
#include "formats/error.h"
#include "formats/adapter-config.h"

namespace lora {

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

// Every module's base module through the one name map: kohya names resolved
// (m.name becomes the base's dotted path), dotted paths looked up as they are
// and through the layout table. Re-sorts the modules by name.
void resolve_targets(adapter& a, const model_files& base, std::vector<fit_problem>& problems) {
  const name_map names(base.tensor_names);
  for (lora_module& m : a.modules) {
    const bool kohya = a.format == adapter_format::kohya;
    if (kohya && !m.target.empty()) continue;  // already resolved
    const name_lookup found = kohya ? names.find_kohya(m.name) : names.find_path(m.name);
    if (found.modules.empty()) {
      if (kohya)
        problems.push_back(
            {m.name,
             fmt::format("no base tensor matches {} (looked for a \"<module>.weight\" whose dots read as "
                         "underscores give \"{}\")",
                         m.name, found.looked_for),
             fit_issue::no_base_tensor});
      // a dotted path keeps its target: the shape check names what is missing
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
  std::sort(a.modules.begin(), a.modules.end(),
            [](const lora_module& x, const lora_module& y) { return x.name < y.name; });
}

// Every base tensor changed by at most one adapter entry.
void check_claims(const adapter& a, std::vector<fit_problem>& problems) {
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
    m.fan_in_fan_out = is_conv1d_model_type(model_type) && conv1d_style_name(m.name);
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
      std::vector<int64_t> want{sa[1], out};
      if (w.shape != want)
        problems.push_back(
            {m.a.info->name,
             fmt::format("base {} is {}, the embedding LoRA makes {}", m.target, shape_text(w.shape), shape_text(want)),
             fit_issue::shape});
      break;
    }
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

// modules_to_save replace their base tensor: same shape.
void check_saved(const adapter& a, const model_files& base, std::vector<fit_problem>& problems) {
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
}

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

fit_report fit_adapter(adapter& a, const model_files& base) {
  fit_report report;
  auto& problems = report.problems;
  std::optional<std::string> model_type;
  if (!base.config_path.empty()) model_type = read_model_type(base.config_path);

  resolve_targets(a, base, problems);
  check_claims(a, problems);
  for (lora_module& m : a.modules) {
    if (m.target.empty()) continue;
    const tensor_ref* base_w = base.find_ref(m.target);
    if (base_w == nullptr) {
      problems.push_back(
          {m.a.info->name, fmt::format("the base has no tensor {}", m.target), fit_issue::no_base_tensor});
      continue;
    }
    if (m.form != delta_form::low_rank)
      check_lycoris_shape(m, *base_w->info, a.weights_path, problems);
    else
      check_shape(m, *base_w->info, model_type, problems);
    check_extras(m, base, problems);
  }
  check_saved(a, base, problems);
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
  if (const std::string_view hint = fit_hint(report); !hint.empty()) what += fmt::format(" ({})", hint);
  return errors::invalid(adapter_path, "", what);
}

void require_fit(adapter& a, const model_files& base) {
  const fit_report report = fit_adapter(a, base);
  if (!report.ok()) throw fit_error(a.path, base.path, report);
}

}  // namespace lora
