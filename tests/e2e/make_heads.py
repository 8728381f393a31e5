"""Inputs of tests/e2e/e2e-heads.sh: tiny Llama-style models (F32 and BF16)
and PEFT adapters (numpy only, fixed seeds).

  tied-f32/, tied-bf16/   tie_word_embeddings true, no lm_head.weight (Qwen2.5
                          0.5B-3B, Llama 3.2 1B/3B, Gemma checkpoints)
  untied-f32/             the same with its own lm_head.weight
  a-head/                 LoRA on q_proj and lm_head (r 4, alpha 8)
  a-head-bf16/            LoRA on lm_head for the BF16 model
  a-save-head/            modules_to_save lm_head (+ LoRA on q_proj)
  a-seqcls/               SEQ_CLS: modules_to_save score.weight, LoRA on q_proj
  a-classifier/           modules_to_save classifier.weight / .bias
  a-tokens/               modules_to_save embed_tokens and lm_head with 4 more rows
  a-tokens-tied/          modules_to_save embed_tokens with 4 more rows (tied base)
  bad-cols/               modules_to_save embed_tokens with other columns
  bad-rows/               modules_to_save q_proj with more rows
  bad-fewer/              modules_to_save embed_tokens with fewer rows
  a-inf/                  LoRA on q_proj whose product overflows F32 (a write-time failure)
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_np import write  # noqa: E402

VOCAB, HID, INTER, LAYERS, HEADS, KV = 64, 16, 32, 1, 2, 1


def bf16(a):
    """float -> ("BF16", shape, bytes), round to nearest even."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return ("BF16", list(np.shape(a)), u.tobytes())


def model(out, rng, dtype, tied):
    os.makedirs(out, exist_ok=True)
    t = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HID)) * 0.5,
         "model.norm.weight": 1 + rng.standard_normal(HID) * 0.1}
    hd = HID // HEADS
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        t[p + "input_layernorm.weight"] = 1 + rng.standard_normal(HID) * 0.1
        t[p + "post_attention_layernorm.weight"] = 1 + rng.standard_normal(HID) * 0.1
        t[p + "self_attn.q_proj.weight"] = rng.standard_normal((HID, HID)) * 0.2
        t[p + "self_attn.k_proj.weight"] = rng.standard_normal((KV * hd, HID)) * 0.2
        t[p + "self_attn.v_proj.weight"] = rng.standard_normal((KV * hd, HID)) * 0.2
        t[p + "self_attn.o_proj.weight"] = rng.standard_normal((HID, HID)) * 0.2
        t[p + "mlp.gate_proj.weight"] = rng.standard_normal((INTER, HID)) * 0.2
        t[p + "mlp.up_proj.weight"] = rng.standard_normal((INTER, HID)) * 0.2
        t[p + "mlp.down_proj.weight"] = rng.standard_normal((HID, INTER)) * 0.2
    if not tied:
        t["lm_head.weight"] = rng.standard_normal((VOCAB, HID)) * 0.5
    conv = (lambda a: bf16(a)) if dtype == "bf16" else (lambda a: np.asarray(a, np.float32))
    write(out + "/model.safetensors", {k: conv(v) for k, v in t.items()})
    config = {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": HID, "intermediate_size": INTER, "max_position_embeddings": 64, "model_type": "llama",
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32", "vocab_size": VOCAB,
    }
    with open(out + "/config.json", "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def adapter(out, tensors, targets, saved=(), task="CAUSAL_LM", r=4, alpha=8):
    os.makedirs(out, exist_ok=True)
    write(out + "/adapter_model.safetensors", {f"base_model.model.{k}": v for k, v in tensors.items()})
    config = {"peft_type": "LORA", "task_type": task, "r": r, "lora_alpha": alpha, "target_modules": targets,
              "modules_to_save": list(saved) or None, "fan_in_fan_out": False, "bias": "none"}
    with open(out + "/adapter_config.json", "w") as f:
        json.dump(config, f, indent=2)


def lora(rng, name, n_out, n_in, r=4):
    return {f"{name}.lora_A.weight": (rng.standard_normal((r, n_in)) * 0.3).astype(np.float32),
            f"{name}.lora_B.weight": (rng.standard_normal((n_out, r)) * 0.3).astype(np.float32)}


def main(w):
    rng = np.random.default_rng(14)
    model(w + "/tied-f32", rng, "f32", True)
    model(w + "/tied-bf16", rng, "bf16", True)
    model(w + "/untied-f32", rng, "f32", False)
    q = "model.layers.0.self_attn.q_proj"
    f32 = np.float32
    adapter(w + "/a-head", {**lora(rng, q, HID, HID), **lora(rng, "lm_head", VOCAB, HID)}, ["q_proj", "lm_head"])
    adapter(w + "/a-head-bf16", lora(rng, "lm_head", VOCAB, HID), ["lm_head"])
    adapter(w + "/a-save-head", {**lora(rng, q, HID, HID), "lm_head.weight": rng.standard_normal((VOCAB, HID)).astype(f32)},
            ["q_proj"], ["lm_head"])
    adapter(w + "/a-seqcls", {**lora(rng, q, HID, HID), "score.weight": rng.standard_normal((3, HID)).astype(f32)},
            ["q_proj"], ["score"], task="SEQ_CLS")
    adapter(w + "/a-classifier", {**lora(rng, q, HID, HID), "classifier.weight": rng.standard_normal((3, HID)).astype(f32),
                                  "classifier.bias": rng.standard_normal(3).astype(f32)}, ["q_proj"], ["classifier"],
            task="SEQ_CLS")
    grown = lambda: rng.standard_normal((VOCAB + 4, HID)).astype(f32)  # noqa: E731
    adapter(w + "/a-tokens", {**lora(rng, q, HID, HID), "model.embed_tokens.weight": grown(), "lm_head.weight": grown()},
            ["q_proj"], ["embed_tokens", "lm_head"])
    adapter(w + "/a-tokens-tied", {"model.embed_tokens.weight": grown(), **lora(rng, q, HID, HID)}, ["q_proj"],
            ["embed_tokens"])
    adapter(w + "/bad-cols", {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HID + 4)).astype(f32),
                              **lora(rng, q, HID, HID)}, ["q_proj"], ["embed_tokens"])
    adapter(w + "/bad-rows", {f"{q}.weight": rng.standard_normal((HID + 4, HID)).astype(f32),
                              **lora(rng, "model.layers.0.self_attn.o_proj", HID, HID)}, ["o_proj"], ["q_proj"])
    adapter(w + "/bad-fewer", {"model.embed_tokens.weight": rng.standard_normal((VOCAB - 4, HID)).astype(f32),
                               **lora(rng, q, HID, HID)}, ["q_proj"], ["embed_tokens"])
    big = lora(rng, q, HID, HID)
    for k in big:
        big[k] = np.full_like(big[k], 1e30)
    adapter(w + "/a-inf", big, ["q_proj"])


if __name__ == "__main__":
    main(sys.argv[1])
