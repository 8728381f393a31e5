#include "core/mlx-format.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include <fmt/format.h>

#include "core/adapter.h"
#include "core/dtype.h"
#include "formats/error.h"
#include "formats/mlx-config.h"

namespace lora::mlx {

namespace fs = std::filesystem;

bool is_lora_key(std::string_view key) noexcept { return key.ends_with(a_suffix) || key.ends_with(b_suffix); }

bool is_adapter(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec))
    return fs::exists(fs::path(path) / weights_name, ec) &&
           !fs::exists(fs::path(path) / "adapter_model.safetensors", ec);
  if (!fs::is_regular_file(path, ec)) return false;
  safetensors_file f(path);
  for (const tensor_info& t : f.tensors())
    if (is_lora_key(t.name)) return true;
  return false;
}

namespace {

// The config, LoRA only.
mlx_adapter_config read_config(const adapter_files& files) {
  if (files.config.empty())
    throw errors::invalid(files.weights, "",
                          "MLX LoRA weights without adapter_config.json beside them (lora_parameters.scale unknown)");
  const mlx_adapter_config cfg = parse_mlx_adapter_config(read_text_file(files.config), files.config);
  if (cfg.use_dora || cfg.fine_tune_type == "dora")
    throw errors::invalid(files.config, "fine_tune_type", "an MLX DoRA adapter: only LoRA adapters are converted");
  if (!cfg.fine_tune_type.empty() && cfg.fine_tune_type != "lora")
    throw errors::invalid(files.config, "fine_tune_type",
                          fmt::format("\"{}\": only LoRA adapters are converted", cfg.fine_tune_type));
  return cfg;
}

using ab_pair = std::pair<const tensor_info*, const tensor_info*>;

// Every key into lora_a / lora_b of a module.
std::map<std::string, ab_pair> group_keys(const safetensors_file& f, const std::string& label) {
  std::map<std::string, ab_pair> by_module;
  for (const tensor_info& t : f.tensors()) {
    if (t.name.ends_with(a_suffix) && t.name.size() > a_suffix.size())
      by_module[t.name.substr(0, t.name.size() - a_suffix.size())].first = &t;
    else if (t.name.ends_with(b_suffix) && t.name.size() > b_suffix.size())
      by_module[t.name.substr(0, t.name.size() - b_suffix.size())].second = &t;
    else if (t.name.ends_with(".m"))
      throw errors::invalid(label, t.name, "DoRA magnitude (.m): MLX DoRA adapters are not converted");
    else
      throw errors::invalid(label, t.name,
                            "unknown key in an MLX LoRA adapter (expected <module>.lora_a and <module>.lora_b)");
  }
  if (by_module.empty()) throw errors::invalid(label, "", "holds no lora_a / lora_b tensors");
  return by_module;
}

// Linear or embedding: the base's shape decides, else the name.
module_kind kind_of(const std::string& name, const tensor_info& la, int64_t in, int64_t out, const std::string& label,
                    const model_files* base) {
  static const std::set<std::string> embedding_names = {"embed_tokens", "wte", "word_embeddings", "tok_embeddings",
                                                        "embed_in"};
  const std::string last = name.substr(name.rfind('.') == std::string::npos ? 0 : name.rfind('.') + 1);
  module_kind kind = embedding_names.count(last) ? module_kind::embedding : module_kind::linear;
  if (base == nullptr) return kind;
  const tensor_ref* w = base->find_ref(name + ".weight");
  if (w == nullptr)
    throw fit_error(label, base->path,
                    {{{la.name, fmt::format("the base has no tensor {}.weight", name), fit_issue::no_base_tensor}}});
  const std::vector<int64_t> linear{out, in}, embedding{in, out};
  if (w->info->shape == linear && w->info->shape != embedding) return module_kind::linear;
  if (w->info->shape == embedding && w->info->shape != linear) return module_kind::embedding;
  if (w->info->shape != linear)
    throw fit_error(
        label, base->path,
        {{{la.name,
           fmt::format("base {}.weight is {}, the LoRA makes {}", name, shape_text(w->info->shape), shape_text(linear)),
           fit_issue::shape}}});
  return kind;
}

// t^T, element by element (no rounding).
tensor_data transposed(const safetensors_file& file, const tensor_info& t) {
  const int64_t rows = t.shape[0], cols = t.shape[1];
  const size_t es = static_cast<size_t>(dtype_bits(t.type) / 8);
  std::span<const uint8_t> src = file.data(t);
  tensor_data d;
  d.type = t.type;
  d.shape = {cols, rows};
  d.bytes.resize(src.size());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      std::copy_n(src.data() + (i * cols + j) * es, es, d.bytes.data() + (j * rows + i) * es);
  return d;
}

}  // namespace

adapter_data load(const std::string& path, const model_files* base) {
  const adapter_files files = find_adapter_files(path);
  const std::string& label = files.weights;
  const mlx_adapter_config cfg = read_config(files);
  safetensors_file f(files.weights);

  adapter_data d;
  d.format = adapter_format::peft;
  d.metadata = metadata_map{{"format", "pt"}};
  for (const auto& [name, pair] : group_keys(f, label)) {
    const auto [la, lb] = pair;
    if (!la) throw errors::invalid(label, lb->name, "lora_b without its lora_a");
    if (!lb) throw errors::invalid(label, la->name, "lora_a without its lora_b");
    if (la->shape.size() != 2 || lb->shape.size() != 2)
      throw errors::invalid(
          label, la->name,
          fmt::format("lora_a {} and lora_b {}: expected [in, r] and [r, out] (switch / MoE LoRA is not converted)",
                      shape_text(la->shape), shape_text(lb->shape)));
    const int64_t in = la->shape[0], r = la->shape[1], out = lb->shape[1];
    if (lb->shape[0] != r)
      throw errors::invalid(label, lb->name,
                            fmt::format("rank disagrees: lora_a is {} (rank {}), lora_b is {} (rank {})",
                                        shape_text(la->shape), r, shape_text(lb->shape), lb->shape[0]));
    if (r <= 0) throw errors::invalid(label, la->name, "rank 0");
    if (cfg.rank && *cfg.rank != r)
      throw errors::invalid(
          label, la->name,
          fmt::format("rank {} from the shapes, but {} says lora_parameters.rank = {}", r, files.config, *cfg.rank));
    for (const tensor_info* t : {la, lb})
      if (!dtype_is_math(t->type))
        throw errors::invalid(label, t->name, fmt::format("dtype {} is not a float type", dtype_name(t->type)));

    module_data m;
    m.name = name;
    m.kind = kind_of(name, *la, in, out, label, base);
    m.a = transposed(f, *la);  // A = lora_a^T [r, in]
    m.b = transposed(f, *lb);  // B = lora_b^T [out, r]
    m.rank = r;
    m.alpha = alpha_for_scale(cfg.scale, r, false);  // scale = alpha / r
    d.modules.push_back(std::move(m));
  }
  d.config.peft_type = "LORA";
  d.config.target_modules = sorted_names(d.modules);
  d.config.base_model_name_or_path = cfg.model;
  d.config.task_type = "CAUSAL_LM";
  return d;
}

}  // namespace lora::mlx
