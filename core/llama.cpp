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

void causal_attention(const float* q, const float* k, const float* v, int64_t n_tokens, int64_t n_heads,
                      int64_t n_kv_heads, int64_t head_dim, float* out, int64_t window) {
  const int64_t group = n_heads / n_kv_heads;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  std::vector<float> scores(static_cast<size_t>(n_tokens));
  for (int64_t h = 0; h < n_heads; ++h) {
    const int64_t kvh = h / group;
    for (int64_t i = 0; i < n_tokens; ++i) {
      const float* qi = q + (i * n_heads + h) * head_dim;
      // keys j0 <= j <= i: j > i - window with a sliding window
      const int64_t j0 = window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
      // scores_j = q_i . k_j / sqrt(d)
      float max_score = -INFINITY;
      for (int64_t j = j0; j <= i; ++j) {
        const float* kj = k + (j * n_kv_heads + kvh) * head_dim;
        float dot = 0;
        for (int64_t d = 0; d < head_dim; ++d) dot += qi[d] * kj[d];
        scores[static_cast<size_t>(j)] = dot * scale;
        max_score = std::max(max_score, scores[static_cast<size_t>(j)]);
      }
      // softmax over j0 <= j <= i
      double sum = 0;
      for (int64_t j = j0; j <= i; ++j) {
        scores[static_cast<size_t>(j)] = std::exp(scores[static_cast<size_t>(j)] - max_score);
        sum += scores[static_cast<size_t>(j)];
      }
      const float inv_sum = static_cast<float>(1.0 / sum);
      // out_i = sum_j p_j v_j
      float* oi = out + (i * n_heads + h) * head_dim;
      std::fill(oi, oi + head_dim, 0.0f);
      for (int64_t j = j0; j <= i; ++j) {
        const float p = scores[static_cast<size_t>(j)] * inv_sum;
        const float* vj = v + (j * n_kv_heads + kvh) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) oi[d] += p * vj[d];
      }
    }
  }
}

void swiglu(const float* gate, const float* up, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

// ---- the model ----

namespace {

// C[m, n] (+)= alpha * X[m, k] Y[n, k]^T  (row-major)
void gemm_xyt(const float* x, const float* y, int64_t m, int64_t n, int64_t k, float alpha, float beta, float* c) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_int(m, ""), blas_int(n, ""), blas_int(k, ""), alpha, x,
              blas_int(k, ""), y, blas_int(k, ""), beta, c, blas_int(n, ""));
}

// The model's tensors (with the adapter's modules_to_save in place of the
// base's) and the adapter's LoRA modules, by target.
class weights {
 public:
  weights(const model_files& model, const hf_config& config, const adapter* a, int threads, int64_t block_elements)
      : model_(model), config_(config), adapter_(a), threads_(threads), block_elements_(block_elements) {
    if (a) {
      for (const lora_module& m : a->modules) modules_[m.target] = &m;
      for (const saved_tensor& s : a->saved) saved_[s.target] = &s.tensor;
    }
  }

  std::optional<tensor_ref> find(const std::string& name) const {
    if (auto it = saved_.find(name); it != saved_.end()) return *it->second;
    return model_.find(name);
  }
  bool has(const std::string& name) const { return find(name).has_value(); }

  // The whole tensor in f32, checked against `shape`.
  std::vector<float> load(const std::string& name, const std::vector<int64_t>& shape) const {
    tensor_ref t = require(name, shape);
    std::vector<float> out(t.info->n_elements);
    to_f32(t.info->type, t.data(), out);
    return out;
  }

  // y[T, n_rows] = x[T, n_cols] W^T for the tensor `name`, checked against
  // [n_rows, n_cols], in its stored dtype one row block at a time
  // (core/stored-gemm); its pages are released as the blocks are done.
  void product(const std::string& name, int64_t n_rows, int64_t n_cols, const float* x, int64_t n_tokens, float* y,
               const stored_block_fn& on_block = {}) const {
    const stored_matrix m = stored(name, n_rows, n_cols);
    stored_gemm(m, x, n_tokens, y, threads_, scratch_, block_elements_, on_block);
  }

  // Calls on_block for each row block of `name` in f32, in increasing row
  // order on this thread, then releases its pages.
  void for_each_block(const std::string& name, int64_t n_rows, int64_t n_cols, const stored_block_fn& on_block) const {
    const stored_matrix m = stored(name, n_rows, n_cols);
    const int64_t rows = std::max<int64_t>(
        1, (block_elements_ > 0 ? block_elements_ : stored_gemm_block_elements) / std::max<int64_t>(n_cols, 1));
    const size_t esize = static_cast<size_t>(math_dtype_size(m.type)), cols = static_cast<size_t>(n_cols);
    float* buf = scratch_.block(0, static_cast<size_t>(std::min(rows, n_rows)) * cols);
    for (int64_t rb = 0; rb < n_rows; rb += rows) {
      check_interrupted();
      const int64_t re = std::min(n_rows, rb + rows);
      const size_t n = static_cast<size_t>(re - rb) * cols;
      to_f32(m.type, m.bytes.subspan(static_cast<size_t>(rb) * cols * esize, n * esize), std::span<float>(buf, n));
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
    if (!dtype_is_math(t->info->type))
      throw errors::invalid(t->file->path(), name,
                            fmt::format("dtype {} is not supported for arithmetic (only F16, BF16, F32, F64)",
                                        dtype_name(t->info->type)));
    return *t;
  }

  const lora_module* module(const std::string& target) const {
    auto it = modules_.find(target);
    return it == modules_.end() ? nullptr : it->second;
  }
  const std::string& adapter_file() const { return adapter_->weights_path; }

 private:
  const model_files& model_;
  const hf_config& config_;
  const adapter* adapter_;
  std::map<std::string, const lora_module*> modules_;
  std::map<std::string, const tensor_ref*> saved_;
  int threads_;
  int64_t block_elements_;
  mutable stored_gemm_scratch scratch_;

  stored_matrix stored(const std::string& name, int64_t n_rows, int64_t n_cols) const {
    const tensor_ref t = require(name, {n_rows, n_cols});
    return {t.info->type, t.data(), n_rows, n_cols, &t.file->map()};
  }
};

// The adapter's factors for the linear module on `wname`, if any. Throws
// lora::error (exit 3) for a module kind the forward pass does not apply.
std::optional<delta_factors> linear_factors(const weights& w, const std::string& wname, int64_t n_out, int64_t n_in) {
  const lora_module* m = w.module(wname);
  if (!m) return std::nullopt;
  if (m->kind != module_kind::linear || m->fan_in_fan_out)
    throw errors::invalid(w.adapter_file(), m->name,
                          fmt::format("the forward pass applies linear LoRA modules only, not {}{}",
                                      module_kind_name(m->kind), m->fan_in_fan_out ? " (fan_in_fan_out)" : ""));
  return load_delta_factors(*m, {n_out, n_in}, w.adapter_file());
}

// y[T, out] += b[out] on every row
void add_bias_rows(std::span<const float> b, int64_t n_tokens, float* y) {
  const int64_t n_out = static_cast<int64_t>(b.size());
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t o = 0; o < n_out; ++o) y[t * n_out + o] += b[static_cast<size_t>(o)];
}

// y[T, out] = x[T, in] W^T (+ LoRA / DoRA) (+ bias), W = "<prefix>.weight" [out, in].
void linear(const weights& w, const std::string& prefix, bool has_bias, const float* x, int64_t n_tokens, int64_t n_in,
            int64_t n_out, float* y) {
  const std::string wname = prefix + ".weight";
  w.require(wname, {n_out, n_in});
  const std::optional<delta_factors> f = linear_factors(w, wname, n_out, n_in);
  // DoRA: ||V_o||^2 per output row, V = W0 + s B A (core/delta), from each row block of W0 after its product
  std::vector<double> norms_sq;
  stored_block_fn dora_norms;
  if (f && f->dora) {
    norms_sq.assign(static_cast<size_t>(n_out), 0.0);
    dora_norms = [&](int64_t rb, int64_t re, float* block) {
      add_delta_rows(*f, 1.0, rb, re, block);
      add_dora_norms_sq(*f, rb, re, block, norms_sq);
    };
  }
  // base: y = x W0^T
  w.product(wname, n_out, n_in, x, n_tokens, y, dora_norms);

  if (f) {
    // lora[T, out] = s (x A^T) B^T   (A [r, in], B [out, r])
    std::vector<float> ax(static_cast<size_t>(n_tokens * f->rank));
    gemm_xyt(x, f->a.data(), n_tokens, f->rank, n_in, 1.0f, 0.0f, ax.data());
    gemm_xyt(ax.data(), f->b.data(), n_tokens, n_out, f->rank, static_cast<float>(f->scale), 1.0f, y);
    if (f->dora) {
      // DoRA: y = (m / ||V||_row) (x W0^T + s (x A^T) B^T)
      for (int64_t o = 0; o < n_out; ++o) {
        const float gain =
            static_cast<float>(f->magnitude[static_cast<size_t>(o)] / std::sqrt(norms_sq[static_cast<size_t>(o)]));
        for (int64_t t = 0; t < n_tokens; ++t) y[t * n_out + o] *= gain;
      }
    }
    // lora_bias: y += s b
    if (const lora_module* m = w.module(wname); m->bias) {
      std::vector<float> bias_delta(static_cast<size_t>(n_out), 0.0f);
      add_bias_delta(*m, 1.0, bias_delta, w.adapter_file());
      add_bias_rows(bias_delta, n_tokens, y);
    }
  }

  // the base (or modules_to_save) bias
  if (has_bias) add_bias_rows(w.load(prefix + ".bias", {n_out}), n_tokens, y);
}

// DoRA on an embedding: ||V[:, j]||^2 per column over the whole vocabulary,
// V = E + s (B A)^T, one row block at a time in increasing row order (core/delta).
std::vector<double> embedding_dora_norms(const weights& w, const delta_factors& f, const std::string& name) {
  std::vector<double> norms_sq(static_cast<size_t>(f.n_cols), 0.0);
  w.for_each_block(name, f.n_rows, f.n_cols, [&](int64_t rb, int64_t re, float* block) {
    add_delta_rows(f, 1.0, rb, re, block);
    add_dora_norms_sq(f, rb, re, block, norms_sq);
  });
  return norms_sq;
}

// x[T, hidden] = embed_tokens[tokens] (+ embedding LoRA): only the tokens' rows are decoded
std::vector<float> embed(const weights& w, const hf_config& c, std::span<const int64_t> tokens) {
  const std::string name = "model.embed_tokens.weight";
  const int64_t dim = c.hidden_size;
  tensor_ref t = w.require(name, {c.vocab_size, dim});
  const lora_module* m = w.module(name);
  std::optional<delta_factors> f;
  std::vector<double> norms_sq;
  if (m) {
    if (m->kind != module_kind::embedding)
      throw errors::invalid(w.adapter_file(), m->name, "a LoRA module on embed_tokens must be an embedding module");
    f = load_delta_factors(*m, {c.vocab_size, dim}, w.adapter_file());
    if (f->dora) norms_sq = embedding_dora_norms(w, *f, name);
  }
  const size_t esize = static_cast<size_t>(math_dtype_size(t.info->type)), row_bytes = static_cast<size_t>(dim) * esize;
  std::vector<float> x(tokens.size() * static_cast<size_t>(dim));
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int64_t tok = tokens[i];
    float* row = x.data() + i * static_cast<size_t>(dim);
    to_f32(t.info->type, t.data().subspan(static_cast<size_t>(tok) * row_bytes, row_bytes),
           std::span<float>(row, static_cast<size_t>(dim)));
    if (!f) continue;
    if (f->dora) {
      // V = E + s (B A)^T on this row; W' = (m / ||V[:, j]||) V
      apply_module_rows(*f, 1.0, tok, tok + 1, row, norms_sq);
    } else {
      // embedding LoRA: row += s (B A[:, tok])  (dW = s (B A)^T, row tok)
      for (int64_t j = 0; j < dim; ++j) row[j] += static_cast<float>(delta_element(*f, tok, j));
    }
  }
  w.release(name);
  return x;
}

}  // namespace

void check_forward_input(const hf_config& c, std::span<const int64_t> tokens) {
  if (tokens.empty()) throw errors::usage("no tokens to run");
  for (int64_t tok : tokens)
    if (tok < 0 || tok >= c.vocab_size)
      throw errors::usage(fmt::format("token id {} is outside the vocabulary [0, {})", tok, c.vocab_size));
}

logits_result llama_forward(const model_files& model, const hf_config& c, const adapter* a,
                            std::span<const int64_t> tokens, int threads, int64_t block_elements) {
  // 1. check the input
  check_forward_input(c, tokens);
  const int64_t n_tok = static_cast<int64_t>(tokens.size());
  set_blas_threads(1);  // the weight products share their row blocks out to `threads` threads

  const weights w(model, c, a, threads, block_elements);
  const int64_t hid = c.hidden_size, n_h = c.num_attention_heads, n_kv = c.num_key_value_heads, hd = c.head_dim;
  const int64_t q_dim = n_h * hd, kv_dim = n_kv * hd, ffn = c.intermediate_size;

  // 2. embeddings
  std::vector<float> x = embed(w, c, tokens);

  std::vector<float> h(x.size()), q(static_cast<size_t>(n_tok * q_dim)), k(static_cast<size_t>(n_tok * kv_dim)),
      v(static_cast<size_t>(n_tok * kv_dim)), att(q.size()), proj(x.size()), gate(static_cast<size_t>(n_tok * ffn)),
      up(gate.size());
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    check_interrupted();
    const std::string p = fmt::format("model.layers.{}.", l);
    // 3. attention block: x += o(attn(rope(q), rope(k), v)) over RMSNorm(x)
    std::vector<float> norm_w = w.load(p + "input_layernorm.weight", {hid});
    rms_norm(x.data(), n_tok, hid, norm_w.data(), c.rms_norm_eps, h.data());
    linear(w, p + "self_attn.q_proj", c.qkv_bias, h.data(), n_tok, hid, q_dim, q.data());
    linear(w, p + "self_attn.k_proj", c.qkv_bias, h.data(), n_tok, hid, kv_dim, k.data());
    linear(w, p + "self_attn.v_proj", c.qkv_bias, h.data(), n_tok, hid, kv_dim, v.data());
    const layer_attention& la = c.layers[static_cast<size_t>(l)];
    const rope_frequencies freqs = compute_rope_frequencies(la.rope, hd, c.max_position_embeddings, n_tok);
    apply_rope(q.data(), n_tok, n_h, hd, freqs);
    apply_rope(k.data(), n_tok, n_kv, hd, freqs);
    causal_attention(q.data(), k.data(), v.data(), n_tok, n_h, n_kv, hd, att.data(), la.sliding_window);
    linear(w, p + "self_attn.o_proj", c.o_bias, att.data(), n_tok, q_dim, hid, proj.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];

    // 4. MLP block: x += down(silu(gate(h)) * up(h)), h = RMSNorm(x)
    norm_w = w.load(p + "post_attention_layernorm.weight", {hid});
    rms_norm(x.data(), n_tok, hid, norm_w.data(), c.rms_norm_eps, h.data());
    linear(w, p + "mlp.gate_proj", c.mlp_bias, h.data(), n_tok, hid, ffn, gate.data());
    linear(w, p + "mlp.up_proj", c.mlp_bias, h.data(), n_tok, hid, ffn, up.data());
    swiglu(gate.data(), up.data(), gate.size(), gate.data());
    linear(w, p + "mlp.down_proj", c.mlp_bias, gate.data(), n_tok, ffn, hid, proj.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
  }

  // 5. final norm and lm_head (embed_tokens when tied)
  std::vector<float> norm_w = w.load("model.norm.weight", {hid});
  rms_norm(x.data(), n_tok, hid, norm_w.data(), c.rms_norm_eps, h.data());
  logits_result r;
  r.n_tokens = n_tok;
  r.n_vocab = c.vocab_size;
  r.logits.resize(static_cast<size_t>(n_tok * c.vocab_size));
  const bool lm_head_adapted = w.module("lm_head.weight") != nullptr ||
                               (a && w.find("lm_head.weight") && !model.find_ref("lm_head.weight")) ||
                               (a && model.find_ref("lm_head.weight") &&
                                w.find("lm_head.weight")->info != model.find_ref("lm_head.weight")->info);
  if (c.tie_word_embeddings && !lm_head_adapted) {
    // tied: transformers points lm_head at embed_tokens (whatever the file holds as lm_head.weight)
    w.product("model.embed_tokens.weight", c.vocab_size, hid, h.data(), n_tok, r.logits.data());
  } else {
    if (!w.has("lm_head.weight"))
      throw errors::invalid(model.path, "lm_head.weight",
                            fmt::format("tensor is missing and tie_word_embeddings is false in {}", c.path));
    linear(w, "lm_head", false, h.data(), n_tok, hid, c.vocab_size, r.logits.data());
  }
  check_interrupted();  // no logits from an input that shrank while it was read
  return r;
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
  return llama_forward(model, config, a ? &*a : nullptr, o.tokens, o.threads);
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
