// A CPU reference forward pass of the Llama family (llama, mistral, qwen2) as
// Hugging Face transformers implements it, in f32 with BLAS:
//
//   x = embed_tokens[tokens]
//   per layer:  h = RMSNorm(x) * w_in;  q, k, v = h Wq^T (+bq), h Wk^T (+bk), h Wv^T (+bv)
//               RoPE(q), RoPE(k)  (rotate-half layout, inv_freq per rope_type: core/rope.h)
//               a = softmax(q k^T / sqrt(d) + causal (sliding-window) mask) v   (grouped-query: head h reads kv head h
//               / (H / H_kv)) x = x + a Wo^T;  h = RMSNorm(x) * w_post x = x + down(silu(gate(h)) * up(h))
//   logits = RMSNorm(x) * w_norm  lm_head^T   (lm_head = embed_tokens when tied)
//
// With an adapter, LoRA is applied unmerged on the fly: y = x W0^T + s (x A^T) B^T
// (+ s b for lora_bias); DoRA per PEFT: y = (m / ||W0 + s B A||_row) * (x W0^T + s (x A^T) B^T) + bias;
// embedding LoRA: row t of embed_tokens + s (B A[:, t]); modules_to_save
// replace the base tensor. The factors and DoRA's norm come from core/delta.
// The weight products read each matrix in its stored dtype, decoding one
// block of rows to f32 at a time inside the product (core/stored-gemm): no
// f32 copy of a matrix, and each block's pages are released once used, so
// memory is the activations plus one block buffer per thread, whatever the
// model's size. Only the tokens' rows of embed_tokens are decoded.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "core/adapter.h"
#include "core/rope.h"
#include "formats/hf-config.h"
#include "formats/model-files.h"

namespace lora {

// ---- building blocks (row-major f32; exposed for tests) ----

// out[t, :] = x[t, :] * rsqrt(mean(x[t, :]^2) + eps) * weight. out may alias x.
void rms_norm(const float* x, int64_t n_tokens, int64_t dim, const float* weight, double eps, float* out);

// apply_rope and the per-type frequencies: core/rope.h

// Causal grouped-query attention: q [T, n_heads, d], k and v [T, n_kv_heads, d],
// out [T, n_heads, d]; query head h uses kv head h / (n_heads / n_kv_heads);
// out = softmax(q k^T / sqrt(d), keys j with i - window < j <= i for query i) v;
// window 0 (or >= n_tokens): every key j <= i. The sliding window is
// transformers' masking_utils sliding_window_overlay (kv_idx > q_idx - window)
// on the causal mask, as mistral and qwen2 use it.
void causal_attention(const float* q, const float* k, const float* v, int64_t n_tokens, int64_t n_heads,
                      int64_t n_kv_heads, int64_t head_dim, float* out, int64_t window = 0);

// out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)). out may alias either input.
void swiglu(const float* gate, const float* up, size_t n, float* out);

// ---- the whole model ----

struct logits_result {
  int64_t n_tokens = 0;
  int64_t n_vocab = 0;
  std::vector<float> logits;  // [n_tokens, n_vocab], row-major
};

// The checks llama_forward makes of its input before any weight is read, for
// callers that want them early (lora verify, before its weight level).
// Throws lora::error (exit 2) for no tokens or a token id outside
// [0, config.vocab_size).
void check_forward_input(const hf_config& config, std::span<const int64_t> tokens);

// Runs the model over `tokens` (positions 0..n-1). `adapter`, when given, must
// have been fitted to `model` (fit_adapter). Borrows everything; threads <= 0:
// all cores (the weight products' row blocks; BLAS runs single-threaded).
// block_elements: elements of a weight matrix decoded per block (rows =
// max(1, block_elements / n_cols)); <= 0: stored_gemm_block_elements; at
// least a matrix's size: the whole matrix decoded, then one sgemm (the
// computation before row blocks, kept for tests).
// Throws lora::error: exit 2 for no tokens or a token id outside [0, vocab);
// exit 3 for a missing tensor or wrong shape (naming it), a non-arithmetic
// dtype, a module kind the forward pass
// does not apply (fan_in_fan_out, conv).
logits_result llama_forward(const model_files& model, const hf_config& config, const adapter* adapter,
                            std::span<const int64_t> tokens, int threads, int64_t block_elements = 0);

struct forward_options {
  std::string model;                   // model folder (config.json required)
  std::optional<std::string> adapter;  // PEFT folder / file, optional
  std::vector<int64_t> tokens;
  int threads = 0;
};

// Opens the model and its config.json, loads and fits the adapter, runs
// llama_forward. Throws lora::error: exit 3 for a model without config.json,
// an unsupported model_type (named), an adapter that does not fit (first
// problem, with a count of the others); as llama_forward otherwise.
logits_result run_forward(const forward_options& options);

// The k largest logits of row `position` (ties: lower id first), as (id, logit).
std::vector<std::pair<int64_t, float>> top_k(const logits_result& r, int64_t position, int64_t k);

// Writes the logits as one F32 tensor "logits" [n_tokens, n_vocab] to `path`
// (atomically, safetensors_writer). Throws lora::error (exit 4).
void save_logits(const logits_result& r, const std::string& path);

}  // namespace lora
