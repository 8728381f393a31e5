// Rotary position embeddings of the Llama family, per rope_type, as Hugging
// Face transformers computes them (src/transformers/modeling_rope_utils.py,
// _compute_{default,linear_scaling,dynamic_ntk,yarn,longrope,llama3}_parameters
// and dynamic_rope_update; transformers 5.x, read at zucchini-nlp/transformers
// commit 26892c16), and applied as models/llama/modeling_llama.py does:
// cos and sin multiplied by the attention factor, rotate-half layout.
#pragma once

#include <cstdint>
#include <vector>

#include "formats/hf-config.h"

namespace lora {

struct rope_frequencies {
  std::vector<double> inv_freq;   // head_dim / 2 inverse frequencies (radians per position)
  double attention_factor = 1.0;  // multiplies cos and sin (yarn, longrope; else 1)
};

// inv_freq and the attention factor of `p` for a head of `head_dim` (even)
// and a forward pass over positions 0..seq_len-1 (seq_len >= 1), with d = head_dim,
// i < d/2, base = p.theta:
//   default:  inv_freq_i = base^(-2i/d)
//   linear:   default / factor
//   dynamic:  default with base * (factor * L / M - (factor - 1))^(d / (d - 2)),
//             L = max(seq_len, M), M = max_position_embeddings (transformers
//             recomputes it when seq_len exceeds M at inference)
//   llama3:   wavelengths above original / low_freq_factor divided by factor,
//             below original / high_freq_factor kept, smoothed between
//   yarn:     interpolation (/ factor) and extrapolation blended by a linear ramp
//             over the correction range [beta_fast, beta_slow] rotations;
//             attention factor 0.1 ln(factor) + 1 (or the mscale ratio), or as given
//   longrope: default / long_factor_i when seq_len > original, else / short_factor_i;
//             attention factor sqrt(1 + ln(factor) / ln(original)), or as given
// where yarn's and longrope's missing factor is M / original. Borrows nothing;
// throws nothing (the config parser has checked the fields).
rope_frequencies compute_rope_frequencies(const rope_parameters& p, int64_t head_dim, int64_t max_position_embeddings,
                                          int64_t seq_len);

// Rotary embedding in place on x [n_tokens, n_heads, head_dim] at positions
// 0..n_tokens-1: with d = head_dim, j < d/2, angle = pos * f.inv_freq[j],
// c = cos(angle) * f.attention_factor, s = sin(angle) * f.attention_factor:
//   x'[j]       = x[j] c - x[j + d/2] s
//   x'[j + d/2] = x[j + d/2] c + x[j] s
// f.inv_freq must hold head_dim / 2 values.
void apply_rope(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, const rope_frequencies& f);

// The default rotary embedding: inv_freq_j = theta^(-2j/d), attention factor 1.
void apply_rope(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, double theta);

}  // namespace lora
