#!/usr/bin/python3
"""Inputs of bench/fp8/run.sh (numpy only, fixed seed), written once under OUT:
OUT/fp8   four 4096 x 4096 down_proj weights in block-scaled FP8 (F8_E4M3,
          F32 weight_scale_inv per 128x128 block, Qwen3-8B-FP8's
          quantization_config): 64 MiB
OUT/bf16  the same weights in BF16 (the float64 values rounded once): 128 MiB
OUT/lora  a PEFT LoRA, rank 16, alpha 16, F32, on the four weights
Usage: make_model.py OUT"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/e2e"))
from fp8_np import bf16_bits, quantize  # noqa: E402
from safetensors_np import write  # noqa: E402

N, LAYERS, R = 4096, 4, 16


def main():
    out = sys.argv[1]
    if os.path.exists(os.path.join(out, "lora", "adapter_config.json")):
        return
    rng = np.random.default_rng(1)
    t8, t16, lora = {}, {}, {}
    for k in range(LAYERS):
        name = "model.layers.%d.mlp.down_proj.weight" % k
        w = rng.standard_normal((N, N)) * 0.02
        codes, scales = quantize(w, [128, 128])
        t8[name] = ("F8_E4M3", [N, N], codes.tobytes())
        t8[name + "_scale_inv"] = scales
        t16[name] = ("BF16", [N, N], bf16_bits(w).tobytes())
        key = "base_model.model.model.layers.%d.mlp.down_proj" % k
        lora[key + ".lora_A.weight"] = (rng.standard_normal((R, N)) * 0.01).astype(np.float32)
        lora[key + ".lora_B.weight"] = (rng.standard_normal((N, R)) * 0.01).astype(np.float32)
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    for d, t, cfg in (("fp8", t8, {"model_type": "llama", "quantization_config": qc}),
                      ("bf16", t16, {"model_type": "llama"})):
        os.makedirs(os.path.join(out, d), exist_ok=True)
        write(os.path.join(out, d, "model.safetensors"), t)
        json.dump(cfg, open(os.path.join(out, d, "config.json"), "w"))
    os.makedirs(os.path.join(out, "lora"), exist_ok=True)
    write(os.path.join(out, "lora", "adapter_model.safetensors"), lora)
    json.dump({"peft_type": "LORA", "r": R, "lora_alpha": R, "target_modules": ["down_proj"]},
              open(os.path.join(out, "lora", "adapter_config.json"), "w"))


if __name__ == "__main__":
    main()
