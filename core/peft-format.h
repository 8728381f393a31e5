// The PEFT LoRA format: a folder holding adapter_model.safetensors and
// adapter_config.json; keys "base_model.model.<module path>.lora_A.weight",
// ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A/B",
// ".lora_magnitude_vector" (DoRA), "base_model.model.<tensor>" for
// modules_to_save, lora.ParamWrapper keys of target_parameters (the module
// path, with ".base_layer" once per nesting level: tuners/lora/model.py,
// tuners/tuners_utils.py _inject_parameters) and
// "<module>.token_adapter.trainable_tokens_delta" for trainable_token_indices
// (utils/other.py TrainableTokensWrapper). The one place its key grammar (read and write), prefix,
// config and file rule live. Follows huggingface/peft commit 5d602fdb
// (2026-08-21): utils/save_and_load.py (get_peft_model_state_dict: the prefix,
// the adapter name stripped, DoRA's magnitude saved without ".weight"),
// utils/constants.py (file names), tuners/lora/config.py (rank_pattern,
// alpha_pattern, use_rslora).
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "core/adapter-data.h"
#include "core/adapter.h"
#include "formats/adapter-config.h"

namespace lora::peft {

// Every saved key starts with this prefix.
inline constexpr std::string_view prefix = "base_model.model.";
// The files of a PEFT folder (utils/constants.py).
inline constexpr std::string_view weights_name = "adapter_model.safetensors";
inline constexpr std::string_view pickle_weights_name = "adapter_model.bin";  // refused: pickle
inline constexpr std::string_view config_name = "adapter_config.json";

// What a tensor of a LoRA module is.
enum class role { a, b, embedding_a, embedding_b, magnitude, bias };

// The name PEFT gives a role ("lora_A", "lora_B.bias", ...).
std::string_view role_name(role r) noexcept;

// The key PEFT saves `module`'s tensor of role `r` under, in the form
// get_peft_model_state_dict writes ("base_model.model.<module>.lora_A.weight",
// "...lora_embedding_A", "...lora_magnitude_vector"). Pure.
std::string key(const std::string& module, role r);

// The key of a modules_to_save tensor replacing base tensor `target`. Pure.
std::string saved_key(const std::string& target);

// True for a key of this format's LoRA grammar (lora_A / lora_B /
// lora_embedding_A/B / lora_magnitude_vector).
bool is_lora_key(std::string_view key) noexcept;

// Parses the config (read_config() returns adapter_config.json's text, named
// `config_label`), then reads a.file into a.modules and a.saved: A paired with
// B, rank from the shapes checked against r / rank_pattern (keys are regexes
// matched as ^(.*\.)?(KEY)$, first match in file order; core/module-pattern,
// RE2), alpha from alpha_pattern, lora_alpha, else 8, the scale
// lora_scale(alpha, r, use_rslora), DoRA magnitudes and lora_B biases checked
// against use_dora / lora_bias; target_parameters modules (kind parameter:
// name and target the parameter key, rank the per-expert r, n_experts = A's
// rows / r, the nesting resolved in registration order) and
// trainable_token_indices deltas into a.tokens (rows checked against the
// indices, indices unique). Throws lora::error (exit 3) naming the file
// and key: a key without the prefix, an unknown LoRA key, a missing half, a
// rank that disagrees, peft_type other than LORA, layer_replication,
// ParamWrapper keys that target_parameters does not match one to one, a
// trainable tokens delta without its indices; exit 4 when the config
// cannot be read.
void load(adapter& a, const std::string& config_label, const std::function<std::string()>& read_config);

// The keys and tensors of `data` as adapter_model.safetensors. Borrows `data`.
// Throws lora::error (exit 3, naming `label`) for two tensors with one key.
keyed_tensors tensors(const adapter_data& data, const std::string& label);

// The config for these modules: r = the most common rank, lora_alpha = the
// most common alpha (ties: the smaller), rank_pattern / alpha_pattern =
// {module path: value} for every module that differs; use_dora / lora_bias
// from the modules; the other fields from data.config. Pure.
peft_config make_config(const adapter_data& data);

// A rank_pattern / alpha_pattern key that matches exactly this module path
// under PEFT's rule ^(.*\.)?(KEY)$: the path with its dots escaped. Pure.
std::string exact_pattern(const std::string& path);

}  // namespace lora::peft
