// What differs between the decoder-only families the forward pass runs, as
// data: the norms, the attention's projections and extras, the MLP, the
// embedding, and every weight's name. core/llama runs one loop over it.
//
// Each family follows Hugging Face transformers' modeling file as of the
// 4.51 - 4.53 releases (gemma2 read at huggingface/transformers 006e8693;
// the MoE routers and gemma3's layer pattern checked against
// Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock and Gemma3Attention of those
// releases; rotary scaling as core/rope says, 5.x):
//   llama, mistral, qwen2   models/{llama,mistral,qwen2}/modeling_*.py
//   qwen3                   models/qwen3/modeling_qwen3.py: q_norm / k_norm (RMSNorm over head_dim) before RoPE
//   gemma2                  models/gemma2/modeling_gemma2.py: (1 + w) RMSNorms before and after attention and MLP,
//                           embedding * sqrt(hidden) in the model dtype, scale query_pre_attn_scalar^-0.5,
//                           tanh soft-capping of scores and logits, even layers sliding
//   gemma3_text             models/gemma3/modeling_gemma3.py: gemma2's layout plus (1 + w) q/k norms; sliding
//                           layers rotate with rope_local_base_freq
//   phi3                    models/phi3/modeling_phi3.py: fused qkv_proj [q; k; v] and gate_up_proj [gate; up]
//   mixtral                 models/mixtral/modeling_mixtral.py: block_sparse_moe (gate; experts.E.w1, w3, w2)
//   qwen3_moe               models/qwen3_moe/modeling_qwen3_moe.py: mlp.gate, mlp.experts.E.{gate,up,down}_proj
//   gpt2                    models/gpt2/modeling_gpt2.py: Conv1D weights [in, out], LayerNorm with bias,
//                           learned positions wpe, gelu_new, tied head
#pragma once

#include <cstdint>
#include <string>

#include "formats/hf-config.h"
#include "formats/model-files.h"

namespace lora {

enum class norm_kind {
  none,            // no norm at this place
  rms,             // x rsqrt(mean(x^2) + eps) w
  rms_offset_one,  // x rsqrt(mean(x^2) + eps) (1 + w), in f32 (Gemma2RMSNorm / Gemma3RMSNorm)
  layer_norm,      // (x - mean) rsqrt(var + eps) w + b, var biased (torch LayerNorm)
};

enum class mlp_kind {
  gated,        // down(act(gate(x)) * up(x))
  fused_gated,  // gate, up = chunk(gate_up(x), 2); down(act(gate) * up)   (phi3)
  plain,        // proj(act(fc(x)))   (gpt2: c_fc, c_proj)
};

// Tensor names; "{}" stands for the layer (or expert) index. Every name
// below is a module path (the tensor is "<name>.weight", "<name>.bias").
struct family_names {
  std::string embed, positions, final_norm, lm_head;
  std::string layer;  // the layer prefix, e.g. "model.layers.{}."
  // inside a layer
  std::string attn_norm, post_attn_norm, mlp_norm, post_mlp_norm;  // empty: no such norm
  std::string q, k, v, qkv, o, q_norm, k_norm;                     // qkv: fused [q; k; v] (then q, k, v empty)
  std::string gate, up, gate_up, down;                             // plain: up = fc, down = proj
  std::string router, expert;                                      // MoE: router linear; expert prefix "…experts.{}."
  // transformers 5.x fused experts: "<fused_experts>gate_up_proj" [E, 2I, H] and "down_proj" [E, H, I]
  // (read when the layer stores them; empty: the family has none)
  std::string fused_experts;
  std::string expert_gate, expert_up, expert_down;                 // inside an expert
};

struct model_family {
  norm_kind norm = norm_kind::rms;      // attn_norm, mlp_norm, post norms and final_norm
  norm_kind qk_norm = norm_kind::none;  // per head, over head_dim, before RoPE
  bool rotary = true;                   // RoPE (core/rope); false: learned positions (names.positions)
  bool conv1d = false;                  // 2-D weights stored [in, out] (GPT-2 Conv1D): y = x W + b
  bool embed_scale = false;             // x = embed * sqrt(hidden) rounded to the model dtype
  mlp_kind mlp = mlp_kind::gated;
  family_names names;
};

// The description of config.model_type (one of supported_architectures()).
// gpt2 reads both checkpoint layouts: GPT2LMHeadModel's names
// ("transformer.h.0.attn.c_attn") when `model` holds "transformer.wte.weight",
// else the hub's bare GPT2Model names ("h.0.attn.c_attn"). Borrows nothing;
// throws lora::error (exit 3) for a model_type without a description.
model_family describe_family(const hf_config& config, const model_files& model);

}  // namespace lora
