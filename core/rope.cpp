#include "core/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace lora {

namespace {

// base^(-2i/d), i < d/2 (_compute_default_rope_parameters)
std::vector<double> default_inv_freq(double base, int64_t dim) {
  std::vector<double> inv(static_cast<size_t>(dim / 2));
  for (size_t i = 0; i < inv.size(); ++i)
    inv[i] = 1.0 / std::pow(base, 2.0 * static_cast<double>(i) / static_cast<double>(dim));
  return inv;
}

// yarn's attention factor per scale: 1 when scale <= 1, else 0.1 m ln(scale) + 1 (get_mscale)
double yarn_mscale(double scale, double m) { return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; }

// _compute_yarn_parameters (5.x): ramp between interpolation and extrapolation
rope_frequencies yarn(const rope_parameters& p, int64_t dim, int64_t max_pos) {
  const double orig = static_cast<double>(p.original_max_position_embeddings);
  const double factor = p.factor ? *p.factor : static_cast<double>(max_pos) / orig;
  rope_frequencies f;
  if (p.attention_factor) {
    f.attention_factor = *p.attention_factor;
  } else if (p.mscale != 0.0 && p.mscale_all_dim != 0.0) {
    f.attention_factor = yarn_mscale(factor, p.mscale) / yarn_mscale(factor, p.mscale_all_dim);
  } else {
    f.attention_factor = yarn_mscale(factor, 1.0);
  }
  // correction dim of r rotations: d ln(orig / (2 pi r)) / (2 ln base)
  const double d = static_cast<double>(dim);
  auto correction_dim = [&](double rotations) {
    return d * std::log(orig / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(p.theta));
  };
  double low = correction_dim(p.beta_fast), high = correction_dim(p.beta_slow);
  if (p.truncate) low = std::floor(low), high = std::ceil(high);
  low = std::max(low, 0.0);
  high = std::min(high, d - 1.0);
  if (low == high) high += 0.001;  // as HF: no singular ramp
  // inv = interp (1 - e) + extrap e, e = 1 - clamp((i - low) / (high - low), 0, 1)
  const std::vector<double> extrap = default_inv_freq(p.theta, dim);
  f.inv_freq.resize(extrap.size());
  for (size_t i = 0; i < extrap.size(); ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double e = 1.0 - ramp;
    f.inv_freq[i] = extrap[i] / factor * (1.0 - e) + extrap[i] * e;
  }
  return f;
}

// _compute_llama3_parameters: by wavelength 2 pi / inv_freq
std::vector<double> llama3(const rope_parameters& p, int64_t dim) {
  std::vector<double> inv = default_inv_freq(p.theta, dim);
  const double orig = static_cast<double>(p.original_max_position_embeddings), factor = *p.factor;
  const double low_wavelen = orig / p.low_freq_factor, high_wavelen = orig / p.high_freq_factor;
  for (double& v : inv) {
    const double wavelen = 2.0 * std::numbers::pi / v;
    if (wavelen > low_wavelen) {
      v /= factor;  // low frequencies: interpolated
    } else if (!(wavelen < high_wavelen)) {
      // medium: s = (orig / wavelen - low) / (high - low); (1 - s) v / factor + s v
      const double s = (orig / wavelen - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor);
      v = (1.0 - s) * v / factor + s * v;
    }  // high frequencies: kept
  }
  return inv;
}

// _compute_longrope_parameters with longrope_frequency_update's choice of factors
rope_frequencies longrope(const rope_parameters& p, int64_t dim, int64_t max_pos, int64_t seq_len) {
  const double orig = static_cast<double>(p.original_max_position_embeddings);
  const double factor = p.factor ? *p.factor : static_cast<double>(max_pos) / orig;
  rope_frequencies f;
  f.attention_factor = p.attention_factor ? *p.attention_factor
                       : factor <= 1.0    ? 1.0
                                          : std::sqrt(1.0 + std::log(factor) / std::log(orig));
  const std::vector<double>& ext = seq_len > p.original_max_position_embeddings ? p.long_factor : p.short_factor;
  f.inv_freq = default_inv_freq(p.theta, dim);
  for (size_t i = 0; i < f.inv_freq.size(); ++i) f.inv_freq[i] /= ext[i];
  return f;
}

}  // namespace

rope_frequencies compute_rope_frequencies(const rope_parameters& p, int64_t head_dim, int64_t max_position_embeddings,
                                          int64_t seq_len) {
  if (p.type == "yarn") return yarn(p, head_dim, max_position_embeddings);
  if (p.type == "longrope") return longrope(p, head_dim, max_position_embeddings, seq_len);
  rope_frequencies f;
  if (p.type == "llama3") {
    f.inv_freq = llama3(p, head_dim);
  } else if (p.type == "dynamic") {
    // base * (factor L / M - (factor - 1))^(d / (d - 2)), L = max(seq_len, M)
    const double m = static_cast<double>(max_position_embeddings);
    const double len = std::max(static_cast<double>(seq_len), m), d = static_cast<double>(head_dim);
    const double base = p.theta * std::pow(*p.factor * len / m - (*p.factor - 1.0), d / (d - 2.0));
    f.inv_freq = default_inv_freq(base, head_dim);
  } else {
    f.inv_freq = default_inv_freq(p.theta, head_dim);
    if (p.type == "linear")
      for (double& v : f.inv_freq) v /= *p.factor;
  }
  return f;
}

void apply_rope(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, const rope_frequencies& f) {
  const int64_t half = head_dim / 2;
  std::vector<float> cos_t(static_cast<size_t>(half)), sin_t(static_cast<size_t>(half));
  for (int64_t p = 0; p < n_tokens; ++p) {
    // angle_j = p * inv_freq_j; cos and sin scaled by the attention factor (LlamaRotaryEmbedding.forward)
    for (int64_t j = 0; j < half; ++j) {
      const double angle = static_cast<double>(p) * f.inv_freq[static_cast<size_t>(j)];
      cos_t[static_cast<size_t>(j)] = static_cast<float>(std::cos(angle) * f.attention_factor);
      sin_t[static_cast<size_t>(j)] = static_cast<float>(std::sin(angle) * f.attention_factor);
    }
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = x + (p * n_heads + h) * head_dim;
      // rotate half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = v[j], x2 = v[j + half];
        const float c = cos_t[static_cast<size_t>(j)], s = sin_t[static_cast<size_t>(j)];
        v[j] = x1 * c - x2 * s;
        v[j + half] = x2 * c + x1 * s;
      }
    }
  }
}

void apply_rope(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, double theta) {
  rope_parameters p;
  p.theta = theta;
  apply_rope(x, n_tokens, n_heads, head_dim, compute_rope_frequencies(p, head_dim, 1, n_tokens));
}

}  // namespace lora
