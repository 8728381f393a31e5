#include "core/lycoris-delta.h"

#include <cblas.h>

#include <algorithm>

#include <fmt/format.h>

#include "core/blas.h"
#include "core/dtype.h"
#include "formats/error.h"

namespace lora {

namespace {

int64_t count(const std::vector<int64_t>& shape, size_t from = 0) {
  int64_t n = 1;
  for (size_t i = from; i < shape.size(); ++i) n *= shape[i];
  return n;
}

const std::vector<int64_t>& shape_of(const std::optional<tensor_ref>& t) { return t->info->shape; }

// A required tensor of a form, or an exit-3 error naming the module.
const tensor_ref& need(const std::optional<tensor_ref>& t, const lora_module& m, const std::string& file,
                       std::string_view what) {
  if (!t) throw errors::invalid(file, m.name, fmt::format("{} module without its {}", delta_form_name(m.form), what));
  return *t;
}

void check_dims(const tensor_ref& t, size_t lo, size_t hi, const std::string& file) {
  const size_t n = t.info->shape.size();
  if (n < lo || n > hi)
    throw errors::invalid(file, t.info->name,
                          fmt::format("expected {}..{} dims, found shape {}", lo, hi, shape_text(t.info->shape)));
  for (int64_t d : t.info->shape)
    if (d <= 0)
      throw errors::invalid(file, t.info->name, fmt::format("empty dimension in {}", shape_text(t.info->shape)));
}

// A factor's first dim must be `want` (ranks and sizes shared between tensors).
void check_dim(const tensor_ref& t, size_t axis, int64_t want, const std::string& file, std::string_view what) {
  if (t.info->shape[axis] != want)
    throw errors::shape_mismatch(file, t.info->name, fmt::format("dim {} = {} ({})", axis, want, what),
                                 shape_text(t.info->shape));
}

std::vector<double> decode(const tensor_ref& t, const std::string& file) {
  if (!dtype_is_math(t.info->type))
    throw errors::invalid(
        file, t.info->name,
        fmt::format("dtype {} is not supported for arithmetic (only F16, BF16, F32, F64)", dtype_name(t.info->type)));
  std::vector<double> out(t.info->n_elements);
  to_f64(t.info->type, t.data(), out);
  return out;
}

// Row-major C [m, n] = A [m, k] B [k, n] in double (BLAS).
std::vector<double> matmul(const std::vector<double>& a, const std::vector<double>& b, int64_t m, int64_t k, int64_t n,
                           const std::string& key) {
  std::vector<double> c(static_cast<size_t>(m * n), 0.0);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, blas_int(m, key), blas_int(n, key), blas_int(k, key), 1.0,
              a.data(), blas_int(k, key), b.data(), blas_int(n, key), 0.0, c.data(), blas_int(n, key));
  return c;
}

// The Tucker core contracted with one factor: V[i, q * kk + hw] =
// sum_j t[i, j, hw] f[j, q], t [r, r, kh, kw] (kk = kh kw), f [r, n].
std::vector<double> contract_core(const std::vector<double>& t, const std::vector<double>& f, int64_t r, int64_t kk,
                                  int64_t n) {
  std::vector<double> v(static_cast<size_t>(r * n * kk), 0.0);
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t q = 0; q < n; ++q) {
        const double fjq = f[static_cast<size_t>(j * n + q)];
        const double* tij = t.data() + (i * r + j) * kk;
        double* vi = v.data() + (i * n + q) * kk;
        for (int64_t hw = 0; hw < kk; ++hw) vi[hw] += tij[hw] * fjq;
      }
  return v;
}

std::vector<double> transpose(const std::vector<double>& x, int64_t rows, int64_t cols) {
  std::vector<double> y(x.size());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) y[static_cast<size_t>(j * rows + i)] = x[static_cast<size_t>(i * cols + j)];
  return y;
}

// ---------------------------------------------------------------- shapes

// LoHa: one Hadamard factor, its U [out, r] and V [r, n] (Tucker: V from the core).
struct hada_shape {
  int64_t out = 0, r = 0;
  std::vector<int64_t> in_dims;  // [n] or, Tucker, [in, kh, kw]
};

hada_shape hada_factor(const lora_module& m, const std::optional<tensor_ref>& wa, const std::optional<tensor_ref>& wb,
                       const std::optional<tensor_ref>& t, const std::string& file, std::string_view k) {
  const tensor_ref& a = need(wa, m, file, fmt::format("hada_w{}_a", k));
  const tensor_ref& b = need(wb, m, file, fmt::format("hada_w{}_b", k));
  hada_shape s;
  if (t) {
    // Tucker: t [r, r, kh, kw], w_a [r, out], w_b [r, in]
    check_dims(*t, 3, 5, file);
    check_dims(a, 2, 2, file);
    check_dims(b, 2, 2, file);
    s.r = t->info->shape[0];
    check_dim(*t, 1, s.r, file, "the Tucker core is square");
    check_dim(a, 0, s.r, file, "the Tucker core's rank");
    check_dim(b, 0, s.r, file, "the Tucker core's rank");
    s.out = a.info->shape[1];
    s.in_dims = {b.info->shape[1]};
    for (size_t i = 2; i < t->info->shape.size(); ++i) s.in_dims.push_back(t->info->shape[i]);
  } else {
    // w_a [out, r], w_b [r, in * kh * kw] (or [r, in, kh, kw])
    check_dims(a, 2, 2, file);
    check_dims(b, 2, 4, file);
    s.r = b.info->shape[0];
    check_dim(a, 1, s.r, file, "hada_w_b's rank");
    s.out = a.info->shape[0];
    s.in_dims = {count(b.info->shape, 1)};
  }
  return s;
}

// LoKr: K1 [a, b] and K2 [c, d(, kh, kw)] as shapes.
struct kron_shape {
  int64_t a = 0, b = 0, c = 0;
  std::vector<int64_t> k2_tail;  // [n2] or [d, kh, kw] when the kernel is known
};

kron_shape kron_factors(const lora_module& m, const std::string& file) {
  const lycoris_tensors& l = m.lycoris;
  kron_shape s;
  if (l.w1) {
    check_dims(*l.w1, 2, 2, file);
    s.a = shape_of(l.w1)[0];
    s.b = shape_of(l.w1)[1];
  } else {
    const tensor_ref& a = need(l.w1_a, m, file, "lokr_w1 or lokr_w1_a");
    const tensor_ref& b = need(l.w1_b, m, file, "lokr_w1_b");
    check_dims(a, 2, 2, file);
    check_dims(b, 2, 2, file);
    check_dim(b, 0, a.info->shape[1], file, "lokr_w1_a's rank");
    s.a = a.info->shape[0];
    s.b = b.info->shape[1];
  }
  if (l.w2) {
    check_dims(*l.w2, 2, 4, file);
    s.c = shape_of(l.w2)[0];
    s.k2_tail.assign(shape_of(l.w2).begin() + 1, shape_of(l.w2).end());
  } else if (l.t2) {
    // Tucker: t2 [r, r, kh, kw], w2_a [r, c], w2_b [r, d]
    const tensor_ref& a = need(l.w2_a, m, file, "lokr_w2_a");
    const tensor_ref& b = need(l.w2_b, m, file, "lokr_w2_b");
    check_dims(*l.t2, 3, 5, file);
    check_dims(a, 2, 2, file);
    check_dims(b, 2, 2, file);
    const int64_t r = shape_of(l.t2)[0];
    check_dim(*l.t2, 1, r, file, "the Tucker core is square");
    check_dim(a, 0, r, file, "the Tucker core's rank");
    check_dim(b, 0, r, file, "the Tucker core's rank");
    s.c = a.info->shape[1];
    s.k2_tail = {b.info->shape[1]};
    for (size_t i = 2; i < shape_of(l.t2).size(); ++i) s.k2_tail.push_back(shape_of(l.t2)[i]);
  } else {
    // w2_a [c, r], w2_b [r, d * kh * kw] (or [r, d, kh, kw])
    const tensor_ref& a = need(l.w2_a, m, file, "lokr_w2 or lokr_w2_a");
    const tensor_ref& b = need(l.w2_b, m, file, "lokr_w2_b");
    check_dims(a, 2, 2, file);
    check_dims(b, 2, 4, file);
    check_dim(b, 0, a.info->shape[1], file, "lokr_w2_a's rank");
    s.c = a.info->shape[0];
    s.k2_tail = {count(b.info->shape, 1)};
  }
  return s;
}

// LoCon + Tucker: down [r, in(, 1, 1)], mid [r, r, kh, kw], up [out, r(, 1, 1)].
std::vector<int64_t> tucker_shape(const lora_module& m, const std::string& file) {
  const tensor_ref& mid = need(m.lycoris.mid, m, file, "lora_mid");
  check_dims(m.a, 2, 4, file);
  check_dims(m.b, 2, 4, file);
  check_dims(mid, 3, 5, file);
  const int64_t r = m.a.info->shape[0];
  if (count(m.a.info->shape, 2) != 1 || count(m.b.info->shape, 2) != 1)
    throw errors::shape_mismatch(file, m.a.info->name, "1x1 lora_down and lora_up around a lora_mid",
                                 fmt::format("{} and {}", shape_text(m.a.info->shape), shape_text(m.b.info->shape)));
  check_dim(mid, 0, r, file, "lora_down's rank");
  check_dim(mid, 1, r, file, "lora_down's rank");
  check_dim(m.b, 1, r, file, "lora_down's rank");
  std::vector<int64_t> shape{m.b.info->shape[0], m.a.info->shape[1]};
  for (size_t i = 2; i < mid.info->shape.size(); ++i) shape.push_back(mid.info->shape[i]);
  return shape;
}

}  // namespace

bool lycoris_delta_fits(const std::vector<int64_t>& made, const std::vector<int64_t>& target) noexcept {
  if (target.empty() || made.empty() || made[0] != target[0] || count(made, 1) != count(target, 1)) return false;
  if (made.size() <= 2 || made == target) return true;
  return target.size() == 2 && count(made, 2) == 1;
}

std::vector<int64_t> lycoris_delta_shape(const lora_module& m, const std::string& file) {
  switch (m.form) {
    case delta_form::loha: {
      const lycoris_tensors& l = m.lycoris;
      if (l.t1.has_value() != l.t2.has_value())
        throw errors::invalid(file, m.name, "LoHa module with only one of hada_t1, hada_t2");
      const hada_shape s1 = hada_factor(m, l.w1_a, l.w1_b, l.t1, file, "1");
      const hada_shape s2 = hada_factor(m, l.w2_a, l.w2_b, l.t2, file, "2");
      if (s1.out != s2.out || s1.in_dims != s2.in_dims)
        throw errors::shape_mismatch(
            file, l.w2_a->info->name,
            fmt::format("w2's product of the shape of w1's ([{}, {}])", s1.out, count(s1.in_dims)),
            fmt::format("[{}, {}]", s2.out, count(s2.in_dims)));
      std::vector<int64_t> shape{s1.out};
      shape.insert(shape.end(), s1.in_dims.begin(), s1.in_dims.end());
      return shape;
    }
    case delta_form::lokr: {
      const kron_shape s = kron_factors(m, file);
      std::vector<int64_t> shape{s.a * s.c, s.b * s.k2_tail[0]};
      shape.insert(shape.end(), s.k2_tail.begin() + 1, s.k2_tail.end());
      return shape;
    }
    case delta_form::tucker: return tucker_shape(m, file);
    case delta_form::low_rank: break;
  }
  throw errors::invalid(file, m.name, "internal: a LoRA module has no LyCORIS delta");
}

lycoris_delta make_lycoris_delta(const lora_module& m, const std::vector<int64_t>& target_shape,
                                 const std::string& file, bool with_values) {
  const std::vector<int64_t> made = lycoris_delta_shape(m, file);
  if (!lycoris_delta_fits(made, target_shape))
    throw errors::shape_mismatch(
        file, m.name,
        fmt::format("a {} delta the shape of {} {}", delta_form_name(m.form), m.target, shape_text(target_shape)),
        fmt::format("tensors making {}", shape_text(made)));
  lycoris_delta d;
  d.n_rows = target_shape[0];
  d.n_cols = count(target_shape, 1);
  const lycoris_tensors& l = m.lycoris;
  switch (m.form) {
    case delta_form::loha: {
      d.kind = lycoris_delta::op::hadamard;
      // U_k, V_k of (U1 V1) ⊙ (U2 V2)
      auto factor = [&](const std::optional<tensor_ref>& wa, const std::optional<tensor_ref>& wb,
                        const std::optional<tensor_ref>& t, int64_t& r, std::vector<double>& u,
                        std::vector<double>& v) {
        r = wb->info->shape[0];
        if (!with_values) return;
        if (t) {
          // rebuild = einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a): U = w_a^T, V = t ×_j w_b
          const int64_t kk = count(t->info->shape, 2);
          u = transpose(decode(*wa, file), r, d.n_rows);
          v = contract_core(decode(*t, file), decode(*wb, file), r, kk, wb->info->shape[1]);
        } else {
          u = decode(*wa, file);
          v = decode(*wb, file);
        }
      };
      factor(l.w1_a, l.w1_b, l.t1, d.r1, d.u1, d.v1);
      factor(l.w2_a, l.w2_b, l.t2, d.r2, d.u2, d.v2);
      break;
    }
    case delta_form::lokr: {
      d.kind = lycoris_delta::op::kron;
      const kron_shape s = kron_factors(m, file);
      d.a = s.a;
      d.b = s.b;
      d.c = s.c;
      d.n2 = count(s.k2_tail);
      if (!with_values) break;
      // w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b
      if (l.w1)
        d.k1 = decode(*l.w1, file);
      else
        d.k1 = matmul(decode(*l.w1_a, file), decode(*l.w1_b, file), s.a, shape_of(l.w1_b)[0], s.b, m.name);
      // w2 = lokr_w2, rebuild_tucker(t2, w2_a, w2_b), or lokr_w2_a @ lokr_w2_b
      if (l.w2) {
        d.k2 = decode(*l.w2, file);
      } else if (l.t2) {
        // einsum("i j ..., i p, j r -> p r ...", t2, w2_a, w2_b) = w2_a^T (t2 ×_j w2_b)
        const int64_t r = shape_of(l.t2)[0], kk = count(shape_of(l.t2), 2);
        const std::vector<double> v =
            contract_core(decode(*l.t2, file), decode(*l.w2_b, file), r, kk, shape_of(l.w2_b)[1]);
        d.k2 = matmul(transpose(decode(*l.w2_a, file), r, s.c), v, s.c, r, d.n2, m.name);
      } else {
        d.k2 = matmul(decode(*l.w2_a, file), decode(*l.w2_b, file), s.c, shape_of(l.w2_b)[0], d.n2, m.name);
      }
      break;
    }
    case delta_form::tucker: {
      // dW[p, q, hw] = sum_ij mid[i, j, hw] up[p, i] down[j, q]: U = up, V = mid ×_j down
      d.kind = lycoris_delta::op::product;
      d.r1 = m.a.info->shape[0];
      if (!with_values) break;
      const int64_t kk = count(shape_of(l.mid), 2);
      d.u1 = decode(m.b, file);
      d.v1 = contract_core(decode(*l.mid, file), decode(m.a, file), d.r1, kk, m.a.info->shape[1]);
      break;
    }
    case delta_form::low_rank: break;
  }
  return d;
}

void lycoris_rows(const lycoris_delta& d, int64_t row_begin, int64_t row_end, double* out) {
  const int64_t n_rows = row_end - row_begin, n = d.n_cols;
  if (n_rows <= 0 || n == 0) return;
  const std::string key = "lycoris delta";
  switch (d.kind) {
    case lycoris_delta::op::product:
      // D = U V
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, blas_int(n_rows, key), blas_int(n, key),
                  blas_int(d.r1, key), 1.0, d.u1.data() + row_begin * d.r1, blas_int(d.r1, key), d.v1.data(),
                  blas_int(n, key), 0.0, out, blas_int(n, key));
      break;
    case lycoris_delta::op::hadamard: {
      // D = (U1 V1) ⊙ (U2 V2)
      std::vector<double> second(static_cast<size_t>(n_rows * n));
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, blas_int(n_rows, key), blas_int(n, key),
                  blas_int(d.r1, key), 1.0, d.u1.data() + row_begin * d.r1, blas_int(d.r1, key), d.v1.data(),
                  blas_int(n, key), 0.0, out, blas_int(n, key));
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, blas_int(n_rows, key), blas_int(n, key),
                  blas_int(d.r2, key), 1.0, d.u2.data() + row_begin * d.r2, blas_int(d.r2, key), d.v2.data(),
                  blas_int(n, key), 0.0, second.data(), blas_int(n, key));
      for (size_t e = 0; e < second.size(); ++e) out[e] *= second[e];
      break;
    }
    case lycoris_delta::op::kron:
      // D[i1 c + i2, j1 n2 + j2] = K1[i1, j1] K2[i2, j2]
      for (int64_t i = row_begin; i < row_end; ++i) {
        const int64_t i1 = i / d.c, i2 = i % d.c;
        double* row = out + (i - row_begin) * n;
        const double* k2 = d.k2.data() + i2 * d.n2;
        for (int64_t j1 = 0; j1 < d.b; ++j1) {
          const double k1 = d.k1[static_cast<size_t>(i1 * d.b + j1)];
          for (int64_t j2 = 0; j2 < d.n2; ++j2) row[j1 * d.n2 + j2] = k1 * k2[j2];
        }
      }
      break;
  }
}

double lycoris_element(const lycoris_delta& d, int64_t row, int64_t col) noexcept {
  auto dot = [&](const std::vector<double>& u, const std::vector<double>& v, int64_t r) {
    double s = 0;
    for (int64_t k = 0; k < r; ++k)
      s += u[static_cast<size_t>(row * r + k)] * v[static_cast<size_t>(k * d.n_cols + col)];
    return s;
  };
  switch (d.kind) {
    case lycoris_delta::op::product: return dot(d.u1, d.v1, d.r1);
    case lycoris_delta::op::hadamard: return dot(d.u1, d.v1, d.r1) * dot(d.u2, d.v2, d.r2);
    case lycoris_delta::op::kron:
      return d.k1[static_cast<size_t>((row / d.c) * d.b + col / d.n2)] *
             d.k2[static_cast<size_t>((row % d.c) * d.n2 + col % d.n2)];
  }
  return 0;
}

}  // namespace lora
