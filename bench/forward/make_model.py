#!/usr/bin/python3
"""A deterministic Llama-shaped F32 model of about 100M parameters (hidden 768,
8 layers, 12 heads, 4 KV heads, intermediate 2048, vocab 32000) under OUT."""
import json, os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../tests/reference"))
from llama_reference import write_safetensors

out = sys.argv[1]
if os.path.exists(out + "/model.safetensors"):
    sys.exit(0)
os.makedirs(out, exist_ok=True)
H, F, L, NH, KV, V = 768, 2048, 8, 12, 4, 32000
hd = H // NH
rng = np.random.default_rng(0)
w = {}
def mat(o, i): return (rng.standard_normal((o, i), dtype=np.float32) / np.sqrt(i)).astype(np.float32)
w["model.embed_tokens.weight"] = rng.standard_normal((V, H), dtype=np.float32)
w["lm_head.weight"] = mat(V, H)
w["model.norm.weight"] = np.ones(H, np.float32)
for l in range(L):
    p = "model.layers.%d." % l
    w[p + "input_layernorm.weight"] = np.ones(H, np.float32)
    w[p + "post_attention_layernorm.weight"] = np.ones(H, np.float32)
    w[p + "self_attn.q_proj.weight"] = mat(NH * hd, H)
    w[p + "self_attn.k_proj.weight"] = mat(KV * hd, H)
    w[p + "self_attn.v_proj.weight"] = mat(KV * hd, H)
    w[p + "self_attn.o_proj.weight"] = mat(H, NH * hd)
    w[p + "mlp.gate_proj.weight"] = mat(F, H)
    w[p + "mlp.up_proj.weight"] = mat(F, H)
    w[p + "mlp.down_proj.weight"] = mat(H, F)
write_safetensors(out + "/model.safetensors", w)
json.dump({"model_type": "llama", "hidden_size": H, "intermediate_size": F, "num_hidden_layers": L,
           "num_attention_heads": NH, "num_key_value_heads": KV, "vocab_size": V, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu"},
          open(out + "/config.json", "w"), indent=2)
print("params: %.1fM" % (sum(a.size for a in w.values()) / 1e6))
