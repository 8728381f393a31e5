#include "core/kohya-format.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/dtype.h"
#include "formats/error.h"

namespace lora::kohya {

std::string_view prefix_of(std::string_view name) noexcept {
  for (std::string_view p : prefixes)
    if (name.starts_with(p)) return p;
  return {};
}

std::string module_name(const std::string& path, const std::string& prefix) {
  if (!prefix_of(path).empty()) return path;
  std::string out = prefix + path;
  std::replace(out.begin() + static_cast<std::ptrdiff_t>(prefix.size()), out.end(), '.', '_');
  return out;
}

std::string auto_prefix(const std::vector<std::string>& module_paths) {
  static const std::set<std::string, std::less<>> unet_roots = {
      "down_blocks",     "up_blocks",        "mid_block",          "conv_in",
      "conv_out",        "time_embedding",   "add_embedding",      "input_blocks",
      "middle_block",    "output_blocks",    "transformer_blocks", "single_transformer_blocks",
      "time_text_embed", "context_embedder", "x_embedder",         "proj_out",
      "norm_out",        "conv_norm_out",    "diffusion_model"};
  for (const std::string& path : module_paths) {
    const std::string_view root = std::string_view(path).substr(0, path.find('.'));
    if (unet_roots.count(root) || path.find("diffusion_model.") != std::string::npos) return "lora_unet_";
  }
  return "lora_te_";
}

std::string resolve_prefix(const std::string& option, const std::vector<std::string>& module_paths) {
  if (option.empty() || option == "auto") return auto_prefix(module_paths);
  if (std::find(std::begin(prefixes), std::end(prefixes), option) == std::end(prefixes))
    throw errors::usage(fmt::format("--kohya-prefix {} is not one of auto, {}", option, fmt::join(prefixes, ", ")));
  return option;
}

std::string_view checkpoint_family_name(checkpoint_family f) noexcept {
  switch (f) {
    case checkpoint_family::sd1: return "sd1";
    case checkpoint_family::sdxl: return "sdxl";
    case checkpoint_family::flux: return "flux";
    case checkpoint_family::diffusers: return "diffusers";
    case checkpoint_family::other: break;
  }
  return "other";
}

checkpoint_family detect_checkpoint_family(const std::vector<std::string>& tensor_names) {
  bool ldm_unet = false, sd1_te = false, sgm_te = false, bfl = false;
  for (const std::string& n : tensor_names) {
    std::string_view v = n;
    if (v.starts_with("conditioner.embedders.")) sgm_te = true;
    if (v.starts_with("cond_stage_model.")) sd1_te = true;
    if (v.starts_with("model.diffusion_model.")) {
      v.remove_prefix(std::string_view("model.diffusion_model.").size());
      if (v.starts_with("input_blocks.") || v.starts_with("middle_block.") || v.starts_with("output_blocks."))
        ldm_unet = true;
    }
    if (v.starts_with("double_blocks.") || v.starts_with("single_blocks.")) bfl = true;
  }
  if (bfl) return checkpoint_family::flux;
  if (sgm_te) return checkpoint_family::sdxl;
  if (sd1_te || ldm_unet) return checkpoint_family::sd1;
  return checkpoint_family::other;
}

std::string checkpoint_name(const std::string& path, checkpoint_family family, const std::string& label) {
  for (const container& c : containers) {
    if (c.family != family || !path.starts_with(c.base)) continue;
    std::string rest = path.substr(c.base.size());
    if (c.rename != nullptr) rest = c.rename(rest);
    if (rest.empty())
      throw errors::invalid(label, path,
                            fmt::format("--format kohya: the {} module {} has no name in the layout sd-scripts uses "
                                        "for it (diffusers names for an SD 1.x UNet)",
                                        checkpoint_family_name(family), path));
    return module_name(rest, std::string(c.kohya));
  }
  return {};
}

bool is_lora_key(std::string_view key) noexcept {
  return key.find(".lora_down.") != std::string_view::npos || key.find(".lora_up.") != std::string_view::npos;
}

// alpha is a scalar of any float dtype.
double read_alpha(const safetensors_file& f, const tensor_info& t) {
  if (t.n_elements != 1)
    throw errors::invalid(f.path(), t.name, fmt::format("alpha must be a scalar, found shape {}", shape_text(t.shape)));
  if (!dtype_is_math(t.type))
    throw errors::invalid(f.path(), t.name, fmt::format("alpha must be a float, found dtype {}", dtype_name(t.type)));
  double v = 0;
  to_f64(t.type, f.data(t), std::span<double>(&v, 1));
  if (!std::isfinite(v)) throw errors::invalid(f.path(), t.name, "alpha is not finite");
  return v;
}

namespace {

// The tensors of one module, by role.
struct parts {
  const tensor_info* down = nullptr;
  const tensor_info* up = nullptr;
  const tensor_info* alpha = nullptr;
  const tensor_info* dora_scale = nullptr;
};

// Sorts every key of the file into down / up / alpha of a module.
std::map<std::string, parts> group_keys(const safetensors_file& f, const std::string& label) {
  std::map<std::string, parts> by_module;
  for (const tensor_info& t : f.tensors()) {
    std::string_view key = t.name;
    const std::string_view prefix = prefix_of(key);
    if (prefix.empty() || key.size() == prefix.size())
      throw errors::invalid(label, t.name,
                            fmt::format("kohya key without a known prefix ({})", fmt::join(prefixes, ", ")));
    const tensor_info** slot = nullptr;
    std::string module;
    auto take = [&](std::string_view suffix) {
      if (!key.ends_with(suffix) || key.size() == suffix.size()) return false;
      module = std::string(key.substr(0, key.size() - suffix.size()));
      return true;
    };
    if (take(".lora_down.weight"))
      slot = &by_module[module].down;
    else if (take(".lora_up.weight"))
      slot = &by_module[module].up;
    else if (take(".alpha"))
      slot = &by_module[module].alpha;
    else if (take(".dora_scale"))
      slot = &by_module[module].dora_scale;
    else
      throw errors::invalid(label, t.name,
                            "unknown kohya key (expected .lora_down.weight, .lora_up.weight, .alpha or .dora_scale)");
    if (module.find('.') != std::string::npos) throw errors::invalid(label, t.name, "kohya module name contains '.'");
    *slot = &t;
  }
  return by_module;
}

}  // namespace

lora_module pair(const safetensors_file& f, const std::string& label, const std::string& name, const tensor_info* down,
                 const tensor_info* up, const tensor_info* alpha) {
  struct {
    const tensor_info *down, *up, *alpha;
  } p{down, up, alpha};
  if (!p.down && !p.up) throw errors::invalid(label, p.alpha->name, "alpha without lora_down and lora_up");
  if (!p.down) throw errors::invalid(label, p.up->name, "lora_up without its lora_down");
  if (!p.up) throw errors::invalid(label, p.down->name, "lora_down without its lora_up");
  const auto& sd = p.down->shape;
  const auto& su = p.up->shape;
  lora_module m;
  m.name = name;
  if (sd.size() == 2 && su.size() == 2) {
    m.kind = module_kind::linear;
  } else if (sd.size() == 4 && su.size() == 4 && su[2] == 1 && su[3] == 1) {
    m.kind = module_kind::conv;
  } else {
    throw errors::invalid(label, p.down->name,
                          fmt::format("unsupported shapes: lora_down {}, lora_up {} (expected [r, in] and [out, r], "
                                      "or [r, in, kh, kw] and [out, r, 1, 1])",
                                      shape_text(sd), shape_text(su)));
  }
  if (sd[0] != su[1])
    throw errors::invalid(label, p.up->name,
                          fmt::format("rank disagrees: lora_down is {} (rank {}), lora_up is {} (rank {})",
                                      shape_text(sd), sd[0], shape_text(su), su[1]));
  if (sd[0] <= 0) throw errors::invalid(label, p.down->name, "rank 0");
  m.rank = sd[0];
  m.a = {&f, p.down};
  m.b = {&f, p.up};
  // sd-scripts LoRAModule: alpha = r when absent or 0, so the scale is 1
  const double stored = p.alpha ? read_alpha(f, *p.alpha) : 0.0;
  m.alpha = stored == 0.0 ? static_cast<double>(m.rank) : stored;
  m.scale = lora_scale(m.alpha, m.rank, false);
  return m;
}

void load(adapter& a) {
  const safetensors_file& f = *a.file;
  for (const auto& [name, p] : group_keys(f, a.weights_path)) {
    if (p.dora_scale && !p.down && !p.up)
      throw errors::invalid(a.weights_path, p.dora_scale->name, "dora_scale without lora_down and lora_up");
    a.modules.push_back(pair(f, a.weights_path, name, p.down, p.up, p.alpha));
    // kohya-style DoRA files (LyCORIS's LoCon with weight decomposition)
    if (p.dora_scale) a.modules.back().dora_scale = tensor_ref{&f, p.dora_scale};
  }
}

keyed_tensors tensors(const adapter_data& d, const std::string& label) {
  keyed_tensors f;
  if (d.use_rslora) throw errors::invalid(label, "", "internal: kohya files have no rsLoRA (convert the alphas first)");
  if (!d.saved.empty())
    throw errors::invalid(label, d.saved.front().target, "kohya files cannot hold modules_to_save tensors");
  for (const module_data& m : d.modules) {
    if (m.kind == module_kind::embedding)
      throw errors::invalid(label, m.name, "kohya files cannot hold an embedding LoRA (lora_embedding_A/B)");
    if (m.magnitude) throw errors::invalid(label, m.name, "kohya files cannot hold DoRA (lora_magnitude_vector)");
    if (m.bias) throw errors::invalid(label, m.name, "kohya files cannot hold a LoRA bias (lora_B.bias)");
    const std::string k = module_name(m.name, d.kohya_prefix);
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
    f.add_owned(k + ".alpha", std::move(alpha), label);
  }
  return f;
}

metadata_map metadata_after_rerank(const std::optional<metadata_map>& in, const std::vector<module_data>& modules) {
  metadata_map m = in.value_or(metadata_map{});
  m.erase("sshs_model_hash");
  m.erase("sshs_legacy_hash");
  std::set<int64_t> ranks;
  std::set<double> alphas;
  for (const module_data& md : modules) ranks.insert(md.rank), alphas.insert(md.alpha);
  auto py_float = [](double v) { return std::trunc(v) == v ? fmt::format("{}.0", v) : fmt::format("{}", v); };
  m["ss_network_dim"] = ranks.size() == 1 ? fmt::format("{}", *ranks.begin()) : "Dynamic";
  m["ss_network_alpha"] = alphas.size() == 1 ? py_float(*alphas.begin()) : "Dynamic";
  if (!m.count("ss_network_module")) m["ss_network_module"] = "networks.lora";
  return m;
}

}  // namespace lora::kohya
