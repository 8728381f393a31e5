// Fused row slices: one tensor of a checkpoint layout holding, as row
// ranges, the weights another layout keeps as separate modules (OpenCLIP's
// attn.in_proj_weight = [q; k; v] of Hugging Face CLIP's q_proj / k_proj /
// v_proj; Flux BFL's img_attn.qkv = [to_q; to_k; to_v] of diffusers,
// single_blocks.N.linear1 = [to_q; to_k; to_v; proj_mlp]), and plain
// renames between two layouts (a group of one part over every row). The
// types and the row arithmetic; the tables themselves live with their
// family (core/ldm-names: OpenCLIP, core/flux-names: Flux) and core/name-map
// consults them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lora {

// How a fused tensor's rows divide among its parts, in order.
enum class row_split {
  equal,           // n equal parts (q, k, v: torch.chunk(w, 3))
  cols_then_rest,  // parts of n_cols rows each, the last part the rest (Flux linear1: q, k, v, then mlp)
  whole,           // one part, every row (a rename)
  swap_halves,     // one part whose two row halves trade places (Flux final_layer.adaLN_modulation.1 =
                   // [shift; scale], diffusers norm_out.linear = [scale; shift])
};

// One fused tensor and the modules another layout splits it into. Paths
// are below a block ("double_blocks.3." in the fused layout,
// "transformer_blocks.3." in the other), or below the layout's root when
// the blocks are empty.
struct fused_group {
  std::string_view fused_block;         // "double_blocks." (a block index and '.' follow), or "" at the root
  std::string_view parts_block;         // "transformer_blocks." likewise
  std::string_view fused_weight;        // "img_attn.qkv.weight", "attn.in_proj_weight"
  std::string_view fused_bias;          // "img_attn.qkv.bias", "attn.in_proj_bias"
  std::vector<std::string_view> parts;  // module paths, row order: "attn.to_q" (tensors "<part>.weight" / ".bias")
  row_split split = row_split::equal;
};

// Two layouts of one family and the groups between them.
struct fused_layout {
  std::string_view name;  // for messages: "Flux BFL <-> diffusers"
  // key prefixes of a base in the fused layout ("", "model.diffusion_model.") and in the parts layout ("");
  // a base in the parts layout is mapped only when `parts_prefixes` is not empty
  std::vector<std::string_view> fused_prefixes;
  std::vector<std::string_view> parts_prefixes;
  // prefixes an adapter's dotted module paths may carry (diffusers' pipeline component, "transformer.")
  std::vector<std::string_view> adapter_prefixes;
  std::string_view kohya;  // the kohya prefix of these modules ("lora_unet_", "lora_te2_")
  // sd-scripts names the parts (q_proj, k_proj, v_proj) in its kohya files, not the fused
  // module: extract --format kohya writes one module per part
  bool kohya_names_parts = false;
  std::vector<fused_group> groups;
};

// One range of rows: rows [fused_row, fused_row + n_rows) of the fused
// tensor are rows [part_row, part_row + n_rows) of part `part`.
struct fused_segment {
  size_t part = 0;
  int64_t fused_row = 0;
  int64_t part_row = 0;
  int64_t n_rows = 0;
};

// The segments of group `g` for a fused tensor of `n_rows` rows of `n_cols`
// columns (product of its other dims), in fused row order. Returns an empty
// vector and sets `problem` (a sentence) when the rows cannot divide as the
// group says (equal parts: n_rows not a multiple of the count; linear1: no
// rows left for the last part; swap_halves: an odd count). Pure.
std::vector<fused_segment> split_rows(const fused_group& g, int64_t n_rows, int64_t n_cols, std::string& problem);

// The rows part `part` takes in `segments` (their n_rows summed). Pure.
int64_t part_rows(const std::vector<fused_segment>& segments, size_t part) noexcept;

// Where a base tensor name `tensor` sits in group `g` of the fused layout
// below key prefix `prefix`: true when it is the group's fused weight, with
// `base_block` (prefix + "double_blocks.3.", or prefix at the root) and
// `parts_block` ("transformer_blocks.3.", or "") set. Pure.
// "<block><index>." or "" at the root (an empty block). Pure.
std::string block_path(std::string_view block, std::string_view index);

// Whether `rest` starts with `block`, a block index and '.': sets `index`
// and `tail` (what follows the '.'); an empty block matches at the root with
// index "" and tail `rest`. Views into `rest`. Pure.
bool match_block_path(std::string_view rest, std::string_view block, std::string_view& index, std::string_view& tail);

bool match_fused_tensor(const fused_group& g, std::string_view prefix, std::string_view tensor, std::string& base_block,
                        std::string& parts_block);

}  // namespace lora
