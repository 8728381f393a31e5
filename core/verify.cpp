#include "core/verify.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <mutex>
#include <random>

#include <fmt/format.h>

#include "core/adapter.h"
#include "core/delta.h"
#include "core/dtype.h"
#include "core/fp8.h"
#include "core/llama.h"
#include "core/thread-pool.h"
#include "formats/error.h"
#include "formats/hf-config.h"
#include "formats/model-files.h"
#include "formats/safetensors.h"

namespace lora {

namespace {

// A whole (small) tensor decoded to double: biases.
std::vector<double> read_f64(const tensor_ref& t) {
  std::vector<double> v(t.info->n_elements);
  to_f64(t.info->type, t.data(), v);
  return v;
}

// Elements per block of the weight and layer levels (512 KiB of double per
// buffer; a longer row is a block of its own): resident memory stays a few
// blocks whatever the tensor's size, as in merge.
constexpr size_t block_elements = size_t{1} << 16;

size_t rows_per_block(size_t n_cols) { return std::max<size_t>(1, block_elements / std::max<size_t>(n_cols, 1)); }

// A tensor as a row-major matrix: shape[0] rows (1 for a scalar) of the other dims.
struct row_view {
  size_t n_rows = 0, n_cols = 0;
};

row_view rows_of(const tensor_info& t) {
  const size_t n_rows = t.shape.empty() ? 1 : static_cast<size_t>(t.shape[0]);
  return {n_rows, n_rows == 0 ? 0 : static_cast<size_t>(t.n_elements) / n_rows};
}

// Bytes [begin, begin + n) of t's data, read with pread into buf: the map's
// pages are never faulted in, so nothing of the file stays resident.
std::span<const uint8_t> read_bytes(const tensor_ref& t, uint64_t begin, size_t n, std::vector<uint8_t>& buf) {
  buf.resize(n);
  t.file->map().read(t.file->file_offset(*t.info) + begin, buf);
  return buf;
}

// The block-scaled FP8 weights of both models (core/fp8): each one's scale
// tensor and block, by its tensor_info (unique across the two models).
struct fp8_weight {
  tensor_ref scale;
  fp8_block block;
};
struct fp8_index {
  std::map<const tensor_info*, fp8_weight> weights;
  std::set<const tensor_info*> scales;
};

const fp8_weight* fp8_of(const fp8_index& fx, const tensor_ref& t) {
  auto it = fx.weights.find(t.info);
  return it == fx.weights.end() ? nullptr : &it->second;
}

// Throws lora::error (exit 3) as read_fp8_model for an FP8 scheme merge refuses.
void add_fp8_weights(const model_files& m, fp8_index& fx) {
  const fp8_model f = read_fp8_model(m);
  for (const auto& [name, scale] : f.scales) {
    fx.weights.emplace(m.find_ref(name)->info, fp8_weight{scale, f.block});
    fx.scales.insert(scale.info);
  }
}

// The scales of an FP8 weight, read once per thread for consecutive blocks of one tensor.
const std::vector<float>& fp8_scales(const fp8_weight& w) {
  thread_local const tensor_info* cached_for = nullptr;
  thread_local std::vector<float> cached;
  if (cached_for != w.scale.info) {
    cached = read_fp8_scales(w.scale);
    cached_for = w.scale.info;
  }
  return cached;
}

// Rows [rb, re) of a math-dtype tensor viewed as [n_rows, n_cols], decoded to
// double into out; an FP8 weight of `fx` dequantized with its block scales.
void read_rows_f64(const tensor_ref& t, size_t n_cols, size_t rb, size_t re, std::vector<uint8_t>& buf,
                   std::vector<double>& out, const fp8_index& fx) {
  out.resize((re - rb) * n_cols);
  if (const fp8_weight* f = fp8_of(fx, t)) {
    const std::vector<float>& scales = fp8_scales(*f);
    fp8_dequantize_rows(read_bytes(t, rb * n_cols, out.size(), buf), scales, f->block, static_cast<int64_t>(n_cols),
                        static_cast<int64_t>(rb), static_cast<int64_t>(re), out.data());
    return;
  }
  const size_t size = static_cast<size_t>(math_dtype_size(t.info->type));
  to_f64(t.info->type, read_bytes(t, rb * n_cols * size, out.size() * size, buf), out);
}

// Counts one element whose error is err against tolerance tol into c: a
// failure when over it, the worst ratio (NaN: infinite) kept with its error.
void note_element(tensor_check& c, double err, double tol) {
  const double ratio = std::isnan(err) ? INFINITY : err / tol;
  if (ratio > 1) ++c.n_bad;
  if (ratio > c.ratio || std::isnan(err)) {
    c.ratio = ratio;
    c.max_error = err;
    c.tolerance = tol;
  }
}

// Half an E4M3 unit of y = w / s (|y| <= 448) times s: the most one rounding
// of w to E4M3 at block scale s moves it (3 mantissa bits: half of 2^(e-3)
// at exponent e, i.e. 2^(e-4); below 2^-6 the subnormal step 2^-9, half 2^-10).
double fp8_half_unit(double w, double s) {
  const double y = std::fabs(w) / s;
  if (!(y >= 0x1p-6)) return 0x1p-10 * s;
  return std::ldexp(1.0, std::ilogb(y) - 4) * s;
}

// An FP8 merged weight against E, one block of rows (see compare_block):
// tolerance = half an E4M3 unit of E at the element's stored block scale
// (the merge rounds E once to E4M3 at that scale) + the merge's f64 slack
// (rank + 4) 2^-53 (|W0| + |E| + |dW| + T_row). A scale larger than its
// block's maximum needs would widen that bound: each non-zero block must
// reach the largest code, 448 x scale (checked by the caller from block_max).
void compare_block_fp8(tensor_check& c, const std::vector<float>& scales, const fp8_block& block, int64_t rank,
                       const std::vector<double>& row_bounds, size_t n_cols, size_t first_row,
                       const std::vector<double>& w0, const std::vector<double>& expected,
                       const std::vector<double>& merged, std::vector<double>& block_max) {
  const double eps64 = std::ldexp(1.0, -53) * static_cast<double>(rank + 4);
  const size_t n_sc = (n_cols + static_cast<size_t>(block.cols) - 1) / static_cast<size_t>(block.cols);
  for (size_t i = 0; i < expected.size(); ++i) {
    const size_t row = first_row + i / n_cols, col = i % n_cols;
    const size_t b = row / static_cast<size_t>(block.rows) * n_sc + col / static_cast<size_t>(block.cols);
    const double e = expected[i], d = std::fabs(e - w0[i]);
    const double terms = row_bounds.empty() ? 0.0 : row_bounds[row];
    const double tol = fp8_half_unit(e, scales[b]) * (1 + 0x1p-20) +
                       eps64 * (std::fabs(w0[i]) + std::fabs(e) + d + terms);
    const double err = std::fabs(merged[i] - e);
    block_max[b] = std::max(block_max[b], std::fabs(merged[i]));
    note_element(c, err, tol);
  }
}

// One unit in the last place of `type` at magnitude x (subnormal spacing near 0).
double ulp(dtype type, double x) {
  const int mant = type == dtype::BF16 ? 7 : type == dtype::F16 ? 10 : 23;
  const int min_exp = type == dtype::F16 ? -14 : -126;
  // floor(log2 x) from the exponent bits: exact, and no libm call per
  // element (a double subnormal lies below every min_exp; NaN and x <= 0
  // give min_exp)
  const int biased = x > 0 ? static_cast<int>(std::bit_cast<uint64_t>(x) >> 52) : 0;
  if (biased == 0x7ff) return INFINITY;
  const int e = std::max(biased - 1023, min_exp);
  return std::bit_cast<double>(static_cast<uint64_t>(e - mant + 1023) << 52);  // 2^(e - mant)
}

// expected vs merged, one block of rows from `first_row` on (n_cols each),
// into c (the caller sets c.ok once every block is in):
// tolerance = 2 ulp(|E|) + ulp(|dW|) (a second rounding of the delta, as PEFT
// does) + f32 slack (rank + 4) 2^-24 (|W0| + |E| + |dW| + T_row),
// T_row = |s| sum_k |B A terms| of the row (delta_row_bounds): the f32 sum's error.
void compare_block(tensor_check& c, dtype type, int64_t rank, const std::vector<double>& row_bounds, size_t n_cols,
                   size_t first_row, const std::vector<double>& w0, const std::vector<double>& expected,
                   const std::vector<double>& merged) {
  const double eps32 = std::ldexp(1.0, -24) * static_cast<double>(rank + 4);
  // row by row: each row's bound looked up once (not by a division per element)
  const size_t width = std::max<size_t>(n_cols, 1);
  for (size_t row_start = 0, row = first_row; row_start < expected.size(); row_start += width, ++row) {
    const double terms = row_bounds.empty() ? 0.0 : row_bounds[row];
    const size_t row_end = std::min(expected.size(), row_start + width);
    for (size_t i = row_start; i < row_end; ++i) {
      const double e = expected[i], d = std::fabs(e - w0[i]);
      const double tol =
          2 * ulp(type, std::fabs(e)) + ulp(type, d) + eps32 * (std::fabs(w0[i]) + std::fabs(e) + d + terms);
      note_element(c, std::fabs(merged[i] - e), tol);
    }
  }
}

// The base tensor a target starts from: itself, or for a tied base's
// missing head the embedding (core/adapter's tied_head_source).
tensor_ref base_source(const model_files& base, const std::string& target) {
  if (const std::optional<std::string> e = tied_head_source(base, target)) return base.at(*e);
  return base.at(target);
}

// One adapter's module on a tensor, with its weight times the global scale.
struct contribution {
  const lora_module* module = nullptr;
  double weight = 1.0;
  const std::string* file = nullptr;  // the adapter's weights file, for messages
  const row_slice* slice = nullptr;   // fused targets: the rows this module reaches; nullptr: all
};

// The factors of a contribution: a slice's module has its whole delta (delta_shape).
delta_factors_f64 factors_of(const contribution& c, const std::vector<int64_t>& target_shape) {
  return load_delta_factors_f64(*c.module, c.slice ? c.module->delta_shape : target_shape, *c.file);
}

// Per-row bounds of a contribution on its target's rows (n_rows): a slice's
// module rows moved to the rows it reaches, zero elsewhere.
std::vector<double> target_row_bounds(const contribution& c, const delta_factors_f64& f, size_t n_rows) {
  std::vector<double> b = delta_row_bounds(f);
  if (!c.slice) return b;
  std::vector<double> out(n_rows, 0.0);
  for (int64_t k = 0; k < c.slice->n_rows; ++k)
    out[static_cast<size_t>(c.slice->tensor_row + k)] = b[static_cast<size_t>(c.slice->module_row + k)];
  return out;
}

// Every adapter, loaded and fitted, and what each tensor receives from them.
struct adapter_set {
  std::vector<adapter> adapters;
  std::map<std::string, std::vector<contribution>> modules;  // by target tensor, in adapter order
  std::map<std::string, std::vector<contribution>> biases;   // lora_bias, by "<module>.bias"
  std::map<std::string, const tensor_ref*> saved;            // modules_to_save, by target
  std::map<std::string, std::vector<const token_rows*>> tokens;  // trainable_token_indices, by target
  std::vector<std::string> targets;                          // the keys of `modules`, in first-seen order
};

// DoRA's first pass: ||V_o||^2 per output feature, V = W0 + w s dW, block by block.
std::vector<double> dora_norms_sq(const delta_factors_f64& f, double weight, const tensor_ref& base,
                                  const fp8_index& fx) {
  std::vector<double> sq(f.n_norms(), 0.0), v;
  std::vector<uint8_t> buf;
  const size_t n_rows = static_cast<size_t>(f.n_rows), n_cols = static_cast<size_t>(f.n_cols);
  for (size_t rb = 0; rb < n_rows; rb += rows_per_block(n_cols)) {
    check_interrupted();
    const size_t re = std::min(n_rows, rb + rows_per_block(n_cols));
    read_rows_f64(base, n_cols, rb, re, buf, v, fx);
    add_delta_rows(f, dora_v_weight(f, weight), static_cast<int64_t>(rb), static_cast<int64_t>(re), v.data());
    add_dora_norms_sq(f, static_cast<int64_t>(rb), static_cast<int64_t>(re), v.data(), sq);
  }
  return sq;
}

// What a touched tensor should hold: the adapter's replacement
// (modules_to_save), the base bias plus sum_k w_k s_k b_k (lora_bias), or
// W0 + sum_k w_k s_k B_k A_k (a DoRA module alone: rescaled). One is set.
struct expectation {
  const tensor_ref* replacement = nullptr;
  const std::vector<contribution>* biases = nullptr;
  const std::vector<contribution>* modules = nullptr;
  // trainable_token_indices: rows then replaced by the adapters' delta rows
  const std::vector<const token_rows*>* tokens = nullptr;
};

// trainable_token_indices: rows [rb, re) of e ([re - rb, n_cols]) that a
// delta lists take its values (PEFT's index_copy), decoded to double.
void replace_token_rows(const std::vector<const token_rows*>& tokens, size_t rb, size_t re, size_t n_cols,
                        std::vector<double>& e) {
  for (const token_rows* t : tokens) {
    const size_t row_bytes = n_cols * static_cast<size_t>(math_dtype_size(t->values.info->type));
    for (size_t k = 0; k < t->indices.size(); ++k) {
      const size_t i = static_cast<size_t>(t->indices[k]);
      if (i < rb || i >= re) continue;
      to_f64(t->values.info->type, t->values.data().subspan(k * row_bytes, row_bytes),
             std::span<double>(e.data() + (i - rb) * n_cols, n_cols));
    }
  }
}

// The factors of every module on a tensor, in double, with their summed row
// bounds (|w_k| delta_row_bounds_k: the f32 sum's error) and ranks.
struct tensor_deltas {
  std::vector<std::pair<delta_factors_f64, double>> factors;  // (factors, weight)
  std::vector<const row_slice*> slices;                       // per factor: its rows, or nullptr
  std::vector<double> row_bounds;
  int64_t rank = 0;
  std::vector<double> norms;  // DoRA (alone on the tensor): ||V_o||^2
};

tensor_deltas load_tensor_deltas(const std::vector<contribution>& cs, const tensor_ref& b, const fp8_index& fx) {
  tensor_deltas d;
  const size_t n_rows = b.info->shape.empty() ? 1 : static_cast<size_t>(b.info->shape[0]);
  for (const contribution& c : cs) {
    delta_factors_f64 f = factors_of(c, b.info->shape);
    const std::vector<double> bounds = target_row_bounds(c, f, n_rows);
    d.row_bounds.resize(bounds.size(), 0.0);
    for (size_t i = 0; i < bounds.size(); ++i) d.row_bounds[i] += std::fabs(c.weight) * bounds[i];
    d.rank += f.rank;
    if (f.dora) {
      // DoRA rescales V by m / ||V||: the slack scales with it (|E| / |V| = |m_o| / ||V_o||, at least 1;
      // LyCORIS: its dora_factor)
      d.norms = dora_norms_sq(f, c.weight, b, fx);
      double gain = 1;
      for (size_t o = 0; o < d.norms.size(); ++o)
        if (d.norms[o] > 0) gain = std::max(gain, std::fabs(dora_factor(f, f.magnitude[o], d.norms[o], c.weight)));
      for (double& t : d.row_bounds) t *= gain;
    }
    d.factors.emplace_back(std::move(f), c.weight);
    d.slices.push_back(c.slice);
  }
  return d;
}

// Takes rows [rb, re) of W0 and of the merged W~, decoded to double (the
// layer check fed by the weight check's pass: each block read and decoded once).
using rows_fn = std::function<void(size_t rb, size_t re, const double* w0, const double* wm)>;

// A touched tensor against its expected value E, formed in double through
// core/delta one block of rows at a time (DoRA: a first pass for the norms);
// each block of W0 and W~ is also given to `also` (when not empty).
tensor_check check_touched(const std::string& name, const tensor_ref& b, const tensor_ref& m, const expectation& x,
                           const std::string& replacement_file, const fp8_index& fx, const rows_fn& also) {
  tensor_check c{name, x.replacement ? tensor_kind::replaced
                       : x.biases    ? tensor_kind::bias
                       : x.modules || x.tokens ? tensor_kind::merged
                                     : tensor_kind::untouched};
  const tensor_ref& source = x.replacement ? *x.replacement : b;
  if (source.info->n_elements != b.info->n_elements || !(dtype_is_math(source.info->type) || fp8_of(fx, source)))
    throw errors::invalid(replacement_file, name, "the replacement tensor does not fit the base's (modules_to_save)");
  const auto [n_rows, n_cols] = rows_of(*b.info);
  const tensor_deltas d = x.modules ? load_tensor_deltas(*x.modules, b, fx) : tensor_deltas{};
  const fp8_weight* m8 = fp8_of(fx, m);
  std::vector<float> m_scales;
  std::vector<double> block_max;
  if (m8) {
    m_scales = read_fp8_scales(m8->scale);
    block_max.assign(m_scales.size(), 0.0);
  }
  // a bias is one short vector: one block
  const size_t rows = x.biases ? std::max<size_t>(n_rows, 1) : rows_per_block(n_cols);
  std::vector<uint8_t> buf;
  std::vector<double> w0, e, mv;
  for (size_t rb = 0; rb < n_rows; rb += rows) {
    check_interrupted();
    const size_t re = std::min(n_rows, rb + rows);
    read_rows_f64(source, n_cols, rb, re, buf, w0, fx);
    e = w0;
    if (x.biases)
      for (const contribution& k : *x.biases) {
        if (k.slice)
          add_bias_slice(*k.module, k.weight, *k.slice, std::span<double>(e), *k.file);
        else
          add_bias_delta(*k.module, k.weight, std::span<double>(e), *k.file);
      }
    for (size_t k = 0; k < d.factors.size(); ++k) {
      const auto& [f, weight] = d.factors[k];
      if (d.slices[k])
        add_slice_rows(f, weight, *d.slices[k], static_cast<int64_t>(rb), static_cast<int64_t>(re), e.data());
      else
        apply_module_rows(f, weight, static_cast<int64_t>(rb), static_cast<int64_t>(re), e.data(), d.norms);
    }
    if (x.tokens) replace_token_rows(*x.tokens, rb, re, n_cols, e);
    read_rows_f64(m, n_cols, rb, re, buf, mv, fx);
    if (m8)
      compare_block_fp8(c, m_scales, m8->block, d.rank, d.row_bounds, n_cols, rb, w0, e, mv, block_max);
    else
      compare_block(c, m.info->type, d.rank, d.row_bounds, n_cols, rb, w0, e, mv);
    if (also) also(rb, re, w0.data(), mv.data());
  }
  // FP8: every non-zero block reaches 448 x its scale (the scale is max|w| / 448)
  for (size_t k = 0; k < block_max.size(); ++k)
    if (block_max[k] != 0 && block_max[k] != 448.0 * static_cast<double>(m_scales[k])) {
      ++c.n_bad;
      c.ratio = INFINITY;
    }
  c.ok = c.n_bad == 0;
  return c;
}

tensor_check check_untouched(const std::string& name, const tensor_ref& b, const tensor_ref& m) {
  tensor_check c{name, tensor_kind::untouched};
  const dtype bt = b.info->type, mt = m.info->type;
  const bool math = dtype_is_math(bt) && dtype_is_math(mt);
  if (!math && bt != mt) {
    c.n_bad = b.info->n_elements;  // not comparable
  } else if (!math) {
    std::vector<uint8_t> bb, mb;
    const uint64_t n = b.info->n_bytes();
    for (uint64_t at = 0; at < n; at += block_elements) {
      check_interrupted();
      const size_t k = static_cast<size_t>(std::min<uint64_t>(block_elements, n - at));
      const std::span<const uint8_t> x = read_bytes(b, at, k, bb), y = read_bytes(m, at, k, mb);
      for (size_t i = 0; i < k; ++i) c.n_bad += x[i] != y[i];
    }
  } else {
    const size_t bs = static_cast<size_t>(math_dtype_size(bt)), ms = static_cast<size_t>(math_dtype_size(mt));
    std::vector<uint8_t> bb, mb, round;
    std::vector<double> x, y;
    const uint64_t n = b.info->n_elements;
    for (uint64_t at = 0; at < n; at += block_elements) {
      check_interrupted();
      const size_t k = static_cast<size_t>(std::min<uint64_t>(block_elements, n - at));
      const std::span<const uint8_t> xb = read_bytes(b, at * bs, k * bs, bb), yb = read_bytes(m, at * ms, k * ms, mb);
      // the same dtype and the same bytes: nothing to decode (one memcmp per block, not one per element)
      if (bt == mt && std::memcmp(xb.data(), yb.data(), xb.size()) == 0) continue;
      x.resize(k);
      y.resize(k);
      to_f64(bt, xb, x);
      to_f64(mt, yb, y);
      if (bt != mt) {
        // the base rounded once to the merged dtype
        round.resize(k * ms);
        from_f64(mt, x, round);
        to_f64(mt, round, x);
      }
      for (size_t i = 0; i < k; ++i) {
        const bool nan = std::isnan(x[i]) || std::isnan(y[i]);
        const bool differs = bt == mt ? std::memcmp(xb.data() + i * bs, yb.data() + i * bs, bs) != 0
                                      : !(x[i] == y[i]) && !(std::isnan(x[i]) && std::isnan(y[i]));
        if (!differs) continue;
        ++c.n_bad;
        const double err = nan ? (std::isnan(x[i]) && std::isnan(y[i]) ? 0.0 : INFINITY) : std::fabs(x[i] - y[i]);
        c.max_error = std::max(c.max_error, err);
      }
    }
  }
  c.ok = c.n_bad == 0;
  if (!c.ok) c.ratio = INFINITY;
  return c;
}

// An untouched FP8 weight kept FP8 on both sides: its codes compared byte for
// byte; when they differ, the error is measured on the dequantized values
// (codes times block scales), as an untouched BF16 tensor's is.
tensor_check check_untouched_fp8(const std::string& name, const tensor_ref& b, const tensor_ref& m,
                                 const fp8_index& fx) {
  tensor_check c = check_untouched(name, b, m);
  if (c.ok || b.info->shape.size() != 2 || m.info->shape != b.info->shape) return c;
  c.n_bad = 0;
  c.max_error = 0;
  const size_t n_rows = static_cast<size_t>(b.info->shape[0]), n_cols = static_cast<size_t>(b.info->shape[1]);
  std::vector<uint8_t> bb, mb;
  std::vector<double> x, y;
  for (size_t rb = 0; rb < n_rows; rb += rows_per_block(n_cols)) {
    check_interrupted();
    const size_t re = std::min(n_rows, rb + rows_per_block(n_cols));
    read_rows_f64(b, n_cols, rb, re, bb, x, fx);
    read_rows_f64(m, n_cols, rb, re, mb, y, fx);
    for (size_t i = 0; i < x.size(); ++i) {
      if (x[i] == y[i] || (std::isnan(x[i]) && std::isnan(y[i]))) continue;
      ++c.n_bad;
      const bool nan = std::isnan(x[i]) || std::isnan(y[i]);
      c.max_error = std::max(c.max_error, nan ? INFINITY : std::fabs(x[i] - y[i]));
    }
  }
  // the same values through other codes and scales (a rescaled block) pass
  c.ok = c.n_bad == 0;
  c.ratio = c.ok ? 0.0 : INFINITY;
  return c;
}

// ---------------------------------------------------------------- layer level

// Unit roundoff of a float dtype: a value rounded once to it is within
// u |v| of the exact v (half an ulp: 8, 11, 24, 53 significant bits).
double unit_roundoff(dtype type) {
  return type == dtype::BF16 ? 0x1p-8 : type == dtype::F16 ? 0x1p-11 : type == dtype::F32 ? 0x1p-24 : 0x1p-53;
}

// Half the subnormal spacing of a float dtype: the absolute rounding error
// below the normal range, where u |v| no longer bounds it.
double half_min_spacing(dtype type) {
  return type == dtype::BF16 ? 0x1p-134 : type == dtype::F16 ? 0x1p-25 : type == dtype::F32 ? 0x1p-150 : 0x1p-1074;
}

// The module as a map from n_in inputs to n_out outputs, on the stored tensor
// [n_rows, n_cols]: y = W x (plain, conv on the [out, in*kh*kw] view) or
// y = W^T x (transposed: fan_in_fan_out [in, out], embedding [vocab, dim]).
struct layer_shape {
  size_t n_rows = 0, n_cols = 0, n_in = 0, n_out = 0;
  bool transposed = false;
};

// The stored tensor [n_rows, n_cols] as a plain map from n_cols inputs to n_rows outputs.
layer_shape plain_shape(const tensor_info& t) {
  const size_t n_rows = t.shape.empty() ? 1 : static_cast<size_t>(t.shape[0]);
  const size_t n_cols = n_rows == 0 ? 0 : static_cast<size_t>(t.n_elements) / n_rows;
  return {n_rows, n_cols, n_cols, n_rows, false};
}

layer_shape shape_of(const delta_factors_f64& f) {
  layer_shape s{static_cast<size_t>(f.n_rows), static_cast<size_t>(f.n_cols), 0, 0, f.transposed};
  s.n_in = s.transposed ? s.n_rows : s.n_cols;
  s.n_out = s.transposed ? s.n_cols : s.n_rows;
  return s;
}

// What one pass over the stored rows of W0 (and of the merged W~) gathers
// for n inputs x [n, n_in]; the [n, n_out] sums run over j of W(o, j) x_j,
// W(o, j) = w[o, j] (plain) or w[j, o] (transposed).
struct layer_sums {
  std::vector<double> y0, abs0;  // W0 x, sum_j |W0(o, j) x_j|
  std::vector<double> ym, absm;  // W~ x, sum_j |W~(o, j) x_j|  (when W~ is given)
  std::vector<double> v_sq;      // DoRA: ||V_o||^2 per output feature, V = W0 + w s dW
  std::vector<double> bound_sq;  // DoRA: ||(|W0| + T)_o||^2 (when T is given)
  layer_sums(size_t n, size_t n_out)
      : y0(n * n_out), abs0(n * n_out), ym(n * n_out), absm(n * n_out), v_sq(n_out), bound_sq(n_out) {}
};

// y[v] = sum_j row[j] x_v[j] and a[v] = sum_j |row[j] x_v[j]|, v < G, x_v at
// x + v stride, each sum in the order of j (G independent sums in flight).
template <size_t G>
void row_dots(const double* row, const double* x, size_t stride, size_t n_cols, double* y, double* a) {
  double ys[G] = {}, as[G] = {};
  for (size_t j = 0; j < n_cols; ++j) {
    const double w = row[j];
    for (size_t v = 0; v < G; ++v) {
      const double p = w * x[v * stride + j];
      ys[v] += p;
      as[v] += std::fabs(p);
    }
  }
  for (size_t v = 0; v < G; ++v) {
    y[v] = ys[v];
    a[v] = as[v];
  }
}

// Adds stored rows [rb, re) to `acc`: w0 (and wm, when not null) hold
// exactly those rows; t_bound (empty, or one entry per stored row) is
// delta_row_bounds. DoRA's V rows are formed in v_buf through core/delta.
void accumulate_rows(const delta_factors_f64& f, const layer_shape& s, double weight, size_t rb, size_t re,
                     const double* w0, const double* wm, const std::vector<double>& t_bound, const double* x, size_t n,
                     layer_sums& acc, std::vector<double>& v_buf) {
  const size_t nc = s.n_cols;
  if (!s.transposed) {
    // row i is output i: y_i = sum_j W[i, j] x_j, for up to 4 inputs at once
    // (independent sums, each in the order of j: the same bits as one input
    // at a time, without waiting on one sum's additions)
    constexpr size_t group = 4;
    for (size_t i = rb; i < re; ++i) {
      const double* rows[2] = {w0 + (i - rb) * nc, wm ? wm + (i - rb) * nc : nullptr};
      for (size_t v0 = 0; v0 < n; v0 += group) {
        const size_t g = std::min(group, n - v0);
        for (int side = 0; side < 2; ++side) {
          const double* row = rows[side];
          if (!row) continue;
          double y[group] = {}, a[group] = {};
          if (g == group)
            row_dots<group>(row, x + v0 * s.n_in, s.n_in, nc, y, a);
          else
            for (size_t v = 0; v < g; ++v) row_dots<1>(row, x + (v0 + v) * s.n_in, s.n_in, nc, y + v, a + v);
          for (size_t v = 0; v < g; ++v) {
            const size_t at = (v0 + v) * s.n_out + i;
            (side == 0 ? acc.y0 : acc.ym)[at] = y[v];
            (side == 0 ? acc.abs0 : acc.absm)[at] = a[v];
          }
        }
      }
    }
  }
  for (size_t i = rb; i < re && s.transposed; ++i) {
    const double* r0 = w0 + (i - rb) * nc;
    const double* rm = wm ? wm + (i - rb) * nc : nullptr;
    for (size_t v = 0; v < n; ++v) {
      const double* xv = x + v * s.n_in;
      const size_t at = v * s.n_out;
      if (!s.transposed) {
        // row i is output i: y_i = sum_j W[i, j] x_j
        double y0 = 0, a0 = 0, ym = 0, am = 0;
        for (size_t j = 0; j < nc; ++j) {
          y0 += r0[j] * xv[j];
          a0 += std::fabs(r0[j] * xv[j]);
        }
        if (rm)
          for (size_t j = 0; j < nc; ++j) {
            ym += rm[j] * xv[j];
            am += std::fabs(rm[j] * xv[j]);
          }
        acc.y0[at + i] = y0;
        acc.abs0[at + i] = a0;
        acc.ym[at + i] = ym;
        acc.absm[at + i] = am;
      } else {
        // row i is input i: y_o += W[i, o] x_i
        const double xi = xv[i];
        if (xi == 0) continue;  // one-hot embedding inputs: only the looked-up rows
        for (size_t o = 0; o < nc; ++o) {
          acc.y0[at + o] += r0[o] * xi;
          acc.abs0[at + o] += std::fabs(r0[o] * xi);
        }
        if (rm)
          for (size_t o = 0; o < nc; ++o) {
            acc.ym[at + o] += rm[o] * xi;
            acc.absm[at + o] += std::fabs(rm[o] * xi);
          }
      }
    }
  }
  if (!f.dora) return;
  // DoRA: V = W0 + w s dW for these rows; squares per output feature (row, or column when transposed)
  v_buf.assign(w0, w0 + (re - rb) * nc);
  add_delta_rows(f, weight, static_cast<int64_t>(rb), static_cast<int64_t>(re), v_buf.data());
  for (size_t i = rb; i < re; ++i)
    for (size_t j = 0; j < nc; ++j) {
      const double vij = v_buf[(i - rb) * nc + j],
                   bij = t_bound.empty() ? 0 : std::fabs(w0[(i - rb) * nc + j]) + t_bound[i];
      acc.v_sq[s.transposed ? j : i] += vij * vij;
      acc.bound_sq[s.transposed ? j : i] += bij * bij;
    }
}

// y [n, n_out] += w s dW x for each input x, without forming dW (core/delta:
// B (A x), or a LyCORIS delta by row blocks); DoRA (alone on its tensor, y
// holding W0 x): then y_o *= m_o / ||V_o||.
void add_unmerged(const delta_factors_f64& f, const layer_shape& s, double weight, const double* x, size_t n,
                  const layer_sums& acc, std::vector<double>& y) {
  add_delta_times(f, weight, x, n, y.data());
  if (f.dora)
    for (size_t v = 0; v < n; ++v)
      for (size_t o = 0; o < s.n_out; ++o) y[v * s.n_out + o] *= f.magnitude[o] / std::sqrt(acc.v_sq[o]);
}

// y [n, n_out] += w s dW x for a module whose rows land in rows of the
// tensor (a slice): its whole output B (A x) [n, delta rows] formed, the
// slice's rows added to the tensor's output rows.
void add_unmerged_slice(const delta_factors_f64& f, const row_slice& sl, const layer_shape& s, double weight,
                        const double* x, size_t n, std::vector<double>& y) {
  const size_t m_out = static_cast<size_t>(f.n_rows);
  std::vector<double> ym(n * m_out, 0.0);
  add_delta_times(f, weight, x, n, ym.data());
  for (size_t v = 0; v < n; ++v)
    for (int64_t k = 0; k < sl.n_rows; ++k)
      y[v * s.n_out + static_cast<size_t>(sl.tensor_row + k)] += ym[v * m_out + static_cast<size_t>(sl.module_row + k)];
}

// The kind of module a layer check runs, from the first adapter's module.
layer_check layer_header(const std::vector<contribution>& cs) {
  const lora_module& m = *cs.front().module;
  layer_check c;
  // a fused tensor's layer is the tensor (several modules may reach its rows)
  c.name = cs.front().slice ? cs.front().slice->tensor : m.name;
  c.module = m.kind == module_kind::embedding ? layer_module::embedding
             : m.kind == module_kind::conv    ? layer_module::conv
             : m.fan_in_fan_out               ? layer_module::fan_in_fan_out
                                              : layer_module::linear;
  for (const contribution& k : cs) {
    c.dora = c.dora || k.module->dora || k.module->dora_scale;
    c.bias = c.bias || k.module->bias;
  }
  c.n_adapters = cs.size();
  return c;
}

layer_check layer_failure(layer_check c, layer_problem why) {
  c.problem = why;
  c.ok = false;
  c.ratio = INFINITY;
  c.n_bad = 1;
  return c;
}

// The bias of lora_bias modules: b0 + sum_k w_k s_k b_k against the merged model's.
struct layer_bias {
  std::vector<double> b0, ref, merged;
  dtype type = dtype::F32;
  bool f64 = false;  // merge computed it in double
};

// Reads the bias of module `name` for the contributions with lora_bias.
// Throws fit_error when the base has none.
layer_problem load_layer_bias(const std::vector<contribution>& cs, const model_files& base, const model_files& merged,
                              size_t n_out, layer_bias& lb) {
  const std::string name = cs.front().slice ? cs.front().slice->bias : cs.front().module->name + ".bias";
  std::optional<tensor_ref> bb = base.find(name), bm = merged.find(name);
  if (!bb)
    throw fit_error(
        *cs.front().file, base.path,
        {{{cs.front().module->name, fmt::format("the base has no tensor {}", name), fit_issue::no_base_tensor}}});
  if (!bm) return layer_problem::missing;
  if (bm->info->shape != bb->info->shape || bb->info->n_elements != n_out) return layer_problem::shape;
  if (!dtype_is_math(bm->info->type)) return layer_problem::dtype;
  lb.b0 = read_f64(*bb);
  lb.ref = lb.b0;
  for (const contribution& k : cs) {
    if (!k.module->bias) continue;
    if (k.slice)
      add_bias_slice(*k.module, k.weight, *k.slice, std::span<double>(lb.ref), *k.file);
    else
      add_bias_delta(*k.module, k.weight, std::span<double>(lb.ref), *k.file);
  }
  lb.merged = read_f64(*bm);
  lb.type = bm->info->type;
  lb.f64 = lb.type == dtype::F64 || bb->info->type == dtype::F64;
  return layer_problem::none;
}

// n seeded inputs [n, n_in]: N(0, 1) vectors, or one-hot token rows for an embedding.
std::vector<double> seeded_inputs(bool one_hot, size_t n_in, size_t n, uint64_t seed, size_t index) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(index)};
  std::mt19937_64 rng(seq);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> x(n * n_in, 0.0);
  if (one_hot) {
    for (size_t v = 0; v < n; ++v) x[v * n_in + rng() % n_in] = 1.0;
  } else {
    for (double& v : x) v = normal(rng);
  }
  return x;
}

// The constants of the layer tolerance (see check_layer).
struct layer_tolerance {
  double u = 0, eta = 0, uc = 0, c_acc = 0, c_eval = 0;
};

// y~ = W~ x against y_ref, element by element, into c.
void compare_outputs(layer_check& c, const layer_shape& s, const delta_factors_f64* dora,
                     const std::vector<double>& t_bound, const std::vector<double>& x, size_t n, const layer_sums& acc,
                     const std::vector<double>& y_ref, const layer_tolerance& t, const layer_bias* lb) {
  double big = 0;
  for (size_t v = 0; v < n; ++v) {
    const double* xv = x.data() + v * s.n_in;
    // P_o = sum_j |W0(o, j) x_j| + (T_o sum_j |x_j|, or sum_j T_j |x_j| when transposed)
    double sum_x = 0, sum_tx = 0;
    for (size_t j = 0; j < s.n_in; ++j) {
      sum_x += std::fabs(xv[j]);
      if (s.transposed) sum_tx += t_bound[j] * std::fabs(xv[j]);
    }
    for (size_t o = 0; o < s.n_out; ++o) {
      const size_t at = v * s.n_out + o;
      const double p_o = acc.abs0[at] + (s.transposed ? sum_tx : t_bound[o] * sum_x);
      const double s_o = acc.absm[at];
      const double f_o = dora ? std::fabs(dora->magnitude[o]) / std::sqrt(acc.v_sq[o]) : 1.0;
      double ym = acc.ym[at], yr = y_ref[at];
      double tol = 2 * t.u * s_o + 2 * t.eta * sum_x + t.c_acc * f_o * p_o + t.c_eval * (s_o + f_o * p_o);
      if (dora) tol += (t.c_acc * std::sqrt(acc.bound_sq[o] / acc.v_sq[o]) + t.uc) * s_o;
      if (lb) {
        ym += lb->merged[o];
        yr += lb->ref[o];
        const double ub = lb->f64 ? 0x1p-53 : 0x1p-24;
        tol += 2 * unit_roundoff(lb->type) * std::fabs(lb->merged[o]) + 2 * half_min_spacing(lb->type) +
               (2 * ub + 0x1p-52) * (std::fabs(lb->b0[o]) + std::fabs(lb->ref[o] - lb->b0[o]));
      }
      const double diff = std::fabs(ym - yr);
      const double ratio = std::isnan(diff) ? INFINITY : diff == 0 ? 0.0 : diff / tol;
      big = std::max(big, std::fabs(yr));
      if (ratio > 1) ++c.n_bad;
      if (std::isnan(diff) || diff > c.max_abs) c.max_abs = std::isnan(diff) ? INFINITY : diff;
      if (ratio > c.ratio || std::isnan(diff)) {
        c.ratio = ratio;
        c.tolerance = tol;
      }
    }
  }
  c.max_rel = big > 0 ? c.max_abs / big : c.max_abs;
  c.ok = c.n_bad == 0;
}

// One adapted module (every adapter's contribution to it): n_inputs seeded
// inputs through the merged weight and through base + adapters unmerged
// (module index `index` picks the inputs).
//
// Tolerance per output element o of one input x (W(o, j) as in layer_sums):
//   2 u S_o + 2 eta sum_j |x_j|             S_o = sum_j |W~(o, j) x_j|
//   + c f_o P_o                              P_o = sum_j (|W0(o, j)| + T(o, j)) |x_j|
//   + DoRA: (c ||(|W0| + T)_o|| / ||V_o|| + uc) S_o
//   + (n_in + r + 4) 2^-53 (S_o + f_o P_o)
//   + bias: 2 u_b |b~_o| + 2 eta_b + (2 uc + 2^-52)(|b0_o| + |w s b_o|)
// u, eta: unit roundoff and half the subnormal spacing of the merged dtype.
// k = 2: each stored weight W~ is the exact merged value rounded once (merge
// recomputes near-midpoint elements in double), so within u |W~| of it, and
// that one rounding moves y by at most u S_o; the second u S_o covers merge's
// f32 arithmetic before the rounding, negligible next to a 16-bit rounding.
// For F32 / F64 outputs that arithmetic is as large as the rounding itself
// (an F32 embedding merge of testdata reaches ratio 2.5 with 2 u S_o alone),
// so it is bounded explicitly: c = (r + 4) uc, uc = 2^-24 (merge computes in
// f32) or 2^-53 (in f64 when either side is F64), r the summed rank of the
// adapters; T(o, j) = sum_k |w_k| delta_row_bounds_k of the stored row
// holding W(o, j) (|s| sum_k |B A terms|); f_o = |m_o| / ||V_o|| for DoRA,
// else 1. DoRA's norm of an f32 V is off by at most the norm of V_o's
// error, and its product m / ||V|| V rounds once more in f32. The
// (n_in + r + 4) 2^-53 term is this check's own double arithmetic.
//
// A layer_run is one check under way: built from the tensors (steps 1-3), fed
// the stored rows of W0 and W~ in order (add_rows: by its own pass, run(),
// or by the weight check's pass over the same tensor), then finish().
class layer_run {
 public:
  layer_run(const std::vector<contribution>& cs, size_t index, const fp8_index& fx, const model_files& base,
            const model_files& merged, uint64_t seed, int n_inputs)
      : cs_(cs), fx_(fx), c_(layer_header(cs)), acc_(0, 0) {
    // 1. the tensors: base, merged, factors (their bounds summed, |w| each)
    const std::string& target = cs.front().slice ? cs.front().slice->tensor : cs.front().module->target;
    b_ = base_source(base, target);
    mt_ = merged.find(target);
    const fp8_weight* m8 = mt_ ? fp8_of(fx, *mt_) : nullptr;
    const layer_problem tensor_problem = !mt_                                       ? layer_problem::missing
                                         : mt_->info->shape != b_.info->shape      ? layer_problem::shape
                                         : !dtype_is_math(mt_->info->type) && !m8 ? layer_problem::dtype
                                                                                   : layer_problem::none;
    if (tensor_problem != layer_problem::none) {
      fail(tensor_problem);
      return;
    }
    int64_t rank = 0;
    // a slice's module is never transposed nor DoRA (fit_adapter): the tensor is a plain [out, in] map
    const bool sliced = std::any_of(cs.begin(), cs.end(), [](const contribution& k) { return k.slice != nullptr; });
    const size_t n_rows = b_.info->shape.empty() ? 1 : static_cast<size_t>(b_.info->shape[0]);
    for (const contribution& k : cs) {
      fs_.push_back(factors_of(k, b_.info->shape));
      const std::vector<double> bounds = target_row_bounds(k, fs_.back(), n_rows);
      t_bound_.resize(bounds.size(), 0.0);
      for (size_t i = 0; i < bounds.size(); ++i) t_bound_[i] += std::fabs(k.weight) * bounds[i];
      rank += fs_.back().rank;
    }
    s_ = sliced ? plain_shape(*b_.info) : shape_of(fs_.front());
    const dtype type = mt_->info->type;
    // merge computes in f64 when either side is F64 or FP8
    const bool f64_math = type == dtype::F64 || b_.info->type == dtype::F64 || m8 || fp8_of(fx, b_);
    tol_ = {unit_roundoff(type), half_min_spacing(type), f64_math ? 0x1p-53 : 0x1p-24};
    if (m8) {
      // FP8 at block scale s: relative half unit 2^-4 (4 significant bits),
      // absolute below the normal range half the subnormal step, 2^-10 s, at
      // the largest scale of the tensor
      const std::vector<float> scales = read_fp8_scales(m8->scale);
      tol_.u = 0x1p-4;
      tol_.eta = 0x1p-10 * static_cast<double>(*std::max_element(scales.begin(), scales.end()));
    }
    tol_.c_acc = static_cast<double>(rank + 4) * tol_.uc;
    tol_.c_eval = static_cast<double>(s_.n_in + static_cast<size_t>(rank) + 4) * 0x1p-53;

    // 2. the bias, for lora_bias: base + w s b against the merged model's
    if (c_.bias)
      if (const layer_problem p = load_layer_bias(cs, base, merged, s_.n_out, lb_); p != layer_problem::none) {
        fail(p);
        return;
      }

    // 3. seeded inputs
    n_ = static_cast<size_t>(n_inputs);
    x_ = seeded_inputs(c_.module == layer_module::embedding, s_.n_in, n_, seed, index);
    acc_ = layer_sums(n_, s_.n_out);

    // LyCORIS weight decomposition (alone on its tensor): its rescaling is
    // not one per output, so the reference is W' x with W' formed in double
    // through core/delta (apply_module_rows, V's norms from a first pass);
    // the slack of the delta scales with the largest |factor| (at least 1)
    const delta_factors_f64& f0 = fs_.front();
    if (c_.dora && f0.dora_lycoris) {
      lycoris_norms_ = dora_norms_sq(f0, cs.front().weight, b_, fx);
      double gain = 1;
      for (size_t k = 0; k < lycoris_norms_.size(); ++k)
        if (lycoris_norms_[k] > 0)
          gain = std::max(gain, std::fabs(dora_factor(f0, f0.magnitude[k], lycoris_norms_[k], cs.front().weight)));
      for (double& t : t_bound_) t *= gain;
      lycoris_plain_ = f0;
      lycoris_plain_.dora = false;  // accumulate_rows sums W' x only
      lycoris_ = true;
    }
  }

  // False when the check failed before any row (missing, shape, dtype).
  bool needs_rows() const noexcept { return !failed_; }

  // The base tensor and the merged one the rows come from (needs_rows() only).
  const tensor_ref& base_tensor() const noexcept { return b_; }
  const tensor_ref& merged_tensor() const noexcept { return *mt_; }

  // Stored rows [rb, re) of W0 and W~, in double; rows come in order, each once.
  void add_rows(size_t rb, size_t re, const double* w0, const double* wm) {
    if (lycoris_) {
      // W' = the merged value in double (core/delta), then W' x and W~ x
      w_prime_.assign(w0, w0 + (re - rb) * s_.n_cols);
      apply_module_rows(fs_.front(), cs_.front().weight, static_cast<int64_t>(rb), static_cast<int64_t>(re),
                        w_prime_.data(), lycoris_norms_);
      accumulate_rows(lycoris_plain_, s_, cs_.front().weight, rb, re, w_prime_.data(), wm, t_bound_, x_.data(), n_,
                      acc_, v_buf_);
    } else {
      accumulate_rows(fs_.front(), s_, cs_.front().weight, rb, re, w0, wm, t_bound_, x_.data(), n_, acc_, v_buf_);
    }
    rows_done_ = re;
  }

  // Whether every stored row has been added.
  bool fed() const noexcept { return rows_done_ == s_.n_rows; }

  // 4. its own pass over the stored rows of W0 and W~, in blocks read with pread and decoded to double
  void run() {
    std::vector<uint8_t> bytes;
    std::vector<double> w0_buf, wm_buf;
    for (size_t rb = 0; rb < s_.n_rows; rb += rows_per_block(s_.n_cols)) {
      const size_t re = std::min(s_.n_rows, rb + rows_per_block(s_.n_cols));
      check_interrupted();
      read_rows_f64(b_, s_.n_cols, rb, re, bytes, w0_buf, fx_);
      read_rows_f64(*mt_, s_.n_cols, rb, re, bytes, wm_buf, fx_);
      add_rows(rb, re, w0_buf.data(), wm_buf.data());
    }
  }

  // 5. y~ = W~ x against y_ref = W0 x + the adapters unmerged, element by element
  layer_check finish() {
    if (failed_) return c_;
    if (lycoris_) {
      compare_outputs(c_, s_, nullptr, t_bound_, x_, n_, acc_, acc_.y0, tol_, c_.bias ? &lb_ : nullptr);
      return c_;
    }
    std::vector<double> y_ref = acc_.y0;
    for (size_t k = 0; k < fs_.size(); ++k) {
      if (cs_[k].slice)
        add_unmerged_slice(fs_[k], *cs_[k].slice, s_, cs_[k].weight, x_.data(), n_, y_ref);
      else
        add_unmerged(fs_[k], s_, cs_[k].weight, x_.data(), n_, acc_, y_ref);
    }
    const delta_factors_f64* dora = c_.dora ? &fs_.front() : nullptr;  // alone on its tensor (load_adapters)
    compare_outputs(c_, s_, dora, t_bound_, x_, n_, acc_, y_ref, tol_, c_.bias ? &lb_ : nullptr);
    return c_;
  }

 private:
  void fail(layer_problem why) {
    c_ = layer_failure(c_, why);
    failed_ = true;
  }
  const std::vector<contribution>& cs_;
  const fp8_index& fx_;
  layer_check c_;
  bool failed_ = false;
  tensor_ref b_;
  std::optional<tensor_ref> mt_;
  std::vector<delta_factors_f64> fs_;
  std::vector<double> t_bound_;
  layer_shape s_;
  layer_tolerance tol_;
  layer_bias lb_;
  size_t n_ = 0;
  std::vector<double> x_;
  layer_sums acc_;
  std::vector<double> v_buf_;
  size_t rows_done_ = 0;
  // LyCORIS weight decomposition: V's norms, the factors without the
  // rescaling, a block of W'
  bool lycoris_ = false;
  std::vector<double> lycoris_norms_;
  delta_factors_f64 lycoris_plain_;
  std::vector<double> w_prime_;
};

// A whole layer check with its own pass over the rows.
layer_check check_layer(const std::vector<contribution>& cs, size_t index, const fp8_index& fx, const model_files& base,
                        const model_files& merged, uint64_t seed, int n_inputs) {
  layer_run run(cs, index, fx, base, merged, seed, n_inputs);
  if (run.needs_rows()) run.run();
  return run.finish();
}

}  // namespace

std::string_view tensor_kind_name(tensor_kind kind) noexcept {
  switch (kind) {
    case tensor_kind::merged: return "merged";
    case tensor_kind::replaced: return "replaced";
    case tensor_kind::bias: return "bias";
    case tensor_kind::untouched: return "untouched";
    case tensor_kind::missing: return "missing";
    case tensor_kind::extra: return "extra";
    case tensor_kind::shape: return "shape";
    case tensor_kind::scale: return "fp8 scale";
  }
  return "?";
}

std::string layer_kind_text(const layer_check& c) {
  switch (c.problem) {
    case layer_problem::missing: return "missing";
    case layer_problem::shape: return "shape";
    case layer_problem::dtype: return "dtype";
    case layer_problem::none: break;
  }
  std::string k = c.module == layer_module::linear           ? "linear"
                  : c.module == layer_module::fan_in_fan_out ? "fan_in_fan_out"
                  : c.module == layer_module::embedding      ? "embedding"
                                                             : "conv";
  if (c.dora) k += "+dora";
  if (c.bias) k += "+bias";
  return k;
}

std::vector<double> unmerged_layer_output(const delta_factors_f64& f, std::span<const double> w0,
                                          std::span<const double> x, double weight) {
  const layer_shape s = shape_of(f);
  if (f.dora_lycoris)
    throw errors::invalid("", f.target, "internal: no unmerged layer output for LyCORIS weight decomposition");
  if (w0.size() != s.n_rows * s.n_cols || s.n_in == 0 || x.size() % s.n_in != 0)
    throw errors::invalid("", f.target,
                          fmt::format("{} input values and a W0 of {} do not fit a [{}, {}] weight", x.size(),
                                      w0.size(), s.n_rows, s.n_cols));
  const size_t n = x.size() / s.n_in;
  layer_sums acc(n, s.n_out);
  std::vector<double> v_buf;
  accumulate_rows(f, s, weight, 0, s.n_rows, w0.data(), nullptr, {}, x.data(), n, acc, v_buf);
  std::vector<double> y = acc.y0;
  add_unmerged(f, s, weight, x.data(), n, acc, y);
  return y;
}

namespace {

// The model level's inputs, read and checked before any weight is: both
// config.json files parsed (a malformed one is refused at once, exit 3
// naming it) and the token ids checked against the vocabulary (exit 2).
struct model_inputs {
  hf_config base, merged;
  std::vector<int64_t> tokens;
};

// True when `a` and `b` hold the same tensor names with the same shapes.
bool same_tensor_shapes(const model_files& a, const model_files& b) {
  if (a.tensor_names.size() != b.tensor_names.size()) return false;
  for (const std::string& n : a.tensor_names) {
    const tensor_ref* x = a.find_ref(n);
    const tensor_ref* y = b.find_ref(n);
    if (x == nullptr || y == nullptr || x->info->shape != y->info->shape) return false;
  }
  return true;
}

// nullopt when the model level cannot run (`skipped` says why).
std::optional<model_inputs> prepare_model_level(const verify_options& o, const model_files& base,
                                                const model_files& merged, std::string& skipped) {
  if (base.is_pipeline() || merged.is_pipeline()) {
    skipped = "image model";  // a diffusers pipeline: no forward pass for UNets / DiTs
    return std::nullopt;
  }
  std::optional<std::string> mt;
  if (!base.config_path.empty()) mt = parse_model_type(read_text_file(base.config_path), base.config_path);
  if (!merged.config_path.empty()) (void)parse_model_type(read_text_file(merged.config_path), merged.config_path);
  if (!mt || !is_supported_architecture(*mt)) {
    skipped = mt ? fmt::format("model_type {} has no forward pass", *mt) : "no config.json";
    return std::nullopt;
  }
  // a merged single file (merge --out NAME.safetensors of a single-file
  // base) has no config.json beside it: the base's describes it when the
  // merged tensors are the base's names and shapes
  std::string merged_config = merged.config_path;
  if (merged_config.empty()) {
    if (!same_tensor_shapes(base, merged)) {
      skipped = "the merged model has no config.json";
      return std::nullopt;
    }
    merged_config = base.config_path;
  }
  model_inputs in{read_hf_config(base.config_path), read_hf_config(merged_config), o.tokens};
  // added tokens: the base runs with the adapter's larger embedding / head
  // (modules_to_save), the vocabulary merge wrote into the merged config.json
  if (in.merged.vocab_size > in.base.vocab_size) in.base.vocab_size = in.merged.vocab_size;
  // a partial checkpoint cannot run: skipped, not refused
  if (const std::optional<std::string> missing = missing_forward_tensor(base, in.base)) {
    skipped = fmt::format("the base has no {}: the model level needs the whole model", *missing);
    return std::nullopt;
  }
  if (in.tokens.empty()) {
    std::mt19937_64 rng(1234);
    for (int i = 0; i < 16; ++i)
      in.tokens.push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(in.base.vocab_size)));
  }
  check_forward_input(in.base, in.tokens);
  check_forward_input(in.merged, in.tokens);
  return in;
}

// Every adapter loaded and fitted to the base, its modules by target with
// weight_k * scale. Throws as verify_merge.
adapter_set load_adapters(const verify_options& o, const model_files& base,
                          std::vector<std::pair<std::string, std::string>>& skipped) {
  if (o.adapters.empty()) throw errors::usage("no --adapter given");
  if (!std::isfinite(o.scale)) throw errors::usage("--scale must be a finite number");
  adapter_set set;
  set.adapters.reserve(o.adapters.size());  // the maps point into it
  for (const verify_input& in : o.adapters) {
    if (!std::isfinite(in.weight)) throw errors::usage(fmt::format("the weight of {} is not finite", in.path));
    set.adapters.push_back(load_adapter(in.path));
    if (!o.skip_unmatched)
      require_fit(set.adapters.back(), base);
    else
      for (std::string& name : require_fit_skipping(set.adapters.back(), base)) skipped.emplace_back(in.path, name);
  }
  for (size_t i = 0; i < set.adapters.size(); ++i) {
    const adapter& a = set.adapters[i];
    const double w = o.adapters[i].weight * o.scale;
    for (const lora_module& m : a.modules) {
      check_finite_factors(m, a.weights_path);
      // fused targets: each slice's rows (and its bias's) in its own tensor
      for (const row_slice& sl : m.slices) {
        std::vector<contribution>& on = set.modules[sl.tensor];
        if (on.empty()) set.targets.push_back(sl.tensor);
        on.push_back({&m, w, &a.weights_path, &sl});
        if (m.bias) set.biases[sl.bias].push_back({&m, w, &a.weights_path, &sl});
      }
      if (!m.slices.empty()) continue;
      std::vector<contribution>& on = set.modules[m.target];
      if (on.empty()) set.targets.push_back(m.target);
      on.push_back({&m, w, &a.weights_path});
      if (on.size() > 1 && std::any_of(on.begin(), on.end(),
                                       [](const contribution& c) { return c.module->dora || c.module->dora_scale; }))
        throw errors::invalid(a.weights_path, m.name,
                              "a DoRA module shares its tensor with another adapter's: verify checks DoRA alone");
      if (m.bias) set.biases[m.name + ".bias"].push_back({&m, w, &a.weights_path});
    }
    for (const saved_tensor& s : a.saved) set.saved[s.target] = &s.tensor;
    for (const token_rows& t : a.tokens) set.tokens[t.target].push_back(&t);
  }
  return set;
}

// Progress of the weight and layer levels (one pass over both models'
// bytes), then of the model level (both models again); serialized.
struct verify_progress {
  explicit verify_progress(const progress_fn& f) : fn(f) {}
  const progress_fn& fn;
  std::mutex mutex;
  progress_event event;
  void add(uint64_t bytes, const std::string& what) {
    if (!fn) return;
    std::lock_guard<std::mutex> lock(mutex);
    ++event.done_items;
    event.done_bytes += bytes;
    event.current = what;
    fn(event);
  }
};

// One base tensor against its expected value (the weight level); when
// `layer` (may be null) runs on the same two tensors, the weight check's pass
// feeds it each block as it is read.
tensor_check check_weight(const std::string& name, const model_files& base, const model_files& merged,
                          const adapter_set& set, const fp8_index& fx, layer_run* layer = nullptr) {
  // an FP8 block scale: compared as it is when its weight is untouched and
  // stays FP8; else rewritten (requantized) or dropped (--dtype), and
  // checked through its weight's dequantized values
  if (const tensor_ref* bs = base.find_ref(name); bs && fx.scales.count(bs->info)) {
    const std::string weight = name.substr(0, name.size() - std::string_view("_scale_inv").size());
    const std::optional<tensor_ref> m = merged.find(name);
    const std::optional<tensor_ref> mw = merged.find(weight);
    if (!m || set.modules.count(weight) || !mw || !fp8_of(fx, *mw)) return {name, tensor_kind::scale};
    return check_untouched(name, *bs, *m);
  }
  // a modules_to_save tensor gives the expected shape (a new head, added
  // tokens); a tied base's missing head starts from the embedding
  const auto saved = set.saved.find(name);
  const tensor_ref b = saved != set.saved.end() ? *saved->second : base_source(base, name);
  std::optional<tensor_ref> m = merged.find(name);
  if (!m || m->info->shape != b.info->shape) {
    tensor_check c{name, m ? tensor_kind::shape : tensor_kind::missing};
    c.ok = false;
    if (m) {
      c.base_shape = b.info->shape;
      c.merged_shape = m->info->shape;
    }
    return c;
  }
  const bool b8 = fp8_of(fx, b) != nullptr, m8 = fp8_of(fx, *m) != nullptr;
  const bool math = (dtype_is_math(b.info->type) || b8) && (dtype_is_math(m->info->type) || m8);
  expectation x;
  if (saved != set.saved.end())
    x.replacement = saved->second;
  else if (auto it = set.biases.find(name); it != set.biases.end())
    x.biases = &it->second;
  else if (auto it = set.modules.find(name); it != set.modules.end())
    x.modules = &it->second;
  if (auto it = set.tokens.find(name); it != set.tokens.end() && !x.replacement) x.tokens = &it->second;
  const bool touched = x.replacement || x.biases || x.modules || x.tokens;
  // an FP8 weight dequantized by the merge (--dtype) is compared by value
  if (!touched && b8 && m8) return check_untouched_fp8(name, b, *m, fx);
  if (!math || !(touched || b8 != m8)) return check_untouched(name, b, *m);
  rows_fn also;
  if (layer && layer->needs_rows() && x.modules && layer->base_tensor().info == b.info &&
      layer->merged_tensor().info == m->info)
    also = [layer](size_t rb, size_t re, const double* w0, const double* wm) { layer->add_rows(rb, re, w0, wm); };
  return check_touched(name, b, *m, x, set.adapters.front().weights_path, fx, also);
}

// Weight and layer levels in one pass: every base tensor against its
// expected value, then the merged model's extra tensors, into r.tensors;
// every adapted module on seeded inputs into r.layers. One job per base
// tensor on the thread pool; a module's layer check takes the blocks of its
// target's weight check as they are read (one read and one decode of each).
void check_weights_and_layers(const model_files& base, const model_files& merged, const adapter_set& set,
                              const fp8_index& fx, const verify_options& o, verify_progress& progress,
                              verify_report& r) {
  // a fused-experts parameter ([E, d1, d2]) has no single layer to run
  auto experts = [&](const std::string& target) {
    const lora_module& m = *set.modules.at(target).front().module;
    return m.kind == module_kind::parameter && base_source(base, target).info->shape.size() == 3;
  };
  std::map<std::string, size_t> target_index;
  std::vector<uint8_t> layer_done(set.targets.size(), 0);
  for (size_t i = 0; i < set.targets.size(); ++i) {
    if (experts(set.targets[i])) {
      r.layers_skipped.push_back(set.targets[i]);
      layer_done[i] = 2;
      continue;
    }
    target_index.emplace(set.targets[i], i);
  }
  std::vector<tensor_check> checks(base.tensor_names.size());
  r.layers.resize(set.targets.size());
  parallel_for(base.tensor_names.size(), o.threads, [&](size_t i) {
    check_interrupted();
    const std::string& name = base.tensor_names[i];
    if (auto it = target_index.find(name); it != target_index.end()) {
      // the layer check rides on the weight check's pass (each block read and decoded once)
      layer_run layer(set.modules.at(name), it->second, fx, base, merged, o.seed, o.n_inputs);
      checks[i] = check_weight(name, base, merged, set, fx, &layer);
      if (layer.needs_rows() && !layer.fed()) layer.run();
      r.layers[it->second] = layer.finish();
      layer_done[it->second] = 1;  // one job per target: no two jobs write one element
    } else {
      checks[i] = check_weight(name, base, merged, set, fx);
    }
    const std::optional<tensor_ref> m = merged.find(name);
    progress.add(base.at(name).info->n_bytes() + (m ? m->info->n_bytes() : 0), name);
  });
  // targets that are not base tensor names (cannot happen after require_fit; kept total)
  for (size_t k = 0; k < set.targets.size(); ++k)
    if (!layer_done[k]) r.layers[k] = check_layer(set.modules.at(set.targets[k]), k, fx, base, merged, o.seed, o.n_inputs);
  for (size_t k = set.targets.size(); k-- > 0;)
    if (layer_done[k] == 2) r.layers.erase(r.layers.begin() + static_cast<std::ptrdiff_t>(k));
  for (tensor_check& c : checks) {
    r.tensors.push_back(std::move(c));
  }
  // tensors the merge adds: a tied base's head, modules_to_save heads the base lacks
  for (const std::string& name : merged.tensor_names) {
    if (base.find(name)) continue;
    if (set.saved.count(name) > 0 || (set.modules.count(name) > 0 && tied_head_source(base, name))) {
      r.tensors.push_back(check_weight(name, base, merged, set, fx));
    } else {
      r.tensors.push_back({name, tensor_kind::extra, 0, 0, INFINITY, 1, false});
    }
  }
}

// True when every value of `from` is a value of `to` (F16 / BF16 in F32 or F64, F32 in F64).
bool widens(dtype from, dtype to) {
  const bool half = from == dtype::F16 || from == dtype::BF16;
  return from == to || (half && (to == dtype::F32 || to == dtype::F64)) || (from == dtype::F32 && to == dtype::F64);
}

// The merged model's dtype when rounding the base to it changes values: the
// one floating-point dtype of its 2-D and larger tensors, when some base
// tensor does not widen into it (nullopt when it holds the base's values
// exactly, or mixes several dtypes).
std::optional<dtype> converted_dtype(const model_files& base, const model_files& merged) {
  std::optional<dtype> m_type;
  bool narrows = false;
  for (const std::string& name : merged.tensor_names) {
    const tensor_ref t = merged.at(name);
    if (!dtype_is_math(t.info->type) || t.info->shape.size() < 2) continue;
    if (m_type && *m_type != t.info->type) return std::nullopt;
    m_type = t.info->type;
    if (std::optional<tensor_ref> b = base.find(name)) narrows = narrows || !widens(b->info->type, t.info->type);
  }
  return narrows ? m_type : std::nullopt;
}

// max |x - y| and max |x| over two logit sets of the same shape.
std::pair<double, double> logit_diff(const logits_result& x, const logits_result& y) {
  double diff = 0, big = 0;
  for (size_t i = 0; i < x.logits.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::fabs(x.logits[i] - y.logits[i])));
    big = std::max(big, static_cast<double>(std::fabs(x.logits[i])));
  }
  return {diff, big};
}

// Model level: logits of the base with the adapters applied unmerged against
// the merged model's (the base rounded to the merged dtype when it differs).
//
// Tolerance on max |dlogit| / max |logit|: the merged weights' own rounding,
// 2^-5 for BF16, 2^-8 for F16, 1e-4 for F32. After a dtype conversion the
// merge's rounding of an adapted weight, round(W0 + dW) - (round(W0) + dW),
// is at most two roundings of it; so the tolerance is also at least twice
// what one rounding of every weight does to the logits here, measured by a
// third pass on the base in its own dtype (conversion_rel).
void check_model(const model_files& base, const model_files& merged, const adapter_set& set, const verify_options& o,
                 const model_inputs& in, model_check& mc, verify_progress& progress) {
  std::vector<weighted_adapter> adapters;
  for (size_t i = 0; i < set.adapters.size(); ++i)
    adapters.push_back({&set.adapters[i], o.adapters[i].weight * o.scale});
  mc.base_rounded_to = converted_dtype(base, merged);
  logits_result x = model_forward(base, in.base, adapters, in.tokens, o.threads, 0, mc.base_rounded_to);
  progress.add(base.total_tensor_bytes(), "model level: base + adapters");
  logits_result y = model_forward(merged, in.merged, std::span<const weighted_adapter>{}, in.tokens, o.threads);
  progress.add(merged.total_tensor_bytes(), "model level: merged");
  mc.ran = true;
  mc.n_tokens = x.n_tokens;
  const auto [diff, big] = logit_diff(x, y);
  int64_t agree = 0;
  for (int64_t p = 0; p < x.n_tokens; ++p) agree += top_k(x, p, 1)[0].first == top_k(y, p, 1)[0].first;
  mc.max_abs = diff;
  mc.max_rel = big > 0 ? diff / big : diff;
  mc.top1_agreement = static_cast<double>(agree) / static_cast<double>(x.n_tokens);
  const dtype wt = merged.at(merged.tensor_names.front()).info->type;
  mc.tolerance = wt == dtype::BF16 ? 0x1p-5 : wt == dtype::F16 ? 0x1p-8 : 1e-4;
  if (mc.base_rounded_to) {
    const logits_result exact = model_forward(base, in.base, adapters, in.tokens, o.threads);
    const auto [d, b] = logit_diff(exact, x);
    mc.conversion_rel = b > 0 ? d / b : d;
    mc.tolerance = std::max(mc.tolerance, 2 * mc.conversion_rel);
  }
  mc.ok = mc.max_rel <= mc.tolerance;
}

// The verdict: worst first, counts, equivalence.
void conclude(verify_report& r) {
  // a missing, misshapen or extra tensor has no value error: it goes first
  const auto unmatched = [](const tensor_check& c) {
    return c.kind == tensor_kind::missing || c.kind == tensor_kind::shape || c.kind == tensor_kind::extra;
  };
  std::stable_sort(r.tensors.begin(), r.tensors.end(), [&unmatched](const auto& p, const auto& q) {
    if (unmatched(p) != unmatched(q)) return unmatched(p);
    return p.ratio > q.ratio;
  });
  r.n_checked = r.tensors.size();
  std::stable_sort(r.layers.begin(), r.layers.end(), [](const auto& p, const auto& q) { return p.ratio > q.ratio; });
  for (const auto& c : r.tensors) r.n_failed += !c.ok;
  for (const auto& c : r.layers) r.n_layers_failed += !c.ok;
  r.equivalent = r.n_failed == 0 && r.n_layers_failed == 0 && r.model.ok;
}

}  // namespace

verify_report verify_merge(const verify_options& o, const progress_fn& progress_callback) {
  verify_report r;
  if (o.n_inputs < 1) throw errors::usage("the layer check needs at least one input vector");
  // 1. inputs, all checked before the expensive levels: the models' headers,
  // their config.json (model level), every adapter fitting the base
  model_files base = open_model(o.base);
  model_files merged = open_model(o.merged);
  std::optional<model_inputs> model_in = prepare_model_level(o, base, merged, r.model.skipped);
  const adapter_set set = load_adapters(o, base, r.skipped_modules);
  fp8_index fx;
  add_fp8_weights(base, fx);
  add_fp8_weights(merged, fx);
  // the forward pass reads FP8 weights (dequantized per row block), but a
  // merged model whose FP8 weights were requantized has no logit tolerance
  // yet: those are checked at the weight and layer levels. FP8 weights no
  // adapter changes are the base's (the weight level checks them bit for
  // bit), so the model level runs when no adapter changes an FP8 weight
  // (trainable tokens alone, modules on BF16 tensors only).
  const bool merged_fp8 = std::any_of(merged.tensor_names.begin(), merged.tensor_names.end(),
                                      [&](const std::string& n) {
                                        return fx.weights.count(merged.find_ref(n)->info) > 0 &&
                                               (set.modules.count(n) > 0 || set.saved.count(n) > 0 || set.tokens.count(n) > 0);
                                      });
  if (model_in && merged_fp8) {
    r.model.skipped = "FP8 forward of the merged model not checked: no logit tolerance for requantized FP8 weights yet";
    model_in.reset();
  }
  // the forward pass applies no LyCORIS weight decomposition unmerged
  for (const adapter& a : set.adapters)
    for (const lora_module& m : a.modules)
      if (model_in && m.dora_scale) {
        r.model.skipped = fmt::format(
            "{} has LyCORIS weight decomposition (dora_scale), which the forward pass does "
            "not apply unmerged",
            m.name);
        model_in.reset();
      }

  // 2. + 3. weight and layer levels in one pass over both models: every base
  // tensor against its expected value, block by block; every adapted module
  // on seeded inputs
  verify_progress progress{progress_callback};
  progress.event.total_items = base.tensor_names.size() + (model_in ? 2 : 0);
  progress.event.total_bytes = base.total_tensor_bytes() + merged.total_tensor_bytes();
  if (model_in) progress.event.total_bytes *= 2;
  check_weights_and_layers(base, merged, set, fx, o, progress, r);

  // 4. model level, for a supported architecture (a merged model with missing
  // or misshapen tensors has already failed above, and cannot be run)
  const auto unrunnable = std::find_if(r.tensors.begin(), r.tensors.end(), [](const tensor_check& c) {
    return c.kind == tensor_kind::missing || c.kind == tensor_kind::shape;
  });
  // fused experts (3-D target_parameters): the forward pass runs them for
  // qwen3_moe only (transformers 5.x Qwen3MoeExperts, core/llama); elsewhere
  // such a tensor is not read, and the model level would prove nothing
  const lora_module* parameter = nullptr;
  for (const adapter& a : set.adapters)
    for (const lora_module& m : a.modules) {
      const bool run = model_in && model_in->base.model_type == "qwen3_moe" &&
                       (m.target.ends_with(".mlp.experts.gate_up_proj") || m.target.ends_with(".mlp.experts.down_proj"));
      if (m.kind == module_kind::parameter && m.n_experts > 1 && !run && parameter == nullptr) parameter = &m;
    }
  if (model_in && parameter != nullptr)
    r.model.skipped = fmt::format(
        "the forward pass does not run fused experts (target_parameters, lora.ParamWrapper on {}) yet",
        parameter->name);
  else if (model_in && unrunnable != r.tensors.end())
    r.model.skipped =
        fmt::format("the merged model cannot run: {} is {}", unrunnable->name, tensor_kind_name(unrunnable->kind));
  else if (model_in)
    check_model(base, merged, set, o, *model_in, r.model, progress);

  // 5. verdict (none from an input that shrank while it was read)
  check_interrupted();
  conclude(r);
  return r;
}

}  // namespace lora
