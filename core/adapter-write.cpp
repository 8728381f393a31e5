#include "core/adapter-write.h"

#include <filesystem>
#include <map>

#include <fmt/format.h>

#include "core/kohya-format.h"
#include "core/peft-format.h"
#include "formats/error.h"
#include "formats/staged-folder.h"

namespace lora {

namespace fs = std::filesystem;

namespace {

// Writes one safetensors file (atomic by itself: temp + rename).
void write_tensors(const std::string& path, const keyed_tensors& f, const std::optional<metadata_map>& metadata) {
  safetensors_writer w(path, plan_safetensors(f.specs, metadata));
  for (const auto& [key, t] : f.data) w.write(key, t->bytes);
  w.commit();
}

// Every module of `data` has, read back from `folder`, the rank and scale it asked for.
bool config_reads_back(const adapter_data& data, const std::string& folder) {
  adapter back = load_adapter(folder);
  std::map<std::string, const lora_module*> by_name;
  for (const lora_module& m : back.modules) by_name[m.name] = &m;
  for (const module_data& m : data.modules) {
    auto it = by_name.find(m.name);
    if (it == by_name.end()) return false;
    const double want = lora_scale(m.alpha, m.rank, data.use_rslora);
    if (it->second->rank != m.rank || it->second->scale != want) return false;
  }
  return true;
}

// A PEFT folder in the staging folder `dir`: weights, config, and the config
// read back (a plain module path in a pattern is a regex, and could also match
// another module: escape the dots when that happens).
void write_peft_folder(const adapter_data& data, const keyed_tensors& f, const std::string& dir) {
  write_tensors(dir + "/" + std::string(peft::weights_name), f, data.metadata.value_or(metadata_map{{"format", "pt"}}));
  const std::string config_path = dir + "/" + std::string(peft::config_name);
  peft_config config = peft::make_config(data);
  write_file_atomic(config_path, render_peft_config(config));
  if (config_reads_back(data, dir)) return;
  for (auto& [k, v] : config.rank_pattern) k = peft::exact_pattern(k);
  for (auto& [k, v] : config.alpha_pattern) k = peft::exact_pattern(k);
  write_file_atomic(config_path, render_peft_config(config));
  if (!config_reads_back(data, dir))
    throw errors::invalid(config_path, "",
                          "internal: the written config does not give every module its rank and scale");
}

}  // namespace

void write_adapter(const adapter_data& data, const std::string& out_arg, bool force) {
  fs::path out(out_arg);
  while (out.has_relative_path() && !out.has_filename()) out = out.parent_path();  // "dir/" -> "dir"
  std::error_code ec;
  const bool exists = fs::exists(fs::symlink_status(out, ec));
  if (exists && !force)
    throw errors::usage(fmt::format("output {} already exists (--force replaces it)", out.string()));

  // kohya: one file, atomic by itself
  if (data.format == adapter_format::kohya) {
    keyed_tensors f = kohya::tensors(data, out.string());
    if (exists && fs::is_directory(out, ec))
      throw errors::usage(fmt::format("output {} is a folder; a kohya adapter is one .safetensors file", out.string()));
    write_tensors(out.string(), f, data.metadata);
    return;
  }

  // PEFT: both files into a temp folder beside --out, renamed onto --out
  // (swapped with the old one under --force)
  keyed_tensors f = peft::tensors(data, out.string());
  staged_folder tmp(out);
  try {
    write_peft_folder(data, f, tmp.path());
  } catch (const error& e) {
    throw tmp.shown(e);  // name the output, not the temp folder about to be removed
  }
  tmp.commit(exists);
}

}  // namespace lora
