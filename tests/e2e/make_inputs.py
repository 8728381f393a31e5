"""Inputs that several e2e scripts build, one copy each.

Usage:
  make_inputs.py slow-merge BASE_DIR LORA_DIR
      a merge slow enough to be caught mid-way: one 4096 x 4096 BF16 weight
      and a rank-1024 F32 adapter on it (34 GFLOP, about a second on one thread)
  make_inputs.py gpt2-hub FOLDER N_LAYER
      a GPT-2 checkpoint as the hub ships gpt2 / distilgpt2: bare GPT2Model names
      (wte, wpe, h.N.ln_1, h.N.attn.c_attn [in, out] Conv1D, h.N.attn.bias
      buffers, ...), F32, hidden 768 and 12 heads (the shapes of
      ../shared/fixtures/gradience_tiny_lora), n_inner 64, vocab 64, 32
      positions, and the config.json save_pretrained writes for it
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


def gpt2_hub(folder, n_layer):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(11)
    d, inner, vocab, n_pos = 768, 64, 64, 32

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    t = {"wte.weight": w(vocab, d), "wpe.weight": w(n_pos, d),
         "ln_f.weight": np.ones(d, np.float32), "ln_f.bias": np.zeros(d, np.float32)}
    causal = np.tril(np.ones((n_pos, n_pos), np.float32)).reshape(1, 1, n_pos, n_pos)
    for i in range(n_layer):
        p = "h.%d." % i
        t[p + "ln_1.weight"] = np.ones(d, np.float32)
        t[p + "ln_1.bias"] = np.zeros(d, np.float32)
        t[p + "attn.bias"] = causal
        t[p + "attn.c_attn.weight"] = w(d, 3 * d)
        t[p + "attn.c_attn.bias"] = w(3 * d)
        t[p + "attn.c_proj.weight"] = w(d, d)
        t[p + "attn.c_proj.bias"] = w(d)
        t[p + "ln_2.weight"] = np.ones(d, np.float32)
        t[p + "ln_2.bias"] = np.zeros(d, np.float32)
        t[p + "mlp.c_fc.weight"] = w(d, inner)
        t[p + "mlp.c_fc.bias"] = w(inner)
        t[p + "mlp.c_proj.weight"] = w(inner, d)
        t[p + "mlp.c_proj.bias"] = w(d)
    write(folder + "/model.safetensors", t)
    json.dump({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
               "n_embd": d, "n_head": 12, "n_layer": n_layer, "n_inner": inner, "n_positions": n_pos,
               "n_ctx": n_pos, "vocab_size": vocab, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
               "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32"},
              open(folder + "/config.json", "w"), indent=2)


def nan_factor(path):
    t, _ = read(path)
    out = {k: v[3].astype(np.float32) for k, v in t.items()}
    out["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][1, 2] = np.nan
    write(path, out)


if __name__ == "__main__":
    if sys.argv[1] == "gpt2-hub":
        gpt2_hub(sys.argv[2], int(sys.argv[3]))
    else:
        {"slow-merge": slow_merge, "nan-factor": nan_factor}[sys.argv[1]](*sys.argv[2:])
