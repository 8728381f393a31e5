// An adapter held in memory, format-neutral: the tensors of every module as
// owned bytes, what resize, combine, convert and extract build and
// write_adapter (core/adapter-write.h) writes. A loaded adapter (core/adapter.h)
// borrows its tensors from the file; this one owns them. The helpers here are
// the ones every adapter-to-adapter pipeline shares: copying a loaded adapter,
// reading factors into f64, rounding new factors once to a dtype.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/adapter.h"
#include "formats/adapter-config.h"
#include "formats/safetensors.h"

namespace lora {

// One tensor held in memory, in its stored dtype and shape (row-major bytes).
struct tensor_data {
  dtype type = dtype::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// One LoRA module to write. The math is the one of core/delta.h:
// dW = s * B A (viewed per kind), s = lora_scale(alpha, rank, use_rslora).
struct module_data {
  // PEFT output: the dotted module path ("model.layers.0.self_attn.q_proj").
  // kohya output: a kohya name ("lora_unet_..."), or a dotted path that the
  // writer turns into one with the adapter's kohya_prefix.
  std::string name;
  module_kind kind = module_kind::linear;
  tensor_data a;                         // lora_A / lora_embedding_A / lora_down: [r, in(, kh, kw)] or [r, vocab]
  tensor_data b;                         // lora_B / lora_embedding_B / lora_up:   [out, r(, 1, 1)] or [dim, r]
  std::optional<tensor_data> magnitude;  // PEFT DoRA m
  std::optional<tensor_data> bias;       // PEFT lora_B.bias
  int64_t rank = 0;
  double alpha = 0;
};

// modules_to_save: a tensor that replaces the base tensor `target` (PEFT only).
struct saved_data {
  std::string target;
  tensor_data tensor;
};

struct adapter_data {
  adapter_format format = adapter_format::peft;
  bool use_rslora = false;  // PEFT only: s = alpha / sqrt(r)
  // PEFT: fields carried into adapter_config.json (target_modules, task_type,
  // base_model_name_or_path, modules_to_save, fan_in_fan_out, peft_type).
  // r, lora_alpha, rank_pattern, alpha_pattern, use_rslora, use_dora and
  // lora_bias are set by the writer from the modules.
  peft_config config;
  // kohya: the prefix given to dotted module names (names that already carry
  // a kohya prefix are written as they are).
  std::string kohya_prefix = "lora_te_";
  std::vector<module_data> modules;
  std::vector<saved_data> saved;
  std::optional<metadata_map> metadata;  // written as the file's __metadata__
};

// The tensors of one adapter file, by key, as a format's writer lays them out
// (core/peft-format, core/kohya-format) and write_adapter writes them.
// Borrows the tensor_data it is given (they must outlive it), except the
// small tensors handed over with add_owned (kohya's alpha scalars).
struct keyed_tensors {
  std::vector<tensor_spec> specs;                   // in the order added
  std::map<std::string, const tensor_data*> data;   // key -> bytes
  std::vector<std::unique_ptr<tensor_data>> owned;  // what add_owned took

  // Adds `t` under `key`. Throws lora::error (exit 3, naming `label` and
  // `key`) for a second tensor with that key or bytes that disagree with the
  // shape and dtype (an internal error).
  void add(const std::string& key, const tensor_data& t, const std::string& label);
  void add_owned(const std::string& key, std::unique_ptr<tensor_data> t, const std::string& label);
};

// ---------------------------------------------------------------------------
// helpers shared by the pipelines (resize, combine, convert, extract)

// The product of a shape's dimensions (1 for a scalar []).
int64_t n_elements(const std::vector<int64_t>& shape) noexcept;

// `n` values of `type` stored in `bytes`, in f64 (through core/dtype).
std::vector<double> values_f64(dtype type, std::span<const uint8_t> bytes, int64_t n);

// A tensor of `type` and `shape` holding `values` rounded once (core/dtype
// from_f64). `values.size()` must be the shape's element count.
tensor_data make_tensor(dtype type, std::vector<int64_t> shape, std::span<const double> values);

// make_tensor for a tensor about to be written: refuses (exit 3, naming the
// input `file` and `module`) values that do not fit `type` once rounded, so
// that finite inputs never give a NaN / Inf output. `what` names the tensor
// ("lora_A", "lora_B", "lora_B bias").
tensor_data make_finite_tensor(dtype type, std::vector<int64_t> shape, std::span<const double> values,
                               const std::string& file, const std::string& module, std::string_view what);

// The bytes of a borrowed tensor, copied (dtype and shape kept).
tensor_data copy_tensor(const tensor_ref& r);

// A module's factors as f64 matrices: b [m, r], a [r, n] (n = all of A's
// trailing dims: a conv kernel is flattened to [r, in * kh * kw]).
struct factors {
  int64_t m = 0, n = 0, r = 0;
  std::vector<double> b, a;
};
factors read_factors(const tensor_data& a, const tensor_data& b, int64_t rank);

// The shapes of new factors of rank k, like the old ones: A [k, <A's trailing
// dims>], B [m, k(, 1, 1)].
std::vector<int64_t> a_shape(const std::vector<int64_t>& like, int64_t k);
std::vector<int64_t> b_shape(const std::vector<int64_t>& like, int64_t k);

// After fit_adapter, a factor's number of dimensions follows the layer:
// linear / embedding A [r, in], B [out, r]; conv B [out, r, 1, 1], A 4-D.
void reshape_to_kind(module_data& m);

// The modules' names, sorted.
std::vector<std::string> sorted_names(const std::vector<module_data>& modules);

// Copies every tensor of a loaded adapter (PEFT or kohya; after fit_adapter
// the names are the dotted module paths) into an adapter_data, bytes
// untouched. kohya modules keep their kohya names until fitted.
adapter_data adapter_to_data(const adapter& a);

}  // namespace lora
