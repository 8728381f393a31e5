// The LyCORIS format (KohakuBlueleaf/LyCORIS, and the files A1111 / ComfyUI
// read): one .safetensors file with kohya-style module names
// ("lora_unet_<path with '.' as '_'>", "lora_te_", "lora_te1_", ...) and, per
// module, the tensors of one algorithm:
//   LoHa          hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (+ hada_t1, hada_t2), alpha
//   LoKr          lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b (+ lokr_t2), alpha
//   LoCon+Tucker  lora_down.weight, lora_mid.weight, lora_up.weight, alpha
//   LoCon / LoRA  lora_down.weight, lora_up.weight, alpha (as core/kohya-format)
// and, on any of them, dora_scale (weight decomposition, DoRA: kept in
// lora_module::dora_scale; the merged weight is core/delta's).
// The delta of each form is computed by core/lycoris-delta (formulas and
// sources there); names resolve through core/name-map like kohya names.
//
// Scale rules (LyCORIS @ f49d30d6, lycoris/modules/{loha,lokr,locon}.py
// __init__): s = alpha / r, alpha absent or 0 read as r (s = 1);
//   LoHa          r = hada_w1_b.shape[0] (the module's lora_dim)
//   LoKr          r = lokr_w1_b.shape[0] when w1 is decomposed, else
//                 lokr_w2_b.shape[0]; both w1 and w2 full: s = 1, alpha ignored
//                 ("if self.use_w2 and self.use_w1: alpha = lora_dim")
//   LoCon+Tucker  r = lora_down.shape[0]
// ComfyUI (comfy/weight_adapter/loha.py, lokr.py calculate_weight) agrees,
// except that it reads a stored alpha of 0 as s = 0 and takes a LoKr's r
// from lokr_w2_b when both factors are decomposed (LyCORIS trains both at the
// same lora_dim).
#pragma once

#include <string_view>

#include "core/adapter.h"

namespace lora::lycoris {

// True for a key only a LyCORIS file has (".hada_w", ".hada_t", ".lokr_w",
// ".lokr_t", ".lora_mid.").
bool is_lycoris_key(std::string_view key) noexcept;

// Reads a.file (a LyCORIS file) into a.modules, one module per kohya name,
// its form (core/adapter.h delta_form) from the tensors present, its rank,
// alpha and scale by the rules above, module names left as kohya names for
// fit_adapter to resolve, and the shapes checked against each other
// (core/lycoris-delta). Throws lora::error (exit 3) naming the file and
// key: no known prefix, an unknown suffix, tensors of two algorithms in one
// module, a missing tensor, shapes that disagree, an alpha that is not a
// finite float scalar, a dora_scale without the module's other tensors.
void load(adapter& a);

}  // namespace lora::lycoris
