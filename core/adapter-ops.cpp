#include "core/adapter-ops.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <set>

#include <Eigen/Dense>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/adapter-names.h"
#include "core/delta.h"
#include "core/dtype.h"
#include "core/thread-pool.h"
#include "formats/error.h"
#include "formats/mlx-config.h"
#include "formats/staged-folder.h"

namespace lora {

namespace fs = std::filesystem;

namespace {

using mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using const_map = Eigen::Map<const mat>;

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

int64_t n_elements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// x [rows, cols] = q [rows, p] r [p, cols], p = min(rows, cols), q orthonormal.
struct thin_qr {
  mat q;
  mat r;
};
thin_qr qr_of(const mat& x) {
  const Eigen::Index p = std::min(x.rows(), x.cols());
  Eigen::HouseholderQR<mat> qr(x);
  thin_qr out;
  out.q = qr.householderQ() * mat::Identity(x.rows(), p);
  out.r = qr.matrixQR().topRows(p).triangularView<Eigen::Upper>();
  return out;
}

// A tensor's values in f64 (through core/dtype).
std::vector<double> values_f64(dtype type, std::span<const uint8_t> bytes, int64_t n) {
  std::vector<double> out(static_cast<size_t>(n));
  to_f64(type, bytes, out);
  return out;
}

tensor_data make_tensor(dtype type, std::vector<int64_t> shape, std::span<const double> values) {
  tensor_data t;
  t.type = type;
  t.shape = std::move(shape);
  t.bytes.resize(values.size() * static_cast<size_t>(math_dtype_size(type)));
  from_f64(type, values, t.bytes);
  return t;
}

// make_tensor for a tensor about to be written: refuses (exit 3, naming the
// input `file` and `module`) values that do not fit `type` once rounded, so
// that finite inputs never give a NaN / Inf output. `what` names the tensor
// ("lora_A", "lora_B", "lora_B bias").
tensor_data make_finite_tensor(dtype type, std::vector<int64_t> shape, std::span<const double> values,
                               const std::string& file, const std::string& module, std::string_view what) {
  tensor_data t = make_tensor(type, std::move(shape), values);
  if (count_nonfinite(type, t.bytes) == 0) return t;
  double largest = 0;
  for (double v : values) largest = std::max(largest, std::fabs(v));
  throw errors::invalid(file, module,
                        fmt::format("the new {} overflows {}: a value of magnitude {:.3g} (largest finite {:.3g})",
                                    what, dtype_name(type), largest, max_finite(type)));
}

tensor_data copy_tensor(const tensor_ref& r) {
  tensor_data t;
  t.type = r.info->type;
  t.shape = r.info->shape;
  auto bytes = r.data();
  t.bytes.assign(bytes.begin(), bytes.end());
  return t;
}

// A module's factors as f64 matrices: b [m, r], a [r, n] (n = all of A's
// trailing dims: a conv kernel is flattened to [r, in * kh * kw]).
struct factors {
  int64_t m = 0, n = 0, r = 0;
  std::vector<double> b, a;
};
factors read_factors(const tensor_data& a, const tensor_data& b, int64_t rank) {
  factors f;
  f.r = rank;
  f.n = n_elements(a.shape) / rank;
  f.m = b.shape[0];
  f.a = values_f64(a.type, a.bytes, rank * f.n);
  f.b = values_f64(b.type, b.bytes, f.m * rank);
  return f;
}

// The shapes of new factors of rank k, like the old ones: A [k, <A's trailing
// dims>], B [m, k(, 1, 1)].
std::vector<int64_t> a_shape(const std::vector<int64_t>& like, int64_t k) {
  std::vector<int64_t> s = like;
  s[0] = k;
  return s;
}
std::vector<int64_t> b_shape(const std::vector<int64_t>& like, int64_t k) {
  std::vector<int64_t> s = like;
  s[1] = k;
  return s;
}

// ||delta - b_new a_new|| / ||delta|| for delta = scale * b a, through the
// stacked factors [scale b | -b_new] [a; a_new] (no full matrix).
double measured_error(const factors& old, double scale, const tensor_data& a_new, const tensor_data& b_new, int64_t k,
                      double total_energy) {
  if (total_energy <= 0) return 0.0;
  const int64_t m = old.m, n = old.n, r = old.r, w = r + k;
  std::vector<double> an = values_f64(a_new.type, a_new.bytes, k * n);
  std::vector<double> bn = values_f64(b_new.type, b_new.bytes, m * k);
  std::vector<double> bc(static_cast<size_t>(m * w)), ac(static_cast<size_t>(w * n));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < r; ++j) bc[i * w + j] = scale * old.b[i * r + j];
    for (int64_t j = 0; j < k; ++j) bc[i * w + r + j] = -bn[i * k + j];
  }
  std::copy(old.a.begin(), old.a.end(), ac.begin());
  std::copy(an.begin(), an.end(), ac.begin() + r * n);
  return low_rank_norm(bc, ac, m, n, w) / std::sqrt(total_energy);
}

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

// kohya metadata after a change of ranks: sd-scripts' ss_network_dim /
// ss_network_alpha ("Dynamic" when they vary, as resize_lora.py writes), the
// model hashes (sshs_*) dropped because they no longer hold.
metadata_map kohya_metadata(const std::optional<metadata_map>& in, const std::vector<module_data>& modules) {
  metadata_map m = in.value_or(metadata_map{});
  m.erase("sshs_model_hash");
  m.erase("sshs_legacy_hash");
  std::set<int64_t> ranks;
  std::set<double> alphas;
  for (const module_data& md : modules) ranks.insert(md.rank), alphas.insert(md.alpha);
  auto py_float = [](double v) { return std::trunc(v) == v ? fmt::format("{}.0", v) : fmt::format("{}", v); };
  m["ss_network_dim"] = ranks.size() == 1 ? fmt::format("{}", *ranks.begin()) : "Dynamic";
  m["ss_network_alpha"] = alphas.size() == 1 ? py_float(*alphas.begin()) : "Dynamic";
  if (!m.count("ss_network_module")) m["ss_network_module"] = "networks.lora";
  return m;
}

// After fit_adapter, a factor's number of dimensions follows the layer:
// linear / embedding A [r, in], B [out, r]; conv B [out, r, 1, 1], A 4-D.
void reshape_to_kind(module_data& m) {
  if (m.kind == module_kind::conv) {
    if (m.a.shape.size() == 2) m.a.shape = {m.a.shape[0], m.a.shape[1], 1, 1};
    if (m.b.shape.size() == 2) m.b.shape = {m.b.shape[0], m.b.shape[1], 1, 1};
  } else {
    if (m.a.shape.size() == 4) m.a.shape = {m.a.shape[0], n_elements(m.a.shape) / m.a.shape[0]};
    if (m.b.shape.size() == 4) m.b.shape = {m.b.shape[0], m.b.shape[1]};
  }
}

std::vector<std::string> sorted_names(const std::vector<module_data>& modules) {
  std::vector<std::string> names;
  for (const module_data& m : modules) names.push_back(m.name);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

// ---------------------------------------------------------------------------
// math

double recompressed::relative_error() const noexcept {
  // sqrt(sum_{i>=k} s_i^2) / ||s B A||: summed from the dropped values, not
  // as total - kept, which cancels to ~sqrt(eps) when nothing is dropped
  if (total_energy <= 0) return 0.0;
  double dropped = 0;
  for (size_t i = static_cast<size_t>(rank); i < s.size(); ++i) dropped += s[i] * s[i];
  return std::sqrt(dropped / total_energy);
}

recompressed recompress(std::span<const double> b, std::span<const double> a, int64_t m, int64_t n, int64_t r,
                        double scale, const rank_rule& rule) {
  // thin QRs: B = Q_B R_B, A^T = Q_A R_A
  const_map bm(b.data(), m, r);
  const_map am(a.data(), r, n);
  thin_qr qb = qr_of(bm);
  thin_qr qa = qr_of(am.transpose());
  // the core C = s R_B R_A^T [p, q] carries every singular value of s B A
  mat core = scale * qb.r * qa.r.transpose();
  if (!std::isfinite(core.squaredNorm()))
    throw errors::invalid("", "",
                          fmt::format("the delta{} is too large: its squared norm overflows f64",
                                      scale == 1.0 ? "" : fmt::format(" s B A (s = {:.3g})", scale)));
  const int64_t p = core.rows(), q = core.cols();
  std::vector<double> c(core.data(), core.data() + core.size());
  low_rank_svd svd = exact_svd(c, p, q, rule);
  lora_pair pair = split_balanced(svd);

  // B' = Q_B (U_k sqrt(S_k)), A' = (sqrt(S_k) V_k^T) Q_A^T
  recompressed out;
  out.rows = m;
  out.cols = n;
  out.rank = pair.rank;
  out.s = svd.s;
  out.total_energy = svd.total_energy;
  out.kept_energy = svd.kept_energy;
  out.target_reached = svd.target_reached;
  const int64_t k = pair.rank;
  mat bn = qb.q * const_map(pair.b.data(), p, k);
  mat an = const_map(pair.a.data(), k, q) * qa.q.transpose();
  out.b.assign(bn.data(), bn.data() + bn.size());
  out.a.assign(an.data(), an.data() + an.size());
  return out;
}

double low_rank_norm(std::span<const double> b, std::span<const double> a, int64_t m, int64_t n, int64_t r) {
  // ||Q_B R_B R_A^T Q_A^T|| = ||R_B R_A^T||
  thin_qr qb = qr_of(const_map(b.data(), m, r));
  thin_qr qa = qr_of(const_map(a.data(), r, n).transpose());
  return (qb.r * qa.r.transpose()).norm();
}

// ---------------------------------------------------------------------------
// reading

adapter_data adapter_to_data(const adapter& a) {
  adapter_data d;
  d.format = a.format;
  if (a.config) {
    d.config = *a.config;
    d.use_rslora = a.config->use_rslora;
  }
  d.metadata = a.file->metadata();
  for (const lora_module& m : a.modules) {
    module_data md;
    md.name = m.name;
    md.kind = m.kind;
    md.a = copy_tensor(m.a);
    md.b = copy_tensor(m.b);
    if (m.magnitude) md.magnitude = copy_tensor(*m.magnitude);
    if (m.bias) md.bias = copy_tensor(*m.bias);
    md.rank = m.rank;
    md.alpha = m.alpha;
    d.modules.push_back(std::move(md));
  }
  for (const saved_tensor& s : a.saved) d.saved.push_back({s.target, copy_tensor(s.tensor)});
  return d;
}

bool is_mlx_adapter(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec))
    return fs::exists(fs::path(path) / "adapters.safetensors", ec) &&
           !fs::exists(fs::path(path) / "adapter_model.safetensors", ec);
  if (!fs::is_regular_file(path, ec)) return false;
  safetensors_file f(path);
  for (const tensor_info& t : f.tensors())
    if (ends_with(t.name, ".lora_a") || ends_with(t.name, ".lora_b")) return true;
  return false;
}

adapter_data load_mlx_adapter(const std::string& path, const model_files* base) {
  // locate adapters.safetensors and adapter_config.json
  std::error_code ec;
  const bool folder = fs::is_directory(path, ec);
  const fs::path weights = folder ? fs::path(path) / "adapters.safetensors" : fs::path(path);
  const fs::path config_path = weights.parent_path() / "adapter_config.json";
  safetensors_file f(weights.string());
  const std::string label = weights.string();
  if (!fs::exists(config_path, ec))
    throw errors::invalid(label, "",
                          "MLX LoRA weights without adapter_config.json beside them (lora_parameters.scale unknown)");
  const mlx_adapter_config cfg = parse_mlx_adapter_config(read_text_file(config_path.string()), config_path.string());
  if (cfg.use_dora || cfg.fine_tune_type == "dora")
    throw errors::invalid(config_path.string(), "fine_tune_type",
                          "an MLX DoRA adapter: only LoRA adapters are converted");
  if (!cfg.fine_tune_type.empty() && cfg.fine_tune_type != "lora")
    throw errors::invalid(config_path.string(), "fine_tune_type",
                          fmt::format("\"{}\": only LoRA adapters are converted", cfg.fine_tune_type));

  // pair lora_a with lora_b
  std::map<std::string, std::pair<const tensor_info*, const tensor_info*>> by_module;
  for (const tensor_info& t : f.tensors()) {
    if (ends_with(t.name, ".lora_a") && t.name.size() > 7)
      by_module[t.name.substr(0, t.name.size() - 7)].first = &t;
    else if (ends_with(t.name, ".lora_b") && t.name.size() > 7)
      by_module[t.name.substr(0, t.name.size() - 7)].second = &t;
    else if (ends_with(t.name, ".m"))
      throw errors::invalid(label, t.name, "DoRA magnitude (.m): MLX DoRA adapters are not converted");
    else
      throw errors::invalid(label, t.name,
                            "unknown key in an MLX LoRA adapter (expected <module>.lora_a and <module>.lora_b)");
  }
  if (by_module.empty()) throw errors::invalid(label, "", "holds no lora_a / lora_b tensors");

  static const std::set<std::string> embedding_names = {"embed_tokens", "wte", "word_embeddings", "tok_embeddings",
                                                        "embed_in"};
  adapter_data d;
  d.format = adapter_format::peft;
  d.metadata = metadata_map{{"format", "pt"}};
  for (const auto& [name, pair] : by_module) {
    const auto [la, lb] = pair;
    if (!la) throw errors::invalid(label, lb->name, "lora_b without its lora_a");
    if (!lb) throw errors::invalid(label, la->name, "lora_a without its lora_b");
    if (la->shape.size() != 2 || lb->shape.size() != 2)
      throw errors::invalid(
          label, la->name,
          fmt::format("lora_a {} and lora_b {}: expected [in, r] and [r, out] (switch / MoE LoRA is not converted)",
                      shape_text(la->shape), shape_text(lb->shape)));
    const int64_t in = la->shape[0], r = la->shape[1], out = lb->shape[1];
    if (lb->shape[0] != r)
      throw errors::invalid(label, lb->name,
                            fmt::format("rank disagrees: lora_a is {} (rank {}), lora_b is {} (rank {})",
                                        shape_text(la->shape), r, shape_text(lb->shape), lb->shape[0]));
    if (r <= 0) throw errors::invalid(label, la->name, "rank 0");
    if (cfg.rank && *cfg.rank != r)
      throw errors::invalid(label, la->name,
                            fmt::format("rank {} from the shapes, but {} says lora_parameters.rank = {}", r,
                                        config_path.string(), *cfg.rank));
    for (const tensor_info* t : {la, lb})
      if (!dtype_is_math(t->type))
        throw errors::invalid(label, t->name, fmt::format("dtype {} is not a float type", dtype_name(t->type)));

    // linear or embedding: the base's shape decides, else the name
    module_data m;
    m.name = name;
    const std::string last = name.substr(name.rfind('.') == std::string::npos ? 0 : name.rfind('.') + 1);
    m.kind = embedding_names.count(last) ? module_kind::embedding : module_kind::linear;
    if (base != nullptr) {
      const tensor_ref* w = base->find_ref(name + ".weight");
      if (w == nullptr)
        throw fit_error(
            label, base->path,
            {{{la->name, fmt::format("the base has no tensor {}.weight", name), fit_issue::no_base_tensor}}});
      const std::vector<int64_t> linear{out, in}, embedding{in, out};
      if (w->info->shape == linear && w->info->shape != embedding)
        m.kind = module_kind::linear;
      else if (w->info->shape == embedding && w->info->shape != linear)
        m.kind = module_kind::embedding;
      else if (w->info->shape != linear)
        throw fit_error(label, base->path,
                        {{{la->name,
                           fmt::format("base {}.weight is {}, the LoRA makes {}", name, shape_text(w->info->shape),
                                       shape_text(linear)),
                           fit_issue::shape}}});
    }

    // transpose: A = lora_a^T [r, in], B = lora_b^T [out, r] (no rounding)
    auto transpose = [](const safetensors_file& file, const tensor_info& t) {
      const int64_t rows = t.shape[0], cols = t.shape[1];
      const size_t es = static_cast<size_t>(dtype_bits(t.type) / 8);
      std::span<const uint8_t> src = file.data(t);
      tensor_data d;
      d.type = t.type;
      d.shape = {cols, rows};
      d.bytes.resize(src.size());
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j)
          std::copy_n(src.data() + (i * cols + j) * es, es, d.bytes.data() + (j * rows + i) * es);
      return d;
    };
    m.a = transpose(f, *la);
    m.b = transpose(f, *lb);
    m.rank = r;
    // scale = alpha / r with alpha = scale * r
    m.alpha = alpha_for_scale(cfg.scale, r, false);
    d.modules.push_back(std::move(m));
  }
  d.config.peft_type = "LORA";
  d.config.target_modules = sorted_names(d.modules);
  d.config.base_model_name_or_path = cfg.model;
  d.config.task_type = "CAUSAL_LM";
  return d;
}

// ---------------------------------------------------------------------------
// resize

resize_report resize_adapter(const resize_options& o) {
  check_output(o.out, {{"adapter", o.adapter}}, o.force);
  adapter in = load_adapter(o.adapter);
  adapter_data out = adapter_to_data(in);
  resize_report report;
  report.format = in.format;
  report.out = o.out;
  report.modules.resize(out.modules.size());
  const std::string& file = in.weights_path;
  for (const lora_module& m : in.modules) check_finite_factors(m, file);

  // every module on its own: recompress s B A, round once to the input dtypes
  parallel_for(out.modules.size(), 0, [&](size_t i) {
    module_data& md = out.modules[i];
    const double scale = in.modules[i].scale;
    const factors f = read_factors(md.a, md.b, md.rank);
    recompressed rc =
        named_svd_errors(file, md.name, [&] { return recompress(f.b, f.a, f.m, f.n, f.r, scale, o.rule); });
    const int64_t k = rc.rank;

    module_rank_report& line = report.modules[i];
    line.name = md.name;
    line.rank_in = md.rank;
    line.rank_out = k;
    line.energy_kept = rc.energy_fraction();
    line.relative_error = rc.relative_error();
    line.target_reached = rc.target_reached;
    line.singular_values = rc.s;
    line.rows = rc.rows;
    line.cols = rc.cols;
    if (k == md.rank) {
      // nothing dropped: the factors stay as they are, bytes and all (new
      // factors would be rounded again to a 16-bit dtype), and so does the
      // scale, as alpha = s r (rsLoRA is off in the output)
      md.alpha = alpha_for_scale(scale, k, false);
      if (!std::isfinite(md.alpha))
        throw errors::invalid(file, md.name,
                              fmt::format("the new alpha = s * r = {:.3g} * {} overflows f64", scale, k));
      // the written delta is s' B A, s' = alpha / r: off by |s' - s| / |s| (an ulp at most)
      const double written = lora_scale(md.alpha, k, false);
      line.measured_error = scale != 0 ? std::fabs(written - scale) / std::fabs(scale) : 0.0;
      return;
    }
    tensor_data a_new = make_finite_tensor(md.a.type, a_shape(md.a.shape, k), rc.a, file, md.name, "lora_A");
    tensor_data b_new = make_finite_tensor(md.b.type, b_shape(md.b.shape, k), rc.b, file, md.name, "lora_B");
    line.measured_error = measured_error(f, scale, a_new, b_new, k, rc.total_energy);

    // the scale is now 1: a lora_B bias takes the old scale (bias' = s b)
    if (md.bias && scale != 1.0) {
      std::vector<double> v = values_f64(md.bias->type, md.bias->bytes, n_elements(md.bias->shape));
      for (double& x : v) x *= scale;
      md.bias = make_finite_tensor(md.bias->type, md.bias->shape, v, file, md.name, "lora_B bias");
    }
    md.a = std::move(a_new);
    md.b = std::move(b_new);
    md.rank = k;
    md.alpha = static_cast<double>(k);
  });
  out.use_rslora = false;
  if (out.format == adapter_format::kohya) out.metadata = kohya_metadata(out.metadata, out.modules);
  write_adapter(out, o.out, o.force);
  return report;
}

// ---------------------------------------------------------------------------
// combine

combine_report combine_adapters(const combine_options& o) {
  if (o.adapters.empty()) throw errors::usage("no --adapter given");
  for (const combine_input& c : o.adapters)
    if (!std::isfinite(c.weight)) throw errors::usage(fmt::format("the weight of {} is not finite", c.path));
  std::vector<named_input> inputs{{"base model", o.base}};
  for (const combine_input& c : o.adapters) inputs.push_back({"adapter", c.path});
  check_output(o.out, inputs, o.force);

  // load; with a base, every adapter is fitted (kohya names resolved)
  std::vector<adapter> ins;
  for (const combine_input& c : o.adapters) ins.push_back(load_adapter(c.path));
  std::map<std::string, std::string> kohya_names;  // dotted module -> original kohya name
  if (!o.base.empty()) {
    model_files base = open_model(o.base);
    for (adapter& a : ins) {
      std::map<const tensor_info*, std::string> before;
      for (const lora_module& m : a.modules) before[m.a.info] = m.name;
      require_fit(a, base);
      if (a.format == adapter_format::kohya)
        for (const lora_module& m : a.modules) kohya_names.emplace(m.name, before[m.a.info]);
    }
  } else {
    for (const adapter& a : ins)
      if (a.format != ins.front().format)
        throw errors::usage(fmt::format(
            "{} is a {} adapter and {} a {} one: give --base MODEL to match kohya names to "
            "module paths",
            ins.front().path, adapter_format_name(ins.front().format), a.path, adapter_format_name(a.format)));
  }
  const adapter_format format = o.format.value_or(ins.front().format);
  if (format == adapter_format::peft && o.base.empty() && ins.front().format == adapter_format::kohya)
    throw errors::usage(
        "a PEFT output from kohya adapters needs --base MODEL (kohya names lose the dots of the module paths)");

  // what combine cannot do: DoRA (not a sum of deltas), modules_to_save
  std::set<dtype> dtypes;
  for (const adapter& a : ins) {
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
  const dtype out_type = dtypes.size() == 1 ? *dtypes.begin() : dtype::F32;

  // group modules by name, in name order
  struct part {
    size_t adapter;
    const lora_module* module;
  };
  std::map<std::string, std::vector<part>> groups;
  for (size_t i = 0; i < ins.size(); ++i)
    for (const lora_module& m : ins[i].modules) groups[m.name].push_back({i, &m});

  adapter_data out;
  out.format = format;
  for (const adapter& a : ins)
    if (a.config) {
      out.config.task_type = a.config->task_type;
      out.config.base_model_name_or_path = a.config->base_model_name_or_path;
      break;
    }
  combine_report report;
  report.format = format;
  report.out = o.out;
  report.exact = !o.rule.has_value();
  report.out_type = out_type;
  std::vector<std::vector<part>> jobs;
  for (auto& [name, parts] : groups) {
    // every part must make the same delta shape and layout
    const lora_module& first = *parts.front().module;
    const adapter& fa = ins[parts.front().adapter];
    for (const part& p : parts) {
      const lora_module& m = *p.module;
      // A's columns: linear / embedding compare in (a fitted kohya 1x1 conv
      // on a Linear is [r, in, 1, 1]), conv compares [in, kh, kw]
      auto tail = [](const lora_module& lm) {
        const std::vector<int64_t>& s = lm.a.info->shape;
        if (lm.kind != module_kind::conv) return std::vector<int64_t>{n_elements(s) / lm.rank};
        return std::vector<int64_t>(s.begin() + 1, s.end());
      };
      const bool same = m.kind == first.kind && m.fan_in_fan_out == first.fan_in_fan_out && tail(m) == tail(first) &&
                        m.b.info->shape[0] == first.b.info->shape[0];
      if (!same)
        throw errors::invalid(
            ins[p.adapter].weights_path, m.a.info->name,
            fmt::format("module {} cannot be combined: {} {} with B {} here, {} {} with B {} in {}{}", name,
                        module_kind_name(m.kind), shape_text(m.a.info->shape), shape_text(m.b.info->shape),
                        module_kind_name(first.kind), shape_text(first.a.info->shape), shape_text(first.b.info->shape),
                        fa.weights_path, m.fan_in_fan_out != first.fan_in_fan_out ? " (fan_in_fan_out differs)" : ""));
    }
    module_data md;
    md.name = name;
    md.kind = first.kind;
    if (format == adapter_format::kohya) {
      auto it = kohya_names.find(name);
      if (it != kohya_names.end()) md.name = it->second;
    }
    out.modules.push_back(std::move(md));
    jobs.push_back(parts);
  }
  if (format == adapter_format::kohya)
    out.kohya_prefix = resolve_kohya_prefix(o.kohya_prefix, sorted_names(out.modules));
  if (format == adapter_format::peft) {
    std::set<std::string> fif;
    for (const auto& parts : jobs) fif.insert(parts.front().module->fan_in_fan_out ? "1" : "0");
    out.config.fan_in_fan_out = fif.count("1") > 0;
    if (fif.size() > 1)
      throw errors::invalid(
          o.adapters.front().path, "",
          "some modules are fan_in_fan_out (GPT-2 Conv1D) and some not: one PEFT config cannot say both");
    out.config.target_modules = sorted_names(out.modules);
  }

  report.modules.resize(jobs.size());
  parallel_for(jobs.size(), 0, [&](size_t j) {
    const std::vector<part>& parts = jobs[j];
    module_data& md = out.modules[j];
    const lora_module& first = *parts.front().module;
    // stack: B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...] [m, R], A = [A_1; A_2; ...] [R, n]
    const int64_t m = first.b.info->shape[0];
    const int64_t n = static_cast<int64_t>(first.a.info->n_elements) / first.rank;
    int64_t total_rank = 0;
    std::string files;  // the adapters of this module, for messages
    for (const part& p : parts) {
      total_rank += p.module->rank;
      files += (files.empty() ? "" : " + ") + ins[p.adapter].weights_path;
    }
    std::vector<double> b(static_cast<size_t>(m * total_rank)), a(static_cast<size_t>(total_rank * n));
    std::vector<double> bias;
    int64_t col = 0;
    for (const part& p : parts) {
      const lora_module& lm = *p.module;
      const double w = o.adapters[p.adapter].weight * lm.scale;
      if (!std::isfinite(w))
        throw errors::invalid(
            ins[p.adapter].weights_path, md.name,
            fmt::format("weight {:.3g} * scale {:.3g} overflows f64", o.adapters[p.adapter].weight, lm.scale));
      const int64_t r = lm.rank;
      std::vector<double> bi = values_f64(lm.b.info->type, lm.b.data(), m * r);
      std::vector<double> ai = values_f64(lm.a.info->type, lm.a.data(), r * n);
      const scale_split sp = split_scale(w, bi, ai, out_type);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t c = 0; c < r; ++c) b[i * total_rank + col + c] = sp.b * bi[i * r + c];
      for (int64_t e = 0; e < r * n; ++e) a[col * n + e] = sp.a * ai[e];
      col += r;
      // lora_B bias: sum_i w_i s_i b_i
      if (lm.bias) {
        std::vector<double> v = values_f64(lm.bias->info->type, lm.bias->data(), m);
        bias.resize(static_cast<size_t>(m), 0.0);
        for (int64_t i = 0; i < m; ++i) bias[i] += w * v[i];
      }
    }
    std::vector<int64_t> as = first.a.info->shape, bs = first.b.info->shape;
    factors f{m, n, total_rank, b, a};
    module_rank_report& line = report.modules[j];
    line.name = md.name;
    line.rank_in = total_rank;
    if (!o.rule) {
      // exact: the stacked factors as they are
      md.a = make_finite_tensor(out_type, a_shape(as, total_rank), a, files, md.name, "lora_A");
      md.b = make_finite_tensor(out_type, b_shape(bs, total_rank), b, files, md.name, "lora_B");
      md.rank = total_rank;
      const double total = std::pow(low_rank_norm(b, a, m, n, total_rank), 2);
      line.measured_error = measured_error(f, 1.0, md.a, md.b, total_rank, total);
    } else {
      recompressed rc =
          named_svd_errors(files, md.name, [&] { return recompress(b, a, m, n, total_rank, 1.0, *o.rule); });
      md.a = make_finite_tensor(out_type, a_shape(as, rc.rank), rc.a, files, md.name, "lora_A");
      md.b = make_finite_tensor(out_type, b_shape(bs, rc.rank), rc.b, files, md.name, "lora_B");
      md.rank = rc.rank;
      line.energy_kept = rc.energy_fraction();
      line.relative_error = rc.relative_error();
      line.target_reached = rc.target_reached;
      line.measured_error = measured_error(f, 1.0, md.a, md.b, rc.rank, rc.total_energy);
    }
    reshape_to_kind(md);  // linear / embedding 2-D, conv 4-D, whatever the first input's form
    line.rank_out = md.rank;
    md.alpha = static_cast<double>(md.rank);
    if (!bias.empty()) md.bias = make_finite_tensor(out_type, {m}, bias, files, md.name, "lora_B bias");
  });
  if (format == adapter_format::kohya) {
    std::optional<metadata_map> meta;
    for (const adapter& a : ins)
      if (a.format == adapter_format::kohya) {
        meta = a.file->metadata();
        break;
      }
    out.metadata = kohya_metadata(meta, out.modules);
  }
  write_adapter(out, o.out, o.force);
  return report;
}

// ---------------------------------------------------------------------------
// convert

convert_report convert_adapter(const convert_options& o) {
  convert_report report;
  report.to = o.to;
  report.out = o.out;
  check_output(o.out, {{"adapter", o.adapter}, {"base model", o.base}}, o.force);
  std::optional<model_files> base;
  if (!o.base.empty()) base = open_model(o.base);

  adapter_data d;
  if (is_mlx_adapter(o.adapter)) {
    report.from = "mlx";
    d = load_mlx_adapter(o.adapter, base ? &*base : nullptr);
    // NaN / Inf in a factor (the names as mlx_lm wrote them)
    for (const module_data& m : d.modules)
      for (const auto& [t, key] : {std::pair{&m.a, ".lora_a"}, std::pair{&m.b, ".lora_b"}})
        if (const uint64_t bad = count_nonfinite(t->type, t->bytes); bad > 0)
          throw errors::invalid(o.adapter, m.name + key, fmt::format("{} of its values are NaN or infinite", bad));
  } else {
    adapter a = load_adapter(o.adapter);
    for (const lora_module& m : a.modules) check_finite_factors(m, a.weights_path);
    report.from = std::string(adapter_format_name(a.format));
    if (a.format == adapter_format::kohya && o.to == adapter_format::peft && !base)
      throw errors::usage(
          fmt::format("converting the kohya adapter {} to PEFT needs --base MODEL: kohya names (\"{}\") "
                      "lose the dots of the module paths, the base's tensor names give them back",
                      o.adapter, a.modules.empty() ? "" : a.modules.front().name));
    std::map<const tensor_info*, std::string> kohya_name;  // kept for kohya -> kohya
    for (const lora_module& m : a.modules) kohya_name[m.a.info] = m.name;
    if (base) require_fit(a, *base);
    // what kohya cannot hold (fan_in_fan_out: kohya keeps A [r, in], B [out, r] for W [out, in])
    if (o.to == adapter_format::kohya)
      for (const lora_module& m : a.modules)
        if (m.fan_in_fan_out)
          throw errors::invalid(a.weights_path, m.a.info->name,
                                fmt::format("module {} is fan_in_fan_out (GPT-2 Conv1D, weight [in, out]): kohya files "
                                            "have no such layout",
                                            m.name));
    d = adapter_to_data(a);
    if (base && o.to == adapter_format::peft)
      for (module_data& m : d.modules) reshape_to_kind(m);
    if (a.format == adapter_format::kohya && o.to == adapter_format::kohya)
      for (size_t i = 0; i < a.modules.size(); ++i) d.modules[i].name = kohya_name[a.modules[i].a.info];
    if (a.format == adapter_format::kohya) {
      // kohya -> PEFT: the base's module paths, one entry per module
      d.config = peft_config{};
      d.config.peft_type = "LORA";
      d.config.target_modules = sorted_names(d.modules);
      d.config.base_model_name_or_path = o.base;
    }
  }

  // the target format's scale convention
  if (o.to == adapter_format::kohya) {
    if (d.use_rslora) {
      // kohya s = alpha / r: alpha = s * r with s = alpha_peft / sqrt(r)
      for (module_data& m : d.modules) {
        m.alpha = alpha_for_scale(lora_scale(m.alpha, m.rank, true), m.rank, false);
        if (!std::isfinite(m.alpha))
          throw errors::invalid(o.adapter, m.name,
                                fmt::format("the kohya alpha = s * r (rsLoRA) overflows f64 at rank {}", m.rank));
      }
      d.use_rslora = false;
    }
    d.kohya_prefix = resolve_kohya_prefix(o.kohya_prefix, sorted_names(d.modules));
    d.metadata = kohya_metadata(d.format == adapter_format::kohya ? d.metadata : std::nullopt, d.modules);
  } else {
    d.metadata = metadata_map{{"format", "pt"}};
  }
  d.format = o.to;
  write_adapter(d, o.out, o.force);

  // what was written
  report.n_modules = d.modules.size();
  report.n_saved = d.saved.size();
  bool first = true;
  for (const module_data& m : d.modules) {
    const double s = lora_scale(m.alpha, m.rank, d.use_rslora);
    report.min_rank = first ? m.rank : std::min(report.min_rank, m.rank);
    report.max_rank = first ? m.rank : std::max(report.max_rank, m.rank);
    report.min_scale = first ? s : std::min(report.min_scale, s);
    report.max_scale = first ? s : std::max(report.max_scale, s);
    first = false;
  }
  return report;
}

}  // namespace lora
