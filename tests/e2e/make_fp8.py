#!/usr/bin/python3
"""Tiny deterministic block-scaled FP8 Qwen3 models and a PEFT LoRA for
tests/e2e/e2e-fp8.sh (numpy only).

  make_fp8.py DIR   writes
    DIR/fp8-128    Qwen3 (hidden 136, head_dim 16, 4 / 2 heads, MLP 200, vocab 96,
                   one layer) as Qwen3-8B-FP8 ships: every projection F8_E4M3 with
                   an F32 `weight_scale_inv` per 128x128 block (edge blocks
                   partial: [200, 136] has 2 x 2 blocks), embed_tokens, norms
                   and lm_head BF16; config.json with Qwen3-8B-FP8's
                   quantization_config
    DIR/fp8-small  the same weights quantized with weight_block_size [16, 24]
                   (13 x 6 blocks on [200, 136]); rows 0..15 of gate_proj are zero
                   (an all-zero block, scale 1)
    DIR/lora       PEFT LoRA r 4, alpha 8 on q_proj, v_proj, gate_proj, down_proj
                   (k_proj, o_proj, up_proj untouched); lora_B rows 0..15 of
                   gate_proj zero, so that the zero block stays zero
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp8_np import bf16_bits, quantize  # noqa: E402
from safetensors_np import write  # noqa: E402

HID, HEADS, KV, HD, FFN, VOCAB = 136, 4, 2, 16, 200, 96
QCONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
CONFIG = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
          "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": HD, "hidden_act": "silu",
          "hidden_size": HID, "initializer_range": 0.02, "intermediate_size": FFN, "max_position_embeddings": 40960,
          "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": HEADS, "num_hidden_layers": 1,
          "num_key_value_heads": KV, "quantization_config": QCONFIG, "rms_norm_eps": 1e-06, "rope_scaling": None,
          "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
          "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB}
PROJ = {"self_attn.q_proj": (HEADS * HD, HID), "self_attn.k_proj": (KV * HD, HID),
        "self_attn.v_proj": (KV * HD, HID), "self_attn.o_proj": (HID, HEADS * HD),
        "mlp.gate_proj": (FFN, HID), "mlp.up_proj": (FFN, HID), "mlp.down_proj": (HID, FFN)}
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def bf16(x):
    return ("BF16", list(x.shape), bf16_bits(x).tobytes())


def main():
    out = sys.argv[1]
    rng = np.random.default_rng(8)
    # the float64 weights each model quantizes (scaled so that blocks differ)
    w = {}
    for name, shape in PROJ.items():
        v = rng.standard_normal(shape) * 0.05
        v *= np.exp(rng.standard_normal((shape[0], 1)) * 0.5)  # rows of different magnitudes
        w["model.layers.0." + name + ".weight"] = v
    w["model.layers.0.mlp.gate_proj.weight"][:16] = 0.0
    plain = {"model.embed_tokens.weight": bf16(rng.standard_normal((VOCAB, HID)) * 0.5),
             "model.norm.weight": bf16(1 + rng.standard_normal(HID) * 0.1),
             "lm_head.weight": bf16(rng.standard_normal((VOCAB, HID)) * 0.5)}
    for nm in ("input_layernorm", "post_attention_layernorm"):
        plain["model.layers.0.%s.weight" % nm] = bf16(1 + rng.standard_normal(HID) * 0.1)
    for nm in ("q_norm", "k_norm"):
        plain["model.layers.0.self_attn.%s.weight" % nm] = bf16(1 + rng.standard_normal(HD) * 0.1)
    for folder, block in (("fp8-128", [128, 128]), ("fp8-small", [16, 24])):
        t = dict(plain)
        for name, v in w.items():
            codes, scales = quantize(v, block)
            t[name] = ("F8_E4M3", list(v.shape), codes.tobytes())
            t[name + "_scale_inv"] = scales
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        write(os.path.join(out, folder, "model.safetensors"), t)
        cfg = dict(CONFIG, quantization_config=dict(QCONFIG, weight_block_size=block))
        open(os.path.join(out, folder, "config.json"), "w").write(json.dumps(cfg, indent=2) + "\n")
    # the adapter: deltas large enough to move every block's maximum
    lora = {}
    r, alpha = 4, 8
    for name, (o, i) in PROJ.items():
        if name.split(".")[-1] not in TARGETS:
            continue
        a = rng.standard_normal((r, i)) * 0.2
        b = rng.standard_normal((o, r)) * 0.05
        if name == "mlp.gate_proj":
            b[:16] = 0.0
        key = "base_model.model.model.layers.0." + name
        lora[key + ".lora_A.weight"] = a.astype(np.float32)
        lora[key + ".lora_B.weight"] = b.astype(np.float32)
    os.makedirs(os.path.join(out, "lora"), exist_ok=True)
    write(os.path.join(out, "lora", "adapter_model.safetensors"), lora)
    cfg = {"alpha_pattern": {}, "base_model_name_or_path": "Qwen/Qwen3-8B-FP8", "bias": "none",
           "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": alpha, "lora_dropout": 0.0,
           "modules_to_save": None, "peft_type": "LORA", "r": r, "rank_pattern": {}, "target_modules": TARGETS,
           "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False}
    open(os.path.join(out, "lora", "adapter_config.json"), "w").write(json.dumps(cfg, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
