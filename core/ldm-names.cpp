#include "core/ldm-names.h"

#include <charconv>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fmt/format.h>

namespace lora {

namespace {

// The dotted parts of a path.
std::vector<std::string_view> parts_of(std::string_view path) {
  std::vector<std::string_view> out;
  size_t start = 0;
  while (start <= path.size()) {
    const size_t dot = path.find('.', start);
    const size_t end = dot == std::string_view::npos ? path.size() : dot;
    out.push_back(path.substr(start, end - start));
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return out;
}

bool to_int(std::string_view s, int& v) {
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  return ec == std::errc() && ptr == s.data() + s.size() && v >= 0;
}

// The parts after `from` joined with dots ("" when none).
std::string tail(const std::vector<std::string_view>& parts, size_t from) {
  std::string out;
  for (size_t i = from; i < parts.size(); ++i) {
    if (i > from) out.push_back('.');
    out.append(parts[i]);
  }
  return out;
}

// A resnet's inner module in diffusers' name (renew_resnet_paths).
std::string resnet_part(std::string_view inner) {
  static constexpr std::pair<std::string_view, std::string_view> renames[] = {
      {"in_layers.0", "norm1"},  {"in_layers.2", "conv1"},          {"out_layers.0", "norm2"},
      {"out_layers.3", "conv2"}, {"emb_layers.1", "time_emb_proj"}, {"skip_connection", "conv_shortcut"}};
  for (const auto& [from, to] : renames)
    if (inner == from) return std::string(to);
  return {};
}

std::string joined(const std::string& head, const std::string& rest) { return rest.empty() ? head : head + "." + rest; }

constexpr int layers_per_block = 2;

}  // namespace

std::string ldm_unet_to_diffusers(std::string_view path) {
  const std::vector<std::string_view> p = parts_of(path);
  static constexpr std::pair<std::string_view, std::string_view> singles[] = {
      {"time_embed.0", "time_embedding.linear_1"},
      {"time_embed.2", "time_embedding.linear_2"},
      {"input_blocks.0.0", "conv_in"},
      {"out.0", "conv_norm_out"},
      {"out.2", "conv_out"}};
  for (const auto& [from, to] : singles)
    if (path == from) return std::string(to);
  int index = 0, sub = 0;
  if (p.size() >= 3 && p[0] == "middle_block" && to_int(p[1], index)) {
    const std::string inner = tail(p, 2);
    if (index == 1) return joined("mid_block.attentions.0", inner);
    const std::string r = resnet_part(inner);
    if ((index == 0 || index == 2) && !r.empty()) return fmt::format("mid_block.resnets.{}.{}", index / 2, r);
    return {};
  }
  if (p.size() < 4 || !to_int(p[1], index) || !to_int(p[2], sub)) return {};
  const std::string inner = tail(p, 3);
  if (p[0] == "input_blocks" && index >= 1) {
    const int block = (index - 1) / (layers_per_block + 1), layer = (index - 1) % (layers_per_block + 1);
    if (sub == 0 && inner == "op") return fmt::format("down_blocks.{}.downsamplers.0.conv", block);
    if (sub == 0 && layer < layers_per_block) {
      const std::string r = resnet_part(inner);
      return r.empty() ? std::string() : fmt::format("down_blocks.{}.resnets.{}.{}", block, layer, r);
    }
    if (sub == 1 && layer < layers_per_block)
      return joined(fmt::format("down_blocks.{}.attentions.{}", block, layer), inner);
    return {};
  }
  if (p[0] == "output_blocks") {
    const int block = index / (layers_per_block + 1), layer = index % (layers_per_block + 1);
    if (sub == 0) {
      const std::string r = resnet_part(inner);
      return r.empty() ? std::string() : fmt::format("up_blocks.{}.resnets.{}.{}", block, layer, r);
    }
    // .1 is the attention, or the upsampler of a level without attention; .2 the upsampler after an attention
    if (inner == "conv" && layer == layers_per_block) return fmt::format("up_blocks.{}.upsamplers.0.conv", block);
    if (sub == 1) return joined(fmt::format("up_blocks.{}.attentions.{}", block, layer), inner);
    return {};
  }
  return {};
}

namespace {

// sd-scripts' make_unet_conversion_map as {diffusers prefix, LDM prefix}, resnets expanded.
std::vector<std::pair<std::string, std::string>> sdxl_unet_table() {
  std::vector<std::pair<std::string, std::string>> layer, out;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 2; ++j) {
      layer.emplace_back(fmt::format("down_blocks.{}.resnets.{}.", i, j),
                         fmt::format("input_blocks.{}.0.", 3 * i + j + 1));
      layer.emplace_back(fmt::format("down_blocks.{}.attentions.{}.", i, j),
                         fmt::format("input_blocks.{}.1.", 3 * i + j + 1));
    }
    for (int j = 0; j < 3; ++j) {
      layer.emplace_back(fmt::format("up_blocks.{}.resnets.{}.", i, j), fmt::format("output_blocks.{}.0.", 3 * i + j));
      layer.emplace_back(fmt::format("up_blocks.{}.attentions.{}.", i, j),
                         fmt::format("output_blocks.{}.1.", 3 * i + j));
    }
    layer.emplace_back(fmt::format("down_blocks.{}.downsamplers.0.conv.", i),
                       fmt::format("input_blocks.{}.0.op.", 3 * (i + 1)));
    layer.emplace_back(fmt::format("up_blocks.{}.upsamplers.0.", i), fmt::format("output_blocks.{}.2.", 3 * i + 2));
  }
  layer.emplace_back("mid_block.attentions.0.", "middle_block.1.");
  for (int j = 0; j < 2; ++j)
    layer.emplace_back(fmt::format("mid_block.resnets.{}.", j), fmt::format("middle_block.{}.", 2 * j));
  static constexpr std::pair<std::string_view, std::string_view> resnet[] = {
      {"norm1.", "in_layers.0."},  {"conv1.", "in_layers.2."},          {"norm2.", "out_layers.0."},
      {"conv2.", "out_layers.3."}, {"time_emb_proj.", "emb_layers.1."}, {"conv_shortcut.", "skip_connection."}};
  for (const auto& [hf, sd] : layer) {
    if (hf.find("resnets") == std::string::npos) {
      out.emplace_back(hf, sd);
      continue;
    }
    for (const auto& [hf_part, sd_part] : resnet)
      out.emplace_back(hf + std::string(hf_part), sd + std::string(sd_part));
  }
  for (int j = 0; j < 2; ++j) {
    out.emplace_back(fmt::format("time_embedding.linear_{}.", j + 1), fmt::format("time_embed.{}.", 2 * j));
    out.emplace_back(fmt::format("add_embedding.linear_{}.", j + 1), fmt::format("label_emb.0.{}.", 2 * j));
  }
  out.emplace_back("conv_in.", "input_blocks.0.0.");
  out.emplace_back("conv_norm_out.", "out.0.");
  out.emplace_back("conv_out.", "out.2.");
  return out;
}

}  // namespace

namespace {

// `path` with its longest prefix of whole parts that `table` holds replaced
// by the table's value ("" when no prefix is in the table): sd-scripts'
// convert_unet_state_dict.
std::string longest_prefix(const std::unordered_map<std::string, std::string>& table, std::string_view path) {
  const std::string key = std::string(path) + ".";
  for (size_t end = key.size(); end > 0; end = key.rfind('.', end - 2) + 1) {
    if (auto it = table.find(key.substr(0, end)); it != table.end()) {
      std::string out = it->second + key.substr(end);
      out.pop_back();
      return out;
    }
    if (end < 2 || key.rfind('.', end - 2) == std::string::npos) break;
  }
  return {};
}

}  // namespace

namespace {

// sdxl_unet_table as a prefix map, diffusers -> LDM, or read the other way
// (convert_sdxl_unet_state_dict_to_diffusers: conversion_dict = {sd: hf for
// sd, hf in unet_conversion_map}). Built once per direction.
const std::unordered_map<std::string, std::string>& sdxl_unet_map(bool to_ldm) {
  auto build = [](bool forward) {
    std::unordered_map<std::string, std::string> m;
    for (auto& [hf, sd] : sdxl_unet_table()) forward ? m.emplace(hf, sd) : m.emplace(sd, hf);
    return m;
  };
  static const std::unordered_map<std::string, std::string> to_ldm_map = build(true), to_hf_map = build(false);
  return to_ldm ? to_ldm_map : to_hf_map;
}

}  // namespace

std::string sdxl_unet_diffusers_to_ldm(std::string_view path) { return longest_prefix(sdxl_unet_map(true), path); }

std::string sdxl_unet_ldm_to_diffusers(std::string_view path) { return longest_prefix(sdxl_unet_map(false), path); }

std::string sd1_clip_to_hf(std::string_view path) {
  // on the key (path + "."), as the replacements are applied to "<path>.weight"
  const std::string key = std::string(path) + ".";
  for (std::string_view head : {"embeddings.", "encoder.", "final_layer_norm."})
    if (key.starts_with(head)) return "text_model." + std::string(path);
  return std::string(path);
}

std::string open_clip_to_hf(std::string_view path) {
  std::string rest(path);
  static constexpr std::pair<std::string_view, std::string_view> renames[] = {{"transformer.", "text_model.encoder."},
                                                                              {".resblocks.", ".layers."},
                                                                              {".attn.out_proj", ".self_attn.out_proj"},
                                                                              {".mlp.c_fc", ".mlp.fc1"},
                                                                              {".mlp.c_proj", ".mlp.fc2"}};
  for (const auto& [from, to] : renames) {
    const size_t at = from == "transformer." ? (rest.starts_with(from) ? 0 : std::string::npos) : rest.find(from);
    if (at != std::string::npos) rest.replace(at, from.size(), to);
  }
  return rest;
}

// one row per group
// clang-format off
const fused_layout open_clip_layouts = {
    "SDXL OpenCLIP (SGM) <-> Hugging Face CLIP",
    {"conditioner.embedders.1.model."},
    {},
    {"text_encoder_2.", ""},
    "lora_te2_",
    true,  // lora.py names q_proj, k_proj, v_proj of the HF CLIP it loads the checkpoint into
    {
        {"transformer.resblocks.", "text_model.encoder.layers.", "attn.in_proj_weight", "attn.in_proj_bias",
         {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, row_split::equal},
        {"transformer.resblocks.", "text_model.encoder.layers.", "attn.out_proj.weight", "attn.out_proj.bias",
         {"self_attn.out_proj"}, row_split::whole},
        {"transformer.resblocks.", "text_model.encoder.layers.", "mlp.c_fc.weight", "mlp.c_fc.bias", {"mlp.fc1"},
         row_split::whole},
        {"transformer.resblocks.", "text_model.encoder.layers.", "mlp.c_proj.weight", "mlp.c_proj.bias", {"mlp.fc2"},
         row_split::whole},
    },
};
// clang-format on

}  // namespace lora
