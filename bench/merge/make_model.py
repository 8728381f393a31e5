"""Writes the merge benchmark's inputs under bench/out/merge (deterministic):
a Llama-shaped BF16 model (hidden 2048, intermediate 5632, 4 layers, 16 heads,
4 KV heads, vocab 32000: about 0.6 GB) and a PEFT rank-16 adapter (alpha 32,
F32) on all seven linear modules of every layer."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import safetensors_np as st  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB, RANK, ALPHA = 2048, 5632, 4, 16, 4, 32000, 16, 32
KV = HIDDEN // HEADS * KV_HEADS
MODULES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
           "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
           "mlp.down_proj": (HIDDEN, INTER)}


def write(path, tensors, metadata):
    header, offsets, names = st.layout({k: (dt, v.shape) for k, (dt, v) in tensors.items()}, metadata)
    with open(path + ".tmp", "wb") as f:
        f.write(header)
        for k in names:
            f.write(np.ascontiguousarray(tensors[k][1]).tobytes())
    os.replace(path + ".tmp", path)


def main(out):
    model_dir, adapter_dir = os.path.join(out, "base"), os.path.join(out, "adapter")
    if os.path.exists(os.path.join(model_dir, "model.safetensors")) and \
            os.path.exists(os.path.join(adapter_dir, "adapter_model.safetensors")):
        return
    os.makedirs(model_dir, exist_ok=True)
    os.makedirs(adapter_dir, exist_ok=True)
    rng = np.random.default_rng(1234)

    def bf16(shape, std):
        return ("BF16", st.f32_to_bf16_bits(rng.standard_normal(shape, dtype=np.float32) * np.float32(std)))

    t = {"model.embed_tokens.weight": bf16((VOCAB, HIDDEN), 0.02), "lm_head.weight": bf16((VOCAB, HIDDEN), 0.02),
         "model.norm.weight": bf16((HIDDEN,), 1.0)}
    for layer in range(LAYERS):
        p = "model.layers.%d." % layer
        t[p + "input_layernorm.weight"] = bf16((HIDDEN,), 1.0)
        t[p + "post_attention_layernorm.weight"] = bf16((HIDDEN,), 1.0)
        for m, shape in MODULES.items():
            t[p + m + ".weight"] = bf16(shape, 0.02)
    write(os.path.join(model_dir, "model.safetensors"), t, {"format": "pt"})
    json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
               "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
               "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
              open(os.path.join(model_dir, "config.json"), "w"), indent=2)

    # adapter: A ~ U(+-1/sqrt(in)) (PEFT's kaiming init), B ~ N(0, 0.002²): trained-sized deltas
    a = {}
    for layer in range(LAYERS):
        for m, (n_out, n_in) in MODULES.items():
            k = "base_model.model.model.layers.%d.%s" % (layer, m)
            a[k + ".lora_A.weight"] = ("F32", rng.uniform(-1, 1, (RANK, n_in)).astype(np.float32) / np.float32(np.sqrt(n_in)))
            a[k + ".lora_B.weight"] = ("F32", rng.standard_normal((n_out, RANK), dtype=np.float32) * np.float32(0.002))
    write(os.path.join(adapter_dir, "adapter_model.safetensors"), a, None)
    json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
               "target_modules": sorted(m.split(".")[1] for m in MODULES), "fan_in_fan_out": False, "bias": "none",
               "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
               "base_model_name_or_path": "bench-llama"},
              open(os.path.join(adapter_dir, "adapter_config.json"), "w"), indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
