#!/usr/bin/env python3
"""Inputs for tests/e2e/e2e-peft-params.sh (numpy only), seeded.

Bases (one layer each, tiny):
  oss-f32/, oss-bf16/   gpt-oss shaped (model_type gpt_oss): mlp.experts.gate_up_proj
                        [E, H, 2I], gate_up_proj_bias [E, 2I], down_proj [E, I, H],
                        down_proj_bias [E, H] (transformers GptOssExperts,
                        is_transposed=True), router, q_proj, embed_tokens, lm_head
  oss-square-f32/       the same with H == 2I (gate_up_proj square per expert:
                        only model_type tells [E, in, out])
  qwen-f32/             transformers 5.x fused qwen3_moe: experts.gate_up_proj
                        [E, 2I, H], down_proj [E, H, I] (not transposed)
  qwen-full-f32/, qwen-full-bf16/  a complete qwen3_moe with those fused experts
                        (the forward pass runs it)
  tok-f32/, tok-bf16/   Llama-shaped, untied (embed_tokens and lm_head)
  tok-tied-bf16/        Llama-shaped, tie_word_embeddings true, no lm_head.weight
  tok-experts-f32/      Llama-shaped with an extra fused experts tensor [E, 2I, H]
Adapters (PEFT key names as get_peft_model_state_dict saves them):
  p-oss/      target_parameters gate_up_proj + down_proj (nested ParamWrapper:
              gate_up_proj's keys carry ".base_layer"), rank_pattern on
              down_proj (r 3), a q_proj LoRA beside them
  p-oss-sq/   target_parameters gate_up_proj on the square base
  p-qwen/     target_parameters gate_up_proj, use_rslora
  p-qwen-full/ gate_up_proj + down_proj (nested) and q_proj on qwen-full
  p-missing/  target_parameters naming mlp.experts.gate_proj (the base lacks it)
  p-shape/    gate_up_proj's lora_A [r E, 20]: no 3-D layout fits
  p-rows/     lora_A with 7 rows for r 2
  p-2d/       target_parameters self_attn.q_proj.weight (2-D: the linear case)
  p-count/    target_parameters names two parameters, the file holds one wrapper
  t-list/     trainable_token_indices list form, alone
  t-dict/     dict form {embed_tokens: [...], lm_head: [...]} with a q_proj LoRA
  t-tied/     dict form on the tied base, a down_proj LoRA beside it
  t-tied-head/ a LoRA on lm_head of the tied base beside tokens on embed_tokens
  t-range/    an index past the vocabulary
  t-rows/     a delta with one row too many
  t-width/    a delta of the wrong width
  t-dup/      an index listed twice
`reference.py` beside this file recomputes every merged tensor.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_np import write  # noqa: E402

P = "base_model.model."
E, H, I, VOCAB = 4, 16, 12, 32


def bf16(a):
    """float -> ("BF16", shape, bytes), round to nearest even from float32."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return ("BF16", list(np.shape(a)), u.tobytes())


def save_model(out, tensors, config, dtype):
    os.makedirs(out, exist_ok=True)
    conv = bf16 if dtype == "bf16" else (lambda a: np.asarray(a, np.float32))
    write(out + "/model.safetensors", {k: conv(v) for k, v in tensors.items()})
    config = dict(config, torch_dtype="bfloat16" if dtype == "bf16" else "float32")
    json.dump(config, open(out + "/config.json", "w"), indent=2)


def oss(out, rng, dtype, h=H, i=I, model_type="gpt_oss"):
    n = lambda *s: rng.standard_normal(s) * 0.5  # noqa: E731
    t = {"model.embed_tokens.weight": n(VOCAB, h), "lm_head.weight": n(VOCAB, h),
         "model.layers.0.self_attn.q_proj.weight": n(h, h), "model.norm.weight": 1 + n(h) * 0.1,
         "model.layers.0.mlp.router.weight": n(E, h), "model.layers.0.mlp.router.bias": n(E)}
    if model_type == "gpt_oss":
        t.update({"model.layers.0.mlp.experts.gate_up_proj": n(E, h, 2 * i),
                  "model.layers.0.mlp.experts.gate_up_proj_bias": n(E, 2 * i),
                  "model.layers.0.mlp.experts.down_proj": n(E, i, h),
                  "model.layers.0.mlp.experts.down_proj_bias": n(E, h)})
    else:  # transformers 5.x fused qwen3_moe experts, [E, out, in]
        t.update({"model.layers.0.mlp.experts.gate_up_proj": n(E, 2 * i, h),
                  "model.layers.0.mlp.experts.down_proj": n(E, h, i)})
        t["model.layers.0.mlp.gate.weight"] = t.pop("model.layers.0.mlp.router.weight")
        del t["model.layers.0.mlp.router.bias"]
    config = {"architectures": ["GptOssForCausalLM" if model_type == "gpt_oss" else "Qwen3MoeForCausalLM"],
              "model_type": model_type, "hidden_size": h, "intermediate_size": i, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": h // 2, "vocab_size": VOCAB,
              "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
    if model_type == "gpt_oss":
        config.update(num_local_experts=E, experts_per_token=2)
    else:
        config.update(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=i)
    save_model(out, t, config, dtype)


def qwen_full(out, rng, dtype):
    """A complete transformers 5.x qwen3_moe checkpoint (fused experts), one layer."""
    n = lambda *s: rng.standard_normal(s) * 0.5  # noqa: E731
    hd = H // 2
    t = {"model.embed_tokens.weight": n(VOCAB, H), "lm_head.weight": n(VOCAB, H), "model.norm.weight": 1 + n(H) * 0.1}
    pre = "model.layers.0."
    t.update({pre + "input_layernorm.weight": 1 + n(H) * 0.1, pre + "post_attention_layernorm.weight": 1 + n(H) * 0.1,
              pre + "self_attn.q_proj.weight": n(2 * hd, H), pre + "self_attn.k_proj.weight": n(hd, H),
              pre + "self_attn.v_proj.weight": n(hd, H), pre + "self_attn.o_proj.weight": n(H, 2 * hd),
              pre + "self_attn.q_norm.weight": 1 + n(hd) * 0.1, pre + "self_attn.k_norm.weight": 1 + n(hd) * 0.1,
              pre + "mlp.gate.weight": n(E, H), pre + "mlp.experts.gate_up_proj": n(E, 2 * I, H),
              pre + "mlp.experts.down_proj": n(E, H, I)})
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H,
              "intermediate_size": 32, "moe_intermediate_size": I, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": hd, "num_experts": E, "num_experts_per_tok": 2,
              "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": VOCAB,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "max_position_embeddings": 64,
              "tie_word_embeddings": False}
    save_model(out, t, config, dtype)


def llama(out, rng, dtype, tied, experts=False):
    n = lambda *s: rng.standard_normal(s) * 0.5  # noqa: E731
    t = {"model.embed_tokens.weight": n(VOCAB, H), "model.norm.weight": 1 + n(H) * 0.1}
    for p, shape in [("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (H // 2, H)), ("self_attn.v_proj", (H // 2, H)),
                     ("self_attn.o_proj", (H, H)), ("mlp.gate_proj", (32, H)), ("mlp.up_proj", (32, H)),
                     ("mlp.down_proj", (H, 32))]:
        t[f"model.layers.0.{p}.weight"] = n(*shape)
    t["model.layers.0.input_layernorm.weight"] = 1 + n(H) * 0.1
    t["model.layers.0.post_attention_layernorm.weight"] = 1 + n(H) * 0.1
    if not tied:
        t["lm_head.weight"] = n(VOCAB, H)
    if experts:  # a fused experts tensor beside the dense MLP ([E, 2I, H], not read by the forward pass)
        t["model.layers.0.mlp.experts.gate_up_proj"] = n(E, 2 * I, H)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
              "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
              "max_position_embeddings": 64, "tie_word_embeddings": tied}
    save_model(out, t, config, dtype)


def adapter(out, tensors, **config):
    os.makedirs(out, exist_ok=True)
    write(out + "/adapter_model.safetensors", {k: np.asarray(v, np.float32) for k, v in tensors.items()})
    c = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
         "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "target_modules": [],
         "target_parameters": None, "trainable_token_indices": None, "modules_to_save": None, "rank_pattern": {},
         "alpha_pattern": {}, "base_model_name_or_path": "tiny"}
    c.update(config)
    json.dump(c, open(out + "/adapter_config.json", "w"), indent=2)


def wrapper(rng, path, r, n_in, n_out, nested=0):
    """lora.ParamWrapper keys: lora_A [r E, in], lora_B [out, r E]."""
    stem = P + path + ".base_layer" * nested
    return {stem + ".lora_A.weight": rng.standard_normal((r * E, n_in)) * 0.3,
            stem + ".lora_B.weight": rng.standard_normal((n_out, r * E)) * 0.3}


def lora(rng, path, n_out, n_in, r=2):
    return {P + path + ".lora_A.weight": rng.standard_normal((r, n_in)) * 0.3,
            P + path + ".lora_B.weight": rng.standard_normal((n_out, r)) * 0.3}


def main(w):
    rng = np.random.default_rng(14)
    oss(w + "/oss-f32", rng, "f32")
    oss(w + "/oss-bf16", rng, "bf16")
    oss(w + "/oss-square-f32", rng, "f32", h=H, i=H // 2)
    oss(w + "/qwen-f32", rng, "f32", model_type="qwen3_moe")
    llama(w + "/tok-f32", rng, "f32", tied=False)
    llama(w + "/tok-bf16", rng, "bf16", tied=False)
    llama(w + "/tok-tied-bf16", rng, "bf16", tied=True)
    llama(w + "/tok-experts-f32", rng, "f32", tied=False, experts=True)
    qwen_full(w + "/qwen-full-f32", rng, "f32")
    qwen_full(w + "/qwen-full-bf16", rng, "bf16")

    experts = "model.layers.0.mlp.experts"
    # gpt-oss: gate_up_proj [E, H, 2I] is [E, in, out]: in H, out 2I; down_proj [E, I, H]: in I, out H.
    # Both targeted: PEFT wraps gate_up_proj first (registration order), then
    # down_proj around it, so gate_up_proj's keys carry ".base_layer".
    t = wrapper(rng, experts, 2, H, 2 * I, nested=1)
    t.update(wrapper(rng, experts, 3, I, H))
    t.update(lora(rng, "model.layers.0.self_attn.q_proj", H, H))
    tp = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    adapter(w + "/p-oss", t, target_modules=["q_proj"], target_parameters=tp,
            rank_pattern={"mlp.experts.down_proj": 3})
    # square experts: [E, 16, 16], gpt_oss -> [E, in, out]
    adapter(w + "/p-oss-sq", wrapper(rng, experts, 2, H, H), target_parameters=["mlp.experts.gate_up_proj"])
    # qwen3_moe 5.x: gate_up_proj [E, 2I, H] is [E, out, in]
    adapter(w + "/p-qwen", wrapper(rng, experts, 2, H, 2 * I), target_parameters=["mlp.experts.gate_up_proj"],
            use_rslora=True, lora_alpha=3)
    # both fused qwen3_moe experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) and q_proj
    t = wrapper(rng, experts, 2, H, 2 * I, nested=1)
    t.update(wrapper(rng, experts, 2, I, H))
    t.update(lora(rng, "model.layers.0.self_attn.q_proj", H, H))
    adapter(w + "/p-qwen-full", t, target_modules=["q_proj"], target_parameters=tp, lora_alpha=3)
    # refusals
    adapter(w + "/p-missing", wrapper(rng, experts, 2, H, 2 * I), target_parameters=["mlp.experts.gate_proj"])
    adapter(w + "/p-shape", wrapper(rng, experts, 2, 20, 2 * I), target_parameters=["mlp.experts.gate_up_proj"])
    bad = wrapper(rng, experts, 2, H, 2 * I)
    bad[P + experts + ".lora_A.weight"] = bad[P + experts + ".lora_A.weight"][:7]
    bad[P + experts + ".lora_B.weight"] = bad[P + experts + ".lora_B.weight"][:, :7]
    adapter(w + "/p-rows", bad, target_parameters=["mlp.experts.gate_up_proj"])
    # a 2-D parameter: one "expert", saved under the module holding it
    adapter(w + "/p-2d", lora(rng, "model.layers.0.self_attn.q_proj", H, H),
            target_parameters=["self_attn.q_proj.weight"])
    adapter(w + "/p-count", wrapper(rng, experts, 2, H, 2 * I), target_parameters=tp)

    # trainable tokens: PEFT saves "<embedding>.token_adapter.trainable_tokens_delta" [n, dim]
    def delta(path, n, dim=H):
        return {P + path + ".token_adapter.trainable_tokens_delta": rng.standard_normal((n, dim)) * 0.5}
    adapter(w + "/t-list", delta("model.embed_tokens", 3), trainable_token_indices=[30, 2, 17])
    t = delta("model.embed_tokens", 2)
    t.update(delta("lm_head", 3))
    t.update(lora(rng, "model.layers.0.self_attn.q_proj", H, H))
    adapter(w + "/t-dict", t, target_modules=["q_proj"],
            trainable_token_indices={"embed_tokens": [5, 31], "lm_head": [0, 7, 8]})
    # tied base: the head follows the embedding (PEFT ties the head's adapter, saves nothing for it)
    t = delta("model.embed_tokens", 2)
    t.update(lora(rng, "model.layers.0.mlp.down_proj", H, 32))
    adapter(w + "/t-tied", t, target_modules=["down_proj"], trainable_token_indices={"embed_tokens": [1, 20]})
    # a LoRA on the tied head beside trainable tokens on the embedding: refused
    t = delta("model.embed_tokens", 2)
    t.update(lora(rng, "lm_head", VOCAB, H))
    adapter(w + "/t-tied-head", t, target_modules=["lm_head"], trainable_token_indices=[1, 20])
    adapter(w + "/t-range", delta("model.embed_tokens", 2), trainable_token_indices=[3, 32])
    adapter(w + "/t-rows", delta("model.embed_tokens", 3), trainable_token_indices=[3, 4])
    adapter(w + "/t-width", delta("model.embed_tokens", 2, H + 1), trainable_token_indices=[3, 4])
    adapter(w + "/t-dup", delta("model.embed_tokens", 2), trainable_token_indices=[4, 4])


if __name__ == "__main__":
    main(sys.argv[1])
