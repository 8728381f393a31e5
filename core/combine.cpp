#include "core/combine.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include <fmt/format.h>

#include "core/adapter-data.h"
#include "core/adapter-write.h"
#include "core/delta.h"
#include "core/dtype.h"
#include "core/kohya-format.h"
#include "core/thread-pool.h"
#include "formats/error.h"
#include "formats/staged-folder.h"

namespace lora {

namespace {

// How combine's exact stacking carries a part's weight * scale c: all of it
// on B (c B_i, A_i untouched: one rounding, A's bytes kept) when max |c B_i|
// fits `type`; else split so that both factors peak alike,
// c_b = sqrt(|c| max|A_i| / max|B_i|), c_a = c / c_b (c_b B_i)(c_a A_i) = c B_i A_i,
// which keeps the factors finite whenever sqrt(|c| max|B_i| max|A_i|) fits.
struct scale_split {
  double b = 1, a = 1;
};
scale_split split_scale(double c, std::span<const double> b, std::span<const double> a, dtype type) {
  double b_max = 0, a_max = 0;
  for (double v : b) b_max = std::max(b_max, std::fabs(v));
  for (double v : a) a_max = std::max(a_max, std::fabs(v));
  if (std::fabs(c) * b_max <= max_finite(type) || a_max == 0 || b_max == 0) return {c, 1.0};
  const double cb = std::sqrt(std::fabs(c) * (a_max / b_max));
  return {cb, c / cb};
}

// One module of one input adapter.
struct part {
  size_t adapter;
  const lora_module* module;
};

// The inputs, loaded; with a base every adapter is fitted and the kohya name
// of each resolved module kept in `kohya_names` (dotted path -> kohya name).
std::vector<adapter> load_inputs(const combine_options& o, std::map<std::string, std::string>& kohya_names) {
  std::vector<adapter> ins;
  for (const combine_input& c : o.adapters) ins.push_back(load_adapter(c.path));
  if (o.base.empty()) {
    for (const adapter& a : ins)
      if (a.format != ins.front().format)
        throw errors::usage(fmt::format(
            "{} is a {} adapter and {} a {} one: give --base MODEL to match kohya names to "
            "module paths",
            ins.front().path, adapter_format_name(ins.front().format), a.path, adapter_format_name(a.format)));
    return ins;
  }
  model_files base = open_model(o.base);
  for (adapter& a : ins) {
    std::map<const tensor_info*, std::string> before;
    for (const lora_module& m : a.modules) before[m.a.info] = m.name;
    require_fit(a, base);
    require_whole_targets(a, "combine");
    if (a.format == adapter_format::kohya)
      for (const lora_module& m : a.modules) kohya_names.emplace(m.name, before[m.a.info]);
  }
  return ins;
}

// What combine cannot do (DoRA: not a sum of deltas; modules_to_save), and the
// output dtype: the inputs' when they share one, else F32.
dtype check_combinable(const std::vector<adapter>& ins) {
  std::set<dtype> dtypes;
  for (const adapter& a : ins) {
    require_low_rank(a, "combine");
    for (const lora_module& m : a.modules) {
      if (m.dora)
        throw errors::invalid(a.weights_path, m.magnitude->info->name,
                              "DoRA modules cannot be combined (the result is not a sum of LoRA deltas)");
      check_finite_factors(m, a.weights_path);
      dtypes.insert(m.a.info->type);
      dtypes.insert(m.b.info->type);
    }
    if (!a.saved.empty())
      throw errors::invalid(
          a.weights_path, a.saved.front().tensor.info->name,
          "modules_to_save tensors cannot be combined (they replace a base tensor, they are not deltas)");
  }
  return dtypes.size() == 1 ? *dtypes.begin() : dtype::F32;
}

// Every part of one module must make the same delta shape and layout.
void check_same_delta(const std::string& name, const std::vector<part>& parts, const std::vector<adapter>& ins) {
  const lora_module& first = *parts.front().module;
  // A's columns: linear / embedding compare in (a fitted kohya 1x1 conv on a
  // Linear is [r, in, 1, 1]), conv compares [in, kh, kw]
  auto tail = [](const lora_module& lm) {
    const std::vector<int64_t>& s = lm.a.info->shape;
    if (lm.kind != module_kind::conv) return std::vector<int64_t>{n_elements(s) / lm.rank};
    return std::vector<int64_t>(s.begin() + 1, s.end());
  };
  for (const part& p : parts) {
    const lora_module& m = *p.module;
    const bool same = m.kind == first.kind && m.fan_in_fan_out == first.fan_in_fan_out && tail(m) == tail(first) &&
                      m.b.info->shape[0] == first.b.info->shape[0];
    if (!same)
      throw errors::invalid(
          ins[p.adapter].weights_path, m.a.info->name,
          fmt::format("module {} cannot be combined: {} {} with B {} here, {} {} with B {} in {}{}", name,
                      module_kind_name(m.kind), shape_text(m.a.info->shape), shape_text(m.b.info->shape),
                      module_kind_name(first.kind), shape_text(first.a.info->shape), shape_text(first.b.info->shape),
                      ins[parts.front().adapter].weights_path,
                      m.fan_in_fan_out != first.fan_in_fan_out ? " (fan_in_fan_out differs)" : ""));
  }
}

// The output modules (names and kinds, in name order) and, for each, its parts.
std::vector<std::vector<part>> plan_modules(const std::vector<adapter>& ins, const combine_options& o,
                                            const std::map<std::string, std::string>& kohya_names, adapter_data& out) {
  std::map<std::string, std::vector<part>> groups;
  for (size_t i = 0; i < ins.size(); ++i)
    for (const lora_module& m : ins[i].modules) groups[m.name].push_back({i, &m});
  for (const adapter& a : ins)
    if (a.config) {
      out.config.task_type = a.config->task_type;
      out.config.base_model_name_or_path = a.config->base_model_name_or_path;
      break;
    }
  std::vector<std::vector<part>> jobs;
  for (auto& [name, parts] : groups) {
    check_same_delta(name, parts, ins);
    module_data md;
    md.name = name;
    md.kind = parts.front().module->kind;
    if (out.format == adapter_format::kohya)
      if (auto it = kohya_names.find(name); it != kohya_names.end()) md.name = it->second;
    out.modules.push_back(std::move(md));
    jobs.push_back(parts);
  }
  if (out.format == adapter_format::kohya)
    out.kohya_prefix = kohya::resolve_prefix(o.kohya_prefix, sorted_names(out.modules));
  if (out.format == adapter_format::peft) {
    std::set<bool> fif;
    for (const auto& parts : jobs) fif.insert(parts.front().module->fan_in_fan_out);
    out.config.fan_in_fan_out = fif.count(true) > 0;
    if (fif.size() > 1)
      throw errors::invalid(
          o.adapters.front().path, "",
          "some modules are fan_in_fan_out (GPT-2 Conv1D) and some not: one PEFT config cannot say both");
    out.config.target_modules = sorted_names(out.modules);
  }
  return jobs;
}

// The stacked factors of one module: B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...]
// [m, R], A = [A_1; A_2; ...] [R, n], and the summed lora_B bias (empty: none).
struct stacked {
  factors f;
  std::vector<double> bias;
  std::string files;  // the adapters of this module, for messages
};
stacked stack_parts(const std::vector<part>& parts, const std::vector<adapter>& ins, const combine_options& o,
                    const std::string& name, dtype out_type) {
  const lora_module& first = *parts.front().module;
  stacked s;
  const int64_t m = first.b.info->shape[0];
  const int64_t n = static_cast<int64_t>(first.a.info->n_elements) / first.rank;
  int64_t total_rank = 0;
  for (const part& p : parts) {
    total_rank += p.module->rank;
    s.files += (s.files.empty() ? "" : " + ") + ins[p.adapter].weights_path;
  }
  s.f = {m, n, total_rank, std::vector<double>(static_cast<size_t>(m * total_rank)),
         std::vector<double>(static_cast<size_t>(total_rank * n))};
  int64_t col = 0;
  for (const part& p : parts) {
    const lora_module& lm = *p.module;
    const double w = o.adapters[p.adapter].weight * lm.scale;
    if (!std::isfinite(w))
      throw errors::invalid(
          ins[p.adapter].weights_path, name,
          fmt::format("weight {:.3g} * scale {:.3g} overflows f64", o.adapters[p.adapter].weight, lm.scale));
    const int64_t r = lm.rank;
    std::vector<double> bi = values_f64(lm.b.info->type, lm.b.data(), m * r);
    std::vector<double> ai = values_f64(lm.a.info->type, lm.a.data(), r * n);
    const scale_split sp = split_scale(w, bi, ai, out_type);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < r; ++c) s.f.b[i * total_rank + col + c] = sp.b * bi[i * r + c];
    for (int64_t e = 0; e < r * n; ++e) s.f.a[col * n + e] = sp.a * ai[e];
    col += r;
    // lora_B bias: sum_i w_i s_i b_i
    if (lm.bias) {
      std::vector<double> v = values_f64(lm.bias->info->type, lm.bias->data(), m);
      s.bias.resize(static_cast<size_t>(m), 0.0);
      for (int64_t i = 0; i < m; ++i) s.bias[i] += w * v[i];
    }
  }
  return s;
}

// One output module from its parts: exact stacking, or recompressed by the rule.
void combine_module(const std::vector<part>& parts, const std::vector<adapter>& ins, const combine_options& o,
                    dtype out_type, module_data& md, module_rank_report& line) {
  const stacked s = stack_parts(parts, ins, o, md.name, out_type);
  const factors& f = s.f;
  const std::vector<int64_t>& as = parts.front().module->a.info->shape;
  const std::vector<int64_t>& bs = parts.front().module->b.info->shape;
  line.name = md.name;
  line.rank_in = f.r;
  if (!o.rule) {
    // exact: the stacked factors as they are
    md.a = make_finite_tensor(out_type, a_shape(as, f.r), f.a, s.files, md.name, "lora_A");
    md.b = make_finite_tensor(out_type, b_shape(bs, f.r), f.b, s.files, md.name, "lora_B");
    md.rank = f.r;
    const double total = std::pow(low_rank_norm(f.b, f.a, f.m, f.n, f.r), 2);
    line.measured_error = measured_error(f, 1.0, md.a, md.b, f.r, total);
  } else {
    recompressed rc =
        named_svd_errors(s.files, md.name, [&] { return recompress(f.b, f.a, f.m, f.n, f.r, 1.0, *o.rule); });
    md.a = make_finite_tensor(out_type, a_shape(as, rc.rank), rc.a, s.files, md.name, "lora_A");
    md.b = make_finite_tensor(out_type, b_shape(bs, rc.rank), rc.b, s.files, md.name, "lora_B");
    md.rank = rc.rank;
    line.energy_kept = rc.energy_fraction();
    line.relative_error = rc.relative_error();
    line.target_reached = rc.target_reached;
    line.measured_error = measured_error(f, 1.0, md.a, md.b, rc.rank, rc.total_energy);
  }
  reshape_to_kind(md);  // linear / embedding 2-D, conv 4-D, whatever the first input's form
  line.rank_out = md.rank;
  md.alpha = static_cast<double>(md.rank);
  if (!s.bias.empty()) md.bias = make_finite_tensor(out_type, {f.m}, s.bias, s.files, md.name, "lora_B bias");
}

}  // namespace

combine_report combine_adapters(const combine_options& o) {
  if (o.adapters.empty()) throw errors::usage("no --adapter given");
  for (const combine_input& c : o.adapters)
    if (!std::isfinite(c.weight)) throw errors::usage(fmt::format("the weight of {} is not finite", c.path));
  std::vector<named_input> inputs{{"base model", o.base}};
  for (const combine_input& c : o.adapters) inputs.push_back({"adapter", c.path});
  check_output(o.out, inputs, o.force);

  std::map<std::string, std::string> kohya_names;  // dotted module -> original kohya name
  const std::vector<adapter> ins = load_inputs(o, kohya_names);
  adapter_data out;
  out.format = o.format.value_or(ins.front().format);
  if (out.format == adapter_format::peft && o.base.empty() && ins.front().format == adapter_format::kohya)
    throw errors::usage(
        "a PEFT output from kohya adapters needs --base MODEL (kohya names lose the dots of the module paths)");
  const dtype out_type = check_combinable(ins);
  const std::vector<std::vector<part>> jobs = plan_modules(ins, o, kohya_names, out);

  combine_report report;
  report.format = out.format;
  report.out = o.out;
  report.exact = !o.rule.has_value();
  report.out_type = out_type;
  report.modules.resize(jobs.size());
  parallel_for(jobs.size(), 0,
               [&](size_t j) { combine_module(jobs[j], ins, o, out_type, out.modules[j], report.modules[j]); });
  if (out.format == adapter_format::kohya) {
    std::optional<metadata_map> meta;
    for (const adapter& a : ins)
      if (a.format == adapter_format::kohya) {
        meta = a.file->metadata();
        break;
      }
    out.metadata = kohya::metadata_after_rerank(meta, out.modules);
  }
  write_adapter(out, o.out, o.force);
  return report;
}

}  // namespace lora
