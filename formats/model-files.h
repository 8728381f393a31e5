// A model on disk: a Hugging Face folder (config.json plus model.safetensors
// or shards listed by model.safetensors.index.json), or one .safetensors file.
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

struct model_files {
  std::string path;                          // what the user named (folder or file)
  std::string folder;                        // the folder holding the files
  std::string config_path;                   // "<folder>/config.json", empty when there is none
  std::string index_path;                    // empty for a single-file model
  std::optional<uint64_t> index_total_size;  // "metadata.total_size" of the index
  std::vector<safetensors_file> shards;      // in index order (file name order)
  std::vector<std::string> shard_names;      // file names relative to folder
  std::vector<std::string> tensor_names;     // shard order, then data order

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

// The JSON text of a model.safetensors.index.json for these tensors:
// {"metadata": {"total_size": N}, "weight_map": {tensor: file}} (keys sorted,
// two-space indent as transformers writes it).
std::string make_safetensors_index(uint64_t total_size, const std::map<std::string, std::string>& weight_map);

}  // namespace lora
