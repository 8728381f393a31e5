// What a path holds: a model (folder, shards or one file), a LoRA adapter
// (PEFT or kohya), or an adapter of another kind; its files, metadata and
// every tensor, read from the headers only. With a base model, how the
// adapter fits it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/adapter.h"
#include "formats/safetensors.h"

namespace lora {

enum class inspect_kind { model, adapter, other_adapter };
std::string_view inspect_kind_name(inspect_kind k) noexcept;  // "model" | "adapter" | "other_adapter"

// One safetensors file of the inspected path.
struct inspect_file {
  std::string name;           // relative to the model folder (the file name for a single file)
  std::string path;           // as opened
  uint64_t bytes = 0;         // file size
  uint64_t header_bytes = 0;  // N
  size_t n_tensors = 0;
  std::optional<metadata_map> metadata;
};

// One tensor, in file order, then data order.
struct inspect_tensor {
  std::string name;
  dtype type = dtype::F32;
  std::vector<int64_t> shape;
  uint64_t n_elements = 0;
  uint64_t n_bytes = 0;
  std::string file;  // inspect_file::name
};

// A model's block-scaled FP8 weights (core/fp8), or why merge refuses its
// quantization.
struct inspect_quantization {
  std::string scheme;     // "fp8 e4m3, block 128x128, activation_scheme dynamic"
  int64_t block_rows = 0, block_cols = 0;
  uint64_t n_scaled = 0;  // FP8 weights with a weight_scale_inv
  uint64_t n_adapted = 0; // of them, the adapter's targets (inspect --base)
  std::string refused;    // read_fp8_model's error: merge refuses this model; empty: supported
  // inspect --base: merge without --dtype refuses the adapter (a
  // modules_to_save tensor replaces an FP8 weight): merge's message, naming
  // the file and tensor; empty: it keeps FP8
  std::string needs_dtype;
  // F8_E4M3 weights without block scales (fp8_unscaled_what; scheme says so):
  // how many; merge refuses the adapted ones (refused, with --base)
  uint64_t n_unscaled = 0;
};

// A module's base tensor, when inspected against a base model.
struct inspect_base_match {
  bool found = false;
  std::vector<int64_t> shape;
  dtype type = dtype::F32;
};

// One component of a diffusers pipeline folder, with its totals.
struct inspect_component {
  std::string name;        // "unet", "text_encoder", ...
  std::string index_name;  // its *.safetensors.index.json, empty for one file
  size_t n_files = 0;
  size_t n_tensors = 0;
  uint64_t n_parameters = 0;
  uint64_t n_bytes = 0;                                      // tensor bytes
  std::vector<std::pair<std::string, size_t>> dtype_counts;  // dtype name, tensors; by name
};

struct inspect_report {
  inspect_kind kind = inspect_kind::model;
  std::string path;
  std::vector<inspect_file> files;
  std::vector<inspect_tensor> tensors;
  uint64_t n_parameters = 0;  // sum of element counts
  uint64_t n_bytes = 0;       // sum of tensor bytes

  // model: config.json and the shard index, when present
  std::string config_path;
  std::optional<std::string> model_type;
  // a quantized model (FP8 block scales, or a quantization merge refuses)
  std::optional<inspect_quantization> quantization;
  std::string index_path;
  std::optional<uint64_t> index_total_size;
  // model: a diffusers pipeline's model_index.json and components (files
  // named "<component>/<file>")
  std::string pipeline_index_path;
  std::vector<inspect_component> components;

  // adapter (PEFT or kohya LoRA): the loaded adapter, borrowed views included
  std::optional<adapter> lora;
  // adapter: its kind for people ("peft LoRA", "kohya LoRA", "LyCORIS LoHa + LoKr")
  std::string adapter_kind;
  // other_adapter: what kind it is ("IA3 (...)"), and for a file of a known
  // kind that does not load, why (its tensors are listed all the same)
  std::string other_description;
  // adapter_config.json text, for PEFT adapters and other adapters that have one
  std::string config_text;

  // with a base model: one match per lora->modules entry, and the fit report
  std::string base_path;
  std::vector<inspect_base_match> base_matches;
  std::optional<inspect_quantization> base_quantization;  // the base's, as `quantization`
  std::optional<fit_report> fit;
};

// Inspects `path`: a model folder or file (open_model), a PEFT folder or file,
// a kohya or LyCORIS file, or a file of another adapter kind (listed, not
// loaded; without `base`, an adapter file that fails to load with exit 3 is
// listed the same way, the error in other_description). With
// `base`, the adapter is fitted to that model (fit_adapter) and every module
// is matched to its base tensor; a model or other-kind adapter with a base is
// a usage error. Reads headers only.
// Throws lora::error: exit 4 when a file cannot be read (or the path does not
// exist), exit 3 when a file is malformed or the adapter cannot be loaded,
// exit 2 for a base given with a non-LoRA path. A misfit is not thrown:
// see `fit`.
inspect_report inspect_path(const std::string& path, const std::optional<std::string>& base);

}  // namespace lora
