// The mlx_lm LoRA format (ml-explore/mlx-examples llms/mlx_lm, tuner/lora.py):
// a folder holding adapters.safetensors and adapter_config.json; keys
// "<module path>.lora_a" [in, r] and ".lora_b" [r, out]; the scale in
// lora_parameters.scale. Read only (convert turns it into PEFT). The one
// place its key grammar and file rule live.
#pragma once

#include <string>
#include <string_view>

#include "core/adapter-data.h"
#include "formats/model-files.h"

namespace lora::mlx {

// The weights file of an mlx_lm adapter folder.
inline constexpr std::string_view weights_name = "adapters.safetensors";
// A module's keys: "<module path>" + these.
inline constexpr std::string_view a_suffix = ".lora_a";  // [in, r]
inline constexpr std::string_view b_suffix = ".lora_b";  // [r, out]

// True for a key of this format's grammar (ends in .lora_a / .lora_b).
bool is_lora_key(std::string_view key) noexcept;

// True when `path` is an mlx_lm adapter: a folder with adapters.safetensors
// (and no PEFT adapter_model.safetensors), or a .safetensors file whose keys
// end in .lora_a / .lora_b. Throws exit 3 / 4 when the file cannot be parsed.
bool is_adapter(const std::string& path);

// Reads an mlx_lm LoRA adapter (adapters.safetensors + adapter_config.json,
// found by find_adapter_files) as PEFT modules. mlx_lm's LoRALinear computes
//   y = x W^T + scale * (x @ lora_a) @ lora_b,  lora_a [in, r], lora_b [r, out]
// so dW = scale * (lora_a @ lora_b)^T = scale * lora_b^T lora_a^T, that is
// PEFT A = lora_a^T [r, in], B = lora_b^T [out, r], alpha = scale * r (rsLoRA
// off). LoRAEmbedding (lora_a [vocab, r], lora_b [r, dims], dW = scale *
// lora_a @ lora_b) is PEFT's embedding LoRA with the same transposes: a module
// is an embedding when `base` has "<module>.weight" of shape [vocab, dims]
// (not [out, in]) or, without a base, when its last name part is an
// embedding's (embed_tokens, wte, word_embeddings, tok_embeddings, embed_in).
// `base` may be null; it is borrowed for the call only.
// Throws lora::error (exit 3) naming the file and key: no config or no
// lora_parameters.scale, DoRA / full fine-tunes, a key that is not .lora_a /
// .lora_b, a missing half, shapes that are not [in, r] and [r, out], a rank
// that disagrees with lora_parameters.rank, a module that does not fit `base`
// (the one fit error, core/adapter.h fit_error).
adapter_data load(const std::string& path, const model_files* base);

}  // namespace lora::mlx
