// A model on disk: a Hugging Face folder (config.json plus model.safetensors
// or shards listed by model.safetensors.index.json), one .safetensors file,
// or a diffusers pipeline folder (model_index.json and one model folder per
// component: unet/, transformer/, text_encoder/, vae/, ...).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "formats/safetensors.h"

namespace lora {

// A tensor located in one of a model's files. Both pointers borrow from the
// model_files that returned them.
struct tensor_ref {
  const safetensors_file* file = nullptr;
  const tensor_info* info = nullptr;

  std::span<const uint8_t> data() const noexcept { return file->data(*info); }
};

// One component of a diffusers pipeline: a model folder below the pipeline's.
struct model_component {
  std::string name;        // folder name: "unet", "text_encoder_2", ...
  std::string index_name;  // "<weights>.safetensors.index.json" in it; empty: one weights file
  size_t first_shard = 0;  // its shards are shards[first_shard, first_shard + n_shards)
  size_t n_shards = 0;
};

struct model_files {
  std::string path;                          // what the user named (folder or file)
  std::string folder;                        // the folder holding the files
  std::string config_path;                   // "<folder>/config.json", empty when there is none
  std::string index_path;                    // empty for a single-file model
  std::optional<uint64_t> index_total_size;  // "metadata.total_size" of the index
  std::vector<safetensors_file> shards;      // in index order (file name order)
  std::vector<std::string> shard_names;      // file names relative to folder ("unet/x.safetensors" in a pipeline)
  std::vector<std::string> tensor_names;     // shard order, then data order
  // A diffusers pipeline: model_index.json's path (empty for any other
  // model) and its components in folder name order. Its tensors are named
  // "<component>.<name in the file>" ("unet.conv_in.weight"), the names
  // diffusers LoRA files use; shard_prefixes[i] is shard i's "<component>."
  // (empty strings for any other model).
  std::string pipeline_index_path;
  std::vector<model_component> components;
  std::vector<std::string> shard_prefixes;

  bool is_pipeline() const noexcept { return !pipeline_index_path.empty(); }
  // The name a tensor of shard `shard` has in its file: `name` without the
  // shard's component prefix.
  std::string file_tensor_name(size_t shard, const std::string& name) const;

  const tensor_ref* find_ref(const std::string& name) const;
  std::optional<tensor_ref> find(const std::string& name) const;
  // Throws lora::error (exit 3) naming the model when absent.
  tensor_ref at(const std::string& name) const;
  uint64_t total_tensor_bytes() const;

  std::unordered_map<std::string, tensor_ref> by_name;
};

// Opens a model: a folder with config.json and model.safetensors or a sharded
// index, or a bare .safetensors file (config.json beside it is picked up when
// present). Reads headers only. The index is validated: every shard exists and
// parses, every tensor of every shard is in weight_map and maps to its shard,
// no tensor is in two shards, total_size (when given) equals the tensor bytes.
// A folder with model_index.json is a diffusers pipeline: every sub-folder
// holding diffusion_pytorch_model.safetensors, model.safetensors or their
// .safetensors.index.json (diffusers utils/constants.py
// SAFETENSORS_WEIGHTS_NAME / SAFE_WEIGHTS_INDEX_NAME, transformers'
// model.safetensors for the text encoders; pipelines/pipeline_utils.py
// config_name "model_index.json"; huggingface/diffusers commit 58eb52c0) is a
// component, opened as a model folder of its own (index validated as above);
// a pipeline without any is refused.
// Throws lora::error (exit 3 malformed, exit 4 unreadable).
model_files open_model(const std::string& path);

// A file of a model folder other than its weights, and what to do with it.
struct folder_file {
  std::string name;    // file name inside the folder
  std::string source;  // the path to read (a symlink's resolved target)
  std::string skip;    // why it is not to be copied; empty: copy it
};

// The entries of the folder `folder` that are not the model's safetensors
// files (`m`'s shards and index), sorted by name, each either to copy or
// with the reason it is not: only regular files are copied; a symlink is
// followed only when its target is a regular file inside the model's own
// tree, which is the folder itself or, in the Hugging Face cache layout
// (`<repo>/snapshots/<hash>/<file> -> ../../blobs/<sha>`), the `<repo>`
// folder. Links out of the tree (`/etc/shadow`, `/proc/...`), folders,
// FIFOs, devices and sockets are skipped. Reads the file system only (lstat,
// realpath); never opens an entry. Throws lora::error (exit 4) when the
// folder cannot be listed.
std::vector<folder_file> list_folder_files(const model_files& m);

// The entries of a pipeline folder `m` other than its components' weights,
// each named by its path relative to the folder ("model_index.json",
// "unet/config.json", "scheduler/scheduler_config.json"), sorted, with the
// same verdicts as list_folder_files: the files at the top and in every
// sub-folder (one level: a folder inside a sub-folder is skipped, as is a
// symlink to a folder). `folders` gets the sub-folders the listed files
// need (every component and every sub-folder with a file to copy), sorted.
// Throws lora::error (exit 4) when a folder cannot be listed.
std::vector<folder_file> list_pipeline_files(const model_files& m, std::vector<std::string>& folders);

// The JSON text of a model.safetensors.index.json for these tensors:
// {"metadata": {"total_size": N}, "weight_map": {tensor: file}} (keys sorted,
// two-space indent as transformers writes it).
std::string make_safetensors_index(uint64_t total_size, const std::map<std::string, std::string>& weight_map);

}  // namespace lora
