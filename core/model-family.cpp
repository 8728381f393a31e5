#include "core/model-family.h"

#include <fmt/format.h>

#include "formats/error.h"

namespace lora {

namespace {

// llama, mistral, qwen2, qwen3, mixtral, qwen3_moe (modeling_llama.py and the files that copy it)
model_family llama_like() {
  model_family f;
  family_names& n = f.names;
  n.embed = "model.embed_tokens";
  n.final_norm = "model.norm";
  n.lm_head = "lm_head";
  n.layer = "model.layers.{}.";
  n.attn_norm = "input_layernorm";
  n.mlp_norm = "post_attention_layernorm";
  n.q = "self_attn.q_proj";
  n.k = "self_attn.k_proj";
  n.v = "self_attn.v_proj";
  n.o = "self_attn.o_proj";
  n.gate = "mlp.gate_proj";
  n.up = "mlp.up_proj";
  n.down = "mlp.down_proj";
  return f;
}

// gpt2 (modeling_gpt2.py, GPT2Model / GPT2LMHeadModel)
model_family gpt2(const model_files& model) {
  model_family f;
  f.norm = norm_kind::layer_norm;
  f.rotary = false;
  f.conv1d = true;
  f.mlp = mlp_kind::plain;
  const std::string p = model.find("transformer.wte.weight") ? "transformer." : "";
  family_names& n = f.names;
  n.embed = p + "wte";
  n.positions = p + "wpe";
  n.final_norm = p + "ln_f";
  n.lm_head = "lm_head";
  n.layer = p + "h.{}.";
  n.attn_norm = "ln_1";
  n.mlp_norm = "ln_2";
  n.qkv = "attn.c_attn";
  n.o = "attn.c_proj";
  n.up = "mlp.c_fc";
  n.down = "mlp.c_proj";
  return f;
}

}  // namespace

model_family describe_family(const hf_config& c, const model_files& model) {
  const std::string& t = c.model_type;
  if (t == "gpt2") return gpt2(model);
  model_family f = llama_like();
  family_names& n = f.names;
  if (t == "llama" || t == "mistral" || t == "qwen2") return f;
  if (t == "qwen3" || t == "qwen3_moe") {
    // Qwen3Attention: q_norm / k_norm = Qwen3RMSNorm(head_dim) on each head before RoPE
    f.qk_norm = norm_kind::rms;
    n.q_norm = "self_attn.q_norm";
    n.k_norm = "self_attn.k_norm";
    if (t == "qwen3_moe") {
      // Qwen3MoeSparseMoeBlock: gate = Linear(hidden, num_experts), experts[e] = Qwen3MoeMLP
      n.router = "mlp.gate";
      n.expert = "mlp.experts.{}.";
      n.expert_gate = "gate_proj";
      n.expert_up = "up_proj";
      n.expert_down = "down_proj";
      // transformers 5.x Qwen3MoeExperts: gate, up = linear(x, gate_up_proj[e]).chunk(2); linear(., down_proj[e])
      n.fused_experts = "mlp.experts.";
    }
    return f;
  }
  if (t == "mixtral") {
    // MixtralSparseMoeBlock: gate; experts[e] = MixtralBlockSparseTop2MLP: w2(act(w1(x)) * w3(x))
    n.router = "block_sparse_moe.gate";
    n.expert = "block_sparse_moe.experts.{}.";
    n.expert_gate = "w1";
    n.expert_up = "w3";
    n.expert_down = "w2";
    return f;
  }
  if (t == "phi3") {
    // Phi3Attention.qkv_proj: [q (heads * d); k (kv * d); v (kv * d)]; Phi3MLP.gate_up_proj: [gate; up]
    n.q = n.k = n.v = "";
    n.qkv = "self_attn.qkv_proj";
    f.mlp = mlp_kind::fused_gated;
    n.gate = n.up = "";
    n.gate_up = "mlp.gate_up_proj";
    return f;
  }
  if (t == "gemma2" || t == "gemma3_text") {
    // Gemma2DecoderLayer / Gemma3DecoderLayer: four (1 + w) norms; Gemma2Model: embed * normalizer
    f.norm = norm_kind::rms_offset_one;
    f.embed_scale = true;
    n.post_attn_norm = "post_attention_layernorm";
    n.mlp_norm = "pre_feedforward_layernorm";
    n.post_mlp_norm = "post_feedforward_layernorm";
    if (t == "gemma3_text") {
      f.qk_norm = norm_kind::rms_offset_one;
      n.q_norm = "self_attn.q_norm";
      n.k_norm = "self_attn.k_norm";
    }
    return f;
  }
  throw errors::invalid(c.path, "", fmt::format("model_type {} has no forward pass description", t));
}

}  // namespace lora
