// A CPU reference forward pass of the decoder-only families of
// core/model-family.h (llama, mistral, qwen2, qwen3, gemma2, gemma3_text,
// phi3, mixtral, qwen3_moe, gpt2) as Hugging Face transformers implements
// them, in f32 with BLAS. One loop; what differs is the family's description:
//
//   x = embed[tokens] (* sqrt(hidden) in the model dtype: gemma) (+ wpe[positions]: gpt2)
//   per layer:  h = norm(x)   (RMSNorm w, (1 + w) for gemma, LayerNorm w, b for gpt2)
//               q, k, v = h Wq^T, h Wk^T, h Wv^T (+ biases), or split from a fused qkv (phi3, gpt2)
//               q, k = norm per head (qwen3, gemma3); RoPE(q), RoPE(k) (core/rope; the layer's own)
//               a = softmax(cap tanh(q k^T scale / cap) + causal (sliding-window) mask) v
//                   (scale 1/sqrt(d), gemma query_pre_attn_scalar^-0.5; grouped-query heads)
//               x = x + norm_post(a Wo^T)      (norm_post: gemma only)
//               h = norm(x); x = x + norm_post(mlp(h)), mlp = down(act(gate(h)) * up(h)), fused
//                   gate_up (phi3), proj(act(fc(h))) (gpt2), or a mixture of experts (mixtral,
//                   qwen3_moe: softmax router, top-k, renormalised per family)
//   logits = norm(x) lm_head^T (embed when tied), cap tanh(logits / cap) (gemma2)
//
// With an adapter, LoRA is applied unmerged on the fly: y = x W0^T + s (x A^T) B^T
// (+ s b for lora_bias), on any projection it targets, fused ones, experts and
// routers included (a Conv1D's fan_in_fan_out module alike: y = x W0 + s (x A^T) B^T);
// DoRA per PEFT: y = (m / ||W0 + s B A||_row) * (x W0^T + s (x A^T) B^T) + bias;
// embedding LoRA: row t of the table + s (B A[:, t]); modules_to_save
// replace the base tensor. The factors and DoRA's norm come from core/delta.
// The weight products read each matrix in its stored dtype, decoding one
// block of rows to f32 at a time inside the product (core/stored-gemm): no
// f32 copy of a matrix, and each block's pages are released once used, so
// memory is the activations plus one block buffer per thread, whatever the
// model's size. Only the tokens' rows of the embedding are decoded.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "core/adapter.h"
#include "core/model-family.h"
#include "core/rope.h"
#include "formats/hf-config.h"
#include "formats/model-files.h"

namespace lora {

// ---- building blocks (row-major f32; exposed for tests) ----

// out[t, :] = x[t, :] * rsqrt(mean(x[t, :]^2) + eps) * weight. out may alias x.
void rms_norm(const float* x, int64_t n_tokens, int64_t dim, const float* weight, double eps, float* out);

// The norm of `kind` on each row of x [n_tokens, dim] (core/model-family.h):
// none copies, rms as rms_norm, rms_offset_one with (1 + weight) formed in
// f32, layer_norm (x - mean) / sqrt(var + eps) * weight + bias (biased var,
// in double). weight [dim] (not read for none), bias [dim] (layer_norm only).
// out may alias x.
void norm_rows(norm_kind kind, const float* x, int64_t n_tokens, int64_t dim, const float* weight, const float* bias,
               double eps, float* out);

// apply_rope and the per-type frequencies: core/rope.h

// Causal grouped-query attention: q [T, n_heads, d], k and v [T, n_kv_heads, d],
// out [T, n_heads, d]; query head h uses kv head h / (n_heads / n_kv_heads);
// out = softmax(c(q k^T scale), keys j with i - window < j <= i for query i) v,
// scale 1/sqrt(d) when scale <= 0; c(s) = softcap tanh(s / softcap) when
// softcap > 0 (Gemma2's attn_logit_softcapping, applied before the mask), else s;
// window 0 (or >= n_tokens): every key j <= i. The sliding window is
// transformers' masking_utils sliding_window_overlay (kv_idx > q_idx - window)
// on the causal mask, as mistral and qwen2 use it. Computed per head in
// chunks of 256 query rows: two sgemm per chunk (scores, then probabilities
// times values) on single-threaded BLAS, memory 256 * n_tokens floats.
void causal_attention(const float* q, const float* k, const float* v, int64_t n_tokens, int64_t n_heads,
                      int64_t n_kv_heads, int64_t head_dim, float* out, int64_t window = 0, double scale = 0,
                      double softcap = 0);

// act(x) for one activation (formats/hf-config.h activation_kind), in f32.
float activate(activation_kind kind, float x);

// out[i] = act(gate[i]) * up[i]. out may alias either input.
void gated_activation(activation_kind kind, const float* gate, const float* up, size_t n, float* out);

// out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)). out may alias either input.
void swiglu(const float* gate, const float* up, size_t n, float* out);

// ---- the whole model ----

struct logits_result {
  int64_t n_tokens = 0;
  int64_t n_vocab = 0;
  std::vector<float> logits;  // [n_tokens, n_vocab], row-major
};

// The first weight the forward pass of `config`'s family needs that `model`
// lacks (a partial checkpoint), or nullopt. Only names are looked at; shapes
// and dtypes are checked as the pass reads them. Throws what describe_family throws.
std::optional<std::string> missing_forward_tensor(const model_files& model, const hf_config& config);

// The checks model_forward makes of its input before any weight is read, for
// callers that want them early (lora verify, before its weight level).
// Throws lora::error (exit 2) for no tokens or a token id outside
// [0, config.vocab_size).
void check_forward_input(const hf_config& config, std::span<const int64_t> tokens);

// One adapter applied unmerged, its deltas multiplied by `weight` (lora merge's
// --weight times --scale). Borrows `a`.
struct weighted_adapter {
  const adapter* a = nullptr;
  double weight = 1.0;
};

// Runs the model over `tokens` (positions 0..n-1), as its family
// (describe_family) computes, with every adapter's LoRA applied unmerged:
// y = x W0^T + sum_k w_k s_k (x A_k^T) B_k^T (a DoRA module only alone on its
// tensor: V = W0 + w s B A); trainable_token_indices rows replace their
// embedding rows and the head's logits of those rows (PEFT's
// TrainableTokensLayer); transformers 5.x fused qwen3_moe experts
// (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]) run per expert
// with their target_parameters modules as x A_e^T B_e^T s. Each adapter, when given, must
// have been fitted to `model` (fit_adapter). Borrows everything; threads <= 0:
// all cores (the weight products' row blocks; BLAS runs single-threaded).
// block_elements: elements of a weight matrix decoded per block (rows =
// max(1, block_elements / n_cols)); <= 0: stored_gemm_block_elements; at
// least a matrix's size: the whole matrix decoded, then one sgemm (the
// computation before row blocks, kept for tests). round_weights_to: every
// weight of the model (not the adapter's factors) rounded once to this dtype
// after decoding, and the model dtype taken as it (lora verify: the base as a
// merged model of that dtype holds it).
// Throws lora::error: exit 2 for no tokens, a token id outside [0, vocab) or
// (gpt2) more tokens than learned positions; exit 3 for a DoRA module that
// shares its tensor with another adapter's, or a LyCORIS dora_scale (weight
// decomposition, which the forward pass does not apply unmerged);
// exit 3 for a missing tensor or wrong shape (naming it), a non-arithmetic
// dtype, a module kind the forward pass
// does not apply (fan_in_fan_out, conv).
logits_result model_forward(const model_files& model, const hf_config& config,
                            std::span<const weighted_adapter> adapters, std::span<const int64_t> tokens, int threads,
                            int64_t block_elements = 0, std::optional<dtype> round_weights_to = std::nullopt);

// The same with at most one adapter, weight 1.
logits_result model_forward(const model_files& model, const hf_config& config, const adapter* adapter,
                            std::span<const int64_t> tokens, int threads, int64_t block_elements = 0);

struct forward_options {
  std::string model;                   // model folder (config.json required)
  std::optional<std::string> adapter;  // PEFT folder / file, optional
  std::vector<int64_t> tokens;
  int threads = 0;
};

// Opens the model and its config.json, loads and fits the adapter, runs
// model_forward. Throws lora::error: exit 3 for a model without config.json,
// an unsupported model_type (named), an adapter that does not fit (first
// problem, with a count of the others); as llama_forward otherwise.
logits_result run_forward(const forward_options& options);

// The k largest logits of row `position` (ties: lower id first), as (id, logit).
std::vector<std::pair<int64_t, float>> top_k(const logits_result& r, int64_t position, int64_t k);

// Writes the logits as one F32 tensor "logits" [n_tokens, n_vocab] to `path`
// (atomically, safetensors_writer). Throws lora::error (exit 4).
void save_logits(const logits_result& r, const std::string& path);

}  // namespace lora
