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

std::string model_files::file_tensor_name(size_t shard, const std::string& name) const {
  const std::string& prefix = shard < shard_prefixes.size() ? shard_prefixes[shard] : std::string();
  return name.starts_with(prefix) ? name.substr(prefix.size()) : name;
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
  const std::string& prefix = m.shard_prefixes[shard];
  for (const tensor_info& t : f.tensors()) {
    std::string name = prefix + t.name;
    auto [it, inserted] = m.by_name.emplace(name, tensor_ref{&f, &t});
    if (!inserted)
      throw errors::invalid(m.path, name,
                            fmt::format("tensor is in two shards: {} and {}", it->second.file->path(), f.path()));
    m.tensor_names.push_back(std::move(name));
  }
}

// Opens one weights file `name` of the folder `sub` ("" or "unet/") of m.
void add_shard(model_files& m, const std::string& sub, const std::string& name, const std::string& prefix) {
  if (m.shards.size() == m.shards.capacity()) {
    // by_name points into the shards: grow, then point again
    m.shards.reserve(2 * m.shards.capacity() + 64);
    for (size_t i = 0; i < m.shards.size(); ++i)
      for (const tensor_info& t : m.shards[i].tensors()) m.by_name[m.shard_prefixes[i] + t.name] = {&m.shards[i], &t};
  }
  m.shard_names.push_back(sub + name);
  m.shard_prefixes.push_back(prefix);
  m.shards.emplace_back((fs::path(m.folder) / (sub + name)).string());
  add_shard_tensors(m, m.shards.size() - 1);
}

// Opens the shards an index lists: `index_path` in the folder `sub` ("" or
// "unet/") of m, tensors named with `prefix`; returns total_size when given.
std::optional<uint64_t> open_index(model_files& m, const std::string& index_path, const std::string& sub,
                                   const std::string& prefix) {
  const std::string label = index_path;
  std::optional<uint64_t> index_total_size;
  const size_t first_shard = m.shards.size(), first_tensor = m.tensor_names.size();
  json j = parse_json_bounded(read_text_file(index_path), label, "index");
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    throw errors::invalid(label, "", "index has no \"weight_map\" object");
  if (j.contains("metadata") && j["metadata"].is_object() && j["metadata"].contains("total_size")) {
    const json& ts = j["metadata"]["total_size"];
    if (ts.is_number_unsigned()) index_total_size = ts.get<uint64_t>();
    // some writers store it as a float: accept whole values below 2^64 (casting a larger double is UB)
    else if (ts.is_number_float() && ts.get<double>() >= 0 && ts.get<double>() < 18446744073709551616.0 &&
             ts.get<double>() == std::floor(ts.get<double>()))
      index_total_size = static_cast<uint64_t>(ts.get<double>());
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
  for (const std::string& f : files) add_shard(m, sub, f, prefix);
  // the map and the shards must agree both ways
  for (const auto& [tensor, file] : weight_map) {
    const tensor_ref* r = m.find_ref(prefix + tensor);
    if (r == nullptr)
      throw errors::invalid(label, tensor,
                            fmt::format("weight_map puts the tensor in {}, which does not hold it", file));
    if (fs::path(r->file->path()).filename() != file)
      throw errors::invalid(label, tensor,
                            fmt::format("weight_map says {}, but the tensor is in {}", file, r->file->path()));
  }
  for (size_t i = first_tensor; i < m.tensor_names.size(); ++i) {
    const std::string& name = m.tensor_names[i];
    if (!weight_map.count(name.substr(prefix.size())))
      throw errors::invalid(label, name.substr(prefix.size()),
                            fmt::format("tensor in {} is missing from weight_map", m.find_ref(name)->file->path()));
  }
  uint64_t held = 0;
  for (size_t s = first_shard; s < m.shards.size(); ++s)
    for (const auto& t : m.shards[s].tensors()) held += t.n_bytes();
  if (index_total_size && *index_total_size != held)
    throw errors::invalid(
        label, "",
        fmt::format("metadata.total_size is {} but the shards hold {} bytes of tensors", *index_total_size, held));
  return index_total_size;
}

// The weights of a pipeline component folder, in diffusers' names first
// (diffusers utils/constants.py SAFE_WEIGHTS_INDEX_NAME,
// SAFETENSORS_WEIGHTS_NAME), then transformers' (model.safetensors.index.json,
// model.safetensors: the text encoders). Returns {index, file}, one of them
// set; both empty: the folder holds no safetensors weights.
std::pair<std::string, std::string> component_weights(const fs::path& dir) {
  std::error_code ec;
  for (const char* stem : {"diffusion_pytorch_model", "model"}) {
    const std::string index = std::string(stem) + ".safetensors.index.json";
    const std::string file = std::string(stem) + ".safetensors";
    if (fs::is_regular_file(dir / index, ec)) return {index, ""};
    if (fs::is_regular_file(dir / file, ec)) return {"", file};
  }
  return {};
}

// The tree a model folder's symlinks may point into: the folder, or the
// repository folder of a Hugging Face cache snapshot (huggingface_hub's
// file_download.py: snapshots/<revision>/<file> links to ../../blobs/<etag>).
fs::path model_tree(const fs::path& folder) {
  if (folder.parent_path().filename() == "snapshots") return folder.parent_path().parent_path();
  return folder;
}

// True for a model_index.json class that has no weights of its own: a
// scheduler (diffusers' *Scheduler), a tokenizer (transformers'
// *Tokenizer[Fast]), a feature extractor or image / video processor. Every
// other class is taken for a model (UNet2DConditionModel, CLIPTextModel,
// AutoencoderKL, a safety checker...): its folder must be there.
bool weightless_class(const std::string& cls) {
  for (const char* part : {"Scheduler", "Tokenizer", "FeatureExtractor", "Processor"})
    if (cls.find(part) != std::string::npos) return true;
  return false;
}

// model_index.json against the folder. It is a JSON object (diffusers
// configuration_utils.py reads it as a dict); keys starting with "_" are
// metadata ("_class_name", "_diffusers_version"); a value
// [library, class] with both non-null names a component, and
// [null, null] an optional component that is absent (pipeline_utils.py
// from_pretrained, load_module: `value[0] is None` is not loaded;
// huggingface/diffusers commit 58eb52c0). Every listed component folder must
// be a real folder of the pipeline (a linked one would be left out of a
// merged pipeline, and links out of the model's tree are never followed),
// and a model's folder must exist and hold safetensors weights. Throws
// lora::error (exit 3) naming model_index.json and the component.
void check_model_index(const model_files& m) {
  const std::string& label = m.pipeline_index_path;
  std::error_code ec;
  if (!fs::is_regular_file(label, ec))
    throw errors::invalid(label, "", "model_index.json is not a regular file");
  const json j = parse_json_bounded(read_text_file(label), label, "model_index.json");
  if (!j.is_object())
    throw errors::invalid(label, "", fmt::format("model_index.json is a JSON {}, not an object", j.type_name()));
  const fs::path root = fs::canonical(m.folder, ec);
  if (ec) throw errors::io(m.folder, "cannot reach the pipeline folder", ec.value());
  const fs::path tree = model_tree(root);
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    if (name.starts_with("_")) continue;
    const json& v = it.value();
    if (!v.is_array() || v.size() != 2 || !v[0].is_string() || !v[1].is_string()) continue;  // a setting, or absent
    const std::string cls = v[1].get<std::string>();
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..")
      throw errors::invalid(label, name, "model_index.json names a component that is not a folder name");
    const fs::path dir = fs::path(m.folder) / name;
    const fs::file_status link = fs::symlink_status(dir, ec);
    if (!fs::exists(link)) {
      if (weightless_class(cls)) continue;
      throw errors::invalid(label, "",
                            fmt::format("model_index.json lists {} ({}), but {}/ is missing", name, cls, name));
    }
    if (fs::is_symlink(link)) {
      const fs::path target = fs::canonical(dir, ec);
      throw errors::invalid(
          label, "",
          fmt::format("model_index.json lists {}, but {}/ is a symlink {}: a merged pipeline must be complete; "
                      "copy the folder into the pipeline",
                      name, name,
                      ec ? std::string("that is broken")
                         : path_within(target, tree) ? fmt::format("to {}, which is not followed", target.string())
                                                     : fmt::format("out of the pipeline folder (to {})", target.string())));
    }
    if (!fs::is_directory(link))
      throw errors::invalid(label, "", fmt::format("model_index.json lists {}, but {} is not a folder", name, name));
    if (weightless_class(cls)) continue;
    const bool held = std::any_of(m.components.begin(), m.components.end(),
                                  [&name](const model_component& c) { return c.name == name; });
    if (!held)
      throw errors::invalid(label, "",
                            fmt::format("model_index.json lists {} ({}), but {}/ holds no safetensors weights "
                                        "(diffusion_pytorch_model.safetensors, model.safetensors or their .index.json)",
                                        name, cls, name));
  }
}

// A diffusers pipeline: every real sub-folder with safetensors weights is a
// component, opened as a model folder; tensors named "<component>.<name>".
// model_index.json is checked against the folders (check_model_index).
void open_pipeline(model_files& m) {
  std::error_code ec;
  std::vector<std::string> dirs;
  for (const auto& entry : fs::directory_iterator(m.folder, ec))
    if (entry.is_directory(ec) && !entry.is_symlink(ec)) dirs.push_back(entry.path().filename().string());
  if (ec) throw errors::io(m.folder, "cannot list the pipeline folder", ec.value());
  std::sort(dirs.begin(), dirs.end());
  for (const std::string& dir : dirs) {
    const auto [index, file] = component_weights(fs::path(m.folder) / dir);
    if (index.empty() && file.empty()) continue;
    model_component c{dir, index, m.shards.size(), 0};
    if (!index.empty())
      open_index(m, (fs::path(m.folder) / dir / index).string(), dir + "/", dir + ".");
    else
      add_shard(m, dir + "/", file, dir + ".");
    c.n_shards = m.shards.size() - c.first_shard;
    m.components.push_back(std::move(c));
  }
  if (m.components.empty())
    throw errors::invalid(m.pipeline_index_path, "",
                          "a diffusers pipeline without any component holding safetensors weights "
                          "(diffusion_pytorch_model.safetensors, model.safetensors or their .index.json)");
  check_model_index(m);
}

}  // namespace

model_files open_model(const std::string& path) {
  model_files m;
  m.path = path;
  std::error_code ec;
  if (!fs::exists(path, ec)) throw errors::io(path, "no such file or folder");
  if (fs::is_directory(path, ec) && fs::exists(fs::path(path) / "model_index.json", ec)) {
    m.folder = path;
    m.pipeline_index_path = (fs::path(path) / "model_index.json").string();
    open_pipeline(m);
    return m;
  }
  if (fs::is_directory(path, ec)) {
    m.folder = path;
    fs::path single = fs::path(path) / "model.safetensors";
    fs::path index = fs::path(path) / "model.safetensors.index.json";
    // a diffusers component folder (unet/, vae/...) is a model folder too
    const auto [component_index, component_file] = component_weights(path);
    if (fs::exists(index, ec)) {
      m.index_path = index.string();
    } else if (fs::exists(single, ec)) {
      m.shard_names.push_back("model.safetensors");
    } else if (!component_index.empty()) {
      m.index_path = (fs::path(path) / component_index).string();
    } else if (!component_file.empty()) {
      m.shard_names.push_back(component_file);
    } else {
      throw errors::invalid(path, "",
                            "folder has neither model.safetensors, diffusion_pytorch_model.safetensors nor their "
                            ".safetensors.index.json (a diffusers pipeline has model_index.json)");
    }
  } else {
    fs::path p(path);
    m.folder = p.has_parent_path() ? p.parent_path().string() : ".";
    if (p.filename().string().ends_with(".safetensors.index.json")) {
      m.index_path = path;
    } else {
      m.shard_names.push_back(p.filename().string());
    }
  }
  fs::path config = fs::path(m.folder) / "config.json";
  if (fs::exists(config, ec)) m.config_path = config.string();

  if (!m.index_path.empty()) {
    m.shard_names.clear();
    m.index_total_size = open_index(m, m.index_path, "", "");
  } else {
    const std::string name = m.shard_names[0];
    m.shard_names.clear();
    add_shard(m, "", name, "");
  }
  return m;
}

namespace {

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

std::vector<folder_file> list_pipeline_files(const model_files& m, std::vector<std::string>& folders) {
  std::error_code ec;
  const fs::path root = fs::canonical(m.folder, ec);
  if (ec) throw errors::io(m.folder, "cannot reach the pipeline folder", ec.value());
  const fs::path tree = model_tree(root);
  std::set<std::string> weights(m.shard_names.begin(), m.shard_names.end()), needed;
  for (const model_component& c : m.components) {
    if (!c.index_name.empty()) weights.insert(c.name + "/" + c.index_name);
    needed.insert(c.name);
  }
  std::vector<folder_file> files;
  // one folder's entries, named `sub` + their name; sub-folders of the top are listed in turn
  auto list = [&](const fs::path& dir, const std::string& sub, auto& self) -> void {
    std::error_code lec;
    for (const auto& entry : fs::directory_iterator(dir, lec)) {
      folder_file f;
      f.name = sub + entry.path().filename().string();
      if (weights.count(f.name)) continue;
      if (sub.empty() && entry.is_directory(lec) && !entry.is_symlink(lec)) {
        self(entry.path(), f.name + "/", self);
        continue;
      }
      f.skip = copy_verdict(entry.path(), tree, f.source);
      if (f.skip.empty()) needed.insert(sub.empty() ? std::string() : sub.substr(0, sub.size() - 1));
      files.push_back(std::move(f));
    }
    if (lec) throw errors::io(dir.string(), "cannot list the pipeline folder", lec.value());
  };
  list(root, "", list);
  needed.erase(std::string());
  folders.assign(needed.begin(), needed.end());
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
