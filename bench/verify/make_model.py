"""Writes the verify benchmark's inputs under OUT (deterministic): an F32
model with a 512 MiB embedding (embed_tokens [131072, 1024]), one large
linear (mlp.down_proj [8192, 8192], 256 MiB) and a small rest; a PEFT
rank-16 LoRA on embed_tokens (adapter-emb) and a rank-16 DoRA on down_proj
(adapter-dora). config.json names an architecture without a forward pass,
so `lora verify` runs its weight and layer levels only.
Usage: make_model.py OUT"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "merge"))
import safetensors_np as st  # noqa: E402

VOCAB, HIDDEN, BIG, RANK, ALPHA = 131072, 1024, 8192, 16, 32


def write(path, tensors):
    header, _, names = st.layout({k: ("F32", v.shape) for k, v in tensors.items()}, {"format": "pt"})
    with open(path + ".tmp", "wb") as f:
        f.write(header)
        for k in names:
            f.write(np.ascontiguousarray(tensors[k], dtype=np.float32).tobytes())
    os.replace(path + ".tmp", path)


def adapter(path, target, dora, tensors):
    os.makedirs(path, exist_ok=True)
    write(os.path.join(path, "adapter_model.safetensors"), tensors)
    json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
               "target_modules": [target], "fan_in_fan_out": False, "bias": "none", "use_rslora": False,
               "use_dora": dora, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}},
              open(os.path.join(path, "adapter_config.json"), "w"), indent=2)


def main(out):
    base = os.path.join(out, "base")
    if os.path.exists(os.path.join(out, "adapter-dora", "adapter_model.safetensors")):
        return
    os.makedirs(base, exist_ok=True)
    rng = np.random.default_rng(4321)

    def normal(shape, std):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    write(os.path.join(base, "model.safetensors"),
          {"model.embed_tokens.weight": normal((VOCAB, HIDDEN), 0.02),
           "model.layers.0.mlp.down_proj.weight": normal((BIG, BIG), 0.02),
           "model.layers.0.input_layernorm.weight": normal((HIDDEN,), 1.0),
           "model.norm.weight": normal((HIDDEN,), 1.0)})
    json.dump({"model_type": "bench_no_forward", "hidden_size": HIDDEN, "vocab_size": VOCAB},
              open(os.path.join(base, "config.json"), "w"), indent=2)
    p = "base_model.model.model."
    adapter(os.path.join(out, "adapter-emb"), "embed_tokens", False,
            {p + "embed_tokens.lora_embedding_A": normal((RANK, VOCAB), 1.0),
             p + "embed_tokens.lora_embedding_B": normal((HIDDEN, RANK), 0.002)})
    adapter(os.path.join(out, "adapter-dora"), "down_proj", True,
            {p + "layers.0.mlp.down_proj.lora_A.weight": normal((RANK, BIG), 1.0 / np.sqrt(BIG)),
             p + "layers.0.mlp.down_proj.lora_B.weight": normal((BIG, RANK), 0.002),
             p + "layers.0.mlp.down_proj.lora_magnitude_vector": rng.uniform(1.0, 3.0, BIG).astype(np.float32)})


if __name__ == "__main__":
    main(sys.argv[1])
