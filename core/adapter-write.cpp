#include "core/adapter-write.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/adapter-names.h"
#include "formats/error.h"
#include "formats/staged-folder.h"

namespace lora {

namespace fs = std::filesystem;

namespace {

// The most common value; ties go to the smaller one.
template <typename T>
T most_common(const std::vector<T>& values) {
  std::map<T, size_t> count;
  for (const T& v : values) ++count[v];
  T best = count.begin()->first;
  size_t best_n = 0;
  for (const auto& [v, n] : count)
    if (n > best_n) best = v, best_n = n;
  return best;
}

// A rank_pattern / alpha_pattern key that matches exactly this module path
// under PEFT's rule ^(.*\.)?(KEY)$: the path with its dots escaped.
std::string exact_pattern(const std::string& path) {
  std::string out;
  for (char c : path) {
    if (c == '.') out += '\\';
    out += c;
  }
  return out;
}

void check_bytes(const tensor_data& t, const std::string& key, const std::string& label) {
  uint64_t n = 1;
  for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
  std::optional<uint64_t> want = dtype_bytes(t.type, n);
  if (!want || *want != t.bytes.size())
    throw errors::invalid(
        label, key, fmt::format("internal: {} bytes for {} elements of {}", t.bytes.size(), n, dtype_name(t.type)));
}

// The tensors of one file, by key.
struct file_tensors {
  std::vector<tensor_spec> specs;
  std::map<std::string, const tensor_data*> data;
  std::vector<std::unique_ptr<tensor_data>> owned;  // alpha scalars

  void add(const std::string& key, const tensor_data& t, const std::string& label) {
    check_bytes(t, key, label);
    if (!data.emplace(key, &t).second) throw errors::invalid(label, key, "two tensors with this key");
    specs.push_back({key, t.type, t.shape});
  }
};

file_tensors peft_tensors(const adapter_data& d, const std::string& label) {
  file_tensors f;
  for (const module_data& m : d.modules) {
    const std::string p = std::string(peft_prefix) + m.name;
    if (m.kind == module_kind::embedding) {
      f.add(p + ".lora_embedding_A", m.a, label);
      f.add(p + ".lora_embedding_B", m.b, label);
    } else {
      f.add(p + ".lora_A.weight", m.a, label);
      f.add(p + ".lora_B.weight", m.b, label);
    }
    if (m.magnitude) f.add(p + ".lora_magnitude_vector", *m.magnitude, label);
    if (m.bias) f.add(p + ".lora_B.bias", *m.bias, label);
  }
  for (const saved_data& s : d.saved) f.add(std::string(peft_prefix) + s.target, s.tensor, label);
  return f;
}

file_tensors kohya_tensors(const adapter_data& d, const std::string& label) {
  file_tensors f;
  if (d.use_rslora) throw errors::invalid(label, "", "internal: kohya files have no rsLoRA (convert the alphas first)");
  if (!d.saved.empty())
    throw errors::invalid(label, d.saved.front().target, "kohya files cannot hold modules_to_save tensors");
  for (const module_data& m : d.modules) {
    if (m.kind == module_kind::embedding)
      throw errors::invalid(label, m.name, "kohya files cannot hold an embedding LoRA (lora_embedding_A/B)");
    if (m.magnitude) throw errors::invalid(label, m.name, "kohya files cannot hold DoRA (lora_magnitude_vector)");
    if (m.bias) throw errors::invalid(label, m.name, "kohya files cannot hold a LoRA bias (lora_B.bias)");
    const std::string k = kohya_module_name(m.name, d.kohya_prefix);
    f.add(k + ".lora_down.weight", m.a, label);
    f.add(k + ".lora_up.weight", m.b, label);
    // alpha: a scalar; f32 when it holds the value exactly, else f64
    auto alpha = std::make_unique<tensor_data>();
    const float a32 = static_cast<float>(m.alpha);
    if (static_cast<double>(a32) == m.alpha) {
      alpha->type = dtype::F32;
      alpha->bytes.resize(4);
      std::memcpy(alpha->bytes.data(), &a32, 4);
    } else {
      alpha->type = dtype::F64;
      alpha->bytes.resize(8);
      std::memcpy(alpha->bytes.data(), &m.alpha, 8);
    }
    f.add(k + ".alpha", *alpha, label);
    f.owned.push_back(std::move(alpha));
  }
  return f;
}

// Writes one safetensors file (atomic by itself: temp + rename).
void write_tensors(const std::string& path, const file_tensors& f, const std::optional<metadata_map>& metadata) {
  safetensors_writer w(path, plan_safetensors(f.specs, metadata));
  for (const auto& [key, t] : f.data) w.write(key, t->bytes);
  w.commit();
}

// Every module of `written` has the rank and scale `data` asked for.
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

}  // namespace

peft_config make_peft_config(const adapter_data& data) {
  peft_config c = data.config;
  if (c.peft_type.empty()) c.peft_type = "LORA";
  c.use_rslora = data.use_rslora;
  c.use_dora = false;
  c.lora_bias = false;
  c.rank_pattern.clear();
  c.alpha_pattern.clear();
  if (data.modules.empty()) return c;

  // the most common rank and alpha are the defaults; the rest go to patterns
  std::vector<int64_t> ranks;
  std::vector<double> alphas;
  for (const module_data& m : data.modules) {
    ranks.push_back(m.rank);
    alphas.push_back(m.alpha);
    c.use_dora = c.use_dora || m.magnitude.has_value();
    c.lora_bias = c.lora_bias || m.bias.has_value();
  }
  c.r = most_common(ranks);
  c.lora_alpha = most_common(alphas);
  for (const module_data& m : data.modules) {
    if (m.rank != *c.r) c.rank_pattern.emplace_back(m.name, m.rank);
    if (m.alpha != *c.lora_alpha) c.alpha_pattern.emplace_back(m.name, m.alpha);
  }
  return c;
}

void write_adapter(const adapter_data& data, const std::string& out_arg, bool force) {
  fs::path out(out_arg);
  while (out.has_relative_path() && !out.has_filename()) out = out.parent_path();  // "dir/" -> "dir"
  std::error_code ec;
  const bool exists = fs::exists(fs::symlink_status(out, ec));
  if (exists && !force)
    throw errors::usage(fmt::format("output {} already exists (--force replaces it)", out.string()));

  // kohya: one file, atomic by itself
  if (data.format == adapter_format::kohya) {
    file_tensors f = kohya_tensors(data, out.string());
    if (exists && fs::is_directory(out, ec))
      throw errors::usage(fmt::format("output {} is a folder; a kohya adapter is one .safetensors file", out.string()));
    write_tensors(out.string(), f, data.metadata);
    return;
  }

  // PEFT: both files into a temp folder beside --out
  file_tensors f = peft_tensors(data, out.string());
  metadata_map metadata = data.metadata.value_or(metadata_map{{"format", "pt"}});
  staged_folder tmp(out);
  try {
    write_tensors(tmp.path() + "/adapter_model.safetensors", f, metadata);
    const std::string config_path = tmp.path() + "/adapter_config.json";
    peft_config config = make_peft_config(data);
    write_file_atomic(config_path, render_peft_config(config));

    // read it back: a plain module path in a pattern is a regex, and could
    // also match another module; escape the dots when that happens
    if (!config_reads_back(data, tmp.path())) {
      for (auto& [k, v] : config.rank_pattern) k = exact_pattern(k);
      for (auto& [k, v] : config.alpha_pattern) k = exact_pattern(k);
      write_file_atomic(config_path, render_peft_config(config));
      if (!config_reads_back(data, tmp.path()))
        throw errors::invalid(config_path, "",
                              "internal: the written config does not give every module its rank and scale");
    }
  } catch (const error& e) {
    throw tmp.shown(e);  // name the output, not the temp folder about to be removed
  }

  // rename onto --out (swapped with the old one under --force)
  tmp.commit(exists);
}

}  // namespace lora
