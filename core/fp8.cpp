#include "core/fp8.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>

#include "core/dtype.h"
#include "formats/error.h"
#include "formats/file-io.h"
#include "formats/hf-config.h"

namespace lora {

namespace {

constexpr std::string_view scale_suffix = "_scale_inv";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_fp8(dtype t) {
  return t == dtype::F8_E4M3 || t == dtype::F8_E5M2 || t == dtype::F8_E4M3FNUZ || t == dtype::F8_E5M2FNUZ;
}

// config.json's quantization_config: fp8 / e4m3 / two positive block sizes.
void read_config(const model_files& base, fp8_model& m) {
  if (base.config_path.empty()) return;
  const std::optional<quantization_config> q =
      parse_quantization_config(read_text_file(base.config_path), base.config_path);
  if (!q) return;
  const std::string& file = base.config_path;
  if (q->quant_method != "fp8")
    throw errors::invalid(file, "",
                          fmt::format("quantization_config.quant_method {} is not supported (lora merges into "
                                      "unquantized models and block-scaled FP8 ones, quant_method fp8)",
                                      q->quant_method.empty() ? "(missing)" : q->quant_method));
  if (q->fmt && *q->fmt != "e4m3")
    throw errors::invalid(file, "",
                          fmt::format("quantization_config.fmt {} is not supported (only e4m3, OCP E4M3 FN)", *q->fmt));
  if (q->weight_block_size) {
    const std::vector<int64_t>& b = *q->weight_block_size;
    // (at most 2^31 each: a block larger than any tensor is one block, and
    // the block arithmetic stays far from overflow)
    constexpr int64_t max_block = int64_t{1} << 31;
    if (b.size() != 2 || b[0] <= 0 || b[1] <= 0 || b[0] > max_block || b[1] > max_block)
      throw errors::invalid(file, "",
                            fmt::format("quantization_config.weight_block_size {} is not supported (block scales "
                                        "need two positive integers up to 2^31; per-tensor FP8 scales are not "
                                        "supported)",
                                        q->weight_block_size_text));
    m.block = {b[0], b[1]};
  }
  m.present = true;
  m.from_config = true;
  m.config_text = fmt::format("fp8 {}, block {}x{}, activation_scheme {}", q->fmt.value_or("e4m3"), m.block.rows,
                              m.block.cols, q->activation_scheme.value_or("dynamic"));
}

// One scaled weight: its scale must be F32 [ceil(out/bo), ceil(in/bi)].
void check_scale(const tensor_ref& w, const tensor_ref& s, const fp8_block& block) {
  const tensor_info& wi = *w.info;
  const tensor_info& si = *s.info;
  if (wi.shape.size() != 2)
    throw errors::invalid(w.file->path(), wi.name,
                          fmt::format("an FP8 weight of shape {} is not supported (only 2-D [out, in] block-scaled "
                                      "weights)",
                                      shape_text(wi.shape)));
  if (si.type != dtype::F32)
    throw errors::invalid(s.file->path(), si.name,
                          fmt::format("the block scale of {} is {}, expected F32", wi.name, dtype_name(si.type)));
  const std::vector<int64_t> want{ceil_div(wi.shape[0], block.rows), ceil_div(wi.shape[1], block.cols)};
  if (si.shape != want)
    throw errors::invalid(s.file->path(), si.name,
                          fmt::format("the block scale of {} {} is {}, expected {} (blocks of {}x{})", wi.name,
                                      shape_text(wi.shape), shape_text(si.shape), shape_text(want), block.rows,
                                      block.cols));
}

}  // namespace

const tensor_ref* fp8_model::scale_of(const std::string& weight) const {
  auto it = scales.find(weight);
  return it == scales.end() ? nullptr : &it->second;
}

bool fp8_model::is_scale(const std::string& name) const {
  if (!ends_with(name, scale_suffix)) return false;
  return scales.count(name.substr(0, name.size() - scale_suffix.size())) > 0;
}

std::string fp8_scale_name(const std::string& weight) { return weight + std::string(scale_suffix); }

fp8_model read_fp8_model(const model_files& base) {
  fp8_model m;
  read_config(base, m);
  // without a config saying so, a model is FP8 when an F8_E4M3 weight has its scale
  if (!m.present)
    for (const std::string& name : base.tensor_names) {
      const tensor_ref& t = *base.find_ref(name);
      if (t.info->type == dtype::F8_E4M3 && base.find_ref(fp8_scale_name(name))) m.present = true;
    }
  if (!m.present) return m;
  if (!m.from_config) m.config_text = "fp8 e4m3, block 128x128 (no quantization_config: the default assumed)";
  for (const std::string& name : base.tensor_names) {
    const tensor_ref& t = *base.find_ref(name);
    if (!is_fp8(t.info->type)) continue;
    const tensor_ref* s = base.find_ref(fp8_scale_name(name));
    if (t.info->type != dtype::F8_E4M3)
      throw errors::invalid(t.file->path(), name,
                            fmt::format("{} weights are not supported (only F8_E4M3 with block scales)",
                                        dtype_name(t.info->type)));
    if (s == nullptr) {
      // per-tensor / per-channel schemes (FBGEMM, compressed-tensors) name it weight_scale
      const std::string base_name = ends_with(name, ".weight") ? name.substr(0, name.size() - 7) : name;
      if (base.find_ref(base_name + ".weight_scale") || base.find_ref(name + "_scale"))
        throw errors::invalid(t.file->path(), name,
                              "per-tensor or per-channel FP8 scales (weight_scale) are not supported (only block "
                              "scales, weight_scale_inv)");
      throw errors::invalid(t.file->path(), name,
                            fmt::format("this FP8 weight has no block scale {}", fp8_scale_name(name)));
    }
    check_scale(t, *s, m.block);
    m.scales.emplace(name, *s);
  }
  return m;
}

std::vector<float> read_fp8_scales(const tensor_ref& scale) {
  std::vector<float> out(scale.info->n_elements);
  std::vector<uint8_t> bytes(scale.info->n_bytes());
  scale.file->map().read(scale.file->file_offset(*scale.info), bytes);
  to_f32(dtype::F32, bytes, out);
  // a block's scale must be a positive finite number: a negative one flips
  // the block's signs, zero erases it, inf / NaN poisons it. None is a real
  // quantizer's output for a block that holds values; an all-zero block is
  // no exception: transformers' quantizer_finegrained_fp8.py (v4.57,
  // `scale = fp8_max / max_abs`, `weight_scale_inv = 1 / scale`) gives it
  // scale inf, codes NaN (0 * inf) and weight_scale_inv 0, a block no reader
  // can dequantize; DeepSeek-V3's kernel.py act_quant divides by the same 0.
  const int64_t n_cols = scale.info->shape.size() == 2 ? std::max<int64_t>(1, scale.info->shape[1]) : 1;
  for (size_t i = 0; i < out.size(); ++i)
    if (!(std::isfinite(out[i]) && out[i] > 0))
      throw errors::invalid(
          scale.file->path(), scale.info->name,
          fmt::format("the scale of block ({}, {}) is {}: a block scale must be finite and positive (a corrupt "
                      "or mis-quantized FP8 checkpoint)",
                      static_cast<int64_t>(i) / n_cols, static_cast<int64_t>(i) % n_cols, out[i]));
  return out;
}

namespace {
template <typename T>
void dequantize(std::span<const uint8_t> q, std::span<const float> scales, const fp8_block& block, int64_t n_cols,
                int64_t row_begin, int64_t row_end, T* out) {
  const int64_t n_scale_cols = ceil_div(n_cols, block.cols);
  T values[256];  // every code's value (core/dtype), looked up in the loop
  for (int c = 0; c < 256; ++c) values[c] = static_cast<T>(e4m3_to_f32(static_cast<uint8_t>(c)));
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* srow = scales.data() + (r / block.rows) * n_scale_cols;
    const uint8_t* qrow = q.data() + (r - row_begin) * n_cols;
    T* orow = out + (r - row_begin) * n_cols;
    // column block by column block: one scale each
    for (int64_t cb = 0, sc = 0; cb < n_cols; cb += block.cols, ++sc) {
      const T s = static_cast<T>(srow[sc]);
      const int64_t ce = std::min(n_cols, cb + block.cols);
      for (int64_t c = cb; c < ce; ++c) orow[c] = values[qrow[c]] * s;
    }
  }
}
}  // namespace

void fp8_dequantize_rows(std::span<const uint8_t> q, std::span<const float> scales, const fp8_block& block,
                         int64_t n_cols, int64_t row_begin, int64_t row_end, double* out) {
  dequantize(q, scales, block, n_cols, row_begin, row_end, out);
}
void fp8_dequantize_rows(std::span<const uint8_t> q, std::span<const float> scales, const fp8_block& block,
                         int64_t n_cols, int64_t row_begin, int64_t row_end, float* out) {
  dequantize(q, scales, block, n_cols, row_begin, row_end, out);
}

uint64_t fp8_quantize_rows(const double* w, const fp8_block& block, int64_t n_cols, int64_t row_begin,
                           int64_t row_end, std::span<const float> old_scales, std::span<uint8_t> q,
                           std::span<float> new_scales) {
  const int64_t n_scale_cols = ceil_div(n_cols, block.cols);
  uint64_t bad = 0;
  for (int64_t br = row_begin; br < row_end; br += block.rows) {
    const int64_t re = std::min(row_end, br + block.rows);
    const int64_t srow = (br - row_begin) / block.rows;
    for (int64_t sc = 0; sc < n_scale_cols; ++sc) {
      const int64_t cb = sc * block.cols, ce = std::min(n_cols, cb + block.cols);
      // the block's largest magnitude (NaN propagates: std::max would drop it)
      double amax = 0;
      bool nan = false;
      for (int64_t r = br; r < re; ++r) {
        const double* wr = w + (r - row_begin) * n_cols;
        for (int64_t c = cb; c < ce; ++c) {
          const double a = std::fabs(wr[c]);
          amax = std::max(amax, a);
          nan = nan || std::isnan(a);
        }
      }
      if (nan) amax = std::numeric_limits<double>::quiet_NaN();
      // scale_inv = max|w| / 448 in f32 (DeepSeek's act_quant: s = amax / 448);
      // an all-zero block keeps its old scale
      float s = amax == 0 ? old_scales[srow * n_scale_cols + sc] : static_cast<float>(amax / e4m3_max);
      if (s == 0 && amax > 0) s = std::numeric_limits<float>::denorm_min();  // amax / 448 below f32's range
      const bool finite = std::isfinite(amax) && std::isfinite(s) && s > 0;
      if (!finite) {
        ++bad;
        s = std::numeric_limits<float>::quiet_NaN();
      }
      new_scales[srow * n_scale_cols + sc] = s;
      const double sd = static_cast<double>(s);
      for (int64_t r = br; r < re; ++r) {
        const double* wr = w + (r - row_begin) * n_cols;
        uint8_t* qr = q.data() + (r - row_begin) * n_cols;
        if (!finite) {
          for (int64_t c = cb; c < ce; ++c) qr[c] = f64_to_e4m3(wr[c] * sd);  // NaN codes
          continue;
        }
        // w / s rounded once; the clamp only absorbs the f32 rounding of s
        for (int64_t c = cb; c < ce; ++c) qr[c] = f64_to_e4m3(std::clamp(wr[c] / sd, -e4m3_max, e4m3_max));
      }
    }
  }
  return bad;
}

}  // namespace lora
