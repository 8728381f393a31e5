#include "core/merge.h"

#include <cblas.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>

#include <fmt/format.h>

#include "core/adapter.h"
#include "core/blas.h"
#include "core/delta.h"
#include "core/dtype.h"
#include "core/scratch.h"
#include "core/thread-pool.h"
#include "core/vectorize.h"
#include "formats/error.h"
#include "formats/model-files.h"
#include "formats/safetensors.h"
#include "formats/staged-folder.h"

namespace lora {

namespace {

namespace fs = std::filesystem;

// Elements per row block: 1 MiB of f32 per thread. Each sgemm call packs the
// whole A factor (r x columns) again, so blocks need many rows to amortize
// that (at 64K elements a 5632-column block had 11 rows and packed more than
// it computed); beyond this size the passes over the block leave the caches.
constexpr uint64_t block_elements = uint64_t{1} << 18;

// ---------------------------------------------------------------- files

// Weights in formats other than safetensors: copying them would ship stale,
// unmerged weights beside the merged ones.
bool is_other_weight_file(const std::string& name) {
  static const char* suffixes[] = {".bin",  ".pt",   ".pth",         ".ckpt",       ".h5",  ".msgpack",
                                   ".gguf", ".onnx", ".safetensors", ".index.json", ".npz", ".pkl"};
  for (const char* s : suffixes) {
    const size_t n = std::strlen(s);
    if (name.size() >= n && name.compare(name.size() - n, n, s) == 0) return true;
  }
  return false;
}

std::string mib(uint64_t bytes) { return fmt::format("{:.1f} MiB", static_cast<double>(bytes) / (1024.0 * 1024.0)); }

// ---------------------------------------------------------------- numbers

// Distance, in f32 units in the last place, from f32 `x` (bits `u`, sign
// cleared) to the nearest midpoint between two neighbouring values of BF16
// (F16 when `f16`, subnormals included): where rounding x and rounding the
// exact value it approximates may differ. Branch-free so that the scan
// below vectorizes.
template <bool f16>
inline int32_t midpoint_distance(uint32_t u) noexcept {
  int32_t half = 1 << 15;  // BF16 keeps the top 16 bits of an f32
  if constexpr (f16) {
    const int32_t e = static_cast<int32_t>(u >> 23);
    int32_t drop = 13 + (113 - e > 0 ? 113 - e : 0);  // F16 subnormals keep fewer bits
    drop = drop > 24 ? 24 : drop;
    half = 1 << (drop - 1);
  }
  const uint32_t m = (u & 0x7fffffu) | 0x800000u;
  const int32_t diff = static_cast<int32_t>(m & static_cast<uint32_t>(2 * half - 1)) - half;
  const int32_t sign = diff >> 31;
  return (diff ^ sign) - sign;
}

// The f32 value R is off the exact W0 + sum_k w_k dW_k by at most 1/2 ulp(R)
// (the add into W0) + (r + 2) u sum|terms| (sgemm's length-r dot product and
// its alpha; u = 2^-24), and ulp(R) >= u |R|: at most 1/2 + (r + 2)
// sum|terms| / |R| ulps of R, with sum|terms| <= bound(row). An element is
// suspect when its distance d to a rounding midpoint is within
// 2 + (r + 3) bound / |R| ulps, i.e. (d - 2) |R| <= (r + 3) bound: only then
// can rounding R and rounding the exact value differ. Zeros and f32
// subnormals (where ulp(R) >= u |R| fails) are always suspect. The float
// comparison is done on the bits (both sides are >= 0 or t is negative, and
// then its bits are a negative int32), which keeps the loop free of branches.
template <bool f16>
inline int32_t suspect(float x, int32_t cb_bits) noexcept {
  const uint32_t u = std::bit_cast<uint32_t>(x) & 0x7fffffffu;
  const float t = (static_cast<float>(midpoint_distance<f16>(u)) - 2.0f) * std::bit_cast<float>(u);
  return static_cast<int32_t>(std::bit_cast<int32_t>(t) <= cb_bits) | static_cast<int32_t>(u < 0x800000u);
}

// Whether any of x[0..n) is suspect (see above), for BF16 and F16 output.
LORA_VECTORIZE bool any_suspect_bf16(const float* x, size_t n, int32_t cb_bits) {
  int32_t any = 0;
  for (size_t j = 0; j < n; ++j) any |= suspect<false>(x[j], cb_bits);
  return any != 0;
}
LORA_VECTORIZE bool any_suspect_f16(const float* x, size_t n, int32_t cb_bits) {
  int32_t any = 0;
  for (size_t j = 0; j < n; ++j) any |= suspect<true>(x[j], cb_bits);
  return any != 0;
}

// Recomputes, in double, the suspect elements of rows [rb, re) held in buf
// (f32, already merged) and overwrites their rounded value in `out`:
// W0 + sum_k w_k dW_k (delta_element) rounded once. Scans 256 elements at a
// time with a vectorizable test; suspects are rare (~1e-4 of elements).
template <bool f16>
void fix_near_midpoints(const std::vector<const delta_factors*>& factors, const std::vector<double>& weights,
                        const std::vector<float>& row_cb, dtype src_type, std::span<const uint8_t> in_bytes, int64_t rb,
                        int64_t re, uint64_t n_cols, const float* buf, uint8_t* out) {
  const size_t in_size = static_cast<size_t>(math_dtype_size(src_type));
  for (int64_t row = rb; row < re; ++row) {
    const int32_t cb = std::bit_cast<int32_t>(row_cb[static_cast<size_t>(row)]);
    const size_t row_off = static_cast<size_t>(row - rb) * n_cols;
    const float* x = buf + row_off;
    for (uint64_t j0 = 0; j0 < n_cols; j0 += 256) {
      const uint64_t j1 = std::min<uint64_t>(n_cols, j0 + 256);
      if (!(f16 ? any_suspect_f16 : any_suspect_bf16)(x + j0, j1 - j0, cb)) continue;
      for (uint64_t j = j0; j < j1; ++j) {
        if (!suspect<f16>(x[j], cb)) continue;
        const size_t e = row_off + j;
        double exact = 0;
        to_f64(src_type, in_bytes.subspan(e * in_size, in_size), std::span<double>(&exact, 1));
        for (size_t i = 0; i < factors.size(); ++i)
          exact += weights[i] * delta_element(*factors[i], row, static_cast<int64_t>(j));
        const uint16_t h = f16 ? f64_to_f16(exact) : f64_to_bf16(exact);
        std::memcpy(out + 2 * e, &h, 2);
      }
    }
  }
}

// ---------------------------------------------------------------- plan

// One adapter's share of a tensor, in adapter order.
struct contribution {
  const lora_module* module = nullptr;
  const std::string* adapter_file = nullptr;  // for messages
  double weight = 1.0;                        // adapter weight * --scale
  bool bias = false;                          // lora_B.bias into "<name>.bias"
};

struct tensor_job {
  size_t shard = 0;
  std::string name;
  tensor_ref source;  // the base tensor or its modules_to_save replacement
  bool replaced = false;
  dtype out_type = dtype::F32;
  std::vector<contribution> deltas;
  bool copy = false;  // byte for byte
  uint64_t out_begin = 0;
  uint64_t out_bytes = 0;
};

// A per-thread scratch buffer of at least n elements, kept for the next
// tensor; `slot` tells apart two buffers of the same type.
template <typename T, int slot>
T* thread_scratch(size_t n) {
  thread_local scratch<T> buffer;
  return buffer.get(n).data();
}

// Rounds rows of the f32/f64 buffer to the output dtype and checks for
// values a merge made non-finite.
template <typename T>
void decode_rows(dtype type, std::span<const uint8_t> src, std::span<T> dst) {
  if constexpr (sizeof(T) == 4)
    to_f32(type, src, dst);
  else
    to_f64(type, src, dst);
}
template <typename T>
void encode_rows(dtype type, std::span<const T> src, std::span<uint8_t> dst) {
  if constexpr (sizeof(T) == 4)
    from_f32(type, src, dst);
  else
    from_f64(type, src, dst);
}

// Computes one tensor in row blocks: decode W0 (or the replacement), apply
// every contribution in order, round once, write.
template <typename T>
void run_compute(const tensor_job& job, safetensors_writer& writer, bool allow_nonfinite) {
  const tensor_info& src = *job.source.info;
  const int in_size = math_dtype_size(src.type);
  const int out_size = math_dtype_size(job.out_type);
  if (src.n_elements == 0) return;
  const int64_t n_rows = src.shape.empty() ? 1 : src.shape[0];
  const uint64_t n_cols = src.n_elements / static_cast<uint64_t>(n_rows);

  // convert each module's factors once for the whole tensor
  std::vector<std::optional<delta_factors_t<T>>> factors(job.deltas.size());
  bool whole = false;
  for (size_t i = 0; i < job.deltas.size(); ++i) {
    const contribution& c = job.deltas[i];
    if (c.bias) {
      whole = true;  // a bias is one short vector
      continue;
    }
    if constexpr (sizeof(T) == 4)
      factors[i] = load_delta_factors(*c.module, src.shape, *c.adapter_file);
    else
      factors[i] = load_delta_factors_f64(*c.module, src.shape, *c.adapter_file);
    whole = whole || factors[i]->needs_whole_tensor();
  }
  // f32 path, plain LoRA into a 16-bit output: fix up near-midpoint elements
  bool exact_fixup =
      sizeof(T) == 4 && !job.deltas.empty() && (job.out_type == dtype::BF16 || job.out_type == dtype::F16);
  for (const contribution& c : job.deltas) exact_fixup = exact_fixup && !c.bias && !c.module->dora;
  // per row: (r + 3) sum_k |w_k| bound_k (see suspect()), for the fix-up
  std::vector<float> row_cb;
  std::vector<const delta_factors*> fix_factors;
  std::vector<double> fix_weights;
  if constexpr (sizeof(T) == 4) {
    if (exact_fixup) {
      std::vector<double> bounds(static_cast<size_t>(n_rows), 0.0);
      double rank_term = 0;
      for (size_t i = 0; i < job.deltas.size(); ++i) {
        const std::vector<double> b = delta_row_bounds(*factors[i]);
        for (size_t row = 0; row < b.size(); ++row) bounds[row] += std::fabs(job.deltas[i].weight) * b[row];
        rank_term += static_cast<double>(factors[i]->rank + 3);
        fix_factors.push_back(&*factors[i]);
        fix_weights.push_back(job.deltas[i].weight);
      }
      row_cb.resize(bounds.size());
      for (size_t row = 0; row < bounds.size(); ++row) row_cb[row] = static_cast<float>(rank_term * bounds[row]);
    }
  }
  const int64_t rows_per_block =
      whole ? n_rows : std::max<int64_t>(1, static_cast<int64_t>(block_elements / std::max<uint64_t>(n_cols, 1)));

  const size_t block_cap = static_cast<size_t>(std::min<int64_t>(rows_per_block, n_rows)) * n_cols;
  // per-thread buffers, reused from tensor to tensor (no fresh pages, no zeroing)
  T* buf = thread_scratch<T, 0>(block_cap);
  uint8_t* out = thread_scratch<uint8_t, 1>(block_cap * static_cast<size_t>(out_size));
  uint8_t* in = thread_scratch<uint8_t, 2>(block_cap * static_cast<size_t>(in_size));
  const mapped_file& map = job.source.file->map();
  const uint64_t file_offset = job.source.file->file_offset(src);
  const uint64_t in_row_bytes = n_cols * static_cast<uint64_t>(in_size);

  for (int64_t rb = 0; rb < n_rows; rb += rows_per_block) {
    const int64_t re = std::min(n_rows, rb + rows_per_block);
    const size_t n = static_cast<size_t>(re - rb) * n_cols;
    const uint64_t in_begin = static_cast<uint64_t>(rb) * in_row_bytes;

    // W = W0 (rows rb..re), read (not faulted in through the map: no page
    // faults, nothing to release, resident memory stays the buffers)
    const std::span<uint8_t> in_block(in, n * static_cast<size_t>(in_size));
    map.read(file_offset + in_begin, in_block);
    const std::span<const uint8_t> in_bytes = in_block;
    decode_rows<T>(src.type, in_bytes, std::span<T>(buf, n));
    // W += weight_k * dW_k, or DoRA's rescaling, adapter by adapter
    for (size_t i = 0; i < job.deltas.size(); ++i) {
      const contribution& c = job.deltas[i];
      if (c.bias)
        add_bias_delta(*c.module, c.weight, std::span<T>(buf, n), *c.adapter_file);
      else
        apply_module_rows(*factors[i], c.weight, rb, re, buf);
    }
    // one rounding to the output dtype
    std::span<uint8_t> out_bytes(out, n * static_cast<size_t>(out_size));
    encode_rows<T>(job.out_type, std::span<const T>(buf, n), out_bytes);
    if constexpr (sizeof(T) == 4) {
      // elements whose f32 value may round to the other side of a midpoint
      if (exact_fixup) {
        if (job.out_type == dtype::F16)
          fix_near_midpoints<true>(fix_factors, fix_weights, row_cb, src.type, in_bytes, rb, re, n_cols, buf,
                                   out_bytes.data());
        else
          fix_near_midpoints<false>(fix_factors, fix_weights, row_cb, src.type, in_bytes, rb, re, n_cols, buf,
                                    out_bytes.data());
      }
    }
    if (!allow_nonfinite) {
      const uint64_t bad = count_nonfinite(job.out_type, out_bytes);
      if (bad > 0 && bad > count_nonfinite(src.type, in_bytes))
        throw errors::invalid(job.source.file->path(), job.name,
                              fmt::format("the merge produced {} NaN or infinite values (rows {}..{}); refusing to "
                                          "write them (--allow-nonfinite writes them anyway)",
                                          bad, rb, re - 1));
    }
    writer.write_part(job.name, static_cast<uint64_t>(rb) * n_cols * static_cast<uint64_t>(out_size), out_bytes);
  }
}

void run_job(const tensor_job& job, safetensors_writer& writer, bool allow_nonfinite) {
  if (job.copy) {
    writer.copy_from(job.name, job.source.file->map().fd(), job.source.file->file_offset(*job.source.info),
                     job.source.file->path());
    return;
  }
  // f64 arithmetic when either side is F64 (no double rounding through f32)
  if (job.out_type == dtype::F64 || job.source.info->type == dtype::F64)
    run_compute<double>(job, writer, allow_nonfinite);
  else
    run_compute<float>(job, writer, allow_nonfinite);
}

// The jobs with the copies (`copy`) placed at evenly spaced positions among
// the others, each group keeping its order.
std::vector<tensor_job> spread_copies(std::vector<tensor_job> jobs) {
  std::vector<tensor_job> copies, computed, out;
  for (tensor_job& j : jobs) (j.copy ? copies : computed).push_back(std::move(j));
  if (copies.empty() || computed.empty()) return copies.empty() ? computed : copies;
  out.reserve(copies.size() + computed.size());
  // copy k goes before computed job floor(k * n / n_copies)
  size_t next = 0;
  for (size_t k = 0; k < copies.size(); ++k) {
    const size_t at = k * computed.size() / copies.size();
    while (next < at) out.push_back(std::move(computed[next++]));
    out.push_back(std::move(copies[k]));
  }
  while (next < computed.size()) out.push_back(std::move(computed[next++]));
  return out;
}

// Metadata of an output shard: the base's, `format: pt` when absent
// (transformers refuses a safetensors file whose metadata lacks it), and
// provenance under `lora.`.
metadata_map output_metadata(const std::optional<metadata_map>& base, const merge_options& options,
                             const std::vector<adapter>& adapters) {
  metadata_map m = base.value_or(metadata_map{});
  if (!m.contains("format")) m["format"] = "pt";
  m["lora.tool"] = std::string("lora ") + LORA_VERSION;
  m["lora.scale"] = fmt::format("{}", options.scale);
  m["lora.adapters"] = fmt::format("{}", adapters.size());
  for (size_t i = 0; i < adapters.size(); ++i) {
    std::error_code ec;
    const std::string canonical = fs::weakly_canonical(adapters[i].path, ec).string();
    m[fmt::format("lora.adapter.{}.path_fnv1a64", i)] =
        fmt::format("{:016x}", fnv1a64(ec ? adapters[i].path : canonical));
    m[fmt::format("lora.adapter.{}.format", i)] = std::string(adapter_format_name(adapters[i].format));
    m[fmt::format("lora.adapter.{}.weight", i)] = fmt::format("{}", options.adapters[i].weight);
  }
  return m;
}

// --out without trailing slashes; refuses an empty path.
fs::path normalize_out(const std::string& out) {
  if (out.empty()) throw errors::usage("--out is empty");
  fs::path p = fs::path(out).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  if (p.empty() || p == "." || p == "..") throw errors::usage(fmt::format("--out {} is not a folder name", out));
  return p;
}

}  // namespace

merge_report merge_model(const merge_options& options) {
  const auto start = std::chrono::steady_clock::now();
  // our thread pool runs the jobs, BLAS stays single-threaded inside each;
  // set first, so that OpenBLAS's idle workers stop spinning while we plan
  set_blas_threads(1);
  merge_report report;
  report.dry_run = options.dry_run;

  // 1. the command line: adapters, weights, --out
  if (options.adapters.empty()) throw errors::usage("no --adapter given");
  if (!std::isfinite(options.scale)) throw errors::usage("--scale must be a finite number");
  for (const merge_input& in : options.adapters)
    if (!std::isfinite(in.weight)) throw errors::usage(fmt::format("the weight of {} is not finite", in.path));
  const fs::path out = normalize_out(options.out);
  report.out = out.string();
  std::vector<named_input> inputs{{"base model", options.base}};
  for (const merge_input& in : options.adapters) inputs.push_back({"adapter", in.path});
  check_output(out.string(), inputs, options.force);
  std::error_code ec;
  const bool out_exists = fs::exists(fs::symlink_status(out, ec));

  // 2. open the base and the adapters; every module must fit
  model_files base = open_model(options.base);
  const bool bare_file = fs::is_regular_file(base.path);
  std::vector<adapter> adapters;
  adapters.reserve(options.adapters.size());
  for (const merge_input& in : options.adapters) {
    adapters.push_back(load_adapter(in.path));
    require_fit(adapters.back(), base);
  }

  // 3. what happens to each base tensor: contributions in adapter order
  std::map<std::string, std::vector<contribution>> deltas;
  std::map<std::string, const saved_tensor*> replacements;
  std::map<std::string, std::string> replaced_by;
  for (size_t k = 0; k < adapters.size(); ++k) {
    const adapter& a = adapters[k];
    const double weight = options.adapters[k].weight * options.scale;
    for (const lora_module& m : a.modules) {
      deltas[m.target].push_back({&m, &a.weights_path, weight, false});
      if (m.bias) deltas[m.name + ".bias"].push_back({&m, &a.weights_path, weight, true});
      ++report.n_modules;
    }
    for (const saved_tensor& s : a.saved) {
      auto [it, fresh] = replaced_by.emplace(s.target, a.path);
      if (!fresh)
        throw errors::invalid(a.path, s.target,
                              fmt::format("both {} and {} replace this tensor (modules_to_save)", it->second, a.path));
      replacements[s.target] = &s;
    }
  }

  // 4. jobs and the output layout of every shard
  std::vector<tensor_job> jobs;
  std::vector<safetensors_layout> layouts;
  std::map<std::string, std::string> weight_map;
  uint64_t total_tensor_bytes = 0;
  for (size_t s = 0; s < base.shards.size(); ++s) {
    const safetensors_file& shard = base.shards[s];
    std::vector<tensor_spec> specs;
    const size_t first_job = jobs.size();
    for (const tensor_info& t : shard.tensors()) {
      tensor_job job;
      job.shard = s;
      job.name = t.name;
      job.source = tensor_ref{&shard, &t};
      if (auto r = replacements.find(t.name); r != replacements.end()) {
        job.source = r->second->tensor;
        job.replaced = true;
      }
      if (auto d = deltas.find(t.name); d != deltas.end()) job.deltas = d->second;
      // the output dtype: --dtype for floating-point tensors, else the base's
      job.out_type = options.out_type && dtype_is_math(t.type) ? *options.out_type : t.type;
      if ((!job.deltas.empty() || job.source.info->type != job.out_type) &&
          !(dtype_is_math(job.source.info->type) && dtype_is_math(job.out_type)))
        throw errors::invalid(
            job.source.file->path(), t.name,
            fmt::format("cannot {} a {} tensor (only F16, BF16, F32, F64)",
                        job.deltas.empty() ? "convert" : "merge into",
                        dtype_name(dtype_is_math(job.source.info->type) ? job.out_type : job.source.info->type)));
      job.copy = job.deltas.empty() && job.source.info->type == job.out_type;
      specs.push_back({t.name, job.out_type, t.shape});
      weight_map[t.name] = base.shard_names[s];
      jobs.push_back(std::move(job));
    }
    layouts.push_back(plan_safetensors(std::move(specs), output_metadata(shard.metadata(), options, adapters)));
    for (size_t j = first_job; j < jobs.size(); ++j) {
      const tensor_info* o = layouts.back().find(jobs[j].name);
      jobs[j].out_begin = o->begin;
      jobs[j].out_bytes = o->n_bytes();
      total_tensor_bytes += o->n_bytes();
    }
  }
  // every delta and replacement has a base tensor (fit_adapter checked; a
  // bias target is checked here)
  for (const auto& [target, list] : deltas)
    if (!base.find_ref(target))
      throw fit_error(
          *list.front().adapter_file, base.path,
          {{{list.front().module->name, fmt::format("the base has no tensor {}", target), fit_issue::no_base_tensor}}});
  // shapes and dtypes of every module, before anything is written
  for (const tensor_job& job : jobs)
    for (const contribution& c : job.deltas) {
      if (c.bias) {
        if (c.module->bias->info->n_elements != job.source.info->n_elements)
          throw errors::shape_mismatch(*c.adapter_file, c.module->bias->info->name,
                                       fmt::format("{} values ({})", job.source.info->n_elements, job.name),
                                       fmt::format("{}", c.module->bias->info->n_elements));
        continue;
      }
      check_delta_factors(*c.module, job.source.info->shape, *c.adapter_file);
    }
  // NaN / Inf in any adapter tensor, before anything is computed: the dry run
  // refuses what the real merge refuses (--allow-nonfinite lets them through)
  if (!options.allow_nonfinite)
    for (const adapter& a : adapters)
      for (const lora_module& m : a.modules) check_finite_factors(m, a.weights_path);
  report.n_tensors = jobs.size();
  for (const tensor_job& job : jobs) {
    if (job.replaced) ++report.n_replaced;
    if (!job.deltas.empty())
      ++report.n_merged;
    else if (!job.replaced)
      ++(job.copy ? report.n_copied : report.n_converted);
  }

  // 5. the other files of the base folder: plain files and links inside the
  // model's tree only (formats' list_folder_files), never other weights
  std::vector<std::pair<std::string, std::string>> extra_files;  // source path, name
  uint64_t extra_bytes = 0;
  const std::string index_name = base.index_path.empty() ? "" : fs::path(base.index_path).filename().string();
  for (folder_file& f : list_folder_files(base)) {
    if (bare_file && f.name != "config.json") continue;  // a bare file's folder is not the model's
    if (f.skip.empty() && is_other_weight_file(f.name)) f.skip = "weights in another format, not merged";
    if (!f.skip.empty()) {
      report.skipped_files.push_back({f.name, f.skip});
      continue;
    }
    extra_bytes += fs::file_size(f.source, ec);
    report.files.push_back(f.name);
    extra_files.emplace_back(f.source, f.name);
  }
  std::string index_text;
  if (!base.index_path.empty()) {
    index_text = make_safetensors_index(total_tensor_bytes, weight_map);
    report.files.push_back(index_name);
  }
  for (size_t s = 0; s < layouts.size(); ++s) {
    report.files.push_back(base.shard_names[s]);
    report.bytes_written += layouts[s].file_size();
  }
  report.bytes_written += extra_bytes + index_text.size();
  std::sort(report.files.begin(), report.files.end());

  // 6. free space where --out goes
  const fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  struct statvfs vfs {};
  if (::statvfs(parent.c_str(), &vfs) != 0)
    throw errors::io(parent.string(), "cannot reach the output's parent folder", errno);
  report.bytes_free = static_cast<uint64_t>(vfs.f_bavail) * static_cast<uint64_t>(vfs.f_frsize);
  if (report.bytes_free < report.bytes_written)
    throw errors::io(out.string(), fmt::format("not enough free space: the merged model needs {}, {} available",
                                               mib(report.bytes_written), mib(report.bytes_free)));
  if (options.dry_run) {
    report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return report;
  }

  // 7. write into a temp folder beside --out
  const durability mode = options.sync ? durability::durable : durability::visible;
  staged_folder tmp(out, mode);
  try {
    for (const auto& [src, name] : extra_files) copy_file(src, tmp.path() + "/" + name, mode);
    std::vector<std::unique_ptr<safetensors_writer>> writers;
    for (size_t s = 0; s < layouts.size(); ++s)
      writers.push_back(
          std::make_unique<safetensors_writer>(tmp.path() + "/" + base.shard_names[s], std::move(layouts[s]), mode));
    for (auto& w : writers) w->sync_in_background(uint64_t{64} << 20);

    // tensors in output order, so reads and writes run front to back; the
    // in-kernel copies spread evenly among the computed tensors, so that two
    // copies rarely run at once (they would contend for the output file's lock
    // while the other core has arithmetic to do)
    std::sort(jobs.begin(), jobs.end(), [](const tensor_job& x, const tensor_job& y) {
      return x.shard != y.shard ? x.shard < y.shard : x.out_begin < y.out_begin;
    });
    jobs = spread_copies(std::move(jobs));
    uint64_t total_bytes = 0;
    for (const tensor_job& job : jobs) total_bytes += job.out_bytes;
    std::mutex progress_mutex;
    progress_event event;
    event.total_items = jobs.size();
    event.total_bytes = total_bytes;
    parallel_for(jobs.size(), options.threads, [&](size_t i) {
      const tensor_job& job = jobs[i];
      run_job(job, *writers[job.shard], options.allow_nonfinite);
      if (options.progress) {
        std::lock_guard<std::mutex> lock(progress_mutex);
        ++event.done_items;
        event.done_bytes += job.out_bytes;
        event.current = job.name;
        options.progress(event);
      }
    });
    for (auto& w : writers) w->commit();
    if (!index_text.empty()) write_file_atomic(tmp.path() + "/" + index_name, index_text, mode);
  } catch (const error& e) {
    throw tmp.shown(e);  // name the output, not the temp folder about to be removed
  }

  // 8. rename onto --out (swapped with the old one under --force)
  tmp.commit(out_exists);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace lora
