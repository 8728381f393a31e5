#include "core/extract.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <set>

#include <fmt/format.h>

#include "core/blas.h"
#include "core/dtype.h"
#include "core/module-pattern.h"
#include "core/scratch.h"
#include "core/thread-pool.h"
#include "formats/staged-folder.h"
#include "core/adapter-names.h"
#include "core/adapter-write.h"
#include "formats/adapter-config.h"
#include "formats/error.h"
#include "formats/model-files.h"
#include "formats/safetensors.h"

namespace lora {

namespace {

// dW = W_tuned - W_base into `out`, in T (f32 for the randomized path, f64 for
// exact), converted through core/dtype in cache-sized chunks.
template <class T>
void delta_into(const tensor_ref& base, const tensor_ref& tuned, std::span<T> out, int threads) {
  constexpr size_t chunk = 16384;       // converted at a time (stays in cache)
  constexpr size_t block = 64 * chunk;  // per job of the thread pool
  const auto bb = base.data(), tb = tuned.data();
  const size_t bs = static_cast<size_t>(math_dtype_size(base.info->type));
  const size_t ts = static_cast<size_t>(math_dtype_size(tuned.info->type));
  const size_t n_blocks = (out.size() + block - 1) / block;
  parallel_for(n_blocks, threads, [&](size_t k) {
    std::vector<T> tmp(chunk);
    const size_t end = std::min(out.size(), (k + 1) * block);
    for (size_t off = k * block; off < end; off += chunk) {
      const size_t c = std::min(chunk, end - off);
      std::span<T> dst = out.subspan(off, c);
      std::span<T> src(tmp.data(), c);
      if constexpr (std::is_same_v<T, float>) {
        to_f32(tuned.info->type, tb.subspan(off * ts, c * ts), dst);
        to_f32(base.info->type, bb.subspan(off * bs, c * bs), src);
      } else {
        to_f64(tuned.info->type, tb.subspan(off * ts, c * ts), dst);
        to_f64(base.info->type, bb.subspan(off * bs, c * bs), src);
      }
      for (size_t i = 0; i < c; ++i) dst[i] -= src[i];
    }
  });
}

template <class T>
std::vector<T> delta_of(const tensor_ref& base, const tensor_ref& tuned) {
  std::vector<T> out(tuned.info->n_elements);
  delta_into<T>(base, tuned, out, 1);
  return out;
}

// ||W_tuned - W_base||_F in double, a block at a time (an untied lm_head
// of a Llama-3-8B is 4 GiB as f64): memory two blocks, whatever the size.
double delta_norm(const tensor_ref& base, const tensor_ref& tuned) {
  constexpr size_t block = size_t{1} << 16;
  const size_t bs = static_cast<size_t>(math_dtype_size(base.info->type));
  const size_t ts = static_cast<size_t>(math_dtype_size(tuned.info->type));
  const auto bb = base.data(), tb = tuned.data();
  std::vector<double> x(block), y(block);
  double sum = 0;
  for (size_t off = 0; off < tuned.info->n_elements; off += block) {
    const size_t c = std::min<size_t>(block, tuned.info->n_elements - off);
    to_f64(tuned.info->type, tb.subspan(off * ts, c * ts), std::span<double>(y.data(), c));
    to_f64(base.info->type, bb.subspan(off * bs, c * bs), std::span<double>(x.data(), c));
    for (size_t i = 0; i < c; ++i) y[i] -= x[i];
    sum += squared_norm(std::span<const double>(y.data(), c));
  }
  return std::sqrt(sum);
}

template <class T>
bool all_finite(std::span<const T> v) {
  for (T x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

template <class T>
double norm_of(std::span<const T> v) {
  return std::sqrt(squared_norm(v));
}

// Transposes a row-major [rows, cols] array of `size`-byte elements.
std::vector<uint8_t> transpose_bytes(const std::vector<uint8_t>& in, int64_t rows, int64_t cols, int size) {
  std::vector<uint8_t> out(in.size());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      std::memcpy(&out[(j * rows + i) * size], &in[(i * cols + j) * size], static_cast<size_t>(size));
  return out;
}

// The factors of one module, as written.
struct written_factors {
  dtype type = dtype::F32;
  std::vector<uint8_t> b;  // [m, r]
  std::vector<uint8_t> a;  // [r, n]
};

// Extracts one module: SVD for the rule, balanced split, rounding once to
// `type`, and the measured residual of the rounded factors. `delta` holds dW
// and is overwritten by the residual.
template <class T>
written_factors factorize(std::span<T> delta, int64_t m, int64_t n, const rank_rule& rule, const svd_options& svd_opts,
                          dtype type, extracted_module& rec) {
  low_rank_svd svd;
  if constexpr (std::is_same_v<T, float>) {
    svd = truncated_svd(delta, m, n, rule, svd_opts);
  } else {
    svd = exact_svd(delta, m, n, rule);
  }
  const int64_t r = svd.rank;
  rec.rank = r;
  rec.method = svd.method;
  rec.sketch = svd.sketch;
  rec.energy = svd.energy_fraction();
  rec.target_reached = svd.target_reached;

  // split once, round once from f64 to the output dtype
  lora_pair pair = split_balanced(svd);
  const int size = math_dtype_size(type);
  written_factors out;
  out.type = type;
  out.b.resize(pair.b.size() * size);
  out.a.resize(pair.a.size() * size);
  from_f64(type, pair.b, out.b);
  from_f64(type, pair.a, out.a);

  // measure ||dW - B A|| with the factors as written
  std::vector<T> b(pair.b.size()), a(pair.a.size());
  if constexpr (std::is_same_v<T, float>) {
    to_f32(type, out.b, b);
    to_f32(type, out.a, a);
  } else {
    to_f64(type, out.b, b);
    to_f64(type, out.a, a);
  }
  if (!all_finite<T>(b) || !all_finite<T>(a))
    throw errors::invalid("", "",
                          fmt::format("the factors B = U sqrt(S), A = sqrt(S) V^T overflow {} (largest singular value "
                                      "{:.3g}): use --dtype f32",
                                      dtype_name(type), svd.s.empty() ? 0.0 : svd.s[0]));
  rec.error = residual_norm(std::span<T>(delta), b, a, m, n, r) / rec.delta_norm;
  return out;
}

// A delta W_tuned - W_base that is not finite: names the model holding NaN /
// Inf, or says that the difference of finite weights overflowed f32 (the
// randomized path) or f64. Always throws lora::error (exit 3).
[[noreturn]] void refuse_nonfinite_delta(const tensor_ref& base, const std::string& base_path, const tensor_ref& tuned,
                                         const std::string& tuned_path, const std::string& tensor, bool in_f64) {
  for (const auto& [ref, path] : {std::pair{&tuned, &tuned_path}, std::pair{&base, &base_path}})
    if (const uint64_t bad = count_nonfinite(ref->info->type, ref->data()); bad > 0)
      throw errors::invalid(*path, tensor, fmt::format("{} of its values are NaN or infinite", bad));
  throw errors::invalid(tuned_path, tensor,
                        in_f64 ? "W_tuned - W_base overflows f64 (finite weights of opposite sign near the f64 limit)"
                               : "W_tuned - W_base overflows f32 (finite weights of opposite sign near the f32 limit): "
                                 "--method exact computes the delta in f64");
}

}  // namespace

std::string module_path(const std::string& tensor) {
  const auto dot = tensor.rfind('.');
  return dot == std::string::npos ? tensor : tensor.substr(0, dot);
}

bool is_embedding_module(const std::string& path) {
  const auto dot = path.rfind('.');
  const std::string last = dot == std::string::npos ? path : path.substr(dot + 1);
  return last.find("embed") != std::string::npos || last == "wte" || last == "wpe" || last == "embeddings";
}

bool is_output_head(const std::string& path) {
  const auto dot = path.rfind('.');
  const std::string last = dot == std::string::npos ? path : path.substr(dot + 1);
  return last == "lm_head" || last == "embed_out";
}

extract_report run_extract(const extract_options& options, const progress_fn& progress) {
  // options the output format cannot hold
  if (options.format == extract_format::kohya && options.save_modules)
    throw errors::usage("--save-modules needs --format peft (kohya files have no modules_to_save)");
  std::optional<module_pattern> targets;  // PEFT's ^(.*\.)?(REGEX)$, in linear time
  if (!options.targets.empty()) {
    try {
      targets.emplace(options.targets);
    } catch (const pattern_error& e) {
      throw errors::usage(fmt::format("--targets '{}' is not a valid regex: {}", options.targets, e.what()));
    }
  }
  check_output(options.out, {{"base model", options.base}, {"tuned model", options.tuned}}, options.force);

  model_files base = open_model(options.base);
  model_files tuned = open_model(options.tuned);

  // step 1: the two models must hold the same tensors with the same shapes
  for (const auto& name : tuned.tensor_names)
    if (!base.find_ref(name))
      throw errors::invalid(tuned.path, name,
                            fmt::format("not in the base model {} (do the models match?)", base.path));
  for (const auto& name : base.tensor_names)
    if (!tuned.find_ref(name))
      throw errors::invalid(tuned.path, name, fmt::format("missing (the base model {} has it)", base.path));

  extract_report report;
  report.out = options.out;
  report.format = options.format;
  report.n_tensors = static_cast<int64_t>(base.tensor_names.size());

  struct job {
    std::string tensor;
    std::string path;
    bool embedding = false;
    tensor_ref base, tuned;
  };
  std::vector<job> jobs;
  std::vector<std::pair<other_delta, tensor_ref>> others;  // with the tuned tensor
  for (const auto& name : base.tensor_names) {
    const tensor_ref b = base.at(name);
    const tensor_ref t = tuned.at(name);
    if (b.info->shape != t.info->shape)
      throw errors::shape_mismatch(tuned.path, name, shape_text(b.info->shape), shape_text(t.info->shape));
    const bool math = dtype_is_math(b.info->type) && dtype_is_math(t.info->type);
    const std::string path = module_path(name);
    const bool two_d = b.info->shape.size() == 2 && name.ends_with(".weight");
    const bool embedding = two_d && is_embedding_module(path);
    const bool head = two_d && is_output_head(path);
    std::string reason;
    if (!two_d) {
      reason = "not a 2-D weight";
    } else if (targets) {
      if (!targets->matches(path)) reason = "excluded by --targets";
    } else if (embedding) {
      reason = "embedding (select it with --targets)";
    } else if (head) {
      reason = "output head (select it with --targets)";
    }
    // a selected 2-D weight is compared in step 2, as its delta is formed (a
    // zero delta counts as unchanged there): one read of it, not two
    const bool compare_later = math && reason.empty() && !embedding;
    if (!compare_later && b.info->type == t.info->type && std::ranges::equal(b.data(), t.data())) {
      ++report.n_unchanged;
      continue;
    }
    if (!math)
      throw errors::invalid(tuned.path, name,
                            fmt::format("differs from the base, and {} and {} cannot be subtracted",
                                        dtype_name(b.info->type), dtype_name(t.info->type)));
    if (reason.empty()) {
      if (embedding && options.format == extract_format::kohya)
        throw errors::usage(fmt::format("{}: kohya files have no embedding LoRA: use --format peft", name));
      jobs.push_back({name, path, embedding, b, t});
    } else {
      // values may be equal in different dtypes: measure the delta
      const double norm = delta_norm(b, t);
      if (norm == 0) {
        ++report.n_unchanged;
        continue;
      }
      others.push_back({other_delta{name, b.info->shape, reason, norm, ""}, t});
    }
  }

  // step 2: SVD of each selected delta, written factors kept in memory
  set_blas_threads(options.threads);
  std::vector<written_factors> factors;
  scratch<float> scratch32;
  scratch<double> scratch64;
  uint64_t total_bytes = 0, done_bytes = 0;
  for (const auto& j : jobs) total_bytes += j.tuned.info->n_bytes();
  double sum_delta = 0, sum_residual = 0, sum_kept = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    check_interrupted();
    const job& j = jobs[i];
    const int64_t m = j.base.info->shape[0], n = j.base.info->shape[1];
    extracted_module rec;
    rec.name = j.path;
    rec.tensor = j.tensor;
    rec.embedding = j.embedding;
    rec.rows = m;
    rec.cols = n;
    const dtype type = options.out_dtype.value_or(j.base.info->type);
    svd_options svd_opts = options.svd;
    svd_opts.seed = options.svd.seed ^ fnv1a64(j.path);  // independent of which other modules run
    written_factors f;
    bool zero = false;
    auto run = [&](auto delta) {
      // the norm is finite exactly when every element is (f32 squares cannot overflow f64)
      rec.delta_norm = norm_of<typename decltype(delta)::element_type>(delta);
      // NaN at the same places in both models: unchanged (compared only then: a second read)
      if (!std::isfinite(rec.delta_norm) && j.base.info->type == j.tuned.info->type &&
          std::ranges::equal(j.base.data(), j.tuned.data()))
        rec.delta_norm = 0;
      if (!std::isfinite(rec.delta_norm))
        refuse_nonfinite_delta(j.base, base.path, j.tuned, tuned.path, j.tensor,
                               std::is_same_v<typename decltype(delta)::element_type, double>);
      if (rec.delta_norm == 0) {
        zero = true;
        return;
      }
      f = named_svd_errors(tuned.path, j.tensor,
                           [&] { return factorize(delta, m, n, options.rule, svd_opts, type, rec); });
    };
    if (options.svd.method == svd_method::exact) {
      std::span<double> d = scratch64.get(j.tuned.info->n_elements);
      delta_into<double>(j.base, j.tuned, d, options.threads);
      run(d);
    } else {
      std::span<float> d = scratch32.get(j.tuned.info->n_elements);
      delta_into<float>(j.base, j.tuned, d, options.threads);
      run(d);
    }
    j.base.file->release(*j.base.info);
    j.tuned.file->release(*j.tuned.info);
    done_bytes += j.tuned.info->n_bytes();
    if (zero) {
      ++report.n_unchanged;
    } else {
      const double d2 = rec.delta_norm * rec.delta_norm;
      sum_delta += d2;
      sum_residual += rec.error * rec.error * d2;
      sum_kept += rec.energy * d2;
      report.modules.push_back(rec);
      factors.push_back(std::move(f));
    }
    if (progress) progress({i + 1, jobs.size(), done_bytes, total_bytes, j.tensor});
  }
  if (report.modules.empty() && others.empty())
    throw errors::invalid(options.tuned, "",
                          fmt::format("models are identical: nothing to extract (base {})", options.base));
  if (report.modules.empty())
    throw errors::invalid(options.tuned, "",
                          fmt::format("no selected 2-D weight differs from the base ({} other tensors do, e.g. {}: {})",
                                      others.size(), others.front().first.tensor, others.front().first.reason));
  report.total_delta_norm = std::sqrt(sum_delta);
  report.total_error = std::sqrt(sum_residual / sum_delta);
  report.total_energy = sum_kept / sum_delta;

  // step 3: the adapter in memory; write_adapter (core/adapter-write.h) names
  // the keys, derives r / lora_alpha / rank_pattern / alpha_pattern (alpha =
  // rank per module, so every scale is 1) and writes atomically
  adapter_data data;
  data.format = options.format == extract_format::kohya ? adapter_format::kohya : adapter_format::peft;
  data.config.peft_type = "LORA";
  data.config.base_model_name_or_path = options.base;
  std::map<std::string, size_t> module_index;  // module path -> position in data.modules
  for (size_t i = 0; i < report.modules.size(); ++i) {
    const auto& m = report.modules[i];
    written_factors& f = factors[i];
    const int64_t r = m.rank;
    module_data md;
    md.name = m.name;
    md.rank = r;
    md.alpha = static_cast<double>(r);
    if (m.embedding) {
      // PEFT embedding: dW = (B_e A_e)^T, so A_e = B^T [r, vocab], B_e = A^T [dim, r]
      const int size = math_dtype_size(f.type);
      md.kind = module_kind::embedding;
      md.a = {f.type, {r, m.rows}, transpose_bytes(f.b, m.rows, r, size)};
      md.b = {f.type, {m.cols, r}, transpose_bytes(f.a, r, m.cols, size)};
    } else {
      md.kind = module_kind::linear;
      md.a = {f.type, {r, m.cols}, std::move(f.a)};
      md.b = {f.type, {m.rows, r}, std::move(f.b)};
      module_index[m.name] = data.modules.size();
    }
    data.modules.push_back(std::move(md));
    data.config.target_modules.push_back(m.name);
  }
  factors.clear();
  std::sort(data.config.target_modules.begin(), data.config.target_modules.end());
  data.kohya_prefix = auto_kohya_prefix(data.config.target_modules);  // the one rule convert uses

  // deltas not extracted: the bias of an extracted module becomes lora_B.bias
  // (a delta; lora_bias: true); anything else is saved whole (modules_to_save)
  std::set<std::string> modules_to_save;
  if (options.save_modules) {
    for (auto& [rec, t] : others) {
      const std::string path = module_path(rec.tensor);
      auto it = module_index.find(path);
      if (rec.tensor.ends_with(".bias") && it != module_index.end()) {
        const tensor_ref b = base.at(rec.tensor);
        std::vector<double> d = delta_of<double>(b, t);
        const dtype type = options.out_dtype.value_or(b.info->type);
        std::vector<uint8_t> bytes(d.size() * math_dtype_size(type));
        from_f64(type, d, bytes);
        data.modules[it->second].bias = tensor_data{type, rec.shape, std::move(bytes)};
        rec.saved_as = std::string(peft_prefix) + path + ".lora_B.bias";
      } else if (it != module_index.end()) {
        continue;  // another tensor of a LoRA module: PEFT cannot also save it whole
      } else {
        const auto bytes = t.data();
        data.saved.push_back({rec.tensor, tensor_data{t.info->type, rec.shape, {bytes.begin(), bytes.end()}}});
        rec.saved_as = std::string(peft_prefix) + rec.tensor;
        modules_to_save.insert(path);
      }
    }
  }
  for (auto& [rec, t] : others) report.others.push_back(rec);
  data.config.modules_to_save.assign(modules_to_save.begin(), modules_to_save.end());
  report.config_rank = *make_peft_config(data).r;

  write_adapter(data, options.out, options.force);
  const std::string weights =
      options.format == extract_format::kohya ? options.out : options.out + "/adapter_model.safetensors";
  std::error_code ec;
  report.out_bytes = std::filesystem::file_size(weights, ec);
  return report;
}

}  // namespace lora
