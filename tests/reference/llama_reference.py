#!/usr/bin/python3
"""HF-equivalent Llama / Qwen2 forward pass in plain torch (transformers is not
installed), used once to produce tests/reference/llama-logits.safetensors, which
tests/test-llama.cpp compares `lora`'s forward pass against.

Follows transformers' modeling_llama.py / modeling_qwen2.py: LlamaRMSNorm (f32),
rotary embeddings with rotate_half and inv_freq = 1 / theta^(arange(0, d, 2) / d),
repeat_kv for grouped-query attention, causal softmax(q k^T / sqrt(d)) in f32,
SwiGLU MLP, final norm, lm_head (tied to embed_tokens when tie_word_embeddings).
LoRA is applied unmerged as PEFT's Linear.forward does: y = W0 x + s B(A x);
DoRA as PEFT's DoraLinearLayer: y = (m / ||W0 + s B A||_row) (W0 x + s B A x).

Usage: /usr/bin/python3 tests/reference/llama_reference.py  (from the repo root)
"""
import json
import struct
import sys

import numpy as np
import torch

TOKENS = [1, 17, 42, 255, 0, 128, 7, 99, 3, 200, 64, 5]


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        raw = data[base + b:base + end]
        if e["dtype"] == "F32":
            a = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif e["dtype"] == "F16":
            a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif e["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(e["dtype"])
        out[name] = torch.from_numpy(a.reshape(e["shape"]).copy())
    return out


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        b = tensors[name].astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def load_model(folder):
    cfg = json.load(open(folder + "/config.json"))
    w = {}
    index = folder + "/model.safetensors.index.json"
    try:
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    except FileNotFoundError:
        files = ["model.safetensors"]
    for f in files:
        w.update(read_safetensors(folder + "/" + f))
    return cfg, w


def load_adapter(folder):
    cfg = json.load(open(folder + "/adapter_config.json"))
    t = read_safetensors(folder + "/adapter_model.safetensors")
    mods = {}
    for k, v in t.items():
        k = k.replace(".default", "")
        p = k[len("base_model.model."):]
        for suffix, what in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector", "m")):
            if p.endswith(suffix):
                mods.setdefault(p[: -len(suffix)], {})[what] = v
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and not cfg["use_rslora"]
    scale = cfg["lora_alpha"] / cfg["r"]
    return mods, scale


def rms_norm(x, w, eps):
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def forward(cfg, w, tokens, adapter=None):
    mods, scale = adapter if adapter else ({}, 0.0)

    def linear(x, name, bias):
        W = w[name + ".weight"]
        y = x @ W.T
        if name in mods:
            m = mods[name]
            lora = (x @ m["A"].T) @ m["B"].T * scale
            if "m" in m:
                V = W + scale * m["B"] @ m["A"]
                g = m["m"] / V.norm(p=2, dim=1)
                y = g * (y + lora)
            else:
                y = y + lora
        if bias:
            y = y + w[name + ".bias"]
        return y

    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or H // nh
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    T = len(tokens)
    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = torch.arange(T).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    mask = torch.full((T, T), float("-inf")).triu(1)
    for l in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % l
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = linear(h, p + "self_attn.q_proj", qkv_bias).view(T, nh, hd).transpose(0, 1)
        k = linear(h, p + "self_attn.k_proj", qkv_bias).view(T, nkv, hd).transpose(0, 1)
        v = linear(h, p + "self_attn.v_proj", qkv_bias).view(T, nkv, hd).transpose(0, 1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(nh // nkv, dim=0)  # repeat_kv
        v = v.repeat_interleave(nh // nkv, dim=0)
        s = q @ k.transpose(1, 2) / (hd ** 0.5) + mask
        a = torch.softmax(s, dim=-1, dtype=torch.float32) @ v
        a = a.transpose(0, 1).reshape(T, nh * hd)
        x = x + linear(a, p + "self_attn.o_proj", cfg["model_type"] != "qwen2" and cfg.get("attention_bias", False))
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = torch.nn.functional.silu(linear(h, p + "mlp.gate_proj", False))
        x = x + linear(g * linear(h, p + "mlp.up_proj", False), p + "mlp.down_proj", False)
    h = rms_norm(x, w["model.norm.weight"], eps)
    if cfg.get("tie_word_embeddings", False):
        return h @ w["model.embed_tokens.weight"].T
    return linear(h, "lm_head", False)


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "."
    td = root + "/testdata/"
    torch.set_grad_enabled(False)
    out = {"tokens": np.array(TOKENS, dtype=np.float32)}
    for key, model, adapter in [
        ("tiny-llama", "tiny-llama", None),
        ("tiny-llama-f16-sharded", "tiny-llama-f16-sharded", None),
        ("tiny-llama-tied", "tiny-llama-tied", None),
        ("tiny-qwen2", "tiny-qwen2", None),
        ("tiny-llama+lora-tiny-llama", "tiny-llama", "lora-tiny-llama"),
        ("tiny-llama+lora-tiny-llama-dora", "tiny-llama", "lora-tiny-llama-dora"),
    ]:
        cfg, w = load_model(td + model)
        ad = load_adapter(td + adapter) if adapter else None
        out[key] = forward(cfg, w, TOKENS, ad).numpy()
    write_safetensors(root + "/tests/reference/llama-logits.safetensors", out)
    print("wrote", ", ".join("%s %s" % (k, list(v.shape)) for k, v in out.items()))


if __name__ == "__main__":
    main()
