// Block-scaled FP8 weights (DeepSeek-V3, Qwen3-FP8, transformers'
// "fp8" quant_method): a 2-D tensor `X.weight` of F8_E4M3 [out, in] with
// `X.weight_scale_inv`, F32 [ceil(out / bo), ceil(in / bi)], the block size
// [bo, bi] from config.json `quantization_config.weight_block_size` (default
// [128, 128]). The value of element (r, c) is
//     w[r, c] = e4m3(q[r, c]) * scale_inv[r / bo, c / bi]
// (edge blocks are partial). Follows DeepSeek-V3 inference/kernel.py
// weight_dequant_kernel (`y = x * s`, s indexed by row block and column
// block) and inference/fp8_cast_bf16.py (the `<weight>_scale_inv` name; commit
// dca08f2c of deepseek-ai/DeepSeek-V3), and transformers'
// quantizers/quantizer_finegrained_fp8.py (v4.57: per block
// `scale = 448 / max|w|`, `q = clamp(w * scale).to(float8_e4m3fn)`,
// `weight_scale_inv = 1 / scale`) with utils/quantization_config.py
// FineGrainedFP8Config (defaults activation_scheme "dynamic",
// weight_block_size (128, 128)).
//
// Requantization (merge into an FP8 base, output kept FP8): per block, the
// new scale_inv is max|w| / 448 rounded to f32 (DeepSeek's act_quant_kernel:
// `s = max(|x|) / 448; y = x / s`), and each element w / scale_inv is rounded
// once to E4M3 (round to nearest even), clamped to +-448 first (f32 rounding
// of the scale can put the block's largest element a hair above 448). So
// every dequantized element is within half an E4M3 unit (2^-4 relative for
// normals, 2^-10 * scale_inv absolute for subnormals) of w. An all-zero block
// keeps its old scale (every element encodes to 0 whatever the scale; keeping
// it leaves the scale tensor unchanged where the block is).
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "formats/model-files.h"

namespace lora {

struct fp8_block {
  int64_t rows = 128;  // bo: weight rows per scale row
  int64_t cols = 128;  // bi: weight columns per scale column
};

// What a model holds in block-scaled FP8.
struct fp8_model {
  bool present = false;       // config.json says fp8, or some F8_E4M3 weight has a scale
  bool from_config = false;   // quantization_config was read (else the default block is assumed)
  std::string config_text;    // quantization_config as a short description, for reports
  fp8_block block;            // weight_block_size
  std::map<std::string, tensor_ref> scales;  // "X.weight" -> its "X.weight_scale_inv"

  // The scale tensor of `weight`, or nullptr when it is not a scaled FP8 weight.
  const tensor_ref* scale_of(const std::string& weight) const;
  // True when `name` is the scale tensor of a scaled weight.
  bool is_scale(const std::string& name) const;
};

// Why merge without --dtype refuses a modules_to_save tensor replacing an FP8
// weight (merge and inspect --base say the same).
inline constexpr const char* fp8_replaced_message =
    "modules_to_save replaces this FP8 weight, which would leave its block scale stale; "
    "merge with --dtype bf16 to dequantize the model";

// What F8_E4M3 weights without any block scale are, and why merge refuses
// to merge into them (merge and inspect say the same). ComfyUI's FP8 Flux
// checkpoints store the weights so: codes with no weight_scale_inv, no
// quantization_config.
inline constexpr const char* fp8_unscaled_what =
    "F8_E4M3 weights without block scales (per-tensor / unscaled FP8, as ComfyUI stores Flux)";
inline constexpr const char* fp8_unscaled_message =
    "cannot merge into F8_E4M3 weights without block scales (per-tensor / unscaled FP8, as ComfyUI stores Flux): "
    "not supported; merge into a BF16 or block-scaled FP8 checkpoint";

// "X.weight" -> "X.weight_scale_inv" (DeepSeek's fp8_cast_bf16.py naming).
std::string fp8_scale_name(const std::string& weight);

// Reads config.json's quantization_config and the tensors of `base`.
// Throws lora::error (exit 3) naming the file and tensor: a quant_method other
// than fp8 ("quant_method gptq is not supported ..."), fmt other than e4m3,
// weight_block_size not two positive integers (null: per-tensor scales,
// refused by name); in an FP8 model an F8_E4M3 tensor without its
// `_scale_inv` (or with a per-tensor / per-channel `weight_scale` instead),
// a scale that is not F32 or not [ceil(out/bo), ceil(in/bi)], an FP8 weight
// that is not 2-D; an F8_E5M2 / FNUZ tensor with a scale (other FP8 schemes).
// Borrows nothing after it returns except the tensor_refs, which point into `base`.
fp8_model read_fp8_model(const model_files& base);

// The scale tensor of a weight, read whole into f32 (it is small: one value
// per block). Throws lora::error (exit 4) when the file cannot be read, and
// (exit 3, naming the file, the scale tensor and the block) for a scale that
// is not finite and positive (zero, negative, inf, NaN).
std::vector<float> read_fp8_scales(const tensor_ref& scale);

// Dequantizes rows [row_begin, row_end) of an [n_rows, n_cols] FP8 weight:
// `q` holds those rows' codes ((row_end - row_begin) * n_cols bytes), `scales`
// the whole scale tensor (row-major, ceil(n_cols / block.cols) per row); the
// values go to out (same count), exactly (an E4M3 value times an f32 fits a double).
void fp8_dequantize_rows(std::span<const uint8_t> q, std::span<const float> scales, const fp8_block& block,
                         int64_t n_cols, int64_t row_begin, int64_t row_end, double* out);
void fp8_dequantize_rows(std::span<const uint8_t> q, std::span<const float> scales, const fp8_block& block,
                         int64_t n_cols, int64_t row_begin, int64_t row_end, float* out);

// Requantizes rows [row_begin, row_end) of w (row-major, n_cols per row):
// row_begin must be a multiple of block.rows and row_end one too or the last
// row, so that the rows hold whole scale rows [row_begin / bo, ceil(row_end / bo)).
// Writes the codes to q (same count as w) and those scale rows to
// new_scales (their count * ceil(n_cols / bi) values); `old_scales` holds the
// same scale rows of the base (kept for an all-zero block). Returns the number
// of blocks whose max |w| is not finite or whose scale overflows f32 (their
// codes are NaN); 0 means every code and scale is finite.
uint64_t fp8_quantize_rows(const double* w, const fp8_block& block, int64_t n_cols, int64_t row_begin,
                           int64_t row_end, std::span<const float> old_scales, std::span<uint8_t> q,
                           std::span<float> new_scales);

}  // namespace lora
