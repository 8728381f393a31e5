#include "core/delta.h"

#include <cblas.h>

#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <cstring>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/blas.h"
#include "core/dtype.h"
#include "core/scratch.h"
#include "core/vectorize.h"
#include "formats/error.h"

namespace lora {

namespace {

// y[j] += alpha * x[j], j < n: the exact path's inner loop (vectorized; one
// product and one sum per element, in the same order on every path).
LORA_VECTORIZE void axpy(double alpha, const double* x, double* y, size_t n) {
  for (size_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}

uint64_t product(const std::vector<int64_t>& shape, size_t from) {
  uint64_t n = 1;
  for (size_t i = from; i < shape.size(); ++i) n *= static_cast<uint64_t>(shape[i]);
  return n;
}

// Refuses a tensor whose dtype the arithmetic cannot take (exit 3).
void check_math_dtype(const tensor_ref& t, const std::string& file, const std::string& key) {
  if (!dtype_is_math(t.info->type))
    throw errors::invalid(
        file, t.info->name,
        fmt::format("dtype {} is not supported for arithmetic (only F16, BF16, F32, F64) in module {}",
                    dtype_name(t.info->type), key));
}

// Decodes a tensor through core/dtype into a vector of T.
template <typename T>
std::vector<T> decode(const tensor_ref& t, const std::string& file, const std::string& key) {
  check_math_dtype(t, file, key);
  std::vector<T> out(t.info->n_elements);
  if constexpr (sizeof(T) == 4)
    to_f32(t.info->type, t.data(), out);
  else
    to_f64(t.info->type, t.data(), out);
  return out;
}

// Experts (lora.ParamWrapper on [E, d1, d2]): A [r E, in] as stored, B
// [out, r E] reordered to [E, out, r] (B_e[o, k] = B[o, k E + e], PEFT's
// weight_B.reshape(out, r, E)); in = d2, out = d1, or the reverse when
// transposed ([E, in, out]).
template <typename T>
void load_experts(delta_factors_t<T>& f, const lora_module& m, const std::vector<int64_t>& target_shape,
                  const std::string& file, bool with_values) {
  const int64_t e = m.n_experts, r = m.rank;
  f.transposed = m.fan_in_fan_out;
  f.n_experts = e;
  f.expert_rows = target_shape[1];
  f.expert_cols = target_shape[2];
  f.rank = r;
  const int64_t in = f.transposed ? f.expert_rows : f.expert_cols;
  const int64_t out = f.transposed ? f.expert_cols : f.expert_rows;
  const auto& a_shape = m.a.info->shape;
  const auto& b_shape = m.b.info->shape;
  if (target_shape[0] != e || r <= 0 || a_shape != std::vector<int64_t>{r * e, in} ||
      b_shape != std::vector<int64_t>{out, r * e})
    throw errors::shape_mismatch(
        file, m.name,
        fmt::format("lora_A [{}, {}] and lora_B [{}, {}] ({} experts of rank {}) for {} {}{}", r * target_shape[0],
                    in, out, r * target_shape[0], target_shape[0], r, m.target, shape_text(target_shape),
                    f.transposed ? " ([E, in, out])" : ""),
        fmt::format("A {} and B {}", shape_text(a_shape), shape_text(b_shape)));
  check_math_dtype(m.a, file, m.name);
  check_math_dtype(m.b, file, m.name);
  if (!with_values) return;
  f.a = decode<T>(m.a, file, m.name);
  const std::vector<T> b = decode<T>(m.b, file, m.name);
  f.b.resize(b.size());
  const size_t ne = static_cast<size_t>(e), nr = static_cast<size_t>(r), no = static_cast<size_t>(out);
  for (size_t x = 0; x < ne; ++x)
    for (size_t o = 0; o < no; ++o)
      for (size_t k = 0; k < nr; ++k) f.b[(x * no + o) * nr + k] = b[o * nr * ne + k * ne + x];
}

// LyCORIS weight decomposition: dora_scale [out, 1, ...] (a norm per row) or
// [1, in, 1, ...] (a norm per input channel, LyCORIS wd_on_out = False),
// checked against the target; eps = torch.finfo(dora_scale.dtype).eps
// (LyCORIS @ f49d30d6, lycoris/modules/locon.py apply_weight_decompose:
// the weight is cast to dora_scale's dtype before the norm).
template <typename T>
void load_dora_scale(delta_factors_t<T>& f, const lora_module& m, const std::vector<int64_t>& target_shape,
                     const std::string& file, bool with_values) {
  const tensor_ref& t = *m.dora_scale;
  const std::vector<int64_t>& ds = t.info->shape;
  if (m.dora || f.transposed)
    throw errors::invalid(file, t.info->name,
                          fmt::format("dora_scale on a {} module (LyCORIS weight decomposition applies to a "
                                      "[out, in, ...] weight)",
                                      m.dora ? "PEFT DoRA" : "transposed"));
  auto ones_from = [&](size_t k) {
    for (size_t i = k; i < ds.size(); ++i)
      if (ds[i] != 1) return false;
    return true;
  };
  const bool rows = ds.size() >= 2 && ds[0] == target_shape[0] && ones_from(1);
  const bool cols =
      !rows && target_shape.size() >= 2 && ds.size() >= 2 && ds[0] == 1 && ds[1] == target_shape[1] && ones_from(2);
  if (!rows && !cols)
    throw errors::shape_mismatch(
        file, t.info->name,
        fmt::format("[{}, 1, ...] (a norm per output row) or [1, {}, 1, ...] (a norm per input channel) for {} {}",
                    target_shape[0], target_shape.size() >= 2 ? target_shape[1] : 1, m.target,
                    shape_text(target_shape)),
        shape_text(ds));
  const dtype type = t.info->type;
  if (!dtype_is_math(type))
    throw errors::invalid(
        file, t.info->name,
        fmt::format("dtype {} is not supported for dora_scale (only F16, BF16, F32, F64)", dtype_name(type)));
  f.dora = true;
  f.dora_lycoris = true;
  f.dora_columns = cols;
  f.dora_group = cols ? f.n_cols / target_shape[1] : 1;
  // torch.finfo(dtype).eps: 2^-(mantissa bits)
  f.dora_eps = type == dtype::BF16 ? 0x1p-7 : type == dtype::F16 ? 0x1p-10 : type == dtype::F64 ? 0x1p-52 : 0x1p-23;
  if (with_values) f.magnitude = decode<T>(t, file, m.name);
}

// Everything about a module's factors but their values: layout, rank, scale,
// checked against the target (see load_delta_factors); `with_values` also
// decodes A, B and the DoRA magnitudes.
template <typename T>
delta_factors_t<T> load_factors(const lora_module& m, const std::vector<int64_t>& target_shape, const std::string& file,
                                bool with_values) {
  delta_factors_t<T> f;
  f.key = m.name;
  f.target = m.target;
  f.target_shape = target_shape;
  f.scale = m.scale;
  f.dora = m.dora;
  f.transposed = m.kind == module_kind::embedding || (m.kind == module_kind::linear && m.fan_in_fan_out);
  if (target_shape.empty())
    throw errors::invalid(file, m.name, fmt::format("target {} is a scalar: no LoRA delta applies to it", m.target));
  f.n_rows = target_shape[0];
  f.n_cols = static_cast<int64_t>(product(target_shape, 1));
  if (m.form != delta_form::low_rank) {
    // LyCORIS: D formed by core/lycoris-delta (no DoRA, never transposed)
    if (m.dora || m.magnitude || m.bias)
      throw errors::invalid(
          file, m.name, fmt::format("{} module with PEFT DoRA or a bias is not supported", delta_form_name(m.form)));
    if (f.transposed)
      throw errors::invalid(file, m.name,
                            fmt::format("{} module on a transposed ([in, out]) target", delta_form_name(m.form)));
    f.rank = m.rank;
    f.lycoris = std::make_shared<const lycoris_delta>(make_lycoris_delta(m, target_shape, file, with_values));
    if (m.dora_scale) load_dora_scale(f, m, target_shape, file, with_values);
    return f;
  }

  if (m.kind == module_kind::parameter && target_shape.size() == 3) {
    load_experts(f, m, target_shape, file, with_values);
    return f;
  }

  // rank from A; B and the module must agree
  const auto& a_shape = m.a.info->shape;
  const auto& b_shape = m.b.info->shape;
  if (a_shape.size() < 2 || b_shape.size() < 2)
    throw errors::shape_mismatch(file, m.name, "lora_A and lora_B of at least 2 dims",
                                 fmt::format("A {} and B {}", shape_text(a_shape), shape_text(b_shape)));
  f.rank = a_shape[0];
  if (m.rank != 0 && m.rank != f.rank)
    throw errors::shape_mismatch(file, m.name, fmt::format("rank {} (A's first dim)", f.rank),
                                 fmt::format("rank {}", m.rank));

  // the dims each factor must cover: A [r, k], B [n, r] (B may carry trailing 1s)
  const int64_t k = f.transposed ? f.n_rows : f.n_cols;
  const int64_t n = f.transposed ? f.n_cols : f.n_rows;
  const bool a_ok = product(a_shape, 1) == static_cast<uint64_t>(k);
  const bool b_ok = b_shape[0] == n && product(b_shape, 1) == static_cast<uint64_t>(f.rank);
  bool kernel_ok = true;
  if (!f.transposed && a_shape.size() == target_shape.size() && a_shape.size() > 2)
    for (size_t i = 1; i < a_shape.size(); ++i) kernel_ok = kernel_ok && a_shape[i] == target_shape[i];
  if (f.transposed && target_shape.size() != 2)
    throw errors::shape_mismatch(file, m.name, "a 2-D target for a transposed (fan_in_fan_out / embedding) delta",
                                 fmt::format("{} {}", m.target, shape_text(target_shape)));
  if (!a_ok || !b_ok || !kernel_ok) {
    const std::string layout = m.kind == module_kind::embedding ? "(B A)^T"
                               : f.transposed                   ? "(B A)^T (fan_in_fan_out)"
                                                                : "B A";
    throw errors::shape_mismatch(
        file, m.name, fmt::format("factors whose product {} is {} {}", layout, m.target, shape_text(target_shape)),
        fmt::format("A {} and B {}", shape_text(a_shape), shape_text(b_shape)));
  }

  check_math_dtype(m.a, file, m.name);
  check_math_dtype(m.b, file, m.name);
  if (with_values) {
    f.a = decode<T>(m.a, file, m.name);
    f.b = decode<T>(m.b, file, m.name);
  }
  if (f.dora) {
    if (!m.magnitude) throw errors::invalid(file, m.name, "DoRA module without lora_magnitude_vector");
    const uint64_t want = static_cast<uint64_t>(f.transposed ? f.n_cols : f.n_rows);
    if (m.magnitude->info->n_elements != want)
      throw errors::shape_mismatch(
          file, m.magnitude->info->name,
          fmt::format("{} magnitudes for module {} (one per output feature)", want, m.name),
          fmt::format("{} {}", m.magnitude->info->n_elements, shape_text(m.magnitude->info->shape)));
    check_math_dtype(*m.magnitude, file, m.name);
    if (with_values) f.magnitude = decode<T>(*m.magnitude, file, m.name);
  }
  if (m.dora_scale) load_dora_scale(f, m, target_shape, file, with_values);
  return f;
}

template <typename T>
void check_rows(const delta_factors_t<T>& f, int64_t row_begin, int64_t row_end) {
  if (row_begin < 0 || row_end < row_begin || row_end > f.n_rows)
    throw errors::invalid("", f.target,
                          fmt::format("rows [{}, {}) outside the tensor's {} rows", row_begin, row_end, f.n_rows));
}

// DoRA, per-row norms: w_block rows already hold V; scale each row by m / ||V_row||.
template <typename T>
void dora_scale_rows(const delta_factors_t<T>& f, double weight, int64_t row_begin, int64_t row_end, T* w_block) {
  const size_t n_cols = static_cast<size_t>(f.n_cols);
  for (int64_t i = row_begin; i < row_end; ++i) {
    T* row = w_block + static_cast<size_t>(i - row_begin) * n_cols;
    double sq = 0;
    for (size_t j = 0; j < n_cols; ++j) sq += static_cast<double>(row[j]) * static_cast<double>(row[j]);
    // W' = (m / ||V||) V (LyCORIS: dora_factor)
    const double factor = dora_factor(f, static_cast<double>(f.magnitude[static_cast<size_t>(i)]), sq, weight);
    for (size_t j = 0; j < n_cols; ++j) row[j] = static_cast<T>(static_cast<double>(row[j]) * factor);
  }
}

template <typename T>
void check_norms(const delta_factors_t<T>& f, size_t n) {
  const size_t want = f.n_norms();
  if (n != want) throw errors::invalid("", f.target, fmt::format("{} DoRA norms for {} output features", n, want));
}

// DoRA: squares of V per output feature, rows [row_begin, row_end) of V in v_block
// (per row: sq[i] = sum_j V[i, j]^2; per column: sq[j / group] += sum_i V[i, j]^2).
template <typename T>
void dora_norms_sq(const delta_factors_t<T>& f, int64_t row_begin, int64_t row_end, const T* v_block,
                   std::span<double> sq) {
  check_rows(f, row_begin, row_end);
  check_norms(f, sq.size());
  const size_t n_cols = static_cast<size_t>(f.n_cols);
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* row = v_block + static_cast<size_t>(i - row_begin) * n_cols;
    if (!f.per_column()) {
      double s = 0;
      for (size_t j = 0; j < n_cols; ++j) s += static_cast<double>(row[j]) * static_cast<double>(row[j]);
      sq[static_cast<size_t>(i)] = s;
    } else {
      const size_t g = static_cast<size_t>(f.transposed ? 1 : f.dora_group);
      for (size_t j = 0; j < n_cols; ++j) sq[j / g] += static_cast<double>(row[j]) * static_cast<double>(row[j]);
    }
  }
}

// DoRA: W' = (m / sqrt(sq)) V per output feature, rows [row_begin, row_end) of V in w_block.
template <typename T>
void scale_by_norms(const delta_factors_t<T>& f, double weight, int64_t row_begin, int64_t row_end, T* w_block,
                    std::span<const double> sq) {
  check_rows(f, row_begin, row_end);
  check_norms(f, sq.size());
  const size_t n_cols = static_cast<size_t>(f.n_cols);
  std::vector<double> col_factor;
  if (f.per_column()) {
    // column j belongs to norm j / group (group 1 but for LyCORIS's per-input-channel conv)
    const size_t g = static_cast<size_t>(f.transposed ? 1 : f.dora_group);
    col_factor.resize(n_cols);
    for (size_t j = 0; j < n_cols; ++j)
      col_factor[j] = dora_factor(f, static_cast<double>(f.magnitude[j / g]), sq[j / g], weight);
  }
  for (int64_t i = row_begin; i < row_end; ++i) {
    T* row = w_block + static_cast<size_t>(i - row_begin) * n_cols;
    if (f.per_column()) {
      for (size_t j = 0; j < n_cols; ++j) row[j] = static_cast<T>(static_cast<double>(row[j]) * col_factor[j]);
    } else {
      const size_t ii = static_cast<size_t>(i);
      const double factor = dora_factor(f, static_cast<double>(f.magnitude[ii]), sq[ii], weight);
      for (size_t j = 0; j < n_cols; ++j) row[j] = static_cast<T>(static_cast<double>(row[j]) * factor);
    }
  }
}

// DoRA, per-column norms (fan_in_fan_out, embedding): w holds all of V.
template <typename T>
void dora_scale_columns(const delta_factors_t<T>& f, double weight, T* w) {
  std::vector<double> sq(f.n_norms(), 0.0);
  dora_norms_sq(f, 0, f.n_rows, w, sq);
  // W'[:, j] = (m_j / ||V[:, j]||) V[:, j] (LyCORIS: dora_factor, per input channel)
  scale_by_norms<T>(f, weight, 0, f.n_rows, w, sq);
}

template <typename T>
void apply_rows(const delta_factors_t<T>& f, double weight, int64_t row_begin, int64_t row_end, T* w_block) {
  if (f.needs_whole_tensor() && (row_begin != 0 || row_end != f.n_rows))
    throw errors::invalid("", f.target, "DoRA with per-column norms needs the whole tensor at once");
  // V = W + weight * s * dW (LyCORIS: V = W + s dW)
  add_delta_rows(f, f.dora ? dora_v_weight(f, weight) : weight, row_begin, row_end, w_block);
  if (!f.dora) return;
  if (f.per_column())
    dora_scale_columns(f, weight, w_block);
  else
    dora_scale_rows(f, weight, row_begin, row_end, w_block);
}

template <typename T>
void add_bias(const lora_module& m, double weight, std::span<T> bias, const std::string& file) {
  if (!m.bias) throw errors::invalid(file, m.name, "module has no lora_B.bias");
  if (m.bias->info->n_elements != bias.size())
    throw errors::shape_mismatch(file, m.bias->info->name, fmt::format("[{}] (the base bias)", bias.size()),
                                 shape_text(m.bias->info->shape));
  std::vector<double> b = decode<double>(*m.bias, file, m.name);
  // bias' = bias + w s b
  const double ws = weight * m.scale;
  for (size_t i = 0; i < bias.size(); ++i) bias[i] = static_cast<T>(static_cast<double>(bias[i]) + ws * b[i]);
}

// Rows of D per block: a few MiB of doubles.
int64_t lycoris_block_rows(int64_t n_cols) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(n_cols, 1));
}

// The rows [row_begin, row_end) of a LyCORIS delta D (without its scale),
// formed in double a block at a time: fn(rb, re, d) with d [re - rb, n_cols].
template <typename F>
void for_each_lycoris_block(const lycoris_delta& l, int64_t n_cols, int64_t row_begin, int64_t row_end, F&& fn) {
  std::vector<double> d;
  for (int64_t rb = row_begin; rb < row_end; rb += lycoris_block_rows(n_cols)) {
    const int64_t re = std::min(row_end, rb + lycoris_block_rows(n_cols));
    d.resize(static_cast<size_t>(re - rb) * static_cast<size_t>(n_cols));
    lycoris_rows(l, rb, re, d.data());
    fn(rb, re, static_cast<const double*>(d.data()));
  }
}

// LyCORIS: W[i, j] += weight * s * D[i, j], the product and sum in double,
// rounded once to T.
template <typename T>
void add_lycoris_rows(const delta_factors_t<T>& f, double weight, int64_t row_begin, int64_t row_end, T* w_block) {
  const double ws = weight * f.scale;
  const size_t n_cols = static_cast<size_t>(f.n_cols);
  for_each_lycoris_block(*f.lycoris, f.n_cols, row_begin, row_end, [&](int64_t rb, int64_t re, const double* d) {
    T* w = w_block + static_cast<size_t>(rb - row_begin) * n_cols;
    for (size_t e = 0; e < static_cast<size_t>(re - rb) * n_cols; ++e)
      w[e] = static_cast<T>(static_cast<double>(w[e]) + ws * d[e]);
  });
}

}  // namespace

delta_factors load_delta_factors(const lora_module& m, const std::vector<int64_t>& target_shape,
                                 const std::string& file) {
  return load_factors<float>(m, target_shape, file, true);
}

delta_factors_f64 load_delta_factors_f64(const lora_module& m, const std::vector<int64_t>& target_shape,
                                         const std::string& file) {
  return load_factors<double>(m, target_shape, file, true);
}

void check_delta_factors(const lora_module& m, const std::vector<int64_t>& target_shape, const std::string& file) {
  (void)load_factors<float>(m, target_shape, file, false);
}

void check_finite_factors(const lora_module& m, const std::string& file) {
  const lycoris_tensors& l = m.lycoris;
  auto opt = [](const std::optional<tensor_ref>& t) { return t ? &*t : nullptr; };
  for (const tensor_ref* t : {&m.a, &m.b, opt(m.magnitude), opt(m.bias), opt(l.w1), opt(l.w1_a), opt(l.w1_b), opt(l.w2),
                              opt(l.w2_a), opt(l.w2_b), opt(l.t1), opt(l.t2), opt(l.mid), opt(m.dora_scale)}) {
    if (t == nullptr) continue;
    const uint64_t bad = count_nonfinite(t->info->type, t->data());
    if (bad > 0)
      throw errors::invalid(
          file, t->info->name,
          fmt::format("{} of its {} values are NaN or infinite (module {})", bad, t->info->n_elements, m.name));
  }
}

namespace {

// Experts: expert e's factors, A_e [r, k] and B_e [m, r] (k, m its in / out).
template <typename T>
struct expert_view {
  const T* a;
  const T* b;
  size_t k, m;
};
template <typename T>
expert_view<T> expert(const delta_factors_t<T>& f, int64_t e) {
  const size_t r = static_cast<size_t>(f.rank), d1 = static_cast<size_t>(f.expert_rows),
               d2 = static_cast<size_t>(f.expert_cols);
  const size_t k = f.transposed ? d1 : d2, m = f.transposed ? d2 : d1;
  const size_t x = static_cast<size_t>(e);
  return {f.a.data() + x * r * k, f.b.data() + x * m * r, k, m};
}

// Experts: W[e] += alpha B_e A_e (plain, [out, in]) or alpha A_e^T B_e^T
// ([in, out]), expert rows [row_begin, row_end), one sgemm per expert.
void add_expert_rows(const delta_factors& f, float alpha, int64_t row_begin, int64_t row_end, float* w_block) {
  const int d1 = blas_int(f.expert_rows, f.target), d2 = blas_int(f.expert_cols, f.target);
  const int r = blas_int(f.rank, f.target);
  for (int64_t e = row_begin; e < row_end; ++e) {
    const expert_view<float> x = expert(f, e);
    float* w = w_block + static_cast<size_t>(e - row_begin) * static_cast<size_t>(f.n_cols);
    if (!f.transposed)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d1, d2, r, alpha, x.b, r, x.a, d2, 1.0f, w, d2);
    else
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasTrans, d1, d2, r, alpha, x.a, d1, x.b, r, 1.0f, w, d2);
  }
}

// Experts, exact: W[e][i, j] += ws * sum_k (plain B_e[i, k] A_e[k, j]; transposed A_e[k, i] B_e[j, k]).
void add_expert_rows(const delta_factors_f64& f, double ws, int64_t row_begin, int64_t row_end, double* w_block) {
  const size_t r = static_cast<size_t>(f.rank), d1 = static_cast<size_t>(f.expert_rows),
               d2 = static_cast<size_t>(f.expert_cols);
  std::vector<double> acc(d2);
  for (int64_t e = row_begin; e < row_end; ++e) {
    const expert_view<double> x = expert(f, e);
    double* w = w_block + static_cast<size_t>(e - row_begin) * d1 * d2;
    for (size_t i = 0; i < d1; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0);
      if (!f.transposed)
        for (size_t k = 0; k < r; ++k) axpy(x.b[i * r + k], x.a + k * d2, acc.data(), d2);
      else
        for (size_t j = 0; j < d2; ++j)
          for (size_t k = 0; k < r; ++k) acc[j] += x.a[k * d1 + i] * x.b[j * r + k];
      for (size_t j = 0; j < d2; ++j) w[i * d2 + j] += ws * acc[j];
    }
  }
}

}  // namespace

void add_delta_rows(const delta_factors& f, double weight, int64_t row_begin, int64_t row_end, float* w_block) {
  check_rows(f, row_begin, row_end);
  if (f.lycoris) return add_lycoris_rows(f, weight, row_begin, row_end, w_block);
  if (f.n_experts > 0) return add_expert_rows(f, static_cast<float>(weight * f.scale), row_begin, row_end, w_block);
  const int64_t n_block = row_end - row_begin;
  if (n_block == 0 || f.n_cols == 0 || f.rank == 0) return;
  const int m = blas_int(n_block, f.target);
  const int n = blas_int(f.n_cols, f.target);
  const int r = blas_int(f.rank, f.target);
  const float alpha = static_cast<float>(weight * f.scale);
  if (!f.transposed) {
    // W[rb:re, :] += alpha * B[rb:re, :] @ A      (B [n_rows, r], A [r, n_cols])
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, r, alpha,
                f.b.data() + static_cast<size_t>(row_begin) * static_cast<size_t>(r), r, f.a.data(), n, 1.0f, w_block,
                n);
  } else {
    // W[rb:re, :] += alpha * (A^T)[rb:re, :] @ B^T  (A [r, n_rows], B [n_cols, r])
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasTrans, m, n, r, alpha, f.a.data() + row_begin,
                blas_int(f.n_rows, f.target), f.b.data(), r, 1.0f, w_block, n);
  }
}

void add_delta_rows(const delta_factors_f64& f, double weight, int64_t row_begin, int64_t row_end, double* w_block) {
  check_rows(f, row_begin, row_end);
  if (f.lycoris) return add_lycoris_rows(f, weight, row_begin, row_end, w_block);
  if (f.n_experts > 0) return add_expert_rows(f, weight * f.scale, row_begin, row_end, w_block);
  const size_t r = static_cast<size_t>(f.rank);
  const size_t n_rows = static_cast<size_t>(f.n_rows);
  const size_t n_cols = static_cast<size_t>(f.n_cols);
  const double ws = weight * f.scale;
  std::vector<double> acc(n_cols);
  for (int64_t ii = row_begin; ii < row_end; ++ii) {
    const size_t i = static_cast<size_t>(ii);
    std::fill(acc.begin(), acc.end(), 0.0);
    if (!f.transposed) {
      // dW[i, j] = sum_k B[i, k] A[k, j]
      for (size_t k = 0; k < r; ++k) axpy(f.b[i * r + k], f.a.data() + k * n_cols, acc.data(), n_cols);
    } else {
      // dW[i, j] = sum_k A[k, i] B[j, k]
      for (size_t j = 0; j < n_cols; ++j)
        for (size_t k = 0; k < r; ++k) acc[j] += f.a[k * n_rows + i] * f.b[j * r + k];
    }
    double* row = w_block + (i - static_cast<size_t>(row_begin)) * n_cols;
    for (size_t j = 0; j < n_cols; ++j) row[j] += ws * acc[j];
  }
}

double delta_element(const delta_factors& f, int64_t row, int64_t col) noexcept {
  if (f.lycoris) return f.scale * lycoris_element(*f.lycoris, row, col);
  if (f.n_experts > 0) {
    // expert `row`, element (i, j) of its [d1, d2] matrix
    const expert_view<float> x = expert(f, row);
    const size_t r = static_cast<size_t>(f.rank), d2 = static_cast<size_t>(f.expert_cols);
    const size_t i = static_cast<size_t>(col) / d2, j = static_cast<size_t>(col) % d2;
    double acc = 0;
    for (size_t k = 0; k < r; ++k)
      acc += f.transposed ? static_cast<double>(x.a[k * x.k + i]) * x.b[j * r + k]
                          : static_cast<double>(x.b[i * r + k]) * x.a[k * x.k + j];
    return f.scale * acc;
  }
  const size_t r = static_cast<size_t>(f.rank);
  const size_t i = static_cast<size_t>(row), j = static_cast<size_t>(col);
  double acc = 0;
  if (!f.transposed) {
    // s sum_k B[i, k] A[k, j]
    for (size_t k = 0; k < r; ++k)
      acc += static_cast<double>(f.b[i * r + k]) * f.a[k * static_cast<size_t>(f.n_cols) + j];
  } else {
    // s sum_k A[k, i] B[j, k]
    for (size_t k = 0; k < r; ++k)
      acc += static_cast<double>(f.a[k * static_cast<size_t>(f.n_rows) + i]) * f.b[j * r + k];
  }
  return f.scale * acc;
}

namespace {
template <typename T>
std::vector<double> row_bounds(const delta_factors_t<T>& f) {
  const size_t r = static_cast<size_t>(f.rank);
  const size_t n_rows = static_cast<size_t>(f.n_rows), n_cols = static_cast<size_t>(f.n_cols);
  std::vector<double> bound(n_rows, 0.0);
  if (f.lycoris) {
    // |s| max_j |D[i, j]|, D formed in double (its rounding covered by the 2^-40)
    for_each_lycoris_block(*f.lycoris, f.n_cols, 0, f.n_rows, [&](int64_t rb, int64_t re, const double* d) {
      for (size_t e = 0; e < static_cast<size_t>(re - rb) * n_cols; ++e) {
        const size_t i = static_cast<size_t>(rb) + e / std::max<size_t>(n_cols, 1);
        bound[i] = std::max(bound[i], std::fabs(d[e]) * (1 + 0x1p-40));
      }
    });
    for (double& b : bound) b *= std::fabs(f.scale);
    return bound;
  }
  if (f.n_experts > 0) {
    // per expert: |s| sum_k max_j |A_e[k, j]| max_o |B_e[o, k]|
    for (int64_t e = 0; e < f.n_experts; ++e) {
      const expert_view<T> x = expert(f, e);
      double sum = 0;
      for (size_t k = 0; k < r; ++k) {
        double a_max = 0, b_max = 0;
        for (size_t j = 0; j < x.k; ++j) a_max = std::max(a_max, std::fabs(static_cast<double>(x.a[k * x.k + j])));
        for (size_t o = 0; o < x.m; ++o) b_max = std::max(b_max, std::fabs(static_cast<double>(x.b[o * r + k])));
        sum += a_max * b_max;
      }
      bound[static_cast<size_t>(e)] = std::fabs(f.scale) * sum;
    }
    return bound;
  }
  if (!f.transposed) {
    // |s| sum_k |B[i, k]| max_j |A[k, j]|
    std::vector<double> a_max(r, 0.0);
    for (size_t k = 0; k < r; ++k)
      for (size_t j = 0; j < n_cols; ++j)
        a_max[k] = std::max(a_max[k], std::fabs(static_cast<double>(f.a[k * n_cols + j])));
    for (size_t i = 0; i < n_rows; ++i)
      for (size_t k = 0; k < r; ++k) bound[i] += std::fabs(static_cast<double>(f.b[i * r + k])) * a_max[k];
  } else {
    // |s| sum_k |A[k, i]| max_j |B[j, k]|
    std::vector<double> b_max(r, 0.0);
    for (size_t j = 0; j < n_cols; ++j)
      for (size_t k = 0; k < r; ++k) b_max[k] = std::max(b_max[k], std::fabs(static_cast<double>(f.b[j * r + k])));
    for (size_t k = 0; k < r; ++k)
      for (size_t i = 0; i < n_rows; ++i) bound[i] += std::fabs(static_cast<double>(f.a[k * n_rows + i])) * b_max[k];
  }
  for (double& b : bound) b *= std::fabs(f.scale);
  return bound;
}
}  // namespace

void add_delta_times(const delta_factors_f64& f, double weight, const double* x, size_t n, double* y) {
  const size_t n_rows = static_cast<size_t>(f.n_rows), n_cols = static_cast<size_t>(f.n_cols);
  const size_t n_in = f.transposed ? n_rows : n_cols, n_out = f.transposed ? n_cols : n_rows;
  const double ws = weight * f.scale;
  if (f.lycoris) {
    // y_v[i] += w s sum_j D[i, j] x_v[j], D row block by row block
    for_each_lycoris_block(*f.lycoris, f.n_cols, 0, f.n_rows, [&](int64_t rb, int64_t re, const double* d) {
      for (size_t v = 0; v < n; ++v)
        for (int64_t i = rb; i < re; ++i) {
          const double* row = d + static_cast<size_t>(i - rb) * n_cols;
          double sum = 0;
          for (size_t j = 0; j < n_cols; ++j) sum += row[j] * x[v * n_in + j];
          y[v * n_out + static_cast<size_t>(i)] += ws * sum;
        }
    });
    return;
  }
  // y_v += w s B (A x_v), A [r, n_in], B [n_out, r]
  const size_t r = static_cast<size_t>(f.rank);
  std::vector<double> u(r);
  for (size_t v = 0; v < n; ++v) {
    const double* xv = x + v * n_in;
    for (size_t k = 0; k < r; ++k) {
      double sum = 0;
      for (size_t j = 0; j < n_in; ++j) sum += f.a[k * n_in + j] * xv[j];
      u[k] = sum;
    }
    for (size_t o = 0; o < n_out; ++o) {
      double sum = 0;
      for (size_t k = 0; k < r; ++k) sum += f.b[o * r + k] * u[k];
      y[v * n_out + o] += ws * sum;
    }
  }
}

void add_expert_times(const delta_factors& f, int64_t e, double weight, const float* x, int64_t n, float* y) {
  if (f.n_experts <= 0 || e < 0 || e >= f.n_experts)
    throw errors::invalid("", f.target, fmt::format("expert {} of {} experts", e, f.n_experts));
  const expert_view<float> v = expert(f, e);
  if (n == 0 || f.rank == 0) return;
  const int nn = blas_int(n, f.target), r = blas_int(f.rank, f.target), k = blas_int(static_cast<int64_t>(v.k), f.target),
            m = blas_int(static_cast<int64_t>(v.m), f.target);
  // u [n, r] = x A_e^T; y += w s u B_e^T
  std::vector<float> u(static_cast<size_t>(n) * static_cast<size_t>(f.rank));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nn, r, k, 1.0f, x, k, v.a, k, 0.0f, u.data(), r);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nn, m, r, static_cast<float>(weight * f.scale), u.data(), r,
              v.b, r, 1.0f, y, m);
}

std::vector<double> delta_row_bounds(const delta_factors& f) { return row_bounds(f); }
std::vector<double> delta_row_bounds(const delta_factors_f64& f) { return row_bounds(f); }

void apply_module_rows(const delta_factors& f, double weight, int64_t row_begin, int64_t row_end, float* w_block) {
  apply_rows(f, weight, row_begin, row_end, w_block);
}

void apply_module_rows(const delta_factors_f64& f, double weight, int64_t row_begin, int64_t row_end, double* w_block) {
  apply_rows(f, weight, row_begin, row_end, w_block);
}

void add_dora_norms_sq(const delta_factors& f, int64_t row_begin, int64_t row_end, const float* v_block,
                       std::span<double> norms_sq) {
  dora_norms_sq(f, row_begin, row_end, v_block, norms_sq);
}

void add_dora_norms_sq(const delta_factors_f64& f, int64_t row_begin, int64_t row_end, const double* v_block,
                       std::span<double> norms_sq) {
  dora_norms_sq(f, row_begin, row_end, v_block, norms_sq);
}

void apply_module_rows(const delta_factors& f, double weight, int64_t row_begin, int64_t row_end, float* w_block,
                       std::span<const double> norms_sq) {
  add_delta_rows(f, f.dora ? dora_v_weight(f, weight) : weight, row_begin, row_end, w_block);
  if (f.dora) scale_by_norms(f, weight, row_begin, row_end, w_block, norms_sq);
}

void apply_module_rows(const delta_factors_f64& f, double weight, int64_t row_begin, int64_t row_end, double* w_block,
                       std::span<const double> norms_sq) {
  add_delta_rows(f, f.dora ? dora_v_weight(f, weight) : weight, row_begin, row_end, w_block);
  if (f.dora) scale_by_norms(f, weight, row_begin, row_end, w_block, norms_sq);
}

void add_bias_delta(const lora_module& m, double weight, std::span<float> bias, const std::string& file) {
  add_bias(m, weight, bias, file);
}

namespace {

// The rows of [row_begin, row_end) the slice covers, as [lo, hi) (lo >= hi: none).
std::pair<int64_t, int64_t> slice_overlap(const row_slice& s, int64_t row_begin, int64_t row_end) {
  return {std::max(row_begin, s.tensor_row), std::min(row_end, s.tensor_row + s.n_rows)};
}

template <typename F, typename T>
void add_slice(const F& f, double weight, const row_slice& s, int64_t row_begin, int64_t row_end, T* w_block) {
  const auto [lo, hi] = slice_overlap(s, row_begin, row_end);
  if (lo >= hi) return;
  // tensor row t holds module row t - tensor_row + module_row
  add_delta_rows(f, weight, lo - s.tensor_row + s.module_row, hi - s.tensor_row + s.module_row,
                 w_block + (lo - row_begin) * f.n_cols);
}

template <typename T>
void add_bias_rows(const lora_module& m, double weight, const row_slice& s, std::span<T> bias,
                   const std::string& file) {
  if (!m.bias) throw errors::invalid(file, m.name, "module has no lora_B.bias");
  if (s.module_row + s.n_rows > static_cast<int64_t>(m.bias->info->n_elements) ||
      s.tensor_row + s.n_rows > static_cast<int64_t>(bias.size()))
    throw errors::shape_mismatch(
        file, m.bias->info->name,
        fmt::format("rows [{}, {}) of {} ({} values)", s.tensor_row, s.tensor_row + s.n_rows, s.bias, bias.size()),
        shape_text(m.bias->info->shape));
  std::vector<double> b = decode<double>(*m.bias, file, m.name);
  // bias'[t] = bias[t] + w s b[t - tensor_row + module_row]
  const double ws = weight * m.scale;
  for (int64_t k = 0; k < s.n_rows; ++k) {
    T& v = bias[static_cast<size_t>(s.tensor_row + k)];
    v = static_cast<T>(static_cast<double>(v) + ws * b[static_cast<size_t>(s.module_row + k)]);
  }
}

}  // namespace

void add_slice_rows(const delta_factors& f, double weight, const row_slice& s, int64_t row_begin, int64_t row_end,
                    float* w_block) {
  add_slice(f, weight, s, row_begin, row_end, w_block);
}
void add_slice_rows(const delta_factors_f64& f, double weight, const row_slice& s, int64_t row_begin, int64_t row_end,
                    double* w_block) {
  add_slice(f, weight, s, row_begin, row_end, w_block);
}
void add_bias_slice(const lora_module& m, double weight, const row_slice& s, std::span<float> bias,
                    const std::string& file) {
  add_bias_rows(m, weight, s, bias, file);
}
void add_bias_slice(const lora_module& m, double weight, const row_slice& s, std::span<double> bias,
                    const std::string& file) {
  add_bias_rows(m, weight, s, bias, file);
}

void add_bias_delta(const lora_module& m, double weight, std::span<double> bias, const std::string& file) {
  add_bias(m, weight, bias, file);
}

// ---------------------------------------------------------------- exact rounding

namespace {

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

// mask[j] = 1 when x[j] is suspect (see above), else 0, j < n; for BF16 and
// F16 output. One vectorized pass over a row: testing blocks of the row with
// a scalar loop behind a vectorized "any" cost more than the rest of the
// merge's rounding (on a Llama-3-8B merge a quarter of the 256-element blocks
// held a suspect).
LORA_VECTORIZE void suspect_mask_bf16(const float* x, size_t n, int32_t cb_bits, uint8_t* mask) {
  for (size_t j = 0; j < n; ++j) mask[j] = static_cast<uint8_t>(suspect<false>(x[j], cb_bits));
}
LORA_VECTORIZE void suspect_mask_f16(const float* x, size_t n, int32_t cb_bits, uint8_t* mask) {
  for (size_t j = 0; j < n; ++j) mask[j] = static_cast<uint8_t>(suspect<true>(x[j], cb_bits));
}

// W0 element e decoded to double (BF16, F16, F32 or F64 bytes).
double w0_element(dtype type, const uint8_t* bytes, size_t e) noexcept {
  switch (type) {
    case dtype::BF16: {
      uint16_t h;
      std::memcpy(&h, bytes + 2 * e, 2);
      return bf16_to_f32(h);
    }
    case dtype::F16: {
      uint16_t h;
      std::memcpy(&h, bytes + 2 * e, 2);
      return f16_to_f32(h);
    }
    case dtype::F32: {
      float f;
      std::memcpy(&f, bytes + 4 * e, 4);
      return f;
    }
    default: {
      double d;
      std::memcpy(&d, bytes + 8 * e, 8);
      return d;
    }
  }
}

// Recomputes, in double, the suspect elements of rows [rb, re) held in buf
// (f32, already merged) and overwrites their rounded value in `out`:
// W0 + sum_k w_k dW_k (delta_element) rounded once. Each row's suspects are
// marked by one vectorized pass, then found eight mask bytes at a time;
// suspects are rare (~1e-4 of elements).
template <bool f16>
void fix_near_midpoints(const std::vector<const delta_factors*>& factors, const std::vector<double>& weights,
                        const std::vector<const row_slice*>& slices, const std::vector<float>& row_cb, dtype src_type,
                        std::span<const uint8_t> in_bytes, int64_t rb, int64_t re, uint64_t n_cols, const float* buf,
                        uint8_t* out) {
  (void)math_dtype_size(src_type);  // throws for a dtype without arithmetic
  thread_local scratch<uint8_t> mask_buffer;
  const size_t n_words = (static_cast<size_t>(n_cols) + 7) / 8;
  uint8_t* mask = mask_buffer.get(n_words * 8).data();
  for (int64_t row = rb; row < re; ++row) {
    const int32_t cb = std::bit_cast<int32_t>(row_cb[static_cast<size_t>(row)]);
    const size_t row_off = static_cast<size_t>(row - rb) * n_cols;
    const float* x = buf + row_off;
    std::memset(mask + n_words * 8 - 8, 0, 8);  // the tail past n_cols
    (f16 ? suspect_mask_f16 : suspect_mask_bf16)(x, n_cols, cb, mask);
    for (size_t w = 0; w < n_words; ++w) {
      uint64_t word;
      std::memcpy(&word, mask + 8 * w, 8);
      while (word != 0) {
        const size_t j = 8 * w + static_cast<size_t>(std::countr_zero(word)) / 8;
        word &= word - 1;  // one bit set per suspect byte (the mask holds 0 or 1)
        const size_t e = row_off + j;
        double exact = w0_element(src_type, in_bytes.data(), e);
        for (size_t i = 0; i < factors.size(); ++i) {
          // a slice's module row for this tensor row (none: the module does not reach it)
          const row_slice* sl = slices.empty() ? nullptr : slices[i];
          if (sl && (row < sl->tensor_row || row >= sl->tensor_row + sl->n_rows)) continue;
          const int64_t mrow = sl ? row - sl->tensor_row + sl->module_row : row;
          exact += weights[i] * delta_element(*factors[i], mrow, static_cast<int64_t>(j));
        }
        const uint16_t h = f16 ? f64_to_f16(exact) : f64_to_bf16(exact);
        std::memcpy(out + 2 * e, &h, 2);
      }
    }
  }
}

}  // namespace

exact_rounding::exact_rounding(std::vector<const delta_factors*> factors, std::vector<double> weights, dtype out_type,
                               std::vector<const row_slice*> slices, int64_t n_rows)
    : factors_(std::move(factors)), weights_(std::move(weights)), slices_(std::move(slices)), out_type_(out_type) {
  if (out_type_ != dtype::BF16 && out_type_ != dtype::F16)
    throw errors::invalid("", "", fmt::format("exact rounding is to BF16 or F16, not {}", dtype_name(out_type_)));
  if (factors_.empty() || factors_.size() != weights_.size() || (!slices_.empty() && slices_.size() != factors_.size()))
    throw errors::invalid("", "", "exact rounding needs one weight per module");
  n_cols_ = factors_.front()->n_cols;
  // per row of the tensor: (r + 3) sum_k |w_k| bound_k (see suspect()); a
  // slice's module rows land on its tensor rows
  std::vector<double> bounds(static_cast<size_t>(slices_.empty() ? factors_.front()->n_rows : n_rows), 0.0);
  double rank_term = 0;
  for (size_t i = 0; i < factors_.size(); ++i) {
    const std::vector<double> b = delta_row_bounds(*factors_[i]);
    const row_slice* sl = slices_.empty() ? nullptr : slices_[i];
    const int64_t first = sl ? sl->tensor_row : 0, from = sl ? sl->module_row : 0;
    const int64_t count = sl ? sl->n_rows : static_cast<int64_t>(b.size());
    for (int64_t k = 0; k < count; ++k) {
      const size_t row = static_cast<size_t>(first + k), mrow = static_cast<size_t>(from + k);
      if (row < bounds.size() && mrow < b.size()) bounds[row] += std::fabs(weights_[i]) * b[mrow];
    }
    rank_term += static_cast<double>(factors_[i]->rank + 3);
  }
  row_bound_.resize(bounds.size());
  for (size_t row = 0; row < bounds.size(); ++row) row_bound_[row] = static_cast<float>(rank_term * bounds[row]);
}

void exact_rounding::round_rows(dtype w0_type, std::span<const uint8_t> w0, int64_t row_begin, int64_t row_end,
                                const float* merged, std::span<uint8_t> out) const {
  const size_t n = static_cast<size_t>(row_end - row_begin) * static_cast<size_t>(n_cols_);
  from_f32(out_type_, std::span<const float>(merged, n), out);
  const uint64_t n_cols = static_cast<uint64_t>(n_cols_);
  if (out_type_ == dtype::F16)
    fix_near_midpoints<true>(factors_, weights_, slices_, row_bound_, w0_type, w0, row_begin, row_end, n_cols, merged,
                             out.data());
  else
    fix_near_midpoints<false>(factors_, weights_, slices_, row_bound_, w0_type, w0, row_begin, row_end, n_cols, merged,
                              out.data());
}

}  // namespace lora
