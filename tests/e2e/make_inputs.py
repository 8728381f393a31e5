"""Inputs that several e2e scripts build, one copy each.

Usage:
  make_inputs.py slow-merge BASE_DIR LORA_DIR
      a merge slow enough to be caught mid-way: one 4096 x 4096 BF16 weight
      and a rank-1024 F32 adapter on it (34 GFLOP, about a second on one thread)
  make_inputs.py nan-factor ADAPTER_FILE
      rewrites a tiny-llama PEFT adapter file in F32 with one NaN in
      layers.0.self_attn.q_proj's lora_B [1, 2]
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_np import read, write  # noqa: E402


def slow_merge(base, lora):
    os.makedirs(base, exist_ok=True)
    os.makedirs(lora, exist_ok=True)
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((4096, 4096), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    write(base + "/model.safetensors", {"model.layers.0.mlp.down_proj.weight": ("BF16", [4096, 4096], w.tobytes())})
    json.dump({"model_type": "llama"}, open(base + "/config.json", "w"))
    json.dump({"peft_type": "LORA", "r": 1024, "lora_alpha": 1024, "target_modules": ["down_proj"]},
              open(lora + "/adapter_config.json", "w"))
    p = "base_model.model.model.layers.0.mlp.down_proj."
    write(lora + "/adapter_model.safetensors",
          {p + "lora_A.weight": rng.standard_normal((1024, 4096), dtype=np.float32) * np.float32(1e-3),
           p + "lora_B.weight": rng.standard_normal((4096, 1024), dtype=np.float32) * np.float32(1e-3)})


def nan_factor(path):
    t, _ = read(path)
    out = {k: v[3].astype(np.float32) for k, v in t.items()}
    out["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][1, 2] = np.nan
    write(path, out)


if __name__ == "__main__":
    {"slow-merge": slow_merge, "nan-factor": nan_factor}[sys.argv[1]](*sys.argv[2:])
