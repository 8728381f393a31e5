#!/usr/bin/python3
"""One Llama-shaped layer (hidden 2048, intermediate 5632, 16 heads, 4 KV
heads) as base and tuned BF16 models for bench/extract/run.sh.

usage: make-layer.py OUT_DIR   -> OUT_DIR/base, OUT_DIR/tuned (config.json + model.safetensors)

Base weights ~ N(0, 0.02^2). Each delta: U diag(s) V^T with s_i = 0.05 * 0.95^i,
i < 256 (U, V orthonormal from the QR of seeded Gaussians) plus N(0, 1e-5^2)
noise; tuned = base + delta rounded to BF16. Fixed seed.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "e2e"))
from importlib.machinery import SourceFileLoader

gen = SourceFileLoader("gen", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "e2e",
                                           "make-extract-models.py")).load_module()

H, I, HEADS, KV = 2048, 5632, 16, 4
D = H // HEADS
SHAPES = {
    "self_attn.q_proj": (HEADS * D, H),
    "self_attn.k_proj": (KV * D, H),
    "self_attn.v_proj": (KV * D, H),
    "self_attn.o_proj": (H, HEADS * D),
    "mlp.gate_proj": (I, H),
    "mlp.up_proj": (I, H),
    "mlp.down_proj": (H, I),
}


def main():
    out = sys.argv[1]
    rng = np.random.default_rng(2024)
    base, tuned = {}, {}
    for mod, (m, n) in SHAPES.items():
        name = f"model.layers.0.{mod}.weight"
        w = (0.02 * rng.standard_normal((m, n))).astype(np.float32)
        w = (gen.to_bf16_bits(w).astype(np.uint32) << 16).view(np.float32)  # exactly bf16
        k = 256
        u, _ = np.linalg.qr(rng.standard_normal((m, k)).astype(np.float32))
        v, _ = np.linalg.qr(rng.standard_normal((n, k)).astype(np.float32))
        s = (0.05 * 0.95 ** np.arange(k)).astype(np.float32)
        delta = (u * s) @ v.T + 1e-5 * rng.standard_normal((m, n)).astype(np.float32)
        base[name] = ("BF16", w)
        tuned[name] = ("BF16", w + delta)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        base[f"model.layers.0.{norm}.weight"] = ("BF16", np.ones(H, dtype=np.float32))
        tuned[f"model.layers.0.{norm}.weight"] = ("BF16", np.ones(H, dtype=np.float32))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
              "intermediate_size": I, "num_attention_heads": HEADS, "num_key_value_heads": KV,
              "num_hidden_layers": 1, "torch_dtype": "bfloat16"}
    for what, tensors in (("base", base), ("tuned", tuned)):
        d = os.path.join(out, what)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        gen.write(os.path.join(d, "model.safetensors"), tensors, {"format": "pt"})


if __name__ == "__main__":
    main()
