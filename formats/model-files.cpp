#include "formats/model-files.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "formats/error.h"
#include "formats/staged-folder.h"
#include "formats/json.h"

namespace lora {

namespace fs = std::filesystem;
using json = nlohmann::json;

const tensor_ref* model_files::find_ref(const std::string& name) const {
  auto it = by_name.find(name);
  return it == by_name.end() ? nullptr : &it->second;
}

std::optional<tensor_ref> model_files::find(const std::string& name) const {
  const tensor_ref* r = find_ref(name);
  if (r == nullptr) return std::nullopt;
  return *r;
}

tensor_ref model_files::at(const std::string& name) const {
  const tensor_ref* r = find_ref(name);
  if (r == nullptr) throw errors::invalid(path, name, "no such tensor in the model");
  return *r;
}

uint64_t model_files::total_tensor_bytes() const {
  uint64_t total = 0;
  for (const auto& s : shards)
    for (const auto& t : s.tensors()) total += t.n_bytes();
  return total;
}

namespace {

void add_shard_tensors(model_files& m, size_t shard) {
  const safetensors_file& f = m.shards[shard];
  for (const tensor_info& t : f.tensors()) {
    auto [it, inserted] = m.by_name.emplace(t.name, tensor_ref{&f, &t});
    if (!inserted)
      throw errors::invalid(m.path, t.name,
                            fmt::format("tensor is in two shards: {} and {}", it->second.file->path(), f.path()));
    m.tensor_names.push_back(t.name);
  }
}

void open_index(model_files& m) {
  const std::string label = m.index_path;
  json j = parse_json_bounded(read_text_file(m.index_path), label, "index");
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    throw errors::invalid(label, "", "index has no \"weight_map\" object");
  if (j.contains("metadata") && j["metadata"].is_object() && j["metadata"].contains("total_size")) {
    const json& ts = j["metadata"]["total_size"];
    if (ts.is_number_unsigned()) m.index_total_size = ts.get<uint64_t>();
    // some writers store it as a float: accept whole values below 2^64 (casting a larger double is UB)
    else if (ts.is_number_float() && ts.get<double>() >= 0 && ts.get<double>() < 18446744073709551616.0 &&
             ts.get<double>() == std::floor(ts.get<double>()))
      m.index_total_size = static_cast<uint64_t>(ts.get<double>());
    else
      throw errors::invalid(label, "", "metadata.total_size is not a non-negative integer");
  }
  std::map<std::string, std::string> weight_map;
  std::set<std::string> files;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string()) throw errors::invalid(label, it.key(), "weight_map value is not a file name");
    std::string file = it.value().get<std::string>();
    if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
      throw errors::invalid(label, it.key(),
                            fmt::format("weight_map names \"{}\", not a file in the model folder", file));
    weight_map.emplace(it.key(), file);
    files.insert(file);
  }
  // open every shard, in file name order
  for (const std::string& f : files) {
    m.shard_names.push_back(f);
    m.shards.emplace_back((fs::path(m.folder) / f).string());
  }
  for (size_t i = 0; i < m.shards.size(); ++i) add_shard_tensors(m, i);
  // the map and the shards must agree both ways
  for (const auto& [tensor, file] : weight_map) {
    const tensor_ref* r = m.find_ref(tensor);
    if (r == nullptr)
      throw errors::invalid(label, tensor,
                            fmt::format("weight_map puts the tensor in {}, which does not hold it", file));
    if (fs::path(r->file->path()).filename() != file)
      throw errors::invalid(label, tensor,
                            fmt::format("weight_map says {}, but the tensor is in {}", file, r->file->path()));
  }
  for (const std::string& name : m.tensor_names)
    if (!weight_map.count(name))
      throw errors::invalid(label, name,
                            fmt::format("tensor in {} is missing from weight_map", m.find_ref(name)->file->path()));
  if (m.index_total_size && *m.index_total_size != m.total_tensor_bytes())
    throw errors::invalid(label, "",
                          fmt::format("metadata.total_size is {} but the shards hold {} bytes of tensors",
                                      *m.index_total_size, m.total_tensor_bytes()));
}

}  // namespace

model_files open_model(const std::string& path) {
  model_files m;
  m.path = path;
  std::error_code ec;
  if (!fs::exists(path, ec)) throw errors::io(path, "no such file or folder");
  if (fs::is_directory(path, ec)) {
    m.folder = path;
    fs::path single = fs::path(path) / "model.safetensors";
    fs::path index = fs::path(path) / "model.safetensors.index.json";
    if (fs::exists(index, ec)) {
      m.index_path = index.string();
    } else if (fs::exists(single, ec)) {
      m.shard_names.push_back("model.safetensors");
    } else {
      throw errors::invalid(path, "", "folder has neither model.safetensors nor model.safetensors.index.json");
    }
  } else {
    fs::path p(path);
    m.folder = p.has_parent_path() ? p.parent_path().string() : ".";
    if (p.filename() == "model.safetensors.index.json") {
      m.index_path = path;
    } else {
      m.shard_names.push_back(p.filename().string());
    }
  }
  fs::path config = fs::path(m.folder) / "config.json";
  if (fs::exists(config, ec)) m.config_path = config.string();

  m.shards.reserve(64);
  if (!m.index_path.empty()) {
    open_index(m);
  } else {
    m.shards.emplace_back((fs::path(m.folder) / m.shard_names[0]).string());
    add_shard_tensors(m, 0);
  }
  return m;
}

namespace {

// The tree a model folder's symlinks may point into: the folder, or the
// repository folder of a Hugging Face cache snapshot (huggingface_hub's
// file_download.py: snapshots/<revision>/<file> links to ../../blobs/<etag>).
fs::path model_tree(const fs::path& folder) {
  if (folder.parent_path().filename() == "snapshots") return folder.parent_path().parent_path();
  return folder;
}

// Why the entry `path` is not copied, or "" when it is; `source` gets the
// file to read.
std::string copy_verdict(const fs::path& path, const fs::path& tree, std::string& source) {
  std::error_code ec;
  const fs::file_status link = fs::symlink_status(path, ec);
  if (ec) return "cannot be read";
  fs::path target = path;
  if (fs::is_symlink(link)) {
    target = fs::canonical(path, ec);
    if (ec) return "a broken symlink";
    if (!path_within(target, tree)) return "a symlink out of the model folder";
  }
  const fs::file_status st = fs::status(target, ec);
  if (ec) return "cannot be read";
  if (fs::is_directory(st)) return "a folder";
  if (!fs::is_regular_file(st)) return "not a regular file";
  source = target.string();
  return "";
}

}  // namespace

std::vector<folder_file> list_folder_files(const model_files& m) {
  std::error_code ec;
  const fs::path folder = fs::canonical(m.folder, ec);
  if (ec) throw errors::io(m.folder, "cannot reach the model folder", ec.value());
  const fs::path tree = model_tree(folder);
  const std::string index_name = m.index_path.empty() ? "" : fs::path(m.index_path).filename().string();
  std::vector<folder_file> files;
  for (const auto& entry : fs::directory_iterator(folder, ec)) {
    folder_file f;
    f.name = entry.path().filename().string();
    if (f.name == index_name || std::find(m.shard_names.begin(), m.shard_names.end(), f.name) != m.shard_names.end())
      continue;
    f.skip = copy_verdict(entry.path(), tree, f.source);
    files.push_back(std::move(f));
  }
  if (ec) throw errors::io(m.folder, "cannot list the model folder", ec.value());
  std::sort(files.begin(), files.end(), [](const folder_file& a, const folder_file& b) { return a.name < b.name; });
  return files;
}

std::string make_safetensors_index(uint64_t total_size, const std::map<std::string, std::string>& weight_map) {
  json j;
  j["metadata"] = {{"total_size", total_size}};
  json wm = json::object();
  for (const auto& [k, v] : weight_map) wm[k] = v;
  j["weight_map"] = std::move(wm);
  return j.dump(2) + "\n";
}

}  // namespace lora
