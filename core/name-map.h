// Which base tensor an adapter module changes: the one answer for every
// adapter format and every base layout (merge, verify, forward, inspect,
// combine and convert all ask it through fit_adapter).
//
// A module names its target in its format's way: a dotted module path (PEFT,
// MLX: "model.layers.0.self_attn.q_proj") or a kohya name (a prefix, then the
// path with '.' read as '_': "lora_unet_input_blocks_1_1_proj_in"). The base
// names its tensors in its layout's way. The map is built once from the
// base's tensor names and tries, in order:
//   1. the name as it is (a weight whose dotted path reads as the kohya name
//      once its dots are underscores);
//   2. for a kohya name, each single-file container of its prefix
//      (core/kohya-format `containers`, the table extract names modules by:
//      sd-scripts strips `model.diffusion_model.` and the text encoders'
//      containers when it loads a single-file checkpoint).
// The first step that matches decides; two base modules matching in one step
// is an ambiguity the caller reports with both names.
//
// Dotted paths also follow the model class: PEFT saves keys under the class
// it wrapped (GPT2LMHeadModel: "transformer.h.0.attn.c_attn"), the checkpoint
// on disk may be another class's (the hub's bare GPT2Model: "h.0.attn.c_attn").
// Such a difference is a whole-model property, so it is decided once for the
// whole adapter (choose_layout): a `model_layouts` entry (a set of prefix
// rewrites) is applied only when every tensor the adapter changes is found
// under it; two layouts that both fit are an ambiguity naming both.
//
// Extending it: a new checkpoint layout is rows in a table (`model_layouts`
// for base-model prefixes and multimodal containers, kohya::containers for
// single-file diffusion checkpoints, or a table of its own consulted in the
// same order for LDM / SGM / BFL namings), never a special case in merge or
// verify.
//   3. when neither finds it, the fused tables (core/fused-rows; one table
//      per family: core/ldm-names open_clip_layouts, core/flux-names
//      flux_layouts): a module another layout keeps apart whose rows the
//      base fuses (HF CLIP q_proj -> a third of OpenCLIP's in_proj_weight,
//      diffusers Flux to_q -> a third of BFL img_attn.qkv), a fused module
//      the base splits (BFL linear1 -> diffusers to_q, to_k, to_v,
//      proj_mlp), or a plain rename between the two layouts. The answer is
//      a fused_target: base tensors and row ranges, or a whole base module.
//      For a dotted path, the diffusers pipeline components of a
//      single-file checkpoint (`single_file_components`: "unet." ->
//      model.diffusion_model. with the UNet renamed, "text_encoder." ->
//      the CLIP container) are renames consulted in the same step.
// Fused tables apply to bases in either layout below their prefixes: a
// diffusers pipeline folder's "transformer." component is one of Flux's.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "core/adapter.h"
#include "core/fused-rows.h"
#include "core/kohya-format.h"

namespace lora {

// A base layout another model class uses for the same weights: each row
// rewrites a name starting with `adapter` to start with `base` instead (the
// first matching row applies; a name no row matches stays as it is).
struct model_layout {
  std::string_view name;  // what it is, for messages ("bare GPT2Model checkpoint")
  std::vector<std::pair<std::string_view, std::string_view>> rows;  // {adapter prefix, base prefix}
};

// The layouts, in the order tried. Sources in name-map.cpp.
extern const std::vector<model_layout> model_layouts;

// `name` under `layout` (nullptr: unchanged). Pure.
std::string apply_layout(const std::string& name, const model_layout* layout);

// What choose_layout found.
struct layout_choice {
  const model_layout* layout = nullptr;        // the one to apply; nullptr: names as they are
  std::vector<const model_layout*> ambiguous;  // two or more fit every name: the caller reports them
  // When nothing fits: the layout under which the most names are found, and
  // how many (0 and nullptr when none helps more than the names as they are).
  const model_layout* closest = nullptr;
  size_t closest_found = 0;
  size_t found_as_is = 0;  // names found without a layout
};

struct name_lookup {
  std::vector<std::string> modules;  // base module paths matched: none, one, or several (ambiguous)
  std::string looked_for;            // what was searched: the dotted path, or the kohya name's mangled form
};

// What a module changes through a fused table (find_fused).
struct fused_target {
  std::string layout;  // the table's name ("Flux BFL <-> diffusers")
  // a rename: the base module path whose "<module>.weight" the module changes
  // whole ("double_blocks.0.img_attn.proj"); empty for row slices
  std::string whole;
  std::vector<row_slice> slices;     // else: where the delta's rows go, in module row order
  std::vector<int64_t> delta_shape;  // the module's whole delta: [rows, the base tensor's other dims]
  // the base's rows cannot divide as the table says: why, naming the base
  // tensor (slices then empty)
  std::string problem;
};
struct fused_lookup {
  std::vector<fused_target> found;  // none, one, or several (ambiguous: two base containers)
  std::string looked_for;           // the path (or mangled kohya name) searched
};

// Where a diffusers pipeline component lives in a single-file checkpoint of
// `family`: a diffusers module "<component><path>" is the base module
// "<container><p>" for which rename(p) == path (rename nullptr: p == path).
// A diffusers LoRA (unet. / text_encoder. lora_A / lora_B) thus merges into
// an LDM (SD 1.x) or SGM (SDXL) single file. SDXL's text_encoder_2 has no
// row: its attention is fused there (open_clip_layouts maps it).
struct single_file_component {
  kohya::checkpoint_family family;
  std::string_view component;  // "unet.", "text_encoder."
  std::string_view container;  // "model.diffusion_model.", "conditioner.embedders.0.transformer."
  std::string (*rename)(std::string_view) = nullptr;  // container path -> diffusers path ("" when none)
};
// The rows, by family. Sources in name-map.cpp.
extern const std::vector<single_file_component> single_file_components;

// The base tensor shapes a name map may ask for (nullptr: unknown).
using shape_lookup = std::function<const std::vector<int64_t>*(const std::string&)>;

// The fused tables name_map consults, in order (open_clip_layouts, flux_layouts).
extern const std::vector<const fused_layout*> fused_layouts;

// For extract --format kohya: the modules sd-scripts names in place of a
// fused base tensor (a table whose kohya_names_parts is set; SDXL's
// in_proj_weight -> lora_te2_..._self_attn_q_proj / k_proj / v_proj), with
// the rows of `tensor` (of `shape`) each takes. `path` is the part's module
// path under the table's container in the parts layout
// ("conditioner.embedders.1.model.text_model.encoder.layers.0.self_attn.q_proj"),
// `kohya` its kohya name. Empty when `tensor` is no such fused tensor;
// `problem` is set (and nothing returned) when its rows cannot divide. Pure.
struct fused_part {
  std::string path;
  std::string kohya;
  int64_t row = 0;
  int64_t n_rows = 0;
};
std::vector<fused_part> fused_parts(const std::string& tensor, const std::vector<int64_t>& shape, std::string& problem);

class name_map {
 public:
  // Indexes the "<module>.weight" keys of `base_tensor_names` (copied) and
  // the fused tables' modules of the base; `shape_of` gives the shapes the
  // row slices need (without it, only the tables' renames are indexed).
  explicit name_map(const std::vector<std::string>& base_tensor_names, const shape_lookup& shape_of = {});

  // The layout under which every one of `tensors` (full tensor names the
  // adapter changes or replaces: "<module>.weight", modules_to_save targets)
  // is a base tensor, or one that `also_ok` accepts (a tied lm_head the merge
  // can create). As they are when that suffices.
  // `most_found` (merge / verify --skip-unmatched, whose strays are skipped):
  // when no layout finds every name, the layout under which the most names
  // are found, if it finds more than the names as they are; layouts that
  // find the same most (with different rewrites) are `ambiguous`.
  layout_choice choose_layout(const std::vector<std::string>& tensors,
                              const std::function<bool(const std::string&)>& also_ok = {},
                              bool most_found = false) const;

  // True when the base has this tensor.
  bool has_tensor(const std::string& name) const { return tensors_.count(name) > 0; }

  // The base module a kohya name changes ("lora_te1_text_model_...": its
  // known prefix, then a path whose dots read as underscores). A name
  // without a known prefix matches nothing.
  name_lookup find_kohya(const std::string& name) const;

  // Step 3 for a dotted module path (PEFT, diffusers: the table's adapter
  // prefixes such as "transformer." are tried, and the base's
  // single_file_components) or a kohya name (its prefix must be the
  // table's): the fused tables' answers. Pure lookups.
  fused_lookup find_fused(const std::string& path) const;
  fused_lookup find_fused_kohya(const std::string& name) const;

 private:
  void index_fused(const std::vector<std::string>& names, const fused_layout& layout, size_t which,
                   const shape_lookup& shape_of);
  void index_parts(const std::vector<std::string>& names, const fused_layout& layout, size_t which,
                   const shape_lookup& shape_of);

  std::unordered_set<std::string> tensors_;                            // every tensor name
  std::unordered_set<std::string> modules_;                            // dotted module paths with a .weight
  std::unordered_map<std::string, std::vector<std::string>> mangled_;  // path with '_' for '.' -> paths
  // per row of kohya::containers with a rename: the renamed path below the
  // row's base, with '_' for '.' -> base paths
  std::vector<std::unordered_map<std::string, std::vector<std::string>>> renamed_;
  // per fused_layouts entry: module path in the adapter's layout -> targets,
  // and the same keyed by the kohya name (prefix + path with '_' for '.')
  std::vector<std::unordered_map<std::string, std::vector<fused_target>>> fused_;
  std::unordered_map<std::string, std::vector<fused_target>> fused_kohya_;
  // diffusers module path ("unet.down_blocks.1...") -> the single-file base modules it is
  // (single_file_components of the base's family)
  std::unordered_map<std::string, std::vector<std::string>> components_;
  std::string components_layout_;  // the family's name for messages
};

}  // namespace lora
