// The adapter model: a PEFT folder or a kohya / sd-scripts file, read into
// LoRA modules (A paired with B, rank, alpha, scale) with views into the
// adapter's tensors. The one place that pairs A with B, names a module's base
// tensor and computes a module's scale.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "formats/adapter-config.h"
#include "formats/model-files.h"

namespace lora {

enum class adapter_format { peft, kohya };
enum class module_kind { linear, embedding, conv };

std::string_view adapter_format_name(adapter_format f) noexcept;  // "peft" | "kohya"
std::string_view module_kind_name(module_kind k) noexcept;        // "linear" | "embedding" | "conv"

struct lora_module {
  // PEFT: the base module path ("model.layers.0.self_attn.q_proj").
  // kohya: the kohya name ("lora_unet_down_blocks_0_attentions_0_proj_in")
  // until fit_adapter() resolves it to the dotted base path.
  std::string name;
  // The base tensor the delta applies to ("<name>.weight"); empty for a kohya
  // module until fit_adapter() resolves it.
  std::string target;
  module_kind kind = module_kind::linear;
  // linear: A [r, in], B [out, r]; conv: A [r, in, kh, kw], B [out, r, 1, 1];
  // embedding: A [r, vocab], B [dim, r] and dW = (B A)^T.
  tensor_ref a;
  tensor_ref b;
  std::optional<tensor_ref> magnitude;  // DoRA m, [out]
  std::optional<tensor_ref> bias;       // lora_B.bias, [out]: added to "<name>.bias"
  int64_t rank = 0;
  double alpha = 0;
  double scale = 0;  // lora_scale(alpha, rank, rslora)
  bool dora = false;
  // The base weight is stored [in, out] (GPT-2 Conv1D): dW is transposed.
  // Set from the config, and by fit_adapter() from the base's model_type.
  bool fan_in_fan_out = false;
};

// modules_to_save: a tensor that replaces the base tensor `target` whole.
struct saved_tensor {
  std::string target;
  tensor_ref tensor;
};

struct adapter {
  std::string path;         // what the user named
  std::string weights_path; // the .safetensors file
  adapter_format format = adapter_format::peft;
  std::unique_ptr<safetensors_file> file;  // owns the map every tensor_ref borrows from
  std::optional<peft_config> config;       // PEFT only
  std::vector<lora_module> modules;        // sorted by name
  std::vector<saved_tensor> saved;
};

// The scale of one module: alpha / r, or alpha / sqrt(r) with rsLoRA.
double lora_scale(double alpha, int64_t rank, bool rslora) noexcept;

// Loads a PEFT folder (adapter_config.json + adapter_model.safetensors), a
// PEFT .safetensors file with its config beside it, or a kohya single file.
// Throws lora::error (exit 3) naming the key: a missing half, a rank that
// disagrees between A, B and the config, a key that is neither LoRA nor a
// known extra, and adapters of other kinds (LoHa, LoKr, MLX lora_a/lora_b,
// diffusers attention processors, ...) named as such.
adapter load_adapter(const std::string& path);

// How an adapter fits a base model.
struct fit_problem {
  std::string key;   // the adapter key (or module name)
  std::string what;  // what is wrong, with a hint
};
struct fit_report {
  std::vector<fit_problem> problems;  // empty: every module fits
  bool ok() const noexcept { return problems.empty(); }
};

// Matches every module to its base tensor: resolves kohya names (ambiguity is
// a problem naming both candidates), decides fan_in_fan_out from the base's
// model_type and shapes (GPT-2 Conv1D), and checks every shape. Updates
// `target` and `fan_in_fan_out` in place. Never throws for a mismatch: the
// report lists them (cli decides the exit code).
fit_report fit_adapter(adapter& a, const model_files& base);

}  // namespace lora
