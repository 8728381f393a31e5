#include "core/verify.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>

#include <fmt/format.h>

#include "core/adapter.h"
#include "core/delta.h"
#include "core/dtype.h"
#include "core/llama.h"
#include "formats/error.h"
#include "formats/hf-config.h"
#include "formats/model-files.h"
#include "formats/safetensors.h"

namespace lora {

namespace {

std::vector<double> read_f64(const tensor_ref& t) {
  std::vector<double> v(t.info->n_elements);
  to_f64(t.info->type, t.data(), v);
  return v;
}

// One unit in the last place of `type` at magnitude x (subnormal spacing near 0).
double ulp(dtype type, double x) {
  const int mant = type == dtype::BF16 ? 7 : type == dtype::F16 ? 10 : 23;
  const int min_exp = type == dtype::F16 ? -14 : -126;
  const int e = x > 0 ? std::max(static_cast<int>(std::floor(std::log2(x))), min_exp) : min_exp;
  return std::ldexp(1.0, e - mant);
}

// expected vs merged: tolerance = 2 ulp(|E|) + ulp(|dW|) (a second rounding
// of the delta, as PEFT does) + f32 slack (rank + 4) 2^-24 (|W0| + |E| + |dW| + T_row),
// T_row = |s| sum_k |B A terms| of the row (delta_row_bounds): the f32 sum's error.
tensor_check compare(const std::string& name, const std::string& kind, const std::vector<double>& w0,
                     const std::vector<double>& expected, const std::vector<double>& merged, dtype type, int64_t rank,
                     const std::vector<double>& row_bounds = {}) {
  tensor_check c{name, kind};
  const double eps32 = std::ldexp(1.0, -24) * static_cast<double>(rank + 4);
  for (size_t i = 0; i < expected.size(); ++i) {
    const double e = expected[i], d = std::fabs(e - w0[i]);
    const double terms = row_bounds.empty() ? 0.0 : row_bounds[i / (expected.size() / row_bounds.size())];
    const double tol = 2 * ulp(type, std::fabs(e)) + ulp(type, d) + eps32 * (std::fabs(w0[i]) + std::fabs(e) + d + terms);
    const double err = std::fabs(merged[i] - e);
    const double ratio = std::isnan(err) ? INFINITY : err / tol;
    if (ratio > 1) ++c.n_bad;
    if (ratio > c.ratio || std::isnan(err)) {
      c.ratio = ratio;
      c.max_error = err;
      c.tolerance = tol;
    }
  }
  c.ok = c.n_bad == 0;
  return c;
}

}  // namespace

verify_report verify_merge(const verify_options& o) {
  verify_report r;
  // 1. inputs; the adapter must fit the base
  model_files base = open_model(o.base);
  model_files merged = open_model(o.merged);
  adapter a = load_adapter(o.adapter);
  fit_report fit = fit_adapter(a, base);
  if (!fit.ok())
    throw errors::invalid(o.adapter, fit.problems.front().key,
                          fit.problems.front().what + " (does the adapter belong to this base model?)");
  std::map<std::string, const lora_module*> modules, bias_modules;
  std::map<std::string, const tensor_ref*> saved;
  for (const lora_module& m : a.modules) {
    modules[m.target] = &m;
    if (m.bias) bias_modules[m.name + ".bias"] = &m;
  }
  for (const saved_tensor& s : a.saved) saved[s.target] = &s.tensor;

  // 2. weight level: every base tensor against its expected value
  for (const std::string& name : base.tensor_names) {
    tensor_ref b = base.at(name);
    std::optional<tensor_ref> m = merged.find(name);
    tensor_check c{name, "missing"};
    if (!m) { c.ok = false; r.tensors.push_back(c); continue; }
    if (m->info->shape != b.info->shape) { c.kind = "shape"; c.ok = false; r.tensors.push_back(c); continue; }
    ++r.n_checked;
    const bool math = dtype_is_math(b.info->type) && dtype_is_math(m->info->type);
    const bool touched = modules.count(name) || saved.count(name) || bias_modules.count(name);
    if (!touched || !math) {
      // untouched: equal to the base (byte for byte, or value for value after a dtype change)
      c.kind = "untouched";
      if (b.info->type == m->info->type) {
        auto x = b.data(), y = m->data();
        c.ok = std::equal(x.begin(), x.end(), y.begin(), y.end());
        c.n_bad = c.ok ? 0 : 1;
      } else if (math) {
        std::vector<double> x = read_f64(b), y = read_f64(*m);
        std::vector<uint8_t> buf(x.size() * static_cast<size_t>(math_dtype_size(m->info->type)));
        from_f64(m->info->type, x, buf);
        std::vector<double> xr(x.size());
        to_f64(m->info->type, buf, xr);
        for (size_t i = 0; i < x.size(); ++i)
          if (!(xr[i] == y[i]) && !(std::isnan(xr[i]) && std::isnan(y[i]))) {
            ++c.n_bad;
            c.max_error = std::max(c.max_error, std::fabs(xr[i] - y[i]));
          }
        c.ok = c.n_bad == 0;
      } else {
        c.ok = false;
      }
      if (!c.ok) c.ratio = INFINITY;
      r.tensors.push_back(c);
      continue;
    }
    // touched: expected E in f64 through core/delta
    std::vector<double> w0 = read_f64(b), e = w0;
    int64_t rank = 0;
    std::vector<double> row_bounds;
    if (auto s = saved.find(name); s != saved.end()) {
      c.kind = "replaced";
      e = read_f64(*s->second);
      w0 = e;
    } else if (auto bm = bias_modules.find(name); bm != bias_modules.end()) {
      c.kind = "bias";
      add_bias_delta(*bm->second, 1.0, std::span<double>(e), a.weights_path);
    } else {
      c.kind = "merged";
      const lora_module& mod = *modules.at(name);
      delta_factors_f64 f = load_delta_factors_f64(mod, b.info->shape, a.weights_path);
      apply_module_rows(f, 1.0, 0, f.n_rows, e.data());
      rank = f.rank;
      row_bounds = delta_row_bounds(load_delta_factors(mod, b.info->shape, a.weights_path));
      if (f.dora) {
        // DoRA rescales V by m / ||V||: the slack scales with it (|E| / |V| per element, at least 1)
        std::vector<double> v = w0;
        add_delta_rows(f, 1.0, 0, f.n_rows, v.data());
        double gain = 1;
        for (size_t i = 0; i < v.size(); ++i)
          if (v[i] != 0) gain = std::max(gain, std::fabs(e[i] / v[i]));
        for (double& x : row_bounds) x *= gain;
      }
    }
    tensor_check cc = compare(name, c.kind, w0, e, read_f64(*m), m->info->type, rank, row_bounds);
    r.tensors.push_back(cc);
  }
  for (const std::string& name : merged.tensor_names)
    if (!base.find(name)) r.tensors.push_back({name, "extra", 0, 0, INFINITY, 1, false});

  // 3. model level, for a supported architecture
  std::optional<std::string> mt;
  if (!base.config_path.empty()) mt = parse_model_type(read_text_file(base.config_path), base.config_path);
  if (!mt || !is_supported_architecture(*mt) || merged.config_path.empty()) {
    r.model.skipped = mt ? fmt::format("model_type {} has no forward pass", *mt) : "no config.json";
  } else {
    const hf_config cb = read_hf_config(base.config_path), cm = read_hf_config(merged.config_path);
    std::vector<int64_t> tokens = o.tokens;
    if (tokens.empty()) {
      std::mt19937_64 rng(1234);
      for (int i = 0; i < 16; ++i) tokens.push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(cb.vocab_size)));
    }
    logits_result x = llama_forward(base, cb, &a, tokens, o.threads);
    logits_result y = llama_forward(merged, cm, nullptr, tokens, o.threads);
    model_check& mc = r.model;
    mc.ran = true;
    mc.n_tokens = x.n_tokens;
    double big = 0;
    int64_t agree = 0;
    for (size_t i = 0; i < x.logits.size(); ++i) {
      mc.max_abs = std::max(mc.max_abs, static_cast<double>(std::fabs(x.logits[i] - y.logits[i])));
      big = std::max(big, static_cast<double>(std::fabs(x.logits[i])));
    }
    for (int64_t p = 0; p < x.n_tokens; ++p) agree += top_k(x, p, 1)[0].first == top_k(y, p, 1)[0].first;
    mc.max_rel = big > 0 ? mc.max_abs / big : mc.max_abs;
    mc.top1_agreement = static_cast<double>(agree) / static_cast<double>(x.n_tokens);
    // the merged weights' own rounding: relative 2^-5 for bf16, 2^-8 for f16, 1e-4 for f32
    dtype wt = merged.at(merged.tensor_names.front()).info->type;
    mc.tolerance = wt == dtype::BF16 ? 0x1p-5 : wt == dtype::F16 ? 0x1p-8 : 1e-4;
    mc.ok = mc.max_rel <= mc.tolerance;
  }

  // 4. verdict
  std::stable_sort(r.tensors.begin(), r.tensors.end(), [](const auto& p, const auto& q) { return p.ratio > q.ratio; });
  for (const auto& c : r.tensors) r.n_failed += !c.ok;
  r.equivalent = r.n_failed == 0 && r.model.ok;
  return r;
}

}  // namespace lora
