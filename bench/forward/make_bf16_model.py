#!/usr/bin/python3
"""A deterministic Llama-shaped BF16 model of about 0.84B parameters (1.7 GB:
hidden 2048, intermediate 5632, 16 layers, 32 heads, 4 KV heads, vocab 32000,
untied lm_head) under OUT, written tensor by tensor (the generator never holds
more than one tensor). Usage: make_bf16_model.py OUT"""
import json, os, struct, sys
import numpy as np

out = sys.argv[1]
if os.path.exists(out + "/model.safetensors"):
    sys.exit(0)
os.makedirs(out, exist_ok=True)
H, F, L, NH, KV, V = 2048, 5632, 16, 32, 4, 32000
hd = H // NH
shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,)}
for l in range(L):
    p = "model.layers.%d." % l
    shapes[p + "input_layernorm.weight"] = (H,)
    shapes[p + "post_attention_layernorm.weight"] = (H,)
    shapes[p + "self_attn.q_proj.weight"] = (NH * hd, H)
    shapes[p + "self_attn.k_proj.weight"] = (KV * hd, H)
    shapes[p + "self_attn.v_proj.weight"] = (KV * hd, H)
    shapes[p + "self_attn.o_proj.weight"] = (H, NH * hd)
    shapes[p + "mlp.gate_proj.weight"] = (F, H)
    shapes[p + "mlp.up_proj.weight"] = (F, H)
    shapes[p + "mlp.down_proj.weight"] = (H, F)

def bf16_bytes(a):
    # round to nearest even: f32 bits + 0x7fff + lsb, keep the high half
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()

names = sorted(shapes)
header, off = {}, 0
for n in names:
    nb = 2 * int(np.prod(shapes[n]))
    header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [off, off + nb]}
    off += nb
hj = json.dumps(header, separators=(",", ":")).encode()
hj += b" " * (-len(hj) % 8)
rng = np.random.default_rng(0)
tmp = out + "/model.safetensors.tmp"
with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(hj)) + hj)
    for n in names:
        s = shapes[n]
        if len(s) == 1:
            a = 1.0 + 0.1 * rng.standard_normal(s, dtype=np.float32)
        elif n == "model.embed_tokens.weight":
            a = rng.standard_normal(s, dtype=np.float32)
        else:
            a = rng.standard_normal(s, dtype=np.float32) / np.float32(np.sqrt(s[1]))
        f.write(bf16_bytes(a))
os.rename(tmp, out + "/model.safetensors")
json.dump({"model_type": "llama", "hidden_size": H, "intermediate_size": F, "num_hidden_layers": L,
           "num_attention_heads": NH, "num_key_value_heads": KV, "vocab_size": V, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16"},
          open(out + "/config.json", "w"), indent=2)
print("params: %.1fM, %.2f GB" % (off / 2 / 1e6, off / 1e9))
