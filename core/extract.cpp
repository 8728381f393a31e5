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
#include "core/name-map.h"
#include "core/scratch.h"
#include "core/thread-pool.h"
#include "formats/staged-folder.h"
#include "core/kohya-format.h"
#include "core/peft-format.h"
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

// Progress of the whole run, in bytes of both models: each tensor's pair
// counts once in the scan of select_deltas or in the factorization (a job),
// and each job once more in the --budget pass. Events come after each tensor
// and after each 64 MiB of a comparison, so that the bar and its ETA move
// during the scan of a 1 GiB embedding too. One thread.
struct extract_progress {
  const progress_fn& fn;
  progress_event event;
  // `bytes` more of tensor `what` done; `done` when it needs nothing more.
  void advance(uint64_t bytes, const std::string& what, bool done) {
    event.done_bytes += bytes;
    event.done_items += done ? 1 : 0;
    event.current = what;
    if (fn) fn(event);
  }
};

constexpr uint64_t progress_chunk = uint64_t{64} << 20;  // bytes per side between events in a comparison

// Whether base and tuned hold the same bytes, compared 64 MiB at a time with
// an event after each (`advanced` adds up the bytes reported); the pages read
// are released.
bool same_bytes(const tensor_ref& base, const tensor_ref& tuned, extract_progress& progress, const std::string& name,
                uint64_t& advanced) {
  const std::span<const uint8_t> b = base.data(), t = tuned.data();
  bool same = b.size() == t.size();
  for (uint64_t at = 0; same && at < b.size(); at += progress_chunk) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(progress_chunk, b.size() - at));
    same = std::ranges::equal(b.subspan(at, n), t.subspan(at, n));
    progress.advance(2 * n, name, false);
    advanced += 2 * n;
  }
  base.file->release(*base.info);
  tuned.file->release(*tuned.info);
  return same;
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
  rec.singular_values = svd.s;

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

// ---------------------------------------------------------------------------
// select: which deltas, in which layout, under which key

struct extract_job {
  std::string tensor, path, key;
  delta_layout layout = delta_layout::linear;
  int64_t rows = 0, cols = 0;  // the matrix factored
  int64_t row0 = 0;            // its first row in the tensor (a part of a fused tensor: q / k / v)
  bool keyed = false;          // key already set (a fused tensor's part, named by core/name-map)
  tensor_ref base, tuned;
  rank_rule rule;
  std::vector<double> spectrum;  // --budget: the values its allocation saw (reported when longer)
  uint64_t scanned = 0;          // bytes of its pair the scan already reported (a comparison)
};
struct left_delta {
  other_delta rec;
  tensor_ref tuned;
};
struct extract_plan {
  std::vector<extract_job> jobs;
  std::vector<left_delta> others;
  int64_t n_unchanged = 0;
  kohya::checkpoint_family family = kohya::checkpoint_family::other;
};

std::optional<module_pattern> parse_targets(const std::string& regex) {
  if (regex.empty()) return std::nullopt;
  try {
    return module_pattern(regex);
  } catch (const pattern_error& e) {
    throw errors::usage(fmt::format("--targets '{}' is not a valid regex: {}", regex, e.what()));
  }
}

// The two models must hold the same tensors (shapes are checked per tensor).
void check_same_names(const model_files& base, const model_files& tuned) {
  for (const auto& name : tuned.tensor_names)
    if (!base.find_ref(name))
      throw errors::invalid(tuned.path, name,
                            fmt::format("not in the base model {} (do the models match?)", base.path));
  for (const auto& name : base.tensor_names)
    if (!tuned.find_ref(name))
      throw errors::invalid(tuned.path, name, fmt::format("missing (the base model {} has it)", base.path));
}

// ||dW|| of an embedding / head whose rows changed: the common rows' delta and
// the rows only one side has (a row added or removed changes by all of itself).
double resized_delta_norm(const tensor_ref& base, const tensor_ref& tuned) {
  std::vector<double> b(base.info->n_elements), t(tuned.info->n_elements);
  to_f64(base.info->type, base.data(), b);
  to_f64(tuned.info->type, tuned.data(), t);
  const size_t common = std::min(b.size(), t.size());
  double sum = 0;
  for (size_t i = 0; i < common; ++i) sum += (t[i] - b[i]) * (t[i] - b[i]);
  for (size_t i = common; i < t.size(); ++i) sum += t[i] * t[i];
  for (size_t i = common; i < b.size(); ++i) sum += b[i] * b[i];
  return std::sqrt(sum);
}

// The layout of a changed weight, or why it is not extracted (reason set).
std::optional<delta_layout> classify(const std::string& name, const std::string& path,
                                     const std::vector<int64_t>& shape, const std::optional<module_pattern>& targets,
                                     const std::optional<std::string>& model_type, std::string& reason) {
  const bool weight = name.ends_with(".weight");
  const bool two_d = weight && shape.size() == 2;
  const bool conv = weight && shape.size() == 4;
  const bool embedding = two_d && is_embedding_module(path);
  const bool head = two_d && is_output_head(path);
  if (!two_d && !conv) {
    reason = shape.size() < 2 ? "not a 2-D weight" : "not a 2-D or conv weight";
  } else if (targets) {
    if (!targets->matches(path)) reason = "excluded by --targets";
  } else if (embedding) {
    reason = "embedding (select it with --targets)";
  } else if (head) {
    reason = "output head (select it with --targets)";
  }
  if (!reason.empty()) return std::nullopt;
  if (conv) return delta_layout::conv;
  if (embedding) return delta_layout::embedding;
  return stored_in_out(model_type, path) ? delta_layout::conv1d : delta_layout::linear;
}

// The key each module is written under in a kohya file: its name from the
// checkpoint's family (core/kohya-format's containers), else the one prefix rule
// convert uses.
void assign_kohya_keys(extract_plan& plan, const std::string& label) {
  std::vector<std::string> paths;
  for (const auto& j : plan.jobs) paths.push_back(j.path);
  const std::string prefix = kohya::auto_prefix(paths);
  for (auto& j : plan.jobs)
    if (!j.keyed)
      j.key = plan.family == kohya::checkpoint_family::other ? kohya::module_name(j.path, prefix)
                                                             : kohya::checkpoint_name(j.path, plan.family, label);
}

// extract --format kohya: a fused tensor whose parts sd-scripts names
// (core/name-map fused_parts: SDXL's in_proj_weight -> lora_te2_ q_proj,
// k_proj, v_proj) becomes one job per part, each factoring its rows of the
// delta. True when `name` is such a tensor (jobs added, or nothing to do:
// unchanged, or every part excluded by --targets). Throws exit 3 when its
// rows cannot divide.
bool add_fused_parts(const std::string& name, const tensor_ref& b, const tensor_ref& t,
                     const std::optional<module_pattern>& targets, const extract_options& options, extract_plan& plan) {
  std::string problem;
  const std::vector<fused_part> parts = fused_parts(name, b.info->shape, problem);
  if (!problem.empty()) throw errors::invalid(options.tuned, name, fmt::format("--format kohya: {}", problem));
  if (parts.empty()) return false;
  if (b.info->type == t.info->type && std::ranges::equal(b.data(), t.data())) {
    ++plan.n_unchanged;
    return true;
  }
  for (const fused_part& p : parts) {
    if (targets && !targets->matches(p.path)) continue;
    extract_job j{name, p.path, p.kohya, delta_layout::linear, p.n_rows, b.info->shape[1], p.row,
                  true, b,      t,       options.rule,         {}};
    plan.jobs.push_back(std::move(j));
  }
  return true;
}

// Every tensor of the base: unchanged, a job, or a delta left aside.
extract_plan select_deltas(const extract_options& options, const model_files& base, const model_files& tuned,
                           extract_progress& progress) {
  const std::optional<module_pattern> targets = parse_targets(options.targets);
  std::optional<std::string> model_type;
  if (!base.config_path.empty()) model_type = read_model_type(base.config_path);
  extract_plan plan;
  plan.family = kohya::detect_checkpoint_family(base.tensor_names);
  for (const auto& name : base.tensor_names) {
    const tensor_ref b = base.at(name);
    const tensor_ref t = tuned.at(name);
    const std::string path = module_path(name);
    const uint64_t share = b.info->n_bytes() + t.info->n_bytes();  // its part of the progress total
    uint64_t advanced = 0;
    const bool resized = b.info->shape != t.info->shape;
    if (resized) {
      // a bigger (or smaller) vocabulary: rows differ, columns agree
      const auto &bs = b.info->shape, &ts = t.info->shape;
      const bool vocab = bs.size() == 2 && ts.size() == 2 && bs[1] == ts[1] && name.ends_with(".weight") &&
                         (is_embedding_module(path) || is_output_head(path));
      if (!vocab) throw errors::shape_mismatch(tuned.path, name, shape_text(bs), shape_text(ts));
      if (!options.save_modules)
        throw errors::invalid(tuned.path, name,
                              fmt::format("has {} rows, the base {}: a resized vocabulary is written whole with "
                                          "--save-modules (modules_to_save)",
                                          ts[0], bs[0]));
    }
    const bool math = dtype_is_math(b.info->type) && dtype_is_math(t.info->type);
    if (math && !resized && options.format == extract_format::kohya &&
        add_fused_parts(name, b, t, targets, options, plan))
      continue;
    std::string reason;
    std::optional<delta_layout> layout;
    if (resized) {
      reason = fmt::format("vocabulary resized: {} -> {} rows", b.info->shape[0], t.info->shape[0]);
    } else if (math) {
      layout = classify(name, path, b.info->shape, targets, model_type, reason);
    }
    // a selected weight is compared in factorize, as its delta is formed (a
    // zero delta counts as unchanged there): one read of both models, not
    // two. Not where a kohya name must be found first (a module outside the
    // family's networks may be refused, and should not be when unchanged).
    const bool compare_later =
        layout && !(options.format == extract_format::kohya && plan.family != kohya::checkpoint_family::other);
    if (!compare_later && !resized && b.info->type == t.info->type && same_bytes(b, t, progress, name, advanced)) {
      progress.advance(share - advanced, name, true);
      ++plan.n_unchanged;
      continue;
    }
    if (!math)
      throw errors::invalid(tuned.path, name,
                            fmt::format("differs from the base, and {} and {} cannot be subtracted",
                                        dtype_name(b.info->type), dtype_name(t.info->type)));
    if (layout && options.format == extract_format::kohya) {
      if (*layout == delta_layout::embedding)
        throw errors::usage(fmt::format("{}: kohya files have no embedding LoRA: use --format peft", name));
      if (plan.family != kohya::checkpoint_family::other) {
        std::string key = kohya::checkpoint_name(path, plan.family, tuned.path);
        if (key.empty()) {
          layout.reset();
          reason = fmt::format("outside the {} networks sd-scripts names (no kohya name)",
                               kohya::checkpoint_family_name(plan.family));
        }
      }
    }
    if (layout) {
      const auto& shape = b.info->shape;
      extract_job j{name, path, path, *layout, shape[0], 0, 0, false, b, t, options.rule, {}, advanced};
      j.cols = b.info->n_elements / shape[0];
      if (*layout == delta_layout::conv && options.conv_rule) j.rule = *options.conv_rule;
      plan.jobs.push_back(std::move(j));
      continue;
    }
    // values may be equal in different dtypes: measure the delta
    double norm = 0;
    if (resized) {
      norm = resized_delta_norm(b, t);
    } else {
      norm = delta_norm(b, t);
    }
    progress.advance(share - advanced, name, true);
    if (norm == 0) {
      ++plan.n_unchanged;
      continue;
    }
    plan.others.push_back({other_delta{name, t.info->shape, reason, resized, norm, ""}, t});
  }

  if (options.format == extract_format::kohya) assign_kohya_keys(plan, tuned.path);
  return plan;
}

// ---------------------------------------------------------------------------
// factorize: the SVD of each job, ranks by rule or by one budget

// dW of one job into scratch (f64 for the exact method, else f32), then f(span).
template <class F>
void with_delta(const extract_job& j, const extract_options& options, scratch<float>& s32, scratch<double>& s64,
                F&& f) {
  if (options.svd.method == svd_method::exact) {
    std::span<double> d = s64.get(j.tuned.info->n_elements);
    delta_into<double>(j.base, j.tuned, d, options.threads);
    f(d.subspan(static_cast<size_t>(j.row0 * j.cols), static_cast<size_t>(j.rows * j.cols)));
  } else {
    std::span<float> d = s32.get(j.tuned.info->n_elements);
    delta_into<float>(j.base, j.tuned, d, options.threads);
    f(d.subspan(static_cast<size_t>(j.row0 * j.cols), static_cast<size_t>(j.rows * j.cols)));
  }
  j.base.file->release(*j.base.info);
  j.tuned.file->release(*j.tuned.info);
}

svd_options svd_options_for(const extract_options& options, const std::string& path) {
  svd_options o = options.svd;
  o.seed = options.svd.seed ^ fnv1a64(path);  // independent of which other modules run
  return o;
}

int64_t break_even_rank(int64_t rows, int64_t cols) { return rows * cols / (rows + cols); }

// --budget: the spectrum of every job up to the rank it could afford, then
// allocate_budget (core/svd.h); each job gets a fixed rule, and jobs left at
// rank 0 become deltas left out. Spectra are recomputed by the second pass
// (memory stays at one module).
void allocate_ranks(extract_plan& plan, const extract_options& options, const model_files& base,
                    const model_files& tuned, extract_progress& progress) {
  for (const extract_job& j : plan.jobs) progress.event.total_bytes += j.base.info->n_bytes() + j.tuned.info->n_bytes();
  std::vector<std::vector<double>> spectra(plan.jobs.size());
  std::vector<double> norms(plan.jobs.size(), 0);
  std::vector<budget_module> items(plan.jobs.size());
  scratch<float> s32;
  scratch<double> s64;
  for (size_t i = 0; i < plan.jobs.size(); ++i) {
    check_interrupted();
    const extract_job& j = plan.jobs[i];
    int64_t cap =
        std::min({break_even_rank(j.rows, j.cols), options.budget / (j.rows + j.cols), std::min(j.rows, j.cols)});
    if (j.rule.max_rank > 0) cap = std::min(cap, j.rule.max_rank);
    items[i] = {{}, j.rows, j.cols, cap};
    with_delta(j, options, s32, s64, [&](auto d) {
      using T = typename decltype(d)::element_type;
      norms[i] = norm_of<T>(d);
      if (!std::isfinite(norms[i]) && j.base.info->type == j.tuned.info->type &&
          std::ranges::equal(j.base.data(), j.tuned.data()))
        norms[i] = 0;  // NaN at the same places in both models: unchanged
      if (!std::isfinite(norms[i]))
        refuse_nonfinite_delta(j.base, base.path, j.tuned, tuned.path, j.tensor, std::is_same_v<T, double>);
      if (norms[i] == 0 || cap < 1) return;
      const rank_rule rule{rank_rule::kind::fixed, static_cast<double>(cap), cap};
      low_rank_svd svd = named_svd_errors(tuned.path, j.tensor, [&] {
        if constexpr (std::is_same_v<T, float>)
          return truncated_svd(d, j.rows, j.cols, rule, svd_options_for(options, j.path));
        else
          return exact_svd(d, j.rows, j.cols, rule);
      });
      spectra[i] = std::move(svd.s);
    });
    items[i].s = spectra[i];
    progress.advance(j.base.info->n_bytes() + j.tuned.info->n_bytes(), j.tensor, false);
  }
  const std::vector<int64_t> ranks = allocate_budget(items, options.budget);
  std::vector<extract_job> kept;
  for (size_t i = 0; i < plan.jobs.size(); ++i) {
    extract_job& j = plan.jobs[i];
    // a job left out needs nothing more: the rest of its share is done
    if (ranks[i] <= 0) progress.advance(j.base.info->n_bytes() + j.tuned.info->n_bytes() - j.scanned, j.tensor, true);
    if (ranks[i] > 0) {
      j.rule = {rank_rule::kind::fixed, static_cast<double>(ranks[i]), 0};
      j.spectrum = std::move(spectra[i]);
      kept.push_back(std::move(j));
    } else if (norms[i] == 0) {
      ++plan.n_unchanged;
    } else {
      plan.others.push_back(
          {other_delta{j.tensor, j.base.info->shape, "--budget gave it no rank", false, norms[i], ""}, j.tuned});
    }
  }
  plan.jobs = std::move(kept);
}

// The SVD of every job, factors as written kept in memory; fills
// report.modules and the extracted totals.
std::vector<written_factors> factorize_jobs(const extract_plan& plan, const extract_options& options,
                                            const model_files& base, const model_files& tuned,
                                            extract_progress& progress, extract_report& report) {
  std::vector<written_factors> factors;
  scratch<float> s32;
  scratch<double> s64;
  double sum_delta = 0, sum_residual = 0, sum_kept = 0;
  for (size_t i = 0; i < plan.jobs.size(); ++i) {
    check_interrupted();
    const extract_job& j = plan.jobs[i];
    extracted_module rec;
    rec.name = j.path;
    rec.tensor = j.tensor;
    rec.key = j.key;
    rec.layout = j.layout;
    rec.embedding = j.layout == delta_layout::embedding;
    rec.shape = j.base.info->shape;
    rec.rows = j.rows;
    rec.cols = j.cols;
    rec.break_even = break_even_rank(j.rows, j.cols);
    const dtype type = options.out_dtype.value_or(j.base.info->type);
    const svd_options svd_opts = svd_options_for(options, j.path);
    written_factors f;
    with_delta(j, options, s32, s64, [&](auto d) {
      using T = typename decltype(d)::element_type;
      // the norm is finite exactly when every element is (f32 squares cannot overflow f64)
      rec.delta_norm = norm_of<T>(d);
      // NaN at the same places in both models: unchanged (compared only then: a second read)
      if (!std::isfinite(rec.delta_norm) && j.base.info->type == j.tuned.info->type &&
          std::ranges::equal(j.base.data(), j.tuned.data()))
        rec.delta_norm = 0;
      if (!std::isfinite(rec.delta_norm))
        refuse_nonfinite_delta(j.base, base.path, j.tuned, tuned.path, j.tensor, std::is_same_v<T, double>);
      if (rec.delta_norm == 0) return;
      f = named_svd_errors(tuned.path, j.tensor,
                           [&] { return factorize(d, j.rows, j.cols, j.rule, svd_opts, type, rec); });
    });
    if (rec.delta_norm == 0) {
      ++report.n_unchanged;
    } else {
      rec.larger_than_dense = rec.rank > rec.break_even;
      if (j.spectrum.size() > rec.singular_values.size()) rec.singular_values = j.spectrum;
      const double d2 = rec.delta_norm * rec.delta_norm;
      sum_delta += d2;
      sum_residual += rec.error * rec.error * d2;
      sum_kept += rec.energy * d2;
      report.params += rec.params();
      report.modules.push_back(std::move(rec));
      factors.push_back(std::move(f));
    }
    progress.advance(j.base.info->n_bytes() + j.tuned.info->n_bytes() - j.scanned, j.tensor, true);
  }
  if (report.modules.empty() && plan.others.empty())
    throw errors::invalid(options.tuned, "",
                          fmt::format("models are identical: nothing to extract (base {})", options.base));
  if (report.modules.empty())
    throw errors::invalid(
        options.tuned, "",
        fmt::format("no selected 2-D weight differs from the base ({} other tensors do, e.g. {}: {})",
                    plan.others.size(), plan.others.front().rec.tensor, plan.others.front().rec.reason));
  report.total_delta_norm = std::sqrt(sum_delta);
  report.total_error = std::sqrt(sum_residual / sum_delta);
  report.total_energy = sum_kept / sum_delta;
  return factors;
}

// ---------------------------------------------------------------------------
// build: the adapter in memory

// One module's factors in its layout: B [m, r] and A [r, n] of the matrix
// factored become lora_A / lora_B (PEFT) or lora_down / lora_up (kohya).
module_data module_of(const extracted_module& m, written_factors& f) {
  const int64_t r = m.rank;
  const int size = math_dtype_size(f.type);
  module_data md;
  md.name = m.key;
  md.rank = r;
  md.alpha = static_cast<double>(r);
  switch (m.layout) {
    case delta_layout::embedding:
      // PEFT embedding: dW = (B_e A_e)^T, so A_e = B^T [r, vocab], B_e = A^T [dim, r]
      md.kind = module_kind::embedding;
      md.a = {f.type, {r, m.rows}, transpose_bytes(f.b, m.rows, r, size)};
      md.b = {f.type, {m.cols, r}, transpose_bytes(f.a, r, m.cols, size)};
      break;
    case delta_layout::conv1d:
      // Conv1D stores dW [in, out] = (B_p A_p)^T (PEFT fan_in_fan_out): the
      // factors of the stored matrix transposed, A_p = B^T [r, in], B_p = A^T [out, r]
      md.kind = module_kind::linear;
      md.a = {f.type, {r, m.rows}, transpose_bytes(f.b, m.rows, r, size)};
      md.b = {f.type, {m.cols, r}, transpose_bytes(f.a, r, m.cols, size)};
      break;
    case delta_layout::conv:
      // [out, in*kh*kw] = B A: A [r, in, kh, kw], B [out, r, 1, 1]
      // (sd-scripts networks/extract_lora_from_models.py, PEFT lora.layer.Conv2d)
      md.kind = module_kind::conv;
      md.a = {f.type, {r, m.shape[1], m.shape[2], m.shape[3]}, std::move(f.a)};
      md.b = {f.type, {m.rows, r, 1, 1}, std::move(f.b)};
      break;
    case delta_layout::linear:
      md.kind = module_kind::linear;
      md.a = {f.type, {r, m.cols}, std::move(f.a)};
      md.b = {f.type, {m.rows, r}, std::move(f.b)};
      break;
  }
  return md;
}

// The ss_* keys sd-scripts' networks/extract_lora_from_models.py writes
// (kohya-ss/sd-scripts @ 06e89800): network module, dim, alpha (Python's
// str(float)), network args (conv_dim / conv_alpha as json.dumps spells
// them), base model version, v2.
metadata_map kohya_metadata(const extract_report& report) {
  // dim: the most common rank of the linear modules (ties: the smaller);
  // conv_dim: the largest conv rank
  std::map<int64_t, int64_t> linear_ranks;
  int64_t conv_rank = 0;
  for (const auto& m : report.modules) {
    if (m.layout == delta_layout::conv)
      conv_rank = std::max(conv_rank, m.rank);
    else
      ++linear_ranks[m.rank];
  }
  int64_t dim = report.config_rank, best = 0;
  for (const auto& [rank, count] : linear_ranks)
    if (count > best) dim = rank, best = count;
  metadata_map md;
  md["ss_network_module"] = "networks.lora";
  md["ss_network_dim"] = fmt::format("{}", dim);
  md["ss_network_alpha"] = fmt::format("{}.0", dim);
  md["ss_network_args"] =
      conv_rank > 0 ? fmt::format(R"({{"conv_dim": "{}", "conv_alpha": "{}.0"}})", conv_rank, conv_rank) : "{}";
  md["ss_v2"] = "False";
  if (report.family == "sd1") md["ss_base_model_version"] = "sd_v1";
  if (report.family == "sdxl")
    md["ss_base_model_version"] = "sdxl_base_v1-0";                    // sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0
  if (report.family == "flux") md["ss_base_model_version"] = "flux1";  // flux_train_network.py
  return md;
}

// Deltas not extracted, with --save-modules: the bias of an extracted module
// becomes lora_B.bias (a delta; lora_bias: true); anything else is saved whole
// (modules_to_save). Fills saved_as.
void save_whole(std::vector<left_delta>& others, const std::map<std::string, size_t>& module_index,
                const model_files& base, const extract_options& options, adapter_data& data) {
  std::set<std::string> modules_to_save;
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
      rec.saved_as = peft::key(path, peft::role::bias);
    } else if (it != module_index.end()) {
      continue;  // another tensor of a LoRA module: PEFT cannot also save it whole
    } else {
      const auto bytes = t.data();
      data.saved.push_back({rec.tensor, tensor_data{t.info->type, rec.shape, {bytes.begin(), bytes.end()}}});
      rec.saved_as = peft::saved_key(rec.tensor);
      modules_to_save.insert(path);
    }
  }
  data.config.modules_to_save.assign(modules_to_save.begin(), modules_to_save.end());
}

// The adapter of the report's modules (factors moved out of `factors`) and the
// deltas saved whole; completes the report's whole-model totals.
adapter_data build_adapter(extract_report& report, std::vector<written_factors>& factors,
                           std::vector<left_delta>& others, const model_files& base, const extract_options& options) {
  adapter_data data;
  data.format = options.format == extract_format::kohya ? adapter_format::kohya : adapter_format::peft;
  data.config.peft_type = "LORA";
  data.config.base_model_name_or_path = options.base;
  std::map<std::string, size_t> module_index;  // module path -> position in data.modules
  for (size_t i = 0; i < report.modules.size(); ++i) {
    const extracted_module& m = report.modules[i];
    if (m.layout != delta_layout::embedding) module_index[m.name] = data.modules.size();
    data.config.fan_in_fan_out |= m.layout == delta_layout::conv1d;
    data.modules.push_back(module_of(m, factors[i]));
    data.config.target_modules.push_back(m.name);
  }
  factors.clear();
  std::sort(data.config.target_modules.begin(), data.config.target_modules.end());
  if (options.save_modules) save_whole(others, module_index, base, options, data);
  report.config_rank = *peft::make_config(data).r;

  // whole-model totals: saved deltas are kept exactly, the others lost whole
  double saved2 = 0, left2 = 0;
  for (auto& [rec, t] : others) {
    (rec.saved_as.empty() ? left2 : saved2) += rec.delta_norm * rec.delta_norm;
    report.others.push_back(rec);
  }
  const double extracted2 = report.total_delta_norm * report.total_delta_norm;
  const double all2 = extracted2 + saved2 + left2;
  report.model_delta_norm = std::sqrt(all2);
  report.saved_norm = std::sqrt(saved2);
  report.left_out_norm = std::sqrt(left2);
  report.model_energy = (report.total_energy * extracted2 + saved2) / all2;
  report.model_error =
      std::sqrt(report.total_error * report.total_error * extracted2 + left2) / report.model_delta_norm;
  if (data.format == adapter_format::kohya) data.metadata = kohya_metadata(report);
  return data;
}

}  // namespace

std::string_view delta_layout_name(delta_layout l) noexcept {
  switch (l) {
    case delta_layout::conv1d: return "conv1d";
    case delta_layout::embedding: return "embedding";
    case delta_layout::conv: return "conv";
    case delta_layout::linear: break;
  }
  return "linear";
}

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
  parse_targets(options.targets);  // a bad regex is a usage error before any file is touched
  check_output(options.out, {{"base model", options.base}, {"tuned model", options.tuned}}, options.force);
  model_files base = open_model(options.base);
  model_files tuned = open_model(options.tuned);
  check_same_names(base, tuned);

  extract_report report;
  report.out = options.out;
  report.format = options.format;
  report.budget = options.budget;
  report.n_tensors = static_cast<int64_t>(base.tensor_names.size());

  // select, factorize, build, write; progress over both models' bytes
  extract_progress tracker{progress, {}};
  tracker.event.total_items = base.tensor_names.size();
  for (const auto& name : base.tensor_names)
    tracker.event.total_bytes += base.at(name).info->n_bytes() + tuned.at(name).info->n_bytes();
  extract_plan plan = select_deltas(options, base, tuned, tracker);
  report.n_unchanged = plan.n_unchanged;
  report.family = std::string(kohya::checkpoint_family_name(plan.family));
  set_blas_threads(options.threads);
  if (options.budget > 0) {
    allocate_ranks(plan, options, base, tuned, tracker);
    report.n_unchanged = plan.n_unchanged;
  }
  std::vector<written_factors> factors = factorize_jobs(plan, options, base, tuned, tracker, report);
  adapter_data data = build_adapter(report, factors, plan.others, base, options);
  write_adapter(data, options.out, options.force);
  const std::string weights =
      options.format == extract_format::kohya ? options.out : options.out + "/adapter_model.safetensors";
  std::error_code ec;
  report.out_bytes = std::filesystem::file_size(weights, ec);
  return report;
}

}  // namespace lora
