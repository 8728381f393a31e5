// Which base tensor an adapter module changes: the one answer for every
// adapter format and every base layout (merge, verify, forward, inspect,
// combine and convert all ask it through fit_adapter).
//
// A module names its target in its format's way: a dotted module path (PEFT,
// MLX: "model.layers.0.self_attn.q_proj") or a kohya name (a prefix, then the
// path with '.' read as '_': "lora_unet_input_blocks_1_1_proj_in"). The base
// names its tensors in its layout's way. The map is built once from the
// base's tensor names and tries, in order:
//   1. the name as it is ("<path>.weight", or a weight whose dotted path reads
//      as the kohya name once its dots are underscores);
//   2. each row of the layout table `layout_prefixes` whose scope is the
//      module's (a kohya prefix, or "" for dotted paths) and whose `adapter`
//      prefix the name starts with: that prefix replaced by the row's `base`
//      prefix (sd-scripts strips `model.diffusion_model.` and the text
//      encoders' containers when it loads a single-file checkpoint).
// The first step that matches decides; two base modules matching in one step
// is an ambiguity the caller reports with both names.
//
// Extending it: a new checkpoint layout (a base-model prefix, a multimodal
// container, an LDM / SGM / BFL naming) is rows in `layout_prefixes`, or a
// table of its own consulted in the same order, never a special case in merge
// or verify. Fused targets (q / k / v rows of one in_proj_weight) will extend
// name_lookup with the rows a module changes.
#pragma once

#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace lora {

// One row of the layout table: a module whose name (after its kohya prefix,
// for a kohya scope) starts with `adapter` may live in the base under `base`
// instead.
struct layout_prefix {
  std::string_view scope;    // a kohya prefix ("lora_unet_"), or "" for dotted module paths
  std::string_view adapter;  // the prefix as the adapter names it ("" : any name)
  std::string_view base;     // the base's key prefix
};

// The table, in the order tried. Sources in name-map.cpp.
extern const std::vector<layout_prefix> layout_prefixes;

struct name_lookup {
  std::vector<std::string> modules;  // base module paths matched: none, one, or several (ambiguous)
  std::string looked_for;            // what was searched: the dotted path, or the kohya name's mangled form
};

class name_map {
 public:
  // Indexes the "<module>.weight" keys of `base_tensor_names` (copied).
  explicit name_map(const std::vector<std::string>& base_tensor_names);

  // The base module a dotted module path (PEFT, MLX) changes.
  name_lookup find_path(const std::string& path) const;

  // The base module a kohya name changes ("lora_te1_text_model_...": its
  // known prefix, then a path whose dots read as underscores). A name
  // without a known prefix matches nothing.
  name_lookup find_kohya(const std::string& name) const;

 private:
  std::unordered_set<std::string> modules_;                            // dotted module paths with a .weight
  std::unordered_map<std::string, std::vector<std::string>> mangled_;  // path with '_' for '.' -> paths
};

}  // namespace lora
