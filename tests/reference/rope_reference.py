#!/usr/bin/python3
"""Float64 numpy reference for rotary-embedding scaling and sliding-window
attention in the Llama family (llama, mistral, qwen2), independent of lora's
C++ code. Follows transformers 5.x (src/transformers/modeling_rope_utils.py:
standardize_rope_params, _compute_*_parameters, dynamic_rope_update;
models/llama/modeling_llama.py: cos/sin times attention_scaling;
masking_utils.sliding_window_overlay: kv_idx > q_idx - window;
models/qwen2/configuration_qwen2.py: layer_types from use_sliding_window and
max_window_layers), read at zucchini-nlp/transformers commit 26892c16.
Needs numpy only.

  rope_reference.py inv-freq            prints tests/reference/rope-inv-freq.json
                                        (regenerate: ... inv-freq > tests/reference/rope-inv-freq.json)
  rope_reference.py compare MODEL LOGITS TOKENS [--min-diff OTHER_LOGITS]
      runs MODEL (a folder: config.json + model.safetensors) over TOKENS
      (comma-separated) in float64 and compares with LOGITS (lora forward's
      output): prints "ok <rel>" when max|got - ref| <= 1e-4 max|ref|, else
      "mismatch <rel>". With --min-diff, also requires the reference to differ
      from OTHER_LOGITS by more than 1e-3 max|ref| (the setting under test
      changes the result), else prints "no-effect".
"""
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
from safetensors_np import read  # noqa: E402

DEFAULT_MAX_POS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}


# ---- config: the per-layer rope dicts and windows, as transformers 5.x reads them ----

def head_dim_of(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def layer_types_of(cfg):
    if cfg.get("layer_types") is not None:
        return cfg["layer_types"]
    if cfg["model_type"] == "qwen2":
        window = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window", False) else None
        mwl = cfg.get("max_window_layers", 28)
        return ["sliding_attention" if window is not None and i >= mwl else "full_attention"
                for i in range(cfg["num_hidden_layers"])]
    return None


def standardize(cfg):
    """One rope dict per layer (convert_rope_params_to_dict + standardize_rope_params)."""
    rp = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = cfg.get("rope_theta", 10000.0)
    max_pos = cfg.get("max_position_embeddings", DEFAULT_MAX_POS[cfg["model_type"]])
    types = layer_types_of(cfg)
    n = cfg["num_hidden_layers"]

    def fill(d, nested):
        d = dict(d)
        d.setdefault("rope_type", d.get("type", "default"))
        d.setdefault("rope_theta", theta)
        if d["rope_type"] in ("llama3", "yarn", "longrope"):
            if not nested and "original_max_position_embeddings" in cfg:
                d["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
            else:
                d.setdefault("original_max_position_embeddings", max_pos)
        return d

    if types is None or not rp or not set(rp).issubset(types):
        one = fill(rp, False)
        return [one] * n, max_pos
    return [fill(rp[t], True) for t in types], max_pos


def layer_windows(cfg):
    n = cfg["num_hidden_layers"]
    if cfg["model_type"] == "mistral":
        return [cfg.get("sliding_window", 4096) or 0] * n
    if cfg["model_type"] == "qwen2":
        window = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window", False) else None
        return [window if t == "sliding_attention" else 0 for t in layer_types_of(cfg)]
    return [0] * n


# ---- inv_freq and attention factor per rope_type ----

def inv_freq(d, dim, max_pos, seq_len):
    """(inv_freq [dim/2], attention_factor) for rope dict d over positions 0..seq_len-1."""
    base = d["rope_theta"]
    t = d["rope_type"]
    expo = np.arange(0, dim, 2, dtype=np.float64) / dim
    default = 1.0 / base ** expo
    if t == "default":
        return default, 1.0
    if t == "linear":
        return default / d["factor"], 1.0
    if t == "dynamic":
        # dynamic_rope_update: recomputed with seq_len once it exceeds max_position_embeddings
        length = max(seq_len, max_pos)
        f = d["factor"]
        b = base * ((f * length / max_pos) - (f - 1)) ** (dim / (dim - 2))
        return 1.0 / b ** expo, 1.0
    if t == "llama3":
        f, lo, hi = d["factor"], d["low_freq_factor"], d["high_freq_factor"]
        old = d["original_max_position_embeddings"]
        wavelen = 2 * math.pi / default
        out = np.where(wavelen > old / lo, default / f, default)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return np.where(medium, (1 - smooth) * out / f + smooth * out, out), 1.0
    if t == "yarn":
        orig = d["original_max_position_embeddings"]
        f = d.get("factor") or max_pos / orig

        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        att = d.get("attention_factor")
        if att is None:
            att = mscale(f, d["mscale"]) / mscale(f, d["mscale_all_dim"]) \
                if d.get("mscale") and d.get("mscale_all_dim") else mscale(f)
        bf, bs = d.get("beta_fast") or 32, d.get("beta_slow") or 1

        def cdim(rot):
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = cdim(bf), cdim(bs)
        if d.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrap_w = 1 - ramp
        return default / f * (1 - extrap_w) + default * extrap_w, att
    if t == "longrope":
        orig = d["original_max_position_embeddings"]
        f = d.get("factor") or max_pos / orig
        att = d.get("attention_factor")
        if att is None:
            att = 1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(orig))
        ext = np.array(d["long_factor"] if seq_len > orig else d["short_factor"], dtype=np.float64)
        return default / ext, att
    raise ValueError("unknown rope_type " + t)


# ---- the forward pass in float64 ----

def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def forward(folder, tokens):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    w = {k: v[3] for k, v in read(os.path.join(folder, "model.safetensors"))[0].items()}
    ropes, max_pos = standardize(cfg)
    windows = layer_windows(cfg)
    H, KV, D = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"], head_dim_of(cfg)
    eps = cfg.get("rms_norm_eps", 1e-6)
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    x = w["model.embed_tokens.weight"][tokens]
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)

    def lin(name, h, bias):
        y = h @ w[name + ".weight"].T
        return y + w[name + ".bias"] if bias else y
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms(x, w[p + "input_layernorm.weight"], eps)
        q = lin(p + "self_attn.q_proj", h, qkv_bias).reshape(T, H, D)
        k = lin(p + "self_attn.k_proj", h, qkv_bias).reshape(T, KV, D)
        v = lin(p + "self_attn.v_proj", h, qkv_bias).reshape(T, KV, D)
        inv, att = inv_freq(ropes[layer], D, max_pos, T)
        ang = np.concatenate([np.outer(pos, inv)] * 2, axis=1)
        cos, sin = (np.cos(ang) * att)[:, None, :], (np.sin(ang) * att)[:, None, :]

        def rot(t):
            return np.concatenate([-t[..., D // 2:], t[..., :D // 2]], axis=-1)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        s = np.einsum("ihd,jhd->hij", q, k) / math.sqrt(D)
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        allowed = j <= i
        if windows[layer]:
            allowed &= j > i - windows[layer]
        s = np.where(allowed[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hij,jhd->ihd", s, v).reshape(T, H * D)
        x = x + lin(p + "self_attn.o_proj", a, cfg.get("attention_bias", False) and cfg["model_type"] != "qwen2")
        h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        g, u = lin(p + "mlp.gate_proj", h, False), lin(p + "mlp.up_proj", h, False)
        x = x + lin(p + "mlp.down_proj", g / (1 + np.exp(-g)) * u, False)
    h = rms(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return h @ head.T


# ---- inv_freq cases for tests/test-rope.cpp ----

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 2,
         "num_attention_heads": 4, "vocab_size": 8, "max_position_embeddings": 128}
LLAMA31 = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 32, "vocab_size": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
SHORT = [1.0 + 0.1 * i for i in range(8)]
LONG = [2.0 + 0.5 * i for i in range(8)]
CASES = [
    ("default", {**LLAMA}, 12),
    ("default theta 5.x", {**LLAMA, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, 12),
    ("linear", {**LLAMA, "rope_scaling": {"type": "linear", "factor": 4.0}}, 12),
    ("dynamic short", {**LLAMA, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 12),
    ("dynamic long", {**LLAMA, "max_position_embeddings": 8, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 12),
    ("llama3", {**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, 12),
    ("llama 3.1", LLAMA31, 16),
    ("yarn", {**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}, 12),
    ("yarn no truncate, betas", {**LLAMA, "rope_parameters": {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 3.0,
                                                             "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False,
                                                             "original_max_position_embeddings": 64}}, 12),
    ("yarn mscale", {**LLAMA, "max_position_embeddings": 512,
                     "rope_scaling": {"rope_type": "yarn", "factor": None, "mscale": 0.707, "mscale_all_dim": 1.0,
                                      "original_max_position_embeddings": 64}}, 12),
    ("yarn attention_factor", {**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.5,
                                                         "original_max_position_embeddings": 64}}, 12),
    ("longrope short", {**LLAMA, "original_max_position_embeddings": 32,
                        "rope_scaling": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}}, 12),
    ("longrope long", {**LLAMA, "rope_scaling": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                                 "factor": 16.0, "original_max_position_embeddings": 8}}, 12),
]


def inv_freq_cases():
    out = []
    for name, cfg, seq_len in CASES:
        ropes, max_pos = standardize(cfg)
        inv, att = inv_freq(ropes[0], head_dim_of(cfg), max_pos, seq_len)
        out.append({"name": name, "config": cfg, "seq_len": seq_len, "inv_freq": [float(v) for v in inv],
                    "attention_factor": float(att)})
    return out


def main():
    if sys.argv[1] == "inv-freq":
        json.dump(inv_freq_cases(), sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
        return
    folder, logits_path, tokens = sys.argv[2], sys.argv[3], [int(t) for t in sys.argv[4].split(",")]
    ref = forward(folder, tokens)
    got = read(logits_path)[0]["logits"][3]
    scale = np.abs(ref).max()
    rel = float(np.abs(got - ref).max() / scale)
    if got.shape != ref.shape or not rel <= 1e-4:
        print(f"mismatch {rel:.3g}")
    elif len(sys.argv) > 6 and sys.argv[5] == "--min-diff" and \
            not np.abs(read(sys.argv[6])[0]["logits"][3] - ref).max() > 1e-3 * scale:
        print("no-effect")
    else:
        print(f"ok {rel:.3g}")


if __name__ == "__main__":
    main()
