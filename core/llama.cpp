#include "core/llama.h"

#include <cblas.h>

#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/blas.h"
#include "core/delta.h"
#include "core/dtype.h"
#include "core/fp8.h"
#include "core/model-family.h"
#include "core/stored-gemm.h"
#include "core/thread-pool.h"
#include "formats/error.h"

namespace lora {

// ---- building blocks ----

void rms_norm(const float* x, int64_t n_tokens, int64_t dim, const float* weight, double eps, float* out) {
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* row = x + t * dim;
    double sq = 0;
    for (int64_t i = 0; i < dim; ++i) sq += static_cast<double>(row[i]) * row[i];
    // x * rsqrt(mean(x^2) + eps) * w
    const float inv = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(dim) + eps));
    float* o = out + t * dim;
    for (int64_t i = 0; i < dim; ++i) o[i] = weight[i] * (row[i] * inv);
  }
}

void norm_rows(norm_kind kind, const float* x, int64_t n_tokens, int64_t dim, const float* weight, const float* bias,
               double eps, float* out) {
  if (kind == norm_kind::none) {
    if (out != x) std::copy(x, x + n_tokens * dim, out);
    return;
  }
  if (kind != norm_kind::layer_norm) {
    if (kind == norm_kind::rms) return rms_norm(x, n_tokens, dim, weight, eps, out);
    // Gemma2RMSNorm: norm(x.float()) * (1.0 + weight.float()), the (1 + w) in f32
    std::vector<float> w1(static_cast<size_t>(dim));
    for (int64_t i = 0; i < dim; ++i) w1[static_cast<size_t>(i)] = 1.0f + weight[i];
    return rms_norm(x, n_tokens, dim, w1.data(), eps, out);
  }
  // torch.nn.LayerNorm: (x - mean) / sqrt(var + eps) * w + b, var biased
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* row = x + t * dim;
    double mean = 0, var = 0;
    for (int64_t i = 0; i < dim; ++i) mean += row[i];
    mean /= static_cast<double>(dim);
    for (int64_t i = 0; i < dim; ++i) var += (row[i] - mean) * (row[i] - mean);
    const double inv = 1.0 / std::sqrt(var / static_cast<double>(dim) + eps);
    float* o = out + t * dim;
    for (int64_t i = 0; i < dim; ++i) o[i] = static_cast<float>((row[i] - mean) * inv) * weight[i] + bias[i];
  }
}

void causal_attention(const float* q, const float* k, const float* v, int64_t n_tokens, int64_t n_heads,
                      int64_t n_kv_heads, int64_t head_dim, float* out, int64_t window, double scale, double softcap) {
  const int64_t group = n_heads / n_kv_heads, d = head_dim;
  const float sc = static_cast<float>(scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(d)));
  const float cap = static_cast<float>(softcap);
  // query rows in chunks: the scores of a chunk are [rows, keys], so memory stays
  // chunk * n_tokens floats whatever the sequence's length
  constexpr int64_t chunk = 256;
  std::vector<float> s(static_cast<size_t>(std::min(chunk, n_tokens) * n_tokens));
  const int ldq = blas_int(n_heads * d, ""), ldk = blas_int(n_kv_heads * d, "");
  for (int64_t h = 0; h < n_heads; ++h) {
    const int64_t kvh = h / group;
    for (int64_t i0 = 0; i0 < n_tokens; i0 += chunk) {
      const int64_t i1 = std::min(n_tokens, i0 + chunk), rows = i1 - i0;
      // keys j0 <= j < i1 can be seen by some query of the chunk (j > i - window with a sliding window)
      const int64_t j0 = window > 0 ? std::max<int64_t>(0, i0 - window + 1) : 0, n_keys = i1 - j0;
      // S[rows, keys] = Q_chunk K^T * scale
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_int(rows, ""), blas_int(n_keys, ""), blas_int(d, ""),
                  sc, q + (i0 * n_heads + h) * d, ldq, k + (j0 * n_kv_heads + kvh) * d, ldk, 0.0f, s.data(),
                  blas_int(n_keys, ""));
      for (int64_t i = i0; i < i1; ++i) {
        float* row = s.data() + (i - i0) * n_keys;
        // keys of query i: lo <= j <= i; soft-capped cap tanh(score / cap); softmax over them, 0 elsewhere
        const int64_t lo = window > 0 ? std::max<int64_t>(j0, i - window + 1) : 0;
        float max_score = -INFINITY;
        for (int64_t j = lo; j <= i; ++j) {
          float& x = row[j - j0];
          if (cap > 0) x = cap * std::tanh(x / cap);
          max_score = std::max(max_score, x);
        }
        double sum = 0;
        for (int64_t j = j0; j < i1; ++j) {
          float& x = row[j - j0];
          x = j >= lo && j <= i ? std::exp(x - max_score) : 0.0f;
          sum += x;
        }
        const float inv_sum = static_cast<float>(1.0 / sum);
        for (int64_t j = lo; j <= i; ++j) row[j - j0] *= inv_sum;
      }
      // O_chunk = P V
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, blas_int(rows, ""), blas_int(d, ""), blas_int(n_keys, ""),
                  1.0f, s.data(), blas_int(n_keys, ""), v + (j0 * n_kv_heads + kvh) * d, ldk, 0.0f,
                  out + (i0 * n_heads + h) * d, ldq);
    }
  }
}

float activate(activation_kind kind, float x) {
  switch (kind) {
    case activation_kind::silu: return x / (1.0f + std::exp(-x));
    case activation_kind::gelu_tanh: {
      // gelu_pytorch_tanh / NewGELUActivation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
      const float c = 0.7978845608028654f;
      return 0.5f * x * (1.0f + std::tanh(c * (x + 0.044715f * x * x * x)));
    }
    case activation_kind::gelu: return 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f));
  }
  return x;
}

void gated_activation(activation_kind kind, const float* gate, const float* up, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = activate(kind, gate[i]) * up[i];
}

void swiglu(const float* gate, const float* up, size_t n, float* out) {
  gated_activation(activation_kind::silu, gate, up, n, out);
}

// ---- the model ----

namespace {

// C[m, n] (+)= alpha * X[m, k] Y[n, k]^T  (row-major)
void gemm_xyt(const float* x, const float* y, int64_t m, int64_t n, int64_t k, float alpha, float beta, float* c) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_int(m, ""), blas_int(n, ""), blas_int(k, ""), alpha, x,
              blas_int(k, ""), y, blas_int(k, ""), beta, c, blas_int(n, ""));
}

// One adapter's LoRA module on a tensor, with its weight (times the global scale).
struct contribution {
  const lora_module* module;
  double weight;
  const std::string* file;  // the adapter's weights file, for messages
};

// One contribution's factors, loaded (core/delta).
struct weighted_factors {
  delta_factors f;
  double weight;
  const contribution* from;
};

// The model's tensors (with the adapter's modules_to_save in place of the
// base's) and the adapter's LoRA modules, by target.
class weights {
 public:
  weights(const model_files& model, const hf_config& config, std::span<const weighted_adapter> adapters, int threads,
          int64_t block_elements, std::optional<dtype> round_to)
      : model_(model),
        config_(config),
        has_adapter_(!adapters.empty()),
        threads_(threads),
        block_elements_(block_elements),
        round_to_(round_to),
        fp8_(read_fp8_model(model)) {
    for (const weighted_adapter& wa : adapters) {
      for (const lora_module& m : wa.a->modules) modules_[m.target].push_back({&m, wa.weight, &wa.a->weights_path});
      for (const saved_tensor& s : wa.a->saved) saved_[s.target] = &s.tensor;
      for (const token_rows& t : wa.a->tokens) tokens_[t.target].push_back(&t);
    }
  }

  // trainable_token_indices on `target` (nullptr: none).
  const std::vector<const token_rows*>* tokens(const std::string& target) const {
    auto it = tokens_.find(target);
    return it == tokens_.end() ? nullptr : &it->second;
  }

  // A tied base's head that an adapter's LoRA changes reads the embedding
  // (core/adapter's tied_head_source): the head the merge writes.
  std::optional<tensor_ref> find(const std::string& name) const {
    if (auto it = saved_.find(name); it != saved_.end()) return *it->second;
    if (std::optional<tensor_ref> t = model_.find(name)) return t;
    if (modules_.count(name) > 0)
      if (const std::optional<std::string> e = tied_head_source(model_, name)) return model_.find(*e);
    return std::nullopt;
  }
  bool has(const std::string& name) const { return find(name).has_value(); }

  // The whole tensor in f32, checked against `shape`.
  std::vector<float> load(const std::string& name, const std::vector<int64_t>& shape) const {
    tensor_ref t = require(name, shape);
    std::vector<float> out(t.info->n_elements);
    if (scale_for(t)) {
      std::vector<float> scales;
      const int64_t n_rows = shape.empty() ? 1 : shape[0];
      stored_rows_to_f32(stored(name, n_rows, static_cast<int64_t>(t.info->n_elements) / n_rows, scales), 0, n_rows,
                         out.data());
      return out;
    }
    to_f32(t.info->type, t.data(), out);
    round(out);
    return out;
  }

  // y[T, n_rows] = x[T, n_cols] W^T for the tensor `name`, checked against
  // [n_rows, n_cols], in its stored dtype one row block at a time
  // (core/stored-gemm); its pages are released as the blocks are done.
  void product(const std::string& name, int64_t n_rows, int64_t n_cols, const float* x, int64_t n_tokens, float* y,
               const stored_block_fn& on_block = {}) const {
    std::vector<float> scales;
    const stored_matrix m = stored(name, n_rows, n_cols, scales);
    stored_gemm(m, x, n_tokens, y, threads_, scratch_, block_elements_, on_block);
  }

  // Calls on_block for each row block of `name` in f32, in increasing row
  // order on this thread, then releases its pages.
  void for_each_block(const std::string& name, int64_t n_rows, int64_t n_cols, const stored_block_fn& on_block) const {
    std::vector<float> scales;
    const stored_matrix m = stored(name, n_rows, n_cols, scales);
    const int64_t rows = std::max<int64_t>(
        1, (block_elements_ > 0 ? block_elements_ : stored_gemm_block_elements) / std::max<int64_t>(n_cols, 1));
    const size_t cols = static_cast<size_t>(n_cols);
    float* buf = scratch_.block(0, static_cast<size_t>(std::min(rows, n_rows)) * cols);
    for (int64_t rb = 0; rb < n_rows; rb += rows) {
      check_interrupted();
      const int64_t re = std::min(n_rows, rb + rows);
      stored_rows_to_f32(m, rb, re, buf);  // FP8 dequantized; rounded to round_to
      on_block(rb, re, buf);
    }
    release(name);
  }

  // Drops the tensor's pages from memory (it is read again from the page cache if needed).
  void release(const std::string& name) const {
    if (std::optional<tensor_ref> t = find(name)) t->file->release(*t->info);
  }

  tensor_ref require(const std::string& name, const std::vector<int64_t>& shape) const {
    std::optional<tensor_ref> t = find(name);
    if (!t) throw errors::invalid(model_.path, name, "tensor is missing from the model");
    if (t->info->shape != shape)
      throw errors::shape_mismatch(t->file->path(), name, shape_text(shape) + fmt::format(" (from {})", config_.path),
                                   shape_text(t->info->shape));
    if (!dtype_is_math(t->info->type) && !scale_for(*t))
      throw errors::invalid(t->file->path(), name,
                            fmt::format("dtype {} is not supported for arithmetic (only F16, BF16, F32, F64)",
                                        dtype_name(t->info->type)));
    return *t;
  }

  // The LoRA modules on `target`, adapter by adapter (nullptr: none).
  const std::vector<contribution>* modules(const std::string& target) const {
    auto it = modules_.find(target);
    return it == modules_.end() ? nullptr : &it->second;
  }
  bool has_adapter() const { return has_adapter_; }

  // Rounds decoded weights to round_to (verify: the base as the merged dtype holds it).
  void round(std::span<float> x) const {
    if (round_to_) round_through(*round_to_, x);
  }
  // The dtype a model's computations are in (Gemma's embedding normalizer):
  // round_to when given, else the stored dtype of `name`.
  dtype model_dtype(const std::string& name) const {
    if (round_to_) return *round_to_;
    std::optional<tensor_ref> t = find(name);
    return t ? t->info->type : dtype::F32;
  }

 private:
  const model_files& model_;
  const hf_config& config_;
  bool has_adapter_;
  std::map<std::string, std::vector<contribution>> modules_;
  std::map<std::string, std::vector<const token_rows*>> tokens_;
  std::map<std::string, const tensor_ref*> saved_;
  int threads_;
  int64_t block_elements_;
  std::optional<dtype> round_to_;
  fp8_model fp8_;  // block-scaled FP8 weights (core/fp8), dequantized by row block in each product
  mutable stored_gemm_scratch scratch_;

  // The block scale of a model's FP8 weight (not of a modules_to_save tensor of the same name).
  const tensor_ref* scale_for(const tensor_ref& t) const {
    const tensor_ref* s = fp8_.scale_of(t.info->name);
    const tensor_ref* own = s ? model_.find_ref(t.info->name) : nullptr;
    return own && own->info == t.info ? s : nullptr;
  }

  // The stored matrix of `name`; an FP8 weight's block scales are read into
  // `scales`, which the result borrows.
  stored_matrix stored(const std::string& name, int64_t n_rows, int64_t n_cols, std::vector<float>& scales) const {
    const tensor_ref t = require(name, {n_rows, n_cols});
    stored_matrix m{t.info->type, t.data(), n_rows, n_cols, &t.file->map(), round_to_};
    if (const tensor_ref* s = scale_for(t)) {
      scales = read_fp8_scales(*s);
      m.scales = scales;
      m.block_rows = fp8_.block.rows;
      m.block_cols = fp8_.block.cols;
    }
    return m;
  }
};

// The adapters' factors for the linear module on `wname` (stored [n_out,
// n_in], or [n_in, n_out] for a Conv1D: fan_in_fan_out), one per adapter
// that targets it. Throws lora::error (exit 3) for a module kind the forward
// pass does not apply there, or a DoRA module beside another adapter's on
// the same tensor (its norm would depend on their order).
std::vector<weighted_factors> linear_factors(const weights& w, const std::string& wname, int64_t n_out, int64_t n_in,
                                             bool conv1d) {
  std::vector<weighted_factors> out;
  const std::vector<contribution>* cs = w.modules(wname);
  if (!cs) return out;
  for (const contribution& c : *cs) {
    const lora_module* m = c.module;
    // a 2-D target_parameters module (one expert, [out, in]) is the linear case
    const bool linear_kind = m->kind == module_kind::linear || (m->kind == module_kind::parameter && m->n_experts == 1);
    if (!linear_kind || m->fan_in_fan_out != conv1d)
      throw errors::invalid(*c.file, m->name,
                            fmt::format("the forward pass applies {} LoRA modules here, not {}{}",
                                        conv1d ? "fan_in_fan_out (Conv1D)" : "linear", module_kind_name(m->kind),
                                        m->fan_in_fan_out ? " (fan_in_fan_out)" : ""));
    if (m->dora && cs->size() > 1)
      throw errors::invalid(*c.file, m->name, "a DoRA module cannot be applied with another adapter's on its tensor");
    out.push_back({load_delta_factors(
                       *m, conv1d ? std::vector<int64_t>{n_in, n_out} : std::vector<int64_t>{n_out, n_in}, *c.file),
                   c.weight, &c});
  }
  return out;
}

// y[T, out] += b[out] on every row
void add_bias_rows(std::span<const float> b, int64_t n_tokens, float* y) {
  const int64_t n_out = static_cast<int64_t>(b.size());
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t o = 0; o < n_out; ++o) y[t * n_out + o] += b[static_cast<size_t>(o)];
}

// y = x W0 (Conv1D, W0 [n_in, n_out] row-major: one block of input rows at a
// time on this thread, y += x[:, rb:re] W0[rb:re, :]); with DoRA factors,
// ||V_o||^2 per output column into norms_sq, V = W0 + s (B A)^T.
void conv1d_product(const weights& w, const std::string& wname, const weighted_factors* f, const float* x,
                    int64_t n_tokens, int64_t n_in, int64_t n_out, float* y, std::vector<double>& norms_sq) {
  std::fill(y, y + n_tokens * n_out, 0.0f);
  w.for_each_block(wname, n_in, n_out, [&](int64_t rb, int64_t re, float* block) {
    if (n_tokens > 0)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, blas_int(n_tokens, ""), blas_int(n_out, ""),
                  blas_int(re - rb, ""), 1.0f, x + rb, blas_int(n_in, ""), block, blas_int(n_out, ""), 1.0f, y,
                  blas_int(n_out, ""));
    if (f && f->f.dora) {
      add_delta_rows(f->f, f->weight, rb, re, block);
      add_dora_norms_sq(f->f, rb, re, block, norms_sq);
    }
  });
}

// y[T, out] = x[T, in] W^T (+ LoRA / DoRA of every adapter on it) (+ bias),
// W = "<prefix>.weight" [out, in] (a Conv1D's [in, out] when conv1d: y = x W).
void linear(const weights& w, const std::string& prefix, bool has_bias, const float* x, int64_t n_tokens, int64_t n_in,
            int64_t n_out, float* y, bool conv1d = false) {
  const std::string wname = prefix + ".weight";
  w.require(wname, conv1d ? std::vector<int64_t>{n_in, n_out} : std::vector<int64_t>{n_out, n_in});
  const std::vector<weighted_factors> fs = linear_factors(w, wname, n_out, n_in, conv1d);
  // DoRA (alone on its tensor): ||V_o||^2 per output feature, V = W0 + w s B A (core/delta), from each block of W0
  // after its product
  const weighted_factors* dora = fs.size() == 1 && fs[0].f.dora ? &fs[0] : nullptr;
  std::vector<double> norms_sq;
  if (dora) norms_sq.assign(static_cast<size_t>(n_out), 0.0);
  // base: y = x W0^T
  if (conv1d) {
    conv1d_product(w, wname, dora, x, n_tokens, n_in, n_out, y, norms_sq);
  } else {
    stored_block_fn dora_norms;
    if (dora)
      dora_norms = [&](int64_t rb, int64_t re, float* block) {
        add_delta_rows(dora->f, dora->weight, rb, re, block);
        add_dora_norms_sq(dora->f, rb, re, block, norms_sq);
      };
    w.product(wname, n_out, n_in, x, n_tokens, y, dora_norms);
  }

  for (const weighted_factors& wf : fs) {
    // lora[T, out] = w s (x A^T) B^T   (A [r, in], B [out, r])
    const delta_factors& f = wf.f;
    std::vector<float> ax(static_cast<size_t>(n_tokens * f.rank));
    gemm_xyt(x, f.a.data(), n_tokens, f.rank, n_in, 1.0f, 0.0f, ax.data());
    gemm_xyt(ax.data(), f.b.data(), n_tokens, n_out, f.rank, static_cast<float>(wf.weight * f.scale), 1.0f, y);
    // lora_bias: y += w s b
    if (const lora_module* m = wf.from->module; m->bias) {
      std::vector<float> bias_delta(static_cast<size_t>(n_out), 0.0f);
      add_bias_delta(*m, wf.weight, bias_delta, *wf.from->file);
      add_bias_rows(bias_delta, n_tokens, y);
    }
  }
  if (dora) {
    // DoRA: y = (m / ||V||_row) (x W0^T + w s (x A^T) B^T) (+ w s b: lora_bias, undone and redone around the gain)
    std::vector<float> bias_delta(static_cast<size_t>(n_out), 0.0f);
    if (dora->from->module->bias) add_bias_delta(*dora->from->module, dora->weight, bias_delta, *dora->from->file);
    for (int64_t o = 0; o < n_out; ++o) {
      const float gain =
          static_cast<float>(dora->f.magnitude[static_cast<size_t>(o)] / std::sqrt(norms_sq[static_cast<size_t>(o)]));
      const float bd = bias_delta[static_cast<size_t>(o)];
      for (int64_t t = 0; t < n_tokens; ++t) y[t * n_out + o] = (y[t * n_out + o] - bd) * gain + bd;
    }
  }

  // the base (or modules_to_save) bias
  if (has_bias) add_bias_rows(w.load(prefix + ".bias", {n_out}), n_tokens, y);
}

// trainable_token_indices, unmerged (PEFT TrainableTokensLayer.forward_adapters
// @ huggingface/peft 5d602fdb: W.index_copy(0, indices, delta.to(W)), then
// F.embedding or F.linear): calls fn(index, row) for every replaced row of
// `table` ("<name>.weight", `dim` wide), the delta row decoded to f32 and
// rounded through the table's dtype (PEFT casts it to the weight's).
template <typename F>
void for_each_token_row(const weights& w, const std::string& table, int64_t dim, F&& fn) {
  const std::vector<const token_rows*>* ts = w.tokens(table);
  if (ts == nullptr) return;
  const std::optional<tensor_ref> t0 = w.find(table);
  const dtype table_type = t0 ? t0->info->type : dtype::F32;
  std::vector<float> row(static_cast<size_t>(dim));
  for (const token_rows* t : *ts) {
    const size_t row_bytes = static_cast<size_t>(dim) * static_cast<size_t>(math_dtype_size(t->values.info->type));
    for (size_t k = 0; k < t->indices.size(); ++k) {
      to_f32(t->values.info->type, t->values.data().subspan(k * row_bytes, row_bytes), row);
      round_through(table_type, row);
      w.round(row);
      fn(t->indices[k], static_cast<const float*>(row.data()));
    }
  }
}

// The logits of replaced rows of the head `table`: logits[t, i] = x_t . row_i.
void replace_token_logits(const weights& w, const std::string& table, const float* x, int64_t n_tokens, int64_t hid,
                          int64_t vocab, float* logits) {
  for_each_token_row(w, table, hid, [&](int64_t i, const float* row) {
    for (int64_t t = 0; t < n_tokens; ++t) {
      double dot = 0;
      for (int64_t j = 0; j < hid; ++j) dot += static_cast<double>(x[t * hid + j]) * row[j];
      logits[t * vocab + i] = static_cast<float>(dot);
    }
  });
}

// DoRA on an embedding: ||V[:, j]||^2 per column over the whole vocabulary,
// V = E + w s (B A)^T, one row block at a time in increasing row order (core/delta).
std::vector<double> embedding_dora_norms(const weights& w, const weighted_factors& f, const std::string& name) {
  std::vector<double> norms_sq(static_cast<size_t>(f.f.n_cols), 0.0);
  w.for_each_block(name, f.f.n_rows, f.f.n_cols, [&](int64_t rb, int64_t re, float* block) {
    add_delta_rows(f.f, f.weight, rb, re, block);
    add_dora_norms_sq(f.f, rb, re, block, norms_sq);
  });
  return norms_sq;
}

// x[T, dim] = table[ids] (+ every adapter's embedding LoRA) for the table
// "<name>.weight" [n_rows, dim]: only the ids' rows are decoded.
std::vector<float> embed(const weights& w, const std::string& table, int64_t n_rows, int64_t dim,
                         std::span<const int64_t> ids) {
  const std::string name = table + ".weight";
  tensor_ref t = w.require(name, {n_rows, dim});
  std::vector<weighted_factors> fs;
  std::vector<double> norms_sq;
  if (const std::vector<contribution>* cs = w.modules(name)) {
    for (const contribution& c : *cs) {
      if (c.module->kind != module_kind::embedding)
        throw errors::invalid(*c.file, c.module->name,
                              fmt::format("a LoRA module on {} must be an embedding module", table));
      if (c.module->dora && cs->size() > 1)
        throw errors::invalid(*c.file, c.module->name,
                              "a DoRA module cannot be applied with another adapter's on its tensor");
      fs.push_back({load_delta_factors(*c.module, {n_rows, dim}, *c.file), c.weight, &c});
    }
    if (fs.size() == 1 && fs[0].f.dora) norms_sq = embedding_dora_norms(w, fs[0], name);
  }
  const size_t esize = static_cast<size_t>(math_dtype_size(t.info->type)), row_bytes = static_cast<size_t>(dim) * esize;
  std::vector<float> x(ids.size() * static_cast<size_t>(dim));
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t tok = ids[i];
    float* row = x.data() + i * static_cast<size_t>(dim);
    to_f32(t.info->type, t.data().subspan(static_cast<size_t>(tok) * row_bytes, row_bytes),
           std::span<float>(row, static_cast<size_t>(dim)));
    w.round(std::span<float>(row, static_cast<size_t>(dim)));
    for (const weighted_factors& f : fs) {
      if (f.f.dora) {
        // V = E + w s (B A)^T on this row; W' = (m / ||V[:, j]||) V
        apply_module_rows(f.f, f.weight, tok, tok + 1, row, norms_sq);
      } else {
        // embedding LoRA: row += w s (B A[:, tok])  (dW = s (B A)^T, row tok)
        for (int64_t j = 0; j < dim; ++j) row[j] += static_cast<float>(f.weight * delta_element(f.f, tok, j));
      }
    }
  }
  // trainable tokens: the listed rows are the adapter's
  for_each_token_row(w, name, dim, [&](int64_t tok, const float* row) {
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] == tok) std::copy(row, row + dim, x.data() + i * static_cast<size_t>(dim));
  });
  w.release(name);
  return x;
}

std::string layer_name(const std::string& pattern, int64_t i) { return fmt::format(fmt::runtime(pattern), i); }

// One forward pass of a model_family over T tokens: the loop every family
// shares, the differences read from the description (core/model-family.h)
// and the config.
class forward_pass {
 public:
  forward_pass(const weights& w, const hf_config& c, const model_family& f, int64_t n_tokens)
      : w_(w), c_(c), f_(f), T_(n_tokens) {}

  // x = embed_tokens[tokens] (* normalizer) (+ wpe[positions])
  std::vector<float> embeddings(std::span<const int64_t> tokens) const {
    const int64_t hid = c_.hidden_size;
    std::vector<float> x = embed(w_, f_.names.embed, c_.vocab_size, hid, tokens);
    if (f_.embed_scale) {
      // Gemma2Model: normalizer = torch.tensor(hidden_size**0.5, dtype=hidden_states.dtype)
      // (Gemma3TextScaledWordEmbedding: embed_scale.to(weight.dtype)): sqrt(hidden) in the model dtype
      float normalizer = static_cast<float>(std::sqrt(static_cast<double>(hid)));
      round_through(w_.model_dtype(f_.names.embed + ".weight"), std::span<float>(&normalizer, 1));
      for (float& v : x) v *= normalizer;
    }
    if (!f_.rotary) {
      // GPT2Model: inputs_embeds + wpe(position_ids), positions 0..T-1
      std::vector<int64_t> pos(static_cast<size_t>(T_));
      for (int64_t i = 0; i < T_; ++i) pos[static_cast<size_t>(i)] = i;
      const std::vector<float> p = embed(w_, f_.names.positions, c_.max_position_embeddings, hid, pos);
      for (size_t i = 0; i < x.size(); ++i) x[i] += p[i];
    }
    return x;
  }

  // out[T, dim] = the family's norm "<name>" of x (none when name is empty)
  void norm(const std::string& name, norm_kind kind, const float* x, int64_t n_rows, int64_t dim, float* out) const {
    if (name.empty()) kind = norm_kind::none;
    std::vector<float> wt, b;
    if (kind != norm_kind::none) wt = w_.load(name + ".weight", {dim});
    if (kind == norm_kind::layer_norm) b = w_.load(name + ".bias", {dim});
    norm_rows(kind, x, n_rows, dim, wt.data(), b.data(), c_.rms_norm_eps, out);
  }

  // x += post_attn_norm(o(attention(q, k, v))) over h = attn_norm(x), layer l
  void attention_block(int64_t l, std::vector<float>& x) const;
  // x += post_mlp_norm(mlp(h)) over h = mlp_norm(x), layer l
  void mlp_block(int64_t l, std::vector<float>& x) const;
  // logits = final_norm(x) lm_head^T (or embed_tokens when tied), soft-capped
  logits_result head(const model_files& model, std::vector<float>& x) const;

 private:
  const weights& w_;
  const hf_config& c_;
  const model_family& f_;
  int64_t T_;

  // y[n, hidden] = the dense MLP of mlp_kind over n rows of x, with the full module names of gate / up (or fc) /
  // gate_up / down (empty where the kind has none) and intermediate size ffn
  void dense_mlp(const std::string& gate, const std::string& up, const std::string& gate_up, const std::string& down,
                 int64_t ffn, const float* x, int64_t n, float* y) const;
  void moe_mlp(const std::string& p, const float* h, float* y) const;
  // transformers 5.x fused experts of one layer and their target_parameters modules
  struct fused_experts {
    std::string gate_up, down;  // empty: one tensor per expert
    std::vector<int64_t> gate_up_shape, down_shape;
    std::vector<weighted_factors> gate_up_factors, down_factors;
    explicit operator bool() const noexcept { return !gate_up.empty(); }
  };
  fused_experts fused_experts_of(const std::string& p) const;
  void fused_expert_mlp(const fused_experts& fx, int64_t e, const float* x, int64_t m, float* y) const;
};

void forward_pass::attention_block(int64_t l, std::vector<float>& x) const {
  const family_names& n = f_.names;
  const std::string p = layer_name(n.layer, l);
  const int64_t hid = c_.hidden_size, n_h = c_.num_attention_heads, n_kv = c_.num_key_value_heads, hd = c_.head_dim;
  const int64_t q_dim = n_h * hd, kv_dim = n_kv * hd, T = T_;
  std::vector<float> h(x.size()), q(static_cast<size_t>(T * q_dim)), k(static_cast<size_t>(T * kv_dim)), v(k.size());
  norm(p + n.attn_norm, f_.norm, x.data(), T, hid, h.data());
  if (!n.qkv.empty()) {
    // fused [q; k; v] (phi3 qkv_proj, gpt2 c_attn): split along the output
    const int64_t all = q_dim + 2 * kv_dim;
    std::vector<float> qkv(static_cast<size_t>(T * all));
    linear(w_, p + n.qkv, c_.qkv_bias, h.data(), T, hid, all, qkv.data(), f_.conv1d);
    for (int64_t t = 0; t < T; ++t) {
      const float* row = qkv.data() + t * all;
      std::copy(row, row + q_dim, q.data() + t * q_dim);
      std::copy(row + q_dim, row + q_dim + kv_dim, k.data() + t * kv_dim);
      std::copy(row + q_dim + kv_dim, row + all, v.data() + t * kv_dim);
    }
  } else {
    linear(w_, p + n.q, c_.qkv_bias, h.data(), T, hid, q_dim, q.data(), f_.conv1d);
    linear(w_, p + n.k, c_.qkv_bias, h.data(), T, hid, kv_dim, k.data(), f_.conv1d);
    linear(w_, p + n.v, c_.qkv_bias, h.data(), T, hid, kv_dim, v.data(), f_.conv1d);
  }
  // q / k norms per head over head_dim (qwen3 Qwen3RMSNorm, gemma3 Gemma3RMSNorm), before RoPE
  norm(n.q_norm.empty() ? "" : p + n.q_norm, f_.qk_norm, q.data(), T * n_h, hd, q.data());
  norm(n.k_norm.empty() ? "" : p + n.k_norm, f_.qk_norm, k.data(), T * n_kv, hd, k.data());
  const layer_attention& la = c_.layers[static_cast<size_t>(l)];
  if (f_.rotary) {
    const rope_frequencies freqs = compute_rope_frequencies(la.rope, hd, c_.max_position_embeddings, T);
    apply_rope(q.data(), T, n_h, hd, freqs);
    apply_rope(k.data(), T, n_kv, hd, freqs);
  }
  // scale: gemma query_pre_attn_scalar^-0.5; gpt2 1/sqrt(d) when scale_attn_weights, / (l + 1) when by layer
  double scale = c_.query_pre_attn_scalar > 0 ? 1.0 / std::sqrt(c_.query_pre_attn_scalar)
                                              : 1.0 / std::sqrt(static_cast<double>(hd));
  if (!c_.scale_attn_weights) scale = 1.0;
  if (c_.scale_attn_by_inverse_layer_idx) scale /= static_cast<double>(l + 1);
  std::vector<float> att(q.size()), out(x.size());
  causal_attention(q.data(), k.data(), v.data(), T, n_h, n_kv, hd, att.data(), la.sliding_window, scale,
                   c_.attn_logit_softcapping);
  linear(w_, p + n.o, c_.o_bias, att.data(), T, q_dim, hid, out.data(), f_.conv1d);
  norm(n.post_attn_norm.empty() ? "" : p + n.post_attn_norm, f_.norm, out.data(), T, hid, out.data());
  for (size_t i = 0; i < x.size(); ++i) x[i] += out[i];
}

void forward_pass::dense_mlp(const std::string& gate, const std::string& up, const std::string& gate_up,
                             const std::string& down, int64_t ffn, const float* x, int64_t n, float* y) const {
  const int64_t hid = c_.hidden_size;
  std::vector<float> g(static_cast<size_t>(n * ffn)), u(g.size());
  if (f_.mlp == mlp_kind::plain) {
    // GPT2MLP: c_proj(act(c_fc(x)))
    linear(w_, up, c_.mlp_bias, x, n, hid, ffn, g.data(), f_.conv1d);
    for (float& e : g) e = activate(c_.hidden_act, e);
  } else if (!gate_up.empty()) {
    // Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1); up * act(gate)
    std::vector<float> gu(static_cast<size_t>(n * 2 * ffn));
    linear(w_, gate_up, c_.mlp_bias, x, n, hid, 2 * ffn, gu.data(), f_.conv1d);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < ffn; ++i)
        g[static_cast<size_t>(t * ffn + i)] = activate(c_.hidden_act, gu[static_cast<size_t>(t * 2 * ffn + i)]) *
                                              gu[static_cast<size_t>(t * 2 * ffn + ffn + i)];
  } else {
    // LlamaMLP: down(act(gate(x)) * up(x))
    linear(w_, gate, c_.mlp_bias, x, n, hid, ffn, g.data(), f_.conv1d);
    linear(w_, up, c_.mlp_bias, x, n, hid, ffn, u.data(), f_.conv1d);
    gated_activation(c_.hidden_act, g.data(), u.data(), g.size(), g.data());
  }
  linear(w_, down, c_.mlp_bias, g.data(), n, ffn, hid, y, f_.conv1d);
}

// MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock: p = softmax(router(h)) in
// f32, the top num_experts_per_tok per token (ties: lower index first),
// renormalised to sum 1 (mixtral; qwen3_moe when norm_topk_prob); y_t = sum
// over the chosen e of p_e expert_e(h_t).
void forward_pass::moe_mlp(const std::string& p, const float* h, float* y) const {
  const family_names& n = f_.names;
  const int64_t hid = c_.hidden_size, E = c_.num_experts, K = c_.num_experts_per_tok, T = T_;
  std::vector<float> logits(static_cast<size_t>(T * E));
  linear(w_, p + n.router, false, h, T, hid, E, logits.data());
  // chosen[e]: (token, weight) pairs
  std::vector<std::vector<std::pair<int64_t, float>>> chosen(static_cast<size_t>(E));
  std::vector<int64_t> order(static_cast<size_t>(E));
  std::vector<float> prob(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    const float* row = logits.data() + t * E;
    const float top = *std::max_element(row, row + E);
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += prob[static_cast<size_t>(e)] = std::exp(row[e] - top);
    for (float& v : prob) v = static_cast<float>(v / sum);
    for (int64_t e = 0; e < E; ++e) order[static_cast<size_t>(e)] = e;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return prob[static_cast<size_t>(a)] > prob[static_cast<size_t>(b)]; });
    float top_sum = 0;
    for (int64_t i = 0; i < K; ++i) top_sum += prob[static_cast<size_t>(order[static_cast<size_t>(i)])];
    for (int64_t i = 0; i < K; ++i) {
      const int64_t e = order[static_cast<size_t>(i)];
      const float wt = prob[static_cast<size_t>(e)];
      chosen[static_cast<size_t>(e)].push_back({t, c_.norm_topk_prob ? wt / top_sum : wt});
    }
  }
  // transformers 5.x fused experts: "<prefix>gate_up_proj" [E, 2I, H], "down_proj" [E, H, I]
  const fused_experts fused = fused_experts_of(p);
  // each chosen expert over its tokens, weighted into y
  std::fill(y, y + T * hid, 0.0f);
  for (int64_t e = 0; e < E; ++e) {
    const auto& rows = chosen[static_cast<size_t>(e)];
    if (rows.empty()) continue;
    const int64_t m = static_cast<int64_t>(rows.size());
    std::vector<float> xe(static_cast<size_t>(m * hid)), ye(xe.size());
    for (int64_t i = 0; i < m; ++i)
      std::copy(h + rows[static_cast<size_t>(i)].first * hid, h + (rows[static_cast<size_t>(i)].first + 1) * hid,
                xe.data() + i * hid);
    if (fused) {
      fused_expert_mlp(fused, e, xe.data(), m, ye.data());
    } else {
      const std::string ep = p + layer_name(n.expert, e);
      dense_mlp(ep + n.expert_gate, ep + n.expert_up, "", ep + n.expert_down, c_.moe_intermediate_size, xe.data(), m,
                ye.data());
    }
    for (int64_t i = 0; i < m; ++i) {
      const auto [t, wt] = rows[static_cast<size_t>(i)];
      for (int64_t j = 0; j < hid; ++j) y[t * hid + j] += wt * ye[static_cast<size_t>(i * hid + j)];
    }
  }
}

// The fused experts of layer prefix p (transformers 5.x Qwen3MoeExperts,
// models/qwen3_moe/modeling_qwen3_moe.py: gate_up_proj [E, 2I, H], down_proj
// [E, H, I]), their PEFT ParamWrapper modules (target_parameters) loaded once;
// empty names when the layer stores one tensor per expert.
forward_pass::fused_experts forward_pass::fused_experts_of(const std::string& p) const {
  fused_experts fx;
  if (f_.names.fused_experts.empty()) return fx;
  const std::string gu = p + f_.names.fused_experts + "gate_up_proj", down = p + f_.names.fused_experts + "down_proj";
  if (!w_.has(gu)) return fx;
  const int64_t E = c_.num_experts, I = c_.moe_intermediate_size, H = c_.hidden_size;
  fx.gate_up = gu;
  fx.down = down;
  fx.gate_up_shape = {E, 2 * I, H};
  fx.down_shape = {E, H, I};
  for (const auto& [name, shape, out] : {std::tuple{&fx.gate_up, &fx.gate_up_shape, &fx.gate_up_factors},
                                         std::tuple{&fx.down, &fx.down_shape, &fx.down_factors}}) {
    (void)w_.require(*name, *shape);
    if (const std::vector<contribution>* cs = w_.modules(*name))
      for (const contribution& c : *cs) {
        if (c.module->kind != module_kind::parameter || c.module->fan_in_fan_out)
          throw errors::invalid(*c.file, c.module->name,
                                fmt::format("the forward pass applies [E, out, in] target_parameters modules to {}",
                                            *name));
        out->push_back({load_delta_factors(*c.module, *shape, *c.file), c.weight, &c});
      }
  }
  return fx;
}

// One fused expert e over m tokens: gate, up = (x G_e^T).chunk(2); y =
// (act(gate) * up) D_e^T, each product with its ParamWrapper modules
// unmerged (x A_e^T B_e^T s, core/delta add_expert_times).
void forward_pass::fused_expert_mlp(const fused_experts& fx, int64_t e, const float* x, int64_t m, float* y) const {
  const int64_t I = c_.moe_intermediate_size, H = c_.hidden_size;
  auto expert_product = [&](const std::string& name, const std::vector<weighted_factors>& fs, int64_t n_out,
                            int64_t n_in, const float* in, float* out) {
    // W_e [n_out, n_in]: rows e * n_out .. of the [E * n_out, n_in] view
    const tensor_ref t = *w_.find(name);
    const size_t esize = static_cast<size_t>(math_dtype_size(t.info->type));
    const size_t n = static_cast<size_t>(n_out * n_in);
    std::vector<float> we(n);
    to_f32(t.info->type, t.data().subspan(static_cast<size_t>(e) * n * esize, n * esize), we);
    w_.round(we);
    gemm_xyt(in, we.data(), m, n_out, n_in, 1.0f, 0.0f, out);
    for (const weighted_factors& f : fs) add_expert_times(f.f, e, f.weight, in, m, out);
  };
  std::vector<float> gu(static_cast<size_t>(m * 2 * I)), g(static_cast<size_t>(m * I));
  expert_product(fx.gate_up, fx.gate_up_factors, 2 * I, H, x, gu.data());
  for (int64_t t = 0; t < m; ++t)
    for (int64_t i = 0; i < I; ++i)
      g[static_cast<size_t>(t * I + i)] = activate(c_.hidden_act, gu[static_cast<size_t>(t * 2 * I + i)]) *
                                          gu[static_cast<size_t>(t * 2 * I + I + i)];
  expert_product(fx.down, fx.down_factors, H, I, g.data(), y);
}

void forward_pass::mlp_block(int64_t l, std::vector<float>& x) const {
  const family_names& n = f_.names;
  const std::string p = layer_name(n.layer, l);
  std::vector<float> h(x.size()), out(x.size());
  norm(p + n.mlp_norm, f_.norm, x.data(), T_, c_.hidden_size, h.data());
  if (c_.layers[static_cast<size_t>(l)].moe) {
    moe_mlp(p, h.data(), out.data());
  } else {
    auto name = [&](const std::string& s) { return s.empty() ? s : p + s; };
    dense_mlp(name(n.gate), name(n.up), name(n.gate_up), name(n.down), c_.intermediate_size, h.data(), T_, out.data());
  }
  norm(n.post_mlp_norm.empty() ? "" : p + n.post_mlp_norm, f_.norm, out.data(), T_, c_.hidden_size, out.data());
  for (size_t i = 0; i < x.size(); ++i) x[i] += out[i];
}

logits_result forward_pass::head(const model_files& model, std::vector<float>& x) const {
  const int64_t hid = c_.hidden_size;
  const std::string embed_w = f_.names.embed + ".weight", head_w = f_.names.lm_head + ".weight";
  norm(f_.names.final_norm, f_.norm, x.data(), T_, hid, x.data());
  logits_result r;
  r.n_tokens = T_;
  r.n_vocab = c_.vocab_size;
  r.logits.resize(static_cast<size_t>(T_ * c_.vocab_size));
  const bool lm_head_adapted =
      w_.modules(head_w) != nullptr || (w_.has_adapter() && w_.find(head_w) && !model.find_ref(head_w)) ||
      (w_.has_adapter() && model.find_ref(head_w) && w_.find(head_w)->info != model.find_ref(head_w)->info);
  if (c_.tie_word_embeddings && !lm_head_adapted) {
    // tied: transformers points lm_head at embed_tokens (whatever the file holds as lm_head.weight)
    w_.product(embed_w, c_.vocab_size, hid, x.data(), T_, r.logits.data());
    replace_token_logits(w_, embed_w, x.data(), T_, hid, c_.vocab_size, r.logits.data());
  } else {
    if (!w_.has(head_w))
      throw errors::invalid(model.path, head_w,
                            fmt::format("tensor is missing and tie_word_embeddings is false in {}", c_.path));
    linear(w_, f_.names.lm_head, false, x.data(), T_, hid, c_.vocab_size, r.logits.data());
    replace_token_logits(w_, head_w, x.data(), T_, hid, c_.vocab_size, r.logits.data());
  }
  // Gemma2ForCausalLM: logits = cap tanh(logits / cap)
  if (const float cap = static_cast<float>(c_.final_logit_softcapping); cap > 0)
    for (float& v : r.logits) v = cap * std::tanh(v / cap);
  return r;
}

}  // namespace

std::optional<std::string> missing_forward_tensor(const model_files& model, const hf_config& c) {
  const model_family f = describe_family(c, model);
  const family_names& n = f.names;
  std::vector<std::string> need{n.embed, n.final_norm};
  if (!f.rotary) need.push_back(n.positions);
  if (!c.tie_word_embeddings) need.push_back(n.lm_head);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = layer_name(n.layer, l);
    std::vector<std::string> parts{n.attn_norm, n.post_attn_norm, n.mlp_norm, n.post_mlp_norm, n.q, n.k, n.v, n.qkv,
                                   n.o,         n.q_norm,         n.k_norm};
    if (c.layers[static_cast<size_t>(l)].moe) {
      parts.push_back(n.router);
      // fused experts (transformers 5.x): two 3-D tensors, no ".weight"
      if (!n.fused_experts.empty() && model.find(p + n.fused_experts + "gate_up_proj")) {
        if (!model.find(p + n.fused_experts + "down_proj")) return p + n.fused_experts + "down_proj";
      } else {
        for (int64_t e = 0; e < c.num_experts; ++e)
        for (const std::string* x : {&n.expert_gate, &n.expert_up, &n.expert_down})
            parts.push_back(layer_name(n.expert, e) + *x);
      }
    } else {
      parts.insert(parts.end(), {n.gate, n.up, n.gate_up, n.down});
    }
    for (const std::string& part : parts)
      if (!part.empty()) need.push_back(p + part);
  }
  for (const std::string& name : need)
    if (!model.find(name + ".weight")) return name + ".weight";
  return std::nullopt;
}

void check_forward_input(const hf_config& c, std::span<const int64_t> tokens) {
  if (tokens.empty()) throw errors::usage("no tokens to run");
  for (int64_t tok : tokens)
    if (tok < 0 || tok >= c.vocab_size)
      throw errors::usage(fmt::format("token id {} is outside the vocabulary [0, {})", tok, c.vocab_size));
  if (c.model_type == "gpt2" && static_cast<int64_t>(tokens.size()) > c.max_position_embeddings)
    throw errors::usage(fmt::format("{} tokens exceed the {} learned positions (n_positions)", tokens.size(),
                                    c.max_position_embeddings));
}

logits_result model_forward(const model_files& model, const hf_config& c, std::span<const weighted_adapter> adapters,
                            std::span<const int64_t> tokens, int threads, int64_t block_elements,
                            std::optional<dtype> round_weights_to) {
  // 1. check the input; the family's description
  check_forward_input(c, tokens);
  // LyCORIS weight decomposition is not applied unmerged (its rescaling of V
  // at multiplier 1 is not one per output; see core/delta): refused by name
  for (const weighted_adapter& wa : adapters)
    for (const lora_module& m : wa.a->modules)
      if (m.dora_scale)
        throw errors::invalid(wa.a->weights_path, m.dora_scale->info->name,
                              "the forward pass does not apply LyCORIS weight decomposition (dora_scale) unmerged: "
                              "merge it and run the merged model");
  const model_family family = describe_family(c, model);
  set_blas_threads(1);  // the weight products share their row blocks out to `threads` threads
  const weights w(model, c, adapters, threads, block_elements, round_weights_to);
  const forward_pass pass(w, c, family, static_cast<int64_t>(tokens.size()));

  // 2. embeddings, 3. the layers, 4. the head
  std::vector<float> x = pass.embeddings(tokens);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    check_interrupted();
    pass.attention_block(l, x);
    pass.mlp_block(l, x);
  }
  logits_result r = pass.head(model, x);
  check_interrupted();  // no logits from an input that shrank while it was read
  return r;
}

logits_result model_forward(const model_files& model, const hf_config& config, const adapter* a,
                            std::span<const int64_t> tokens, int threads, int64_t block_elements) {
  std::vector<weighted_adapter> one;
  if (a) one.push_back({a, 1.0});
  return model_forward(model, config, one, tokens, threads, block_elements);
}

logits_result run_forward(const forward_options& o) {
  model_files model = open_model(o.model);
  if (model.config_path.empty())
    throw errors::invalid(o.model, "", "no config.json beside the weights: the architecture is unknown");
  const hf_config config = read_hf_config(model.config_path);
  std::optional<adapter> a;
  if (o.adapter) {
    a = load_adapter(*o.adapter);
    require_fit(*a, model);
    for (const lora_module& m : a->modules) check_finite_factors(m, a->weights_path);
  }
  return model_forward(model, config, a ? &*a : nullptr, o.tokens, o.threads);
}

std::vector<std::pair<int64_t, float>> top_k(const logits_result& r, int64_t position, int64_t k) {
  std::vector<std::pair<int64_t, float>> all(static_cast<size_t>(r.n_vocab));
  const float* row = r.logits.data() + position * r.n_vocab;
  for (int64_t i = 0; i < r.n_vocab; ++i) all[static_cast<size_t>(i)] = {i, row[i]};
  const size_t n = static_cast<size_t>(std::clamp<int64_t>(k, 0, r.n_vocab));
  std::partial_sort(
      all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n), all.end(),
      [](const auto& a, const auto& b) { return a.second != b.second ? a.second > b.second : a.first < b.first; });
  all.resize(n);
  return all;
}

void save_logits(const logits_result& r, const std::string& path) {
  safetensors_layout layout = plan_safetensors({{"logits", dtype::F32, {r.n_tokens, r.n_vocab}}}, std::nullopt);
  safetensors_writer writer(path, std::move(layout));
  static_assert(std::endian::native == std::endian::little, "safetensors is little-endian");
  writer.write("logits", std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(r.logits.data()),
                                                  r.logits.size() * sizeof(float)));
  writer.commit();
}

}  // namespace lora
