#include "core/merge.h"

#include <sys/statvfs.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/adapter.h"
#include "core/blas.h"
#include "core/delta.h"
#include "core/dtype.h"
#include "core/fp8.h"
#include "core/scratch.h"
#include "core/thread-pool.h"
#include "formats/error.h"
#include "formats/file-io.h"
#include "formats/hf-config.h"
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

// ---------------------------------------------------------------- plan

// One adapter's share of a tensor, in adapter order.
struct contribution {
  const lora_module* module = nullptr;
  const std::string* adapter_file = nullptr;  // for messages
  double weight = 1.0;                        // adapter weight * --scale
  bool bias = false;                          // lora_B.bias into "<name>.bias" (or the slice's bias)
  const row_slice* slice = nullptr;           // fused targets: the rows this module reaches; nullptr: all
};

struct tensor_job {
  size_t shard = 0;
  std::string name;      // in the model (a pipeline's "<component>.<name>")
  std::string out_name;  // in its output file
  tensor_ref source;     // the base tensor or its modules_to_save replacement
  bool replaced = false;
  dtype out_type = dtype::F32;
  std::vector<contribution> deltas;
  std::vector<const token_rows*> tokens;  // trainable_token_indices: rows replaced after the deltas
  bool copy = false;                      // byte for byte
  // block-scaled FP8 (core/fp8): the source's scale (the base's), and with
  // `requantize` the output stays FP8 with new codes and a new scale tensor
  // (`scale_name`, in shard `scale_shard`), written by this job; `by_weight`
  // marks a scale tensor that its weight's job writes (this job does nothing)
  const tensor_ref* scale = nullptr;
  fp8_block block;
  bool requantize = false;
  std::string scale_name;
  size_t scale_shard = 0;
  bool by_weight = false;
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

// Each module's factors converted once for the whole tensor (none for a
// bias contribution); `whole` is set when a block must be the whole tensor
// (a bias is one short vector; DoRA with per-column norms).
template <typename T>
std::vector<std::optional<delta_factors_t<T>>> load_factors(const tensor_job& job, bool& whole) {
  std::vector<std::optional<delta_factors_t<T>>> factors(job.deltas.size());
  whole = false;
  for (size_t i = 0; i < job.deltas.size(); ++i) {
    const contribution& c = job.deltas[i];
    if (c.bias) {
      whole = true;
      continue;
    }
    // a slice's module: its whole delta, placed row by row (add_slice_rows)
    const std::vector<int64_t>& shape = c.slice ? c.module->delta_shape : job.source.info->shape;
    if constexpr (sizeof(T) == 4)
      factors[i] = load_delta_factors(*c.module, shape, *c.adapter_file);
    else
      factors[i] = load_delta_factors_f64(*c.module, shape, *c.adapter_file);
    whole = whole || factors[i]->needs_whole_tensor();
  }
  return factors;
}

// f32 path, plain LoRA into a 16-bit output: rounded as the exact value
// would be (core/delta's exact_rounding); nullopt otherwise.
template <typename T>
std::optional<exact_rounding> exact_rounding_for(const tensor_job& job,
                                                 const std::vector<std::optional<delta_factors_t<T>>>& factors) {
  if constexpr (sizeof(T) != 4) {
    return std::nullopt;
  } else {
    // (rows replaced by trainable tokens are not W0 + deltas: rounded plainly, once)
    if (job.deltas.empty() || !job.tokens.empty() || (job.out_type != dtype::BF16 && job.out_type != dtype::F16))
      return std::nullopt;
    std::vector<const delta_factors*> f;
    std::vector<double> w;
    std::vector<const row_slice*> slices;
    bool sliced = false;
    for (size_t i = 0; i < job.deltas.size(); ++i) {
      if (job.deltas[i].bias || job.deltas[i].module->dora) return std::nullopt;
      f.push_back(&*factors[i]);
      w.push_back(job.deltas[i].weight);
      slices.push_back(job.deltas[i].slice);
      sliced = sliced || job.deltas[i].slice;
    }
    const int64_t n_rows = job.source.info->shape.empty() ? 1 : job.source.info->shape[0];
    return exact_rounding(std::move(f), std::move(w), job.out_type,
                          sliced ? std::move(slices) : std::vector<const row_slice*>{}, n_rows);
  }
}

// Refuses NaN / Inf that the merge produced in a block (more than W0 held).
void check_block_finite(const tensor_job& job, std::span<const uint8_t> in_bytes, std::span<const uint8_t> out_bytes,
                        int64_t rb, int64_t re) {
  const uint64_t bad = count_nonfinite(job.out_type, out_bytes);
  if (bad > 0 && bad > count_nonfinite(job.source.info->type, in_bytes))
    throw errors::invalid(job.source.file->path(), job.name,
                          fmt::format("the merge produced {} NaN or infinite values (rows {}..{}); refusing to "
                                      "write them (--allow-nonfinite writes them anyway)",
                                      bad, rb, re - 1));
}

// The FP8 side of one row block (core/fp8): requantizes buf into out_bytes
// and writes the block's rows of the new scale tensor.
void requantize_rows(const tensor_job& job, const std::vector<float>& old_scales, const double* buf, int64_t n_cols,
                     int64_t rb, int64_t re, std::span<uint8_t> out_bytes,
                     std::vector<std::unique_ptr<safetensors_writer>>& writers, bool allow_nonfinite) {
  const int64_t n_scale_cols = (n_cols + job.block.cols - 1) / job.block.cols;
  const int64_t sb = rb / job.block.rows, se = (re + job.block.rows - 1) / job.block.rows;
  const size_t n_scales = static_cast<size_t>((se - sb) * n_scale_cols);
  std::vector<float> scales(n_scales);
  const uint64_t bad = fp8_quantize_rows(
      buf, job.block, n_cols, rb, re,
      std::span<const float>(old_scales).subspan(static_cast<size_t>(sb * n_scale_cols), n_scales), out_bytes, scales);
  if (bad > 0 && !allow_nonfinite)
    throw errors::invalid(job.source.file->path(), job.name,
                          fmt::format("the merge produced {} blocks (rows {}..{}) whose largest value or FP8 scale is "
                                      "not finite; refusing to write them (--allow-nonfinite writes them anyway)",
                                      bad, rb, re - 1));
  std::vector<uint8_t> bytes(n_scales * 4);
  from_f32(dtype::F32, scales, bytes);
  writers[job.scale_shard]->write_part(job.scale_name, static_cast<uint64_t>(sb * n_scale_cols) * 4, bytes);
}

// trainable_token_indices: rows [rb, re) of the block `buf` ([re - rb, n_cols])
// that an adapter lists take that adapter's delta row, converted through
// core/dtype (rounded once to the output dtype with the rest of the block).
template <typename T>
void replace_token_rows(const tensor_job& job, int64_t rb, int64_t re, size_t n_cols, T* buf) {
  for (const token_rows* t : job.tokens) {
    const size_t row_bytes = n_cols * static_cast<size_t>(math_dtype_size(t->values.info->type));
    for (size_t k = 0; k < t->indices.size(); ++k) {
      const int64_t i = t->indices[k];
      if (i < rb || i >= re) continue;
      decode_rows<T>(t->values.info->type, t->values.data().subspan(k * row_bytes, row_bytes),
                     std::span<T>(buf + static_cast<size_t>(i - rb) * n_cols, n_cols));
    }
  }
}


// Computes one tensor in row blocks: read W0 (or the replacement; an FP8
// weight dequantized with its block scales), apply every contribution in
// order, round once (or requantize to FP8 with new block scales), write.
template <typename T>
void run_compute(const tensor_job& job, std::vector<std::unique_ptr<safetensors_writer>>& writers,
                 bool allow_nonfinite) {
  safetensors_writer& writer = *writers[job.shard];
  const tensor_info& src = *job.source.info;
  const size_t in_size = job.scale ? 1 : static_cast<size_t>(math_dtype_size(src.type));
  const size_t out_size = job.requantize ? 1 : static_cast<size_t>(math_dtype_size(job.out_type));
  if (src.n_elements == 0) return;
  const int64_t n_rows = src.shape.empty() ? 1 : src.shape[0];
  const uint64_t n_cols = src.n_elements / static_cast<uint64_t>(n_rows);
  bool whole = false;
  const auto factors = load_factors<T>(job, whole);
  const std::optional<exact_rounding> rounding = exact_rounding_for<T>(job, factors);
  const std::vector<float> scales = job.scale ? read_fp8_scales(*job.scale) : std::vector<float>{};
  int64_t rows_per_block =
      whole ? n_rows : std::max<int64_t>(1, static_cast<int64_t>(block_elements / std::max<uint64_t>(n_cols, 1)));
  // requantizing needs whole blocks of rows (a block's scale is its max)
  if (job.requantize && rows_per_block < n_rows)
    rows_per_block = std::max<int64_t>(1, rows_per_block / job.block.rows) * job.block.rows;
  const size_t block_cap = static_cast<size_t>(std::min<int64_t>(rows_per_block, n_rows)) * n_cols;
  // per-thread buffers, reused from tensor to tensor (no fresh pages, no zeroing)
  T* buf = thread_scratch<T, 0>(block_cap);
  uint8_t* out = thread_scratch<uint8_t, 1>(block_cap * out_size);
  uint8_t* in = thread_scratch<uint8_t, 2>(block_cap * in_size);
  const mapped_file& map = job.source.file->map();
  const uint64_t file_offset = job.source.file->file_offset(src);
  read_pass pass(map, file_offset, file_offset + src.n_bytes(), uint64_t{64} << 20);

  for (int64_t rb = 0; rb < n_rows; rb += rows_per_block) {
    const int64_t re = std::min(n_rows, rb + rows_per_block);
    const size_t n = static_cast<size_t>(re - rb) * n_cols;
    const uint64_t in_begin = file_offset + static_cast<uint64_t>(rb) * n_cols * in_size;
    // W = W0 (rows rb..re), read with pread (no page faults; a tensor not in
    // the page cache is read ahead and dropped once read, see read_pass)
    const std::span<uint8_t> in_bytes(in, n * in_size);
    pass.reading(in_begin + in_bytes.size());
    map.read(in_begin, in_bytes);
    pass.consumed(in_begin + in_bytes.size());
    if (job.scale) {
      if constexpr (sizeof(T) == 8)
        fp8_dequantize_rows(in_bytes, scales, job.block, static_cast<int64_t>(n_cols), rb, re, buf);
    } else {
      decode_rows<T>(src.type, in_bytes, std::span<T>(buf, n));
    }
    // W += weight_k * dW_k, or DoRA's rescaling, adapter by adapter
    for (size_t i = 0; i < job.deltas.size(); ++i) {
      const contribution& c = job.deltas[i];
      if (c.bias && c.slice)
        add_bias_slice(*c.module, c.weight, *c.slice, std::span<T>(buf, n), *c.adapter_file);
      else if (c.bias)
        add_bias_delta(*c.module, c.weight, std::span<T>(buf, n), *c.adapter_file);
      else if (c.slice)
        add_slice_rows(*factors[i], c.weight, *c.slice, rb, re, buf);
      else
        apply_module_rows(*factors[i], c.weight, rb, re, buf);
    }
    // trainable tokens: W[index] = delta row (TrainableTokensLayer.merge's index_copy)
    replace_token_rows(job, rb, re, static_cast<size_t>(n_cols), buf);
    // one rounding to the output dtype
    const std::span<uint8_t> out_bytes(out, n * out_size);
    if constexpr (sizeof(T) == 4) {
      if (rounding) rounding->round_rows(src.type, in_bytes, rb, re, buf, out_bytes);
    }
    if (job.requantize) {
      if constexpr (sizeof(T) == 8)
        requantize_rows(job, scales, buf, static_cast<int64_t>(n_cols), rb, re, out_bytes, writers, allow_nonfinite);
    } else if (!rounding) {
      encode_rows<T>(job.out_type, std::span<const T>(buf, n), out_bytes);
    }
    if (!allow_nonfinite) check_block_finite(job, in_bytes, out_bytes, rb, re);
    writer.write_part(job.out_name, static_cast<uint64_t>(rb) * n_cols * out_size, out_bytes);
  }
}

void run_job(const tensor_job& job, std::vector<std::unique_ptr<safetensors_writer>>& writers,
             bool allow_nonfinite) {
  if (job.by_weight) return;  // an FP8 scale: its weight's job writes it
  if (job.copy) {
    safetensors_writer& writer = *writers[job.shard];
    // in the kernel; a source not in the page cache is read ahead and dropped as it is copied
    const safetensors_file& file = *job.source.file;
    const uint64_t begin = file.file_offset(*job.source.info);
    read_pass pass(file.map(), begin, begin + job.source.info->n_bytes(), uint64_t{128} << 20);
    pass.reading(begin);
    writer.copy_from(job.out_name, file.map().fd(), begin, file.path(), [&](uint64_t done) {
      pass.reading(begin + done);
      pass.consumed(begin + done);
    });
    return;
  }
  // f64 arithmetic when either side is F64 (no double rounding through f32),
  // and for FP8 weights (an E4M3 code times its f32 scale is exact in f64,
  // and the merged value is rounded once, to E4M3 or to --dtype), and for
  // LyCORIS weight decomposition (V, its norms and the rescaled weight in
  // double, rounded once: core/delta)
  const bool lycoris_dora =
      std::any_of(job.deltas.begin(), job.deltas.end(), [](const contribution& c) { return c.module->dora_scale; });
  if (job.out_type == dtype::F64 || job.source.info->type == dtype::F64 || job.scale || lycoris_dora)
    run_compute<double>(job, writers, allow_nonfinite);
  else
    run_compute<float>(job, writers, allow_nonfinite);
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

// ---------------------------------------------------------------- plan

// Everything a merge will do, checked; what --dry-run returns. The jobs
// borrow from `base` and `adapters` (their vectors' elements never move).
struct merge_plan {
  fs::path out;
  bool out_exists = false;
  model_files base;
  fp8_model fp8;  // the base's block-scaled FP8 weights (core/fp8); none: not present
  std::vector<adapter> adapters;
  std::vector<tensor_job> jobs;                                  // base shard order, then data order
  std::vector<safetensors_layout> layouts;                       // one per shard
  std::vector<std::pair<std::string, std::string>> extra_files;  // source path, name
  std::vector<std::pair<std::string, std::string>> index_files;  // name, text: each sharded (component) folder's
  std::vector<std::string> folders;  // sub-folders of the output (a pipeline's components and other folders)
  std::string config_text;           // the rewritten config.json; empty: copied as it is
  bool single_file = false;          // --out NAME.safetensors for a single-file base: that one file
};

// Step 1: the command line (adapters, weights, --out) and the output rule.
void check_command_line(const merge_options& options, merge_plan& plan) {
  if (options.adapters.empty()) throw errors::usage("no --adapter given");
  if (!std::isfinite(options.scale)) throw errors::usage("--scale must be a finite number");
  for (const merge_input& in : options.adapters)
    if (!std::isfinite(in.weight)) throw errors::usage(fmt::format("the weight of {} is not finite", in.path));
  plan.out = normalize_out(options.out);
  std::vector<named_input> inputs{{"base model", options.base}};
  for (const merge_input& in : options.adapters) inputs.push_back({"adapter", in.path});
  check_output(plan.out.string(), inputs, options.force);
  std::error_code ec;
  plan.out_exists = fs::exists(fs::symlink_status(plan.out, ec));
}

// What happens to each base tensor: its contributions in adapter order, and
// the modules_to_save tensors that replace base tensors (at most one each).
struct tensor_changes {
  std::map<std::string, std::vector<contribution>> deltas;
  std::map<std::string, const saved_tensor*> replacements;
  std::map<std::string, std::vector<const token_rows*>> tokens;  // trainable_token_indices, adapter order
};

tensor_changes collect_changes(const merge_options& options, const std::vector<adapter>& adapters,
                               merge_report& report) {
  tensor_changes changes;
  std::map<std::string, std::string> replaced_by;
  for (size_t k = 0; k < adapters.size(); ++k) {
    const adapter& a = adapters[k];
    const double weight = options.adapters[k].weight * options.scale;
    for (const lora_module& m : a.modules) {
      ++report.n_modules;
      // fused targets: each slice's rows (and its bias's) in its own tensor
      for (const row_slice& sl : m.slices) {
        changes.deltas[sl.tensor].push_back({&m, &a.weights_path, weight, false, &sl});
        if (m.bias) changes.deltas[sl.bias].push_back({&m, &a.weights_path, weight, true, &sl});
      }
      if (!m.slices.empty()) continue;
      changes.deltas[m.target].push_back({&m, &a.weights_path, weight, false});
      if (m.bias) changes.deltas[m.name + ".bias"].push_back({&m, &a.weights_path, weight, true});
    }
    for (const saved_tensor& s : a.saved) {
      auto [it, fresh] = replaced_by.emplace(s.target, a.path);
      if (!fresh)
        throw errors::invalid(a.path, s.target,
                              fmt::format("both {} and {} replace this tensor (modules_to_save)", it->second, a.path));
      changes.replacements[s.target] = &s;
    }
    for (const token_rows& t : a.tokens) {
      // two adapters on one row: PEFT's _check_overlapping_tokens refuses it
      for (const token_rows* other : changes.tokens[t.target])
        for (int64_t i : t.indices)
          if (std::find(other->indices.begin(), other->indices.end(), i) != other->indices.end())
            throw errors::invalid(a.path, t.target,
                                  fmt::format("token {} is replaced by two adapters (trainable_token_indices)", i));
      changes.tokens[t.target].push_back(&t);
      report.n_token_rows += t.indices.size();
    }
  }
  return changes;
}

// The shard of `file` in the base.
size_t shard_of(const merge_plan& plan, const safetensors_file* file) {
  size_t s = 0;
  while (s + 1 < plan.base.shards.size() && &plan.base.shards[s] != file) ++s;
  return s;
}

// An FP8 model's weights and their block scales (core/fp8): an FP8 weight is
// copied, requantized (it has deltas, no --dtype) or dequantized to --dtype;
// a scale is copied, written by its requantized weight's job, or (--dtype:
// dropped, plan_jobs leaves it out). Returns false for other tensors.
bool plan_fp8_job(tensor_job& job, const tensor_changes& changes, const merge_options& options,
                  const merge_plan& plan) {
  if (const tensor_ref* scale = plan.fp8.scale_of(job.name)) {
    if (job.replaced) {
      if (!options.out_type) throw errors::invalid(job.source.file->path(), job.name, fp8_replaced_message);
      // --dtype: the scales are dropped; the replacement is converted as any tensor
      job.out_type = *options.out_type;
      const dtype src = job.source.info->type;
      if (!dtype_is_math(src))
        throw errors::invalid(job.source.file->path(), job.name,
                              fmt::format("cannot convert a {} tensor (only F16, BF16, F32, F64)", dtype_name(src)));
      job.copy = src == job.out_type;
      return true;
    }
    job.scale = scale;
    job.block = plan.fp8.block;
    job.out_type = options.out_type.value_or(dtype::F8_E4M3);
    job.copy = job.deltas.empty() && job.out_type == dtype::F8_E4M3;
    job.requantize = !job.copy && job.out_type == dtype::F8_E4M3;
    if (job.requantize) {
      job.scale_name = scale->info->name;
      job.scale_shard = shard_of(plan, scale->file);
    }
    return true;
  }
  if (plan.fp8.is_scale(job.name)) {
    const std::string weight = job.name.substr(0, job.name.size() - std::string_view("_scale_inv").size());
    job.out_type = dtype::F32;
    job.by_weight = changes.deltas.count(weight) > 0;
    job.copy = !job.by_weight;
    return true;
  }
  return false;
}

// One output tensor's job: its source (`base_source`, or its replacement),
// contributions and output dtype (--dtype for floating-point tensors, else
// `base_type`). Throws exit 3 for a dtype without arithmetic that would need any.
tensor_job make_job(size_t shard, const std::string& name, dtype base_type, tensor_ref base_source,
                    const tensor_changes& changes, const merge_options& options, const merge_plan& plan) {
  tensor_job job;
  job.shard = shard;
  job.name = name;
  job.source = base_source;
  if (auto r = changes.replacements.find(name); r != changes.replacements.end()) {
    job.source = r->second->tensor;
    job.replaced = true;
  }
  if (auto d = changes.deltas.find(name); d != changes.deltas.end()) job.deltas = d->second;
  if (auto t = changes.tokens.find(name); t != changes.tokens.end()) job.tokens = t->second;
  if (plan.fp8.present && plan_fp8_job(job, changes, options, plan)) return job;
  job.out_type = options.out_type && dtype_is_math(base_type) ? *options.out_type : base_type;
  const dtype src = job.source.info->type;
  const bool changed = !job.deltas.empty() || !job.tokens.empty();
  if (changed && src == dtype::F8_E4M3) throw errors::invalid(job.source.file->path(), name, fp8_unscaled_message);
  if ((changed || src != job.out_type) && !(dtype_is_math(src) && dtype_is_math(job.out_type)))
    throw errors::invalid(
        job.source.file->path(), name,
        fmt::format("cannot {} a {} tensor (only F16, BF16, F32, F64)", job.deltas.empty() ? "convert" : "merge into",
                    dtype_name(dtype_is_math(src) ? job.out_type : src)));
  job.copy = !changed && src == job.out_type;
  return job;
}

// A tensor the base lacks that the output gets, in the shard `shard`.
struct added_tensor {
  size_t shard = 0;
  std::string name;
  dtype base_type = dtype::F32;  // the embedding's for a tied head, else the saved tensor's
  tensor_ref source;             // the embedding (a tied head's W0) or the saved tensor
};

// The tensors the output adds (sorted by name): a tied base's lm_head that
// an adapter changes, in the embedding's shard; modules_to_save tensors the
// base lacks, in the last shard. A delta on any other missing name is left
// to check_contributions.
std::vector<added_tensor> plan_added(const tensor_changes& changes, const model_files& base) {
  std::vector<std::string> names;
  for (const auto& [target, list] : changes.deltas) names.push_back(target);
  for (const auto& [target, s] : changes.replacements) names.push_back(target);
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  std::vector<added_tensor> out;
  for (const std::string& name : names) {
    if (base.find_ref(name) != nullptr) continue;
    if (const std::optional<std::string> e = tied_head_source(base, name)) {
      const tensor_ref& embed = *base.find_ref(*e);
      size_t shard = 0;
      while (shard + 1 < base.shards.size() && &base.shards[shard] != embed.file) ++shard;
      out.push_back({shard, name, embed.info->type, embed});
    } else if (auto r = changes.replacements.find(name); r != changes.replacements.end()) {
      out.push_back({base.shards.size() - 1, name, r->second->tensor.info->type, r->second->tensor});
    }
  }
  return out;
}

// Step 4: the jobs and the output layout of every shard, in the base's
// sharding (a pipeline's: component by component); returns the weight map
// (output file name of each tensor, by model name) and adds up the tensor
// bytes per shard.
std::map<std::string, std::string> plan_jobs(const merge_options& options, const tensor_changes& changes,
                                             const std::vector<added_tensor>& added, merge_plan& plan,
                                             std::vector<uint64_t>& shard_tensor_bytes) {
  std::map<std::string, std::string> weight_map;
  shard_tensor_bytes.assign(plan.base.shards.size(), 0);
  for (size_t s = 0; s < plan.base.shards.size(); ++s) {
    const safetensors_file& shard = plan.base.shards[s];
    std::vector<tensor_spec> specs;
    const size_t first_job = plan.jobs.size();
    auto add_job = [&](tensor_job job) {
      job.out_name = plan.base.file_tensor_name(s, job.name);
      // a replacement with more rows (added tokens) gives the output its shape
      specs.push_back({job.out_name, job.out_type, job.source.info->shape});
      weight_map[job.name] = plan.base.shard_names[s];
      plan.jobs.push_back(std::move(job));
    };
    for (const tensor_info& t : shard.tensors()) {
      const std::string name = plan.base.shard_prefixes[s] + t.name;
      // merge --dtype of an FP8 model: dequantized, its block scales dropped
      if (options.out_type && plan.fp8.is_scale(name)) continue;
      add_job(make_job(s, name, t.type, tensor_ref{&shard, &t}, changes, options, plan));
    }
    for (const added_tensor& a : added)
      if (a.shard == s) add_job(make_job(s, a.name, a.base_type, a.source, changes, options, plan));
    plan.layouts.push_back(
        plan_safetensors(std::move(specs), output_metadata(shard.metadata(), options, plan.adapters)));
    for (size_t j = first_job; j < plan.jobs.size(); ++j) {
      const tensor_info* o = plan.layouts.back().find(plan.jobs[j].out_name);
      plan.jobs[j].out_begin = o->begin;
      plan.jobs[j].out_bytes = o->n_bytes();
      shard_tensor_bytes[s] += o->n_bytes();
    }
  }
  return weight_map;
}

// Every delta has a base tensor (fit_adapter checked the modules; a bias
// target is checked here), every module's shapes fit, and (unless allowed)
// no adapter tensor holds NaN / Inf: the dry run refuses what the merge would.
void check_contributions(const merge_options& options, const tensor_changes& changes,
                         const std::vector<added_tensor>& added, const merge_plan& plan) {
  for (const auto& [target, list] : changes.deltas)
    if (!plan.base.find_ref(target) &&
        // (clang before 16 cannot capture a structured binding: name it)
        std::none_of(added.begin(), added.end(), [&name = target](const added_tensor& a) { return a.name == name; }))
      throw fit_error(
          *list.front().adapter_file, plan.base.path,
          {{{list.front().module->name, fmt::format("the base has no tensor {}", target), fit_issue::no_base_tensor}}});
  for (const tensor_job& job : plan.jobs)
    for (const contribution& c : job.deltas) {
      if (c.bias && c.slice) {
        if (c.slice->tensor_row + c.slice->n_rows > static_cast<int64_t>(job.source.info->n_elements) ||
            c.slice->module_row + c.slice->n_rows > static_cast<int64_t>(c.module->bias->info->n_elements))
          throw errors::shape_mismatch(
              *c.adapter_file, c.module->bias->info->name,
              fmt::format("rows [{}, {}) of {} ({} values)", c.slice->tensor_row, c.slice->tensor_row + c.slice->n_rows,
                          job.name, job.source.info->n_elements),
              fmt::format("{}", c.module->bias->info->n_elements));
        continue;
      }
      if (c.slice) {
        check_delta_factors(*c.module, c.module->delta_shape, *c.adapter_file);
        continue;
      }
      if (c.bias) {
        if (c.module->bias->info->n_elements != job.source.info->n_elements)
          throw errors::shape_mismatch(*c.adapter_file, c.module->bias->info->name,
                                       fmt::format("{} values ({})", job.source.info->n_elements, job.name),
                                       fmt::format("{}", c.module->bias->info->n_elements));
        continue;
      }
      check_delta_factors(*c.module, job.source.info->shape, *c.adapter_file);
    }
  if (!options.allow_nonfinite)
    for (const adapter& a : plan.adapters)
      for (const lora_module& m : a.modules) check_finite_factors(m, a.weights_path);
}

// The fresh index of each sharded folder: the model's, or each sharded
// component's of a pipeline (its tensors under their file names).
void plan_indexes(const std::map<std::string, std::string>& weight_map, const std::vector<uint64_t>& shard_tensor_bytes,
                  merge_plan& plan) {
  const model_files& base = plan.base;
  if (!base.index_path.empty()) {
    uint64_t total = 0;
    for (uint64_t b : shard_tensor_bytes) total += b;
    plan.index_files.emplace_back(fs::path(base.index_path).filename().string(),
                                  make_safetensors_index(total, weight_map));
  }
  for (const model_component& c : base.components) {
    if (c.index_name.empty()) continue;
    const std::string prefix = c.name + ".", sub = c.name + "/";
    std::map<std::string, std::string> map;
    for (auto it = weight_map.lower_bound(prefix); it != weight_map.end() && it->first.starts_with(prefix); ++it)
      map.emplace(it->first.substr(prefix.size()), it->second.substr(sub.size()));
    uint64_t total = 0;
    for (size_t s = c.first_shard; s < c.first_shard + c.n_shards; ++s) total += shard_tensor_bytes[s];
    plan.index_files.emplace_back(sub + c.index_name, make_safetensors_index(total, map));
  }
}

// Step 5: the other files of the base folder: plain files and links inside
// the model's tree only (formats' list_folder_files; a pipeline's top folder
// and sub-folders, list_pipeline_files), never other weights; and the fresh
// index of each sharded folder.
void plan_other_files(const std::map<std::string, std::string>& weight_map,
                      const std::vector<uint64_t>& shard_tensor_bytes, merge_plan& plan, merge_report& report) {
  if (plan.single_file) {
    report.files.push_back(plan.out.filename().string());
    report.bytes_written += plan.layouts[0].file_size();
    return;
  }
  const bool bare_file = fs::is_regular_file(plan.base.path);
  std::error_code ec;
  std::vector<folder_file> files =
      plan.base.is_pipeline() ? list_pipeline_files(plan.base, plan.folders) : list_folder_files(plan.base);
  for (folder_file& f : files) {
    if (bare_file && f.name != "config.json") continue;  // a bare file's folder is not the model's
    if (f.name == "config.json" && !plan.config_text.empty()) {
      report.bytes_written += plan.config_text.size();
      report.files.push_back(f.name);
      continue;
    }
    if (f.skip.empty() && is_other_weight_file(f.name)) f.skip = "weights in another format, not merged";
    if (!f.skip.empty()) {
      report.skipped_files.push_back({f.name, f.skip});
      continue;
    }
    report.bytes_written += fs::file_size(f.source, ec);
    report.files.push_back(f.name);
    plan.extra_files.emplace_back(f.source, f.name);
  }
  plan_indexes(weight_map, shard_tensor_bytes, plan);
  for (const auto& [name, text] : plan.index_files) {
    report.files.push_back(name);
    report.bytes_written += text.size();
  }
  for (size_t s = 0; s < plan.layouts.size(); ++s) {
    report.files.push_back(plan.base.shard_names[s]);
    report.bytes_written += plan.layouts[s].file_size();
  }
  std::sort(report.files.begin(), report.files.end());
}

// Step 4b: config.json's fields that the output changes: tie_word_embeddings
// false when a tied base gets its own head, vocab_size when a saved
// embedding or head grows. Read and rewritten now, written with the rest.
void plan_config(const merge_options& options, const std::vector<added_tensor>& added, merge_plan& plan,
                 merge_report& report) {
  config_update update;
  for (const added_tensor& a : added)
    if (tied_head_source(plan.base, a.name)) update.tie_word_embeddings = false;
  for (const tensor_job& job : plan.jobs) {
    const tensor_ref* b = job.replaced ? plan.base.find_ref(job.name) : nullptr;
    if (b != nullptr && b->info->shape.size() == 2 && job.source.info->shape[0] > b->info->shape[0])
      update.vocab_size = std::max(update.vocab_size.value_or(0), job.source.info->shape[0]);
  }
  if (plan.fp8.present && options.out_type) {
    // dequantized: no quantization_config, the dtype asked (DeepSeek's
    // fp8_cast_bf16.py drops the scales and leaves the config to the user)
    update.remove_quantization_config = plan.fp8.from_config;
    static const std::map<dtype, std::string> torch_names{
        {dtype::BF16, "bfloat16"}, {dtype::F16, "float16"}, {dtype::F32, "float32"}, {dtype::F64, "float64"}};
    if (!plan.base.config_path.empty()) update.torch_dtype = torch_names.at(*options.out_type);
  }
  if (update.empty()) return;
  if (update.tie_word_embeddings) report.config_changes.push_back("tie_word_embeddings: false");
  if (update.vocab_size) report.config_changes.push_back(fmt::format("vocab_size: {}", *update.vocab_size));
  if (update.remove_quantization_config) report.config_changes.push_back("quantization_config: removed");
  if (update.torch_dtype) report.config_changes.push_back(fmt::format("torch_dtype: {}", *update.torch_dtype));
  if (plan.single_file && !(plan.base.config_path.empty() && !update.tie_word_embeddings && !update.vocab_size))
    throw errors::usage(fmt::format(
        "--out {} writes one .safetensors file, but the merged model needs its config.json changed ({}); give "
        "--out a folder",
        plan.out.string(), fmt::join(report.config_changes, ", ")));
  if (plan.base.config_path.empty()) return;
  plan.config_text = update_config_text(read_text_file(plan.base.config_path), plan.base.config_path, update);
}

// Step 6: free space where --out goes (statvfs). Throws exit 4.
void check_free_space(const fs::path& out, merge_report& report) {
  // the nearest folder that exists (missing parents are created when writing)
  fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  std::error_code ec;
  while (parent.has_parent_path() && parent != parent.parent_path() && !fs::exists(parent, ec))
    parent = parent.parent_path();
  if (!fs::exists(parent, ec)) parent = ".";
  struct statvfs vfs {};
  if (::statvfs(parent.c_str(), &vfs) != 0)
    throw errors::io(parent.string(), "cannot reach the output's parent folder", errno);
  report.bytes_free = static_cast<uint64_t>(vfs.f_bavail) * static_cast<uint64_t>(vfs.f_frsize);
  if (report.bytes_free < report.bytes_written)
    throw errors::io(out.string(), fmt::format("not enough free space: the merged model needs {}, {} available",
                                               mib(report.bytes_written), mib(report.bytes_free)));
}

// Steps 1 to 6: everything checked, nothing written.
void plan_merge(const merge_options& options, merge_plan& plan, merge_report& report) {
  check_command_line(options, plan);
  report.out = plan.out.string();
  // 2. open the base and the adapters; every module must fit
  plan.base = open_model(options.base);
  plan.fp8 = read_fp8_model(plan.base);
  plan.single_file =
      plan.out.extension() == ".safetensors" && fs::is_regular_file(plan.base.path) && plan.base.shards.size() == 1;
  // a folder (or sharded) base merges into a folder: a folder named
  // NAME.safetensors would look like one file to every other tool
  // (pipelines only for now: tests/e2e/e2e-verify.sh names HF-folder
  // outputs *.safetensors)
  if (plan.out.extension() == ".safetensors" && plan.base.is_pipeline())
    throw errors::usage(fmt::format("a pipeline folder merges into a folder: --out {} names a .safetensors file",
                                    plan.out.string()));
  plan.adapters.reserve(options.adapters.size());
  for (const merge_input& in : options.adapters) {
    plan.adapters.push_back(load_adapter(in.path));
    if (!options.skip_unmatched)
      require_fit(plan.adapters.back(), plan.base);
    else
      for (std::string& name : require_fit_skipping(plan.adapters.back(), plan.base))
        report.skipped_modules.emplace_back(in.path, std::move(name));
  }
  // 3, 4. what happens to each base tensor; jobs and output layouts
  const tensor_changes changes = collect_changes(options, plan.adapters, report);
  const std::vector<added_tensor> added = plan_added(changes, plan.base);
  std::vector<uint64_t> shard_tensor_bytes;
  const auto weight_map = plan_jobs(options, changes, added, plan, shard_tensor_bytes);
  check_contributions(options, changes, added, plan);
  for (const added_tensor& a : added) report.added.push_back(a.name);
  plan_config(options, added, plan, report);
  report.n_tensors = plan.jobs.size();
  if (plan.fp8.present) {
    report.fp8 = plan.fp8.config_text;
    if (options.out_type) report.n_dropped_scales = plan.fp8.scales.size();
  }
  for (const tensor_job& job : plan.jobs) {
    if (job.replaced && plan.base.find_ref(job.name) != nullptr) ++report.n_replaced;
    if (!job.deltas.empty() || !job.tokens.empty())
      ++report.n_merged;
    else if (job.by_weight)
      ++report.n_rescaled;
    else if (!job.replaced)
      ++(job.copy ? report.n_copied : report.n_converted);
  }
  plan_other_files(weight_map, shard_tensor_bytes, plan, report);
  check_free_space(plan.out, report);
}

// ---------------------------------------------------------------- write

// Steps 7 and 8: every file into a temp folder beside --out, then renamed
// onto it (swapped with the old one under --force).
// Every job, on the thread pool, into the shards' writers.
void run_jobs(const merge_options& options, std::vector<tensor_job> jobs,
              std::vector<std::unique_ptr<safetensors_writer>>& writers) {
  for (auto& w : writers) w->sync_in_background(uint64_t{64} << 20);
  // tensors in output order, so reads and writes run front to back; the
  // in-kernel copies spread evenly among the computed tensors, so that two
  // copies rarely run at once (they would contend for the output file's lock
  // while the other core has arithmetic to do)
  std::sort(jobs.begin(), jobs.end(), [](const tensor_job& x, const tensor_job& y) {
    return x.shard != y.shard ? x.shard < y.shard : x.out_begin < y.out_begin;
  });
  jobs = spread_copies(std::move(jobs));
  std::mutex progress_mutex;
  progress_event event;
  event.total_items = jobs.size();
  for (const tensor_job& job : jobs) event.total_bytes += job.out_bytes;
  parallel_for(jobs.size(), options.threads, [&](size_t i) {
    const tensor_job& job = jobs[i];
    run_job(job, writers, options.allow_nonfinite);
    if (options.progress) {
      std::lock_guard<std::mutex> lock(progress_mutex);
      ++event.done_items;
      event.done_bytes += job.out_bytes;
      event.current = job.name;
      options.progress(event);
    }
  });
  for (auto& w : writers) w->commit();
}

// The missing folders above --out, created; the topmost one created is
// returned (empty: none), for removal when the merge fails.
fs::path create_parents(const fs::path& out) {
  fs::path top;
  for (fs::path p = out.parent_path(); !p.empty() && !fs::exists(p); p = p.parent_path()) top = p;
  if (top.empty()) return top;
  std::error_code ec;
  fs::create_directories(out.parent_path(), ec);
  if (ec) throw errors::io(out.parent_path().string(), "cannot create the output's parent folder", ec.value());
  return top;
}

// Steps 7 and 8: every file into a temp folder beside --out, then renamed
// onto it (swapped with the old one under --force); a single-file output is
// written beside --out and renamed onto it (formats' safetensors_writer).
void write_merge(const merge_options& options, merge_plan& plan) {
  const durability mode = options.sync ? durability::durable : durability::visible;
  const fs::path created = create_parents(plan.out);
  try {
    if (plan.single_file) {
      std::vector<std::unique_ptr<safetensors_writer>> writers;
      writers.push_back(std::make_unique<safetensors_writer>(plan.out.string(), std::move(plan.layouts[0]), mode));
      run_jobs(options, std::move(plan.jobs), writers);
      return;
    }
    staged_folder tmp(plan.out, mode);
    try {
      for (const std::string& folder : plan.folders) {
        std::error_code ec;
        if (!fs::create_directory(tmp.path() + "/" + folder, ec) && ec)
          throw errors::io((plan.out / folder).string(), "cannot create the folder", ec.value());
      }
      for (const auto& [src, name] : plan.extra_files) copy_file(src, tmp.path() + "/" + name, mode);
      if (!plan.config_text.empty()) write_file_atomic(tmp.path() + "/config.json", plan.config_text, mode);
      std::vector<std::unique_ptr<safetensors_writer>> writers;
      for (size_t s = 0; s < plan.layouts.size(); ++s)
        writers.push_back(std::make_unique<safetensors_writer>(tmp.path() + "/" + plan.base.shard_names[s],
                                                               std::move(plan.layouts[s]), mode));
      run_jobs(options, std::move(plan.jobs), writers);
      for (const auto& [name, text] : plan.index_files) write_file_atomic(tmp.path() + "/" + name, text, mode);
      if (options.sync)
        for (const std::string& folder : plan.folders) fsync_path(tmp.path() + "/" + folder);
    } catch (const error& e) {
      throw tmp.shown(e);  // name the output, not the temp folder about to be removed
    }
    tmp.commit(plan.out_exists);
  } catch (...) {
    std::error_code ec;
    if (!created.empty()) fs::remove_all(created, ec);  // nothing left behind, the folders made for it neither
    throw;
  }
}

}  // namespace

merge_report merge_model(const merge_options& options) {
  const auto start = std::chrono::steady_clock::now();
  // our thread pool runs the jobs, BLAS stays single-threaded inside each;
  // set first, so that OpenBLAS's idle workers stop spinning while we plan
  set_blas_threads(1);
  merge_report report;
  report.dry_run = options.dry_run;
  merge_plan plan;
  plan_merge(options, plan, report);
  if (!options.dry_run) write_merge(options, plan);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace lora
