#!/usr/bin/python3
"""Tiny deterministic models of each family `lora forward` implements, with a
PEFT LoRA and DoRA adapter each (numpy only), for tests/e2e/e2e-families.sh.

  make_families.py FAMILY DIR   writes DIR/model (config.json as that family's
                                save_pretrained writes it in transformers 4.5x,
                                model.safetensors F32), DIR/lora and DIR/dora
                                (PEFT folders, r 4, alpha 8), DIR/lora2 (another LoRA)
FAMILY: qwen3 gemma2 gemma3_text phi3 mixtral qwen3_moe gpt2 gpt2-bare (the hub's
GPT2Model names, without "transformer.").
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_np import write  # noqa: E402

HID, LAYERS, HEADS, KV, VOCAB, FFN = 32, 2, 4, 2, 96, 48

COMMON = {"attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
          "torch_dtype": "float32", "transformers_version": "4.51.3", "use_cache": True,
          "hidden_size": HID, "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
          "num_key_value_heads": KV, "vocab_size": VOCAB}

CONFIGS = {
    # Qwen3Config: explicit head_dim (16, not hidden / heads = 8)
    "qwen3": {**COMMON, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16,
              "hidden_act": "silu", "max_position_embeddings": 40960, "max_window_layers": 28, "rms_norm_eps": 1e-06,
              "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
              "use_sliding_window": False, "attention_bias": False},
    # Gemma2Config, with soft-capping small enough to bite and a 3-token window on layer 0
    "gemma2": {**COMMON, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "head_dim": 16,
               "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
               "max_position_embeddings": 8192, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
               "attention_bias": False, "query_pre_attn_scalar": 12, "sliding_window": 3,
               "attn_logit_softcapping": 0.5, "final_logit_softcapping": 2.0, "cache_implementation": "hybrid",
               "pad_token_id": 0, "tie_word_embeddings": True},
    # Gemma3TextConfig: q/k norms, sliding layers (pattern 2: layer 0) on rope_local_base_freq,
    # full layers on rope_theta with linear scaling (as Gemma 3 4B)
    "gemma3_text": {**COMMON, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 16,
                    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
                    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "attention_bias": False,
                    "query_pre_attn_scalar": 16, "sliding_window": 4, "sliding_window_pattern": 2,
                    "attn_logit_softcapping": None, "final_logit_softcapping": None,
                    "cache_implementation": "hybrid", "pad_token_id": 0, "tie_word_embeddings": True},
    # Phi3Config: fused qkv_proj and gate_up_proj; a window on every layer
    "phi3": {**COMMON, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
             "embd_pdrop": 0.0, "resid_pdrop": 0.0, "max_position_embeddings": 4096,
             "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_scaling": None,
             "rope_theta": 10000.0, "sliding_window": 5, "tie_word_embeddings": False, "pad_token_id": 32000,
             "partial_rotary_factor": 1.0},
    # MixtralConfig: 4 experts, top 2
    "mixtral": {**COMMON, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                "sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2,
                "output_router_logits": False, "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0,
                "tie_word_embeddings": False, "head_dim": None},
    # Qwen3MoeConfig: 4 experts, top 2, no renormalisation; layer 1 dense (mlp_only_layers)
    "qwen3_moe": {**COMMON, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": 16,
                  "hidden_act": "silu", "max_position_embeddings": 40960, "max_window_layers": 28,
                  "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
                  "use_sliding_window": False, "attention_bias": False, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 24, "norm_topk_prob": False,
                  "decoder_sparse_step": 1, "mlp_only_layers": [1], "output_router_logits": False,
                  "router_aux_loss_coef": 0.001, "tie_word_embeddings": False},
    # GPT2Config as GPT2LMHeadModel.save_pretrained writes it
    "gpt2": {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
             "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
             "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 32, "n_embd": HID, "n_head": HEADS,
             "n_inner": None, "n_layer": LAYERS, "n_positions": 32, "reorder_and_upcast_attn": False,
             "resid_pdrop": 0.1, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
             "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
             "summary_type": "cls_index", "summary_use_proj": True, "torch_dtype": "float32",
             "transformers_version": "4.51.3", "use_cache": True, "vocab_size": VOCAB},
}

TARGETS = {
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "mixtral": ["q_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3"],
    "qwen3_moe": ["q_proj", "k_proj", "gate", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def tensors(family, cfg, rng):
    def n(*shape, s=0.2):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    def norm_w(d):  # gemma's (1 + w) norms hold w near 0, the others near 1
        return n(d, s=0.1) if family.startswith("gemma") else (1 + n(d, s=0.1)).astype(np.float32)
    w = {}
    if family == "gpt2":
        p = "transformer."
        w[p + "wte.weight"] = n(VOCAB, HID, s=0.5)
        w[p + "wpe.weight"] = n(cfg["n_positions"], HID, s=0.3)
        for l in range(LAYERS):
            q = p + "h.%d." % l
            for ln in ("ln_1", "ln_2"):
                w[q + ln + ".weight"], w[q + ln + ".bias"] = norm_w(HID), n(HID, s=0.1)
            for name, i, o in (("attn.c_attn", HID, 3 * HID), ("attn.c_proj", HID, HID), ("mlp.c_fc", HID, 4 * HID),
                               ("mlp.c_proj", 4 * HID, HID)):
                w[q + name + ".weight"], w[q + name + ".bias"] = n(i, o), n(o, s=0.1)
        w[p + "ln_f.weight"], w[p + "ln_f.bias"] = norm_w(HID), n(HID, s=0.1)
        return w
    hd = cfg.get("head_dim") or HID // HEADS
    w["model.embed_tokens.weight"] = n(VOCAB, HID, s=0.5)
    for l in range(LAYERS):
        p = "model.layers.%d." % l
        norms = ["input_layernorm", "post_attention_layernorm"]
        if family.startswith("gemma"):
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for nm in norms:
            w[p + nm + ".weight"] = norm_w(HID)
        if family == "phi3":
            w[p + "self_attn.qkv_proj.weight"] = n((HEADS + 2 * KV) * hd, HID)
            w[p + "mlp.gate_up_proj.weight"] = n(2 * FFN, HID)
        else:
            w[p + "self_attn.q_proj.weight"] = n(HEADS * hd, HID)
            w[p + "self_attn.k_proj.weight"] = n(KV * hd, HID)
            w[p + "self_attn.v_proj.weight"] = n(KV * hd, HID)
        w[p + "self_attn.o_proj.weight"] = n(HID, HEADS * hd)
        if family in ("qwen3", "qwen3_moe", "gemma3_text"):
            w[p + "self_attn.q_norm.weight"] = norm_w(hd)
            w[p + "self_attn.k_norm.weight"] = norm_w(hd)
        dense = family != "mixtral" and not (family == "qwen3_moe" and l not in cfg["mlp_only_layers"])
        if family == "mixtral":
            w[p + "block_sparse_moe.gate.weight"] = n(4, HID, s=0.5)
            for e in range(4):
                q = p + "block_sparse_moe.experts.%d." % e
                w[q + "w1.weight"], w[q + "w3.weight"], w[q + "w2.weight"] = n(FFN, HID), n(FFN, HID), n(HID, FFN)
        elif not dense:
            w[p + "mlp.gate.weight"] = n(4, HID, s=0.5)
            m = cfg["moe_intermediate_size"]
            for e in range(4):
                q = p + "mlp.experts.%d." % e
                w[q + "gate_proj.weight"], w[q + "up_proj.weight"], w[q + "down_proj.weight"] = \
                    n(m, HID), n(m, HID), n(HID, m)
        if dense and family != "phi3":
            w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = n(FFN, HID), n(FFN, HID)
        if dense:
            w[p + "mlp.down_proj.weight"] = n(HID, FFN)
    w["model.norm.weight"] = norm_w(HID)
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = n(VOCAB, HID, s=0.5)
    return w


def adapter(family, w, folder, dora, rng):
    os.makedirs(folder, exist_ok=True)
    conv = family == "gpt2"
    r, alpha = 4, 8
    out = {}
    for name in sorted(w):
        mod = name[: -len(".weight")]
        if not name.endswith(".weight") or w[name].ndim != 2 or mod.split(".")[-1] not in TARGETS[family]:
            continue
        n_in, n_out = (w[name].shape if conv else w[name].shape[::-1])
        a = (rng.standard_normal((r, n_in)) * 0.3).astype(np.float32)
        b = (rng.standard_normal((n_out, r)) * 0.1).astype(np.float32)
        key = "base_model.model." + mod
        out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = a, b
        if dora:
            wt = w[name].T if conv else w[name]
            v = wt.astype(np.float64) + alpha / r * b.astype(np.float64) @ a
            out[key + ".lora_magnitude_vector"] = (np.linalg.norm(v, axis=1) *
                                                   (1 + 0.2 * rng.standard_normal(n_out))).astype(np.float32)
    write(os.path.join(folder, "adapter_model.safetensors"), out)
    cfg = {"alpha_pattern": {}, "base_model_name_or_path": "model", "bias": "none", "fan_in_fan_out": conv,
           "inference_mode": True, "init_lora_weights": True, "lora_alpha": alpha, "lora_bias": False,
           "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA", "r": r, "rank_pattern": {},
           "target_modules": TARGETS[family], "task_type": "CAUSAL_LM", "use_dora": dora, "use_rslora": False}
    open(os.path.join(folder, "adapter_config.json"), "w").write(json.dumps(cfg, indent=2, sort_keys=True))


def main():
    family, folder = sys.argv[1], sys.argv[2]
    bare = family == "gpt2-bare"
    family = "gpt2" if bare else family
    cfg = CONFIGS[family]
    rng = np.random.default_rng(sorted(CONFIGS).index(family) + 11)
    w = tensors(family, cfg, rng)
    os.makedirs(os.path.join(folder, "model"), exist_ok=True)
    open(os.path.join(folder, "model", "config.json"), "w").write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if bare:  # the hub's gpt2 checkpoint: GPT2Model's names
        w = {k[len("transformer."):]: v for k, v in w.items()}
    write(os.path.join(folder, "model", "model.safetensors"), w)
    if not bare:
        adapter(family, w, os.path.join(folder, "lora"), False, rng)
        adapter(family, w, os.path.join(folder, "dora"), True, rng)
        adapter(family, w, os.path.join(folder, "lora2"), False, rng)


if __name__ == "__main__":
    main()
