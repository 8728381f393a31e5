#include "core/verify.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <random>

#include <fmt/format.h>

#include "core/adapter.h"
#include "core/delta.h"
#include "core/dtype.h"
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

// Rows [rb, re) of a math-dtype tensor viewed as [n_rows, n_cols], decoded to double into out.
void read_rows_f64(const tensor_ref& t, size_t n_cols, size_t rb, size_t re, std::vector<uint8_t>& buf,
                   std::vector<double>& out) {
  const size_t size = static_cast<size_t>(math_dtype_size(t.info->type));
  out.resize((re - rb) * n_cols);
  to_f64(t.info->type, read_bytes(t, rb * n_cols * size, out.size() * size, buf), out);
}

// One unit in the last place of `type` at magnitude x (subnormal spacing near 0).
double ulp(dtype type, double x) {
  const int mant = type == dtype::BF16 ? 7 : type == dtype::F16 ? 10 : 23;
  const int min_exp = type == dtype::F16 ? -14 : -126;
  const int e = x > 0 ? std::max(static_cast<int>(std::floor(std::log2(x))), min_exp) : min_exp;
  return std::ldexp(1.0, e - mant);
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
  for (size_t i = 0; i < expected.size(); ++i) {
    const double e = expected[i], d = std::fabs(e - w0[i]);
    const double terms = row_bounds.empty() ? 0.0 : row_bounds[first_row + i / n_cols];
    const double tol =
        2 * ulp(type, std::fabs(e)) + ulp(type, d) + eps32 * (std::fabs(w0[i]) + std::fabs(e) + d + terms);
    const double err = std::fabs(merged[i] - e);
    const double ratio = std::isnan(err) ? INFINITY : err / tol;
    if (ratio > 1) ++c.n_bad;
    if (ratio > c.ratio || std::isnan(err)) {
      c.ratio = ratio;
      c.max_error = err;
      c.tolerance = tol;
    }
  }
}

// DoRA's first pass: ||V_o||^2 per output feature, V = W0 + s dW, block by block.
std::vector<double> dora_norms_sq(const delta_factors_f64& f, const tensor_ref& base) {
  std::vector<double> sq(f.magnitude.size(), 0.0), v;
  std::vector<uint8_t> buf;
  const size_t n_rows = static_cast<size_t>(f.n_rows), n_cols = static_cast<size_t>(f.n_cols);
  for (size_t rb = 0; rb < n_rows; rb += rows_per_block(n_cols)) {
    check_interrupted();
    const size_t re = std::min(n_rows, rb + rows_per_block(n_cols));
    read_rows_f64(base, n_cols, rb, re, buf, v);
    add_delta_rows(f, 1.0, static_cast<int64_t>(rb), static_cast<int64_t>(re), v.data());
    add_dora_norms_sq(f, static_cast<int64_t>(rb), static_cast<int64_t>(re), v.data(), sq);
  }
  return sq;
}

// What a touched tensor should hold: the adapter's replacement
// (modules_to_save), the base bias plus s b (lora_bias), or W0 + s B A
// (DoRA-rescaled). Exactly one is set.
struct expectation {
  const tensor_ref* replacement = nullptr;
  const lora_module* bias = nullptr;
  const lora_module* module = nullptr;
};

// A touched tensor against its expected value E, formed in double through
// core/delta one block of rows at a time (DoRA: a first pass for the norms).
tensor_check check_touched(const std::string& name, const tensor_ref& b, const tensor_ref& m, const expectation& x,
                           const std::string& adapter_file) {
  tensor_check c{name, x.replacement ? "replaced" : x.bias ? "bias" : "merged"};
  const tensor_ref& source = x.replacement ? *x.replacement : b;
  if (source.info->n_elements != b.info->n_elements || !dtype_is_math(source.info->type))
    throw errors::invalid(adapter_file, name, "the replacement tensor does not fit the base's (modules_to_save)");
  const auto [n_rows, n_cols] = rows_of(*b.info);
  std::optional<delta_factors_f64> f;
  std::vector<double> row_bounds, norms;
  if (x.module) {
    f = load_delta_factors_f64(*x.module, b.info->shape, adapter_file);
    row_bounds = delta_row_bounds(*f);
    if (f->dora) {
      // DoRA rescales V by m / ||V||: the slack scales with it (|E| / |V| = |m_o| / ||V_o||, at least 1)
      norms = dora_norms_sq(*f, b);
      double gain = 1;
      for (size_t o = 0; o < norms.size(); ++o)
        if (norms[o] > 0) gain = std::max(gain, std::fabs(f->magnitude[o] / std::sqrt(norms[o])));
      for (double& t : row_bounds) t *= gain;
    }
  }
  // a bias is one short vector: one block
  const size_t rows = x.bias ? std::max<size_t>(n_rows, 1) : rows_per_block(n_cols);
  std::vector<uint8_t> buf;
  std::vector<double> w0, e, mv;
  for (size_t rb = 0; rb < n_rows; rb += rows) {
    check_interrupted();
    const size_t re = std::min(n_rows, rb + rows);
    read_rows_f64(source, n_cols, rb, re, buf, w0);
    e = w0;
    if (x.bias) add_bias_delta(*x.bias, 1.0, std::span<double>(e), adapter_file);
    if (f) apply_module_rows(*f, 1.0, static_cast<int64_t>(rb), static_cast<int64_t>(re), e.data(), norms);
    read_rows_f64(m, n_cols, rb, re, buf, mv);
    compare_block(c, m.info->type, f ? f->rank : 0, row_bounds, n_cols, rb, w0, e, mv);
  }
  c.ok = c.n_bad == 0;
  return c;
}

// An untouched tensor against the base, block by block: byte for byte in the
// same dtype, value for value after a dtype change (the base rounded once to
// the merged dtype). n_bad counts the differing elements (bytes, for a dtype
// without arithmetic); max_error is the largest |merged - expected| among
// them (infinite where only one is NaN; 0 without arithmetic).
tensor_check check_untouched(const std::string& name, const tensor_ref& b, const tensor_ref& m) {
  tensor_check c{name, "untouched"};
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

// Adds stored rows [rb, re) to `acc`: w0 (and wm, when not null) hold
// exactly those rows; t_bound (empty, or one entry per stored row) is
// delta_row_bounds. DoRA's V rows are formed in v_buf through core/delta.
void accumulate_rows(const delta_factors_f64& f, const layer_shape& s, double weight, size_t rb, size_t re,
                     const double* w0, const double* wm, const std::vector<double>& t_bound, const double* x, size_t n,
                     layer_sums& acc, std::vector<double>& v_buf) {
  const size_t nc = s.n_cols;
  for (size_t i = rb; i < re; ++i) {
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

// y_ref [n, n_out] from the W0 x of `acc`: y = W0 x + w s B (A x), DoRA:
// y_o *= m_o / ||V_o||.
std::vector<double> unmerged_from(const delta_factors_f64& f, const layer_shape& s, double weight, const double* x,
                                  size_t n, const layer_sums& acc) {
  std::vector<double> y(acc.y0);
  // y += w s dW x, without forming dW (core/delta: B (A x), or a LyCORIS delta by row blocks)
  add_delta_times(f, weight, x, n, y.data());
  if (f.dora)
    for (size_t v = 0; v < n; ++v)
      for (size_t o = 0; o < s.n_out; ++o) y[v * s.n_out + o] *= f.magnitude[o] / std::sqrt(acc.v_sq[o]);
  return y;
}

std::string layer_kind(const lora_module& m) {
  std::string k =
      m.kind == module_kind::linear && m.fan_in_fan_out ? "fan_in_fan_out" : std::string(module_kind_name(m.kind));
  if (m.dora) k += "+dora";
  if (m.bias) k += "+bias";
  return k;
}

// One adapted module: n_inputs seeded inputs through the merged weight and
// through base + adapter unmerged (module index `index` picks the inputs).
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
// f32) or 2^-53 (in f64 when either side is F64); T(o, j) = delta_row_bounds
// of the stored row holding W(o, j) (|s| sum_k |B A terms|); f_o = |m_o| /
// ||V_o|| for DoRA, else 1. DoRA's norm of an f32 V is off by at most the
// norm of V_o's error, and its product m / ||V|| V rounds once more in f32.
// The (n_in + r + 4) 2^-53 term is this check's own double arithmetic.
layer_check check_layer(const lora_module& m, size_t index, const std::string& adapter_file, const model_files& base,
                        const model_files& merged, uint64_t seed, int n_inputs) {
  layer_check c{m.name, layer_kind(m)};
  auto fail = [&](const char* why) {
    c.kind = why;
    c.ok = false;
    c.ratio = INFINITY;
    c.n_bad = 1;
    return c;
  };
  // 1. the tensors: base, merged, factors
  const tensor_ref b = base.at(m.target);
  std::optional<tensor_ref> mt = merged.find(m.target);
  if (!mt) return fail("missing");
  if (mt->info->shape != b.info->shape) return fail("shape");
  if (!dtype_is_math(mt->info->type)) return fail("dtype");
  const delta_factors_f64 f = load_delta_factors_f64(m, b.info->shape, adapter_file);
  const std::vector<double> t_bound = delta_row_bounds(f);
  const layer_shape s = shape_of(f);
  const dtype type = mt->info->type;
  const bool f64_math = type == dtype::F64 || b.info->type == dtype::F64;
  const double u = unit_roundoff(type), eta = half_min_spacing(type);
  const double uc = f64_math ? 0x1p-53 : 0x1p-24;
  const double c_acc = static_cast<double>(f.rank + 4) * uc;
  const double c_eval = static_cast<double>(s.n_in + static_cast<size_t>(f.rank) + 4) * 0x1p-53;

  // 2. the bias, for lora_bias: base + s b against the merged model's
  std::vector<double> b0, b_ref, b_merged;
  dtype b_type = type;
  bool b_f64 = f64_math;
  if (m.bias) {
    const std::string name = m.name + ".bias";
    std::optional<tensor_ref> bb = base.find(name), bm = merged.find(name);
    if (!bb)
      throw fit_error(adapter_file, base.path,
                      {{{m.name, fmt::format("the base has no tensor {}", name), fit_issue::no_base_tensor}}});
    if (!bm) return fail("missing");
    if (bm->info->shape != bb->info->shape || bb->info->n_elements != s.n_out) return fail("shape");
    if (!dtype_is_math(bm->info->type)) return fail("dtype");
    b0 = read_f64(*bb);
    b_ref = b0;
    add_bias_delta(m, 1.0, std::span<double>(b_ref), adapter_file);
    b_merged = read_f64(*bm);
    b_type = bm->info->type;
    b_f64 = b_type == dtype::F64 || bb->info->type == dtype::F64;
  }

  // 3. seeded inputs: N(0, 1) vectors, or one-hot token rows for an embedding
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(index)};
  std::mt19937_64 rng(seq);
  std::normal_distribution<double> normal(0.0, 1.0);
  const size_t n = static_cast<size_t>(n_inputs);
  std::vector<double> x(n * s.n_in, 0.0);
  if (m.kind == module_kind::embedding) {
    for (size_t v = 0; v < n; ++v) x[v * s.n_in + rng() % s.n_in] = 1.0;
  } else {
    for (double& v : x) v = normal(rng);
  }

  // 4. one pass over the stored rows of W0 and W~, in blocks read with pread and decoded to double
  layer_sums acc(n, s.n_out);
  std::vector<uint8_t> bytes;
  std::vector<double> w0_buf, wm_buf, v_buf;
  for (size_t rb = 0; rb < s.n_rows; rb += rows_per_block(s.n_cols)) {
    const size_t re = std::min(s.n_rows, rb + rows_per_block(s.n_cols));
    check_interrupted();
    read_rows_f64(b, s.n_cols, rb, re, bytes, w0_buf);
    read_rows_f64(*mt, s.n_cols, rb, re, bytes, wm_buf);
    accumulate_rows(f, s, 1.0, rb, re, w0_buf.data(), wm_buf.data(), t_bound, x.data(), n, acc, v_buf);
  }
  const std::vector<double> y_ref = unmerged_from(f, s, 1.0, x.data(), n, acc);

  // 5. y~ = W~ x against y_ref, element by element
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
      const double f_o = f.dora ? std::fabs(f.magnitude[o]) / std::sqrt(acc.v_sq[o]) : 1.0;
      double ym = acc.ym[at], yr = y_ref[at];
      double tol = 2 * u * s_o + 2 * eta * sum_x + c_acc * f_o * p_o + c_eval * (s_o + f_o * p_o);
      if (f.dora) tol += (c_acc * std::sqrt(acc.bound_sq[o] / acc.v_sq[o]) + uc) * s_o;
      if (m.bias) {
        ym += b_merged[o];
        yr += b_ref[o];
        const double ub = b_f64 ? 0x1p-53 : 0x1p-24;
        tol += 2 * unit_roundoff(b_type) * std::fabs(b_merged[o]) + 2 * half_min_spacing(b_type) +
               (2 * ub + 0x1p-52) * (std::fabs(b0[o]) + std::fabs(b_ref[o] - b0[o]));
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
  return c;
}

}  // namespace

std::vector<double> unmerged_layer_output(const delta_factors_f64& f, std::span<const double> w0,
                                          std::span<const double> x, double weight) {
  const layer_shape s = shape_of(f);
  if (w0.size() != s.n_rows * s.n_cols || s.n_in == 0 || x.size() % s.n_in != 0)
    throw errors::invalid("", f.target,
                          fmt::format("{} input values and a W0 of {} do not fit a [{}, {}] weight", x.size(),
                                      w0.size(), s.n_rows, s.n_cols));
  const size_t n = x.size() / s.n_in;
  layer_sums acc(n, s.n_out);
  std::vector<double> v_buf;
  accumulate_rows(f, s, weight, 0, s.n_rows, w0.data(), nullptr, {}, x.data(), n, acc, v_buf);
  return unmerged_from(f, s, weight, x.data(), n, acc);
}

namespace {

// The model level's inputs, read and checked before any weight is: both
// config.json files parsed (a malformed one is refused at once, exit 3
// naming it) and the token ids checked against the vocabulary (exit 2).
struct model_inputs {
  hf_config base, merged;
  std::vector<int64_t> tokens;
};

// nullopt when the model level cannot run (`skipped` says why).
std::optional<model_inputs> prepare_model_level(const verify_options& o, const model_files& base,
                                                const model_files& merged, std::string& skipped) {
  std::optional<std::string> mt;
  if (!base.config_path.empty()) mt = parse_model_type(read_text_file(base.config_path), base.config_path);
  if (!merged.config_path.empty()) (void)parse_model_type(read_text_file(merged.config_path), merged.config_path);
  if (!mt || !is_supported_architecture(*mt) || merged.config_path.empty()) {
    skipped = mt ? fmt::format("model_type {} has no forward pass", *mt) : "no config.json";
    return std::nullopt;
  }
  model_inputs in{read_hf_config(base.config_path), read_hf_config(merged.config_path), o.tokens};
  if (in.tokens.empty()) {
    std::mt19937_64 rng(1234);
    for (int i = 0; i < 16; ++i)
      in.tokens.push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(in.base.vocab_size)));
  }
  check_forward_input(in.base, in.tokens);
  check_forward_input(in.merged, in.tokens);
  return in;
}

// Weight level: every base tensor against its expected value, then the
// merged model's extra tensors; appended to r.tensors.
void check_weights(const model_files& base, const model_files& merged, const adapter& a, verify_report& r) {
  std::map<std::string, const lora_module*> modules, bias_modules;
  std::map<std::string, const tensor_ref*> saved;
  for (const lora_module& m : a.modules) {
    check_finite_factors(m, a.weights_path);
    modules[m.target] = &m;
    if (m.bias) bias_modules[m.name + ".bias"] = &m;
  }
  for (const saved_tensor& s : a.saved) saved[s.target] = &s.tensor;
  for (const std::string& name : base.tensor_names) {
    check_interrupted();
    tensor_ref b = base.at(name);
    std::optional<tensor_ref> m = merged.find(name);
    tensor_check c{name, "missing"};
    if (!m) {
      c.ok = false;
      r.tensors.push_back(c);
      continue;
    }
    if (m->info->shape != b.info->shape) {
      c.kind = "shape";
      c.ok = false;
      r.tensors.push_back(c);
      continue;
    }
    ++r.n_checked;
    const bool math = dtype_is_math(b.info->type) && dtype_is_math(m->info->type);
    expectation x;
    if (auto it = saved.find(name); it != saved.end())
      x.replacement = it->second;
    else if (auto it = bias_modules.find(name); it != bias_modules.end())
      x.bias = it->second;
    else if (auto it = modules.find(name); it != modules.end())
      x.module = it->second;
    const bool touched = x.replacement || x.bias || x.module;
    r.tensors.push_back(touched && math ? check_touched(name, b, *m, x, a.weights_path) : check_untouched(name, b, *m));
  }
  for (const std::string& name : merged.tensor_names)
    if (!base.find(name)) r.tensors.push_back({name, "extra", 0, 0, INFINITY, 1, false});
}

// Model level: logits of the base with the adapter applied unmerged against the merged model's.
void check_model(const model_files& base, const model_files& merged, const adapter& a, const model_inputs& in,
                 int threads, model_check& mc) {
  logits_result x = llama_forward(base, in.base, &a, in.tokens, threads);
  logits_result y = llama_forward(merged, in.merged, nullptr, in.tokens, threads);
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

}  // namespace

verify_report verify_merge(const verify_options& o) {
  verify_report r;
  if (o.n_inputs < 1) throw errors::usage("the layer check needs at least one input vector");
  // 1. inputs, all checked before the expensive levels: the models' headers,
  // their config.json (model level), the adapter fitting the base
  model_files base = open_model(o.base);
  model_files merged = open_model(o.merged);
  const std::optional<model_inputs> model_in = prepare_model_level(o, base, merged, r.model.skipped);
  adapter a = load_adapter(o.adapter);
  require_fit(a, base);

  // 2. weight level: every base tensor against its expected value, block by block
  check_weights(base, merged, a, r);

  // 3. layer level: every adapted module on seeded inputs, one module per job
  r.layers.resize(a.modules.size());
  parallel_for(a.modules.size(), o.threads, [&](size_t i) {
    r.layers[i] = check_layer(a.modules[i], i, a.weights_path, base, merged, o.seed, o.n_inputs);
  });

  // 4. model level, for a supported architecture (a merged model with missing
  // or misshapen tensors has already failed above, and cannot be run)
  const auto unrunnable = std::find_if(r.tensors.begin(), r.tensors.end(),
                                       [](const tensor_check& c) { return c.kind == "missing" || c.kind == "shape"; });
  if (model_in && unrunnable != r.tensors.end())
    r.model.skipped = fmt::format("the merged model cannot run: {} is {}", unrunnable->name, unrunnable->kind);
  else if (model_in)
    check_model(base, merged, a, *model_in, o.threads, r.model);

  // 5. verdict (none from an input that shrank while it was read)
  check_interrupted();
  std::stable_sort(r.tensors.begin(), r.tensors.end(), [](const auto& p, const auto& q) { return p.ratio > q.ratio; });
  std::stable_sort(r.layers.begin(), r.layers.end(), [](const auto& p, const auto& q) { return p.ratio > q.ratio; });
  for (const auto& c : r.tensors) r.n_failed += !c.ok;
  for (const auto& c : r.layers) r.n_layers_failed += !c.ok;
  r.equivalent = r.n_failed == 0 && r.n_layers_failed == 0 && r.model.ok;
  return r;
}

}  // namespace lora
