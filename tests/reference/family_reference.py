#!/usr/bin/python3
"""Float64 numpy reference forward pass of the decoder-only families `lora
forward` implements beyond the Llama base (qwen3, gemma2, gemma3_text, phi3,
mixtral, qwen3_moe, gpt2; llama / mistral / qwen2 too), written from the
transformers modeling files, independent of lora's C++ code. Needs numpy only.

Sources (transformers 4.5x; huggingface/transformers @006e8693 for gemma2):
  models/qwen3/modeling_qwen3.py          Qwen3Attention: q_norm / k_norm (RMSNorm over head_dim) before RoPE
  models/gemma2/modeling_gemma2.py        Gemma2RMSNorm x * rsqrt(mean x^2 + eps) * (1 + w); four norms per layer;
                                          hidden * sqrt(hidden_size) (normalizer in the model dtype);
                                          scaling = query_pre_attn_scalar**-0.5; scores soft-capped
                                          cap * tanh(s / cap) before the mask; layer i slides when i % 2 == 0;
                                          logits soft-capped by final_logit_softcapping; gelu_pytorch_tanh
  models/gemma3/modeling_gemma3.py        Gemma2's layout plus q_norm / k_norm (1 + w); layer i slides when
                                          (i + 1) % sliding_window_pattern != 0; sliding layers use the default
                                          rotary embedding with base rope_local_base_freq, full layers rope_theta
                                          and rope_scaling
  models/phi3/modeling_phi3.py            qkv_proj -> q = [:H d], k = [H d : H d + KV d], v = rest;
                                          gate_up_proj -> gate, up = chunk(2); up * act(gate)
  models/mixtral/modeling_mixtral.py      MixtralSparseMoeBlock: softmax(gate(h)) in float, topk, divided by
                                          their sum; experts w2(act(w1 h) * w3 h)
  models/qwen3_moe/modeling_qwen3_moe.py  Qwen3MoeSparseMoeBlock: the same router, divided by the sum only when
                                          norm_topk_prob; sparse layers: not in mlp_only_layers and
                                          (i + 1) % decoder_sparse_step == 0
  models/gpt2/modeling_gpt2.py            wte + wpe; LayerNorm(ln_1) -> Conv1D c_attn (x @ W + b, W [in, out])
                                          -> split q, k, v -> causal softmax(q k^T / sqrt(d)) -> c_proj;
                                          ln_2 -> c_fc -> gelu_new -> c_proj; ln_f; logits = h wte^T
LoRA is applied unmerged as PEFT's Linear.forward: y = base(x) + s (x A^T) B^T;
DoRA as PEFT's DoraLinearLayer: y = m / ||W + s B A||_row (x W^T + s x A^T B^T) + b,
for a Conv1D (fan_in_fan_out) the same on W^T.

  family_reference.py compare MODEL LOGITS TOKENS [--adapter DIR] [--bites KEY] [--differs OTHER_LOGITS]
      runs MODEL over TOKENS (comma-separated) in float64 (with the adapter
      applied unmerged) and compares with LOGITS (lora forward's output):
      "ok <rel>" when max|got - ref| <= 1e-4 max|ref|, else "mismatch <rel>".
      --bites KEY: also requires that setting config KEY to null changes the
      reference by more than 1e-3 max|ref| (else "no-effect"): soft-capping,
      windows. --differs: the reference must differ from OTHER_LOGITS alike.
"""
import json
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
sys.path.insert(0, HERE)
from safetensors_np import read  # noqa: E402
from rope_reference import inv_freq, standardize  # noqa: E402
import rope_reference  # noqa: E402

rope_reference.DEFAULT_MAX_POS.update({"qwen3": 32768, "qwen3_moe": 32768, "gemma2": 8192, "gemma3_text": 131072,
                                       "phi3": 4096, "mixtral": 4096 * 32})


def load_weights(folder):
    w = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            w.update({k: v[3] for k, v in read(os.path.join(folder, f))[0].items()})
    return w


def load_adapter(folder):
    if folder is None:
        return {}, {}
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    t = {k: v[3] for k, v in read(os.path.join(folder, "adapter_model.safetensors"))[0].items()}
    mods = {}
    for k, v in t.items():
        p = k[len("base_model.model."):]
        for suffix, what in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector", "m")):
            if p.endswith(suffix):
                mods.setdefault(p[: -len(suffix)], {})[what] = v
    s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    return mods, {"scale": s, "fan_in_fan_out": cfg.get("fan_in_fan_out", False)}


class Model:
    def __init__(self, folder, adapter=None, overrides=None):
        self.cfg = json.load(open(os.path.join(folder, "config.json")))
        self.cfg.update(overrides or {})
        self.w = load_weights(folder)
        self.mods, self.acfg = load_adapter(adapter)
        self.t = self.cfg["model_type"]

    # y = x W^T (+ b) (+ LoRA / DoRA); conv: W stored [in, out] (GPT-2 Conv1D)
    def lin(self, name, x, bias=False, conv=False):
        W = self.w[name + ".weight"]
        Wt = W.T if conv else W  # [out, in]
        y = x @ Wt.T
        if name in self.mods:
            m, s = self.mods[name], self.acfg["scale"]
            lora = (x @ m["A"].T) @ m["B"].T * s
            if "m" in m:
                V = Wt + s * m["B"] @ m["A"]
                y = m["m"] / np.linalg.norm(V, axis=1) * (y + lora)
            else:
                y = y + lora
        if bias:
            y = y + self.w[name + ".bias"]
        return y

    def norm(self, name, x):
        eps = self.cfg.get("layer_norm_epsilon", 1e-5) if self.t == "gpt2" else \
            self.cfg.get("rms_norm_eps", 1e-5 if self.t in ("mixtral", "phi3") else 1e-6)
        w = self.w[name + ".weight"]
        if self.t == "gpt2":
            mu = x.mean(-1, keepdims=True)
            var = ((x - mu) ** 2).mean(-1, keepdims=True)
            return (x - mu) / np.sqrt(var + eps) * w + self.w[name + ".bias"]
        r = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        return r * (1.0 + w) if self.t.startswith("gemma") else r * w

    def act(self, x):
        a = self.cfg.get("hidden_activation") if self.t.startswith("gemma") else \
            self.cfg.get("activation_function", "gelu_new") if self.t == "gpt2" else self.cfg.get("hidden_act", "silu")
        if a in ("gelu_pytorch_tanh", "gelu_new"):
            return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        assert a == "silu", a
        return x / (1 + np.exp(-x))

    def layer_types(self):
        c, n = self.cfg, self.cfg["num_hidden_layers"] if self.t != "gpt2" else self.cfg["n_layer"]
        if c.get("layer_types"):
            return c["layer_types"]
        if self.t == "gemma2":
            return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        if self.t == "gemma3_text":
            p = c.get("sliding_window_pattern", 6)
            return ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]
        if self.t in ("qwen2", "qwen3", "qwen3_moe"):
            win = c.get("sliding_window") if c.get("use_sliding_window") else None
            return ["sliding_attention" if win and i >= c.get("max_window_layers", 28) else "full_attention"
                    for i in range(n)]
        win = c.get("sliding_window")
        return ["sliding_attention" if win else "full_attention"] * n

    def attention(self, p, h, layer, T, ropes, max_pos):
        c = self.cfg
        if self.t == "gpt2":
            H = c["n_head"]
            D = c["n_embd"] // H
            KV = H
        else:
            H = c["num_attention_heads"]
            KV = c.get("num_key_value_heads") or H
            D = c.get("head_dim") or c["hidden_size"] // H
        bias = self.t == "gpt2" or c.get("attention_bias", False)
        if self.t == "gpt2":
            qkv = self.lin(p + "attn.c_attn", h, True, True)
            q, k, v = qkv[:, :H * D], qkv[:, H * D:2 * H * D], qkv[:, 2 * H * D:]
        elif self.t == "phi3":
            qkv = self.lin(p + "self_attn.qkv_proj", h)
            q, k, v = qkv[:, :H * D], qkv[:, H * D:(H + KV) * D], qkv[:, (H + KV) * D:]
        else:
            q = self.lin(p + "self_attn.q_proj", h, bias)
            k = self.lin(p + "self_attn.k_proj", h, bias)
            v = self.lin(p + "self_attn.v_proj", h, bias)
        q, k, v = q.reshape(T, H, D), k.reshape(T, KV, D), v.reshape(T, KV, D)
        if self.t in ("qwen3", "qwen3_moe", "gemma3_text"):
            q = self.norm(p + "self_attn.q_norm", q)
            k = self.norm(p + "self_attn.k_norm", k)
        ltype = self.layer_types()[layer]
        if self.t != "gpt2":
            rp = ropes[layer]
            if self.t == "gemma3_text" and ltype == "sliding_attention" and \
                    "sliding_attention" not in (c.get("rope_parameters") or {}):
                rp = {"rope_type": "default", "rope_theta": c.get("rope_local_base_freq", 10000.0)}
            inv, att = inv_freq(rp, D, max_pos, T)
            ang = np.concatenate([np.outer(np.arange(T, dtype=np.float64), inv)] * 2, axis=1)
            cos, sin = (np.cos(ang) * att)[:, None, :], (np.sin(ang) * att)[:, None, :]

            def rot(t):
                return np.concatenate([-t[..., D // 2:], t[..., :D // 2]], axis=-1)
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        if self.t.startswith("gemma"):
            scaling = c["query_pre_attn_scalar"] ** -0.5
        elif self.t == "gpt2":
            scaling = (1 / math.sqrt(D) if c.get("scale_attn_weights", True) else 1.0) / \
                (layer + 1 if c.get("scale_attn_by_inverse_layer_idx") else 1)
        else:
            scaling = 1 / math.sqrt(D)
        s = np.einsum("ihd,jhd->hij", q, k) * scaling
        cap = c.get("attn_logit_softcapping") if self.t.startswith("gemma") else None
        if cap:
            s = np.tanh(s / cap) * cap
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        allowed = j <= i
        if ltype == "sliding_attention":
            allowed &= j > i - c["sliding_window"]
        s = np.where(allowed[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hij,jhd->ihd", s, v).reshape(T, H * D)
        if self.t == "gpt2":
            return self.lin(p + "attn.c_proj", a, True, True)
        return self.lin(p + "self_attn.o_proj", a, bias)

    def dense(self, p, h):
        if self.t == "gpt2":
            return self.lin(p + "mlp.c_proj", self.act(self.lin(p + "mlp.c_fc", h, True, True)), True, True)
        if self.t == "phi3":
            gu = self.lin(p + "mlp.gate_up_proj", h)
            g, u = np.split(gu, 2, axis=-1)
            return self.lin(p + "mlp.down_proj", u * self.act(g))
        bias = self.cfg.get("mlp_bias", False)
        return self.lin(p + "mlp.down_proj", self.act(self.lin(p + "mlp.gate_proj", h, bias)) *
                        self.lin(p + "mlp.up_proj", h, bias), bias)

    def moe(self, p, h, layer):
        c = self.cfg
        if self.t == "mixtral":
            router, experts, names, renorm = p + "block_sparse_moe.gate", p + "block_sparse_moe.experts.", \
                ("w1", "w3", "w2"), True
            E = c["num_local_experts"]
        elif self.t == "qwen3_moe" and layer not in c.get("mlp_only_layers", []) and \
                c["num_experts"] > 0 and (layer + 1) % c.get("decoder_sparse_step", 1) == 0:
            router, experts, names, renorm = p + "mlp.gate", p + "mlp.experts.", \
                ("gate_proj", "up_proj", "down_proj"), c.get("norm_topk_prob", False)
            E = c["num_experts"]
        else:
            return None
        logits = self.lin(router, h)
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        K = c["num_experts_per_tok"]
        top = np.argsort(-prob, axis=-1, kind="stable")[:, :K]
        wts = np.take_along_axis(prob, top, -1)
        if renorm:
            wts = wts / wts.sum(-1, keepdims=True)
        out = np.zeros_like(h)
        for e in range(E):
            rows, slot = np.nonzero(top == e)
            if len(rows) == 0:
                continue
            ep = experts + "%d." % e
            x = h[rows]
            y = self.lin(ep + names[2], self.act(self.lin(ep + names[0], x)) * self.lin(ep + names[1], x))
            out[rows] += wts[rows, slot][:, None] * y
        return out

    def forward(self, tokens):
        c, T = self.cfg, len(tokens)
        if self.t == "gpt2":
            pre = "transformer." if "transformer.wte.weight" in self.w else ""
            x = self.w[pre + "wte.weight"][tokens] + self.w[pre + "wpe.weight"][np.arange(T)]
            x = x + self.embed_lora(pre + "wte", tokens)
            ropes, max_pos, n = None, None, c["n_layer"]
        else:
            pre = "model."
            x = self.w["model.embed_tokens.weight"][tokens] + self.embed_lora("model.embed_tokens", tokens)
            if self.t.startswith("gemma"):
                # the normalizer in the model dtype (torch_dtype of the saved model: float32 here)
                x = x * np.float64(np.float32(math.sqrt(c["hidden_size"])))
            ropes, max_pos = standardize(c)
            n = c["num_hidden_layers"]
        for layer in range(n):
            if self.t == "gpt2":
                p = pre + "h.%d." % layer
                x = x + self.attention(p, self.norm(p + "ln_1", x), layer, T, ropes, max_pos)
                x = x + self.dense(p, self.norm(p + "ln_2", x))
                continue
            p = "model.layers.%d." % layer
            a = self.attention(p, self.norm(p + "input_layernorm", x), layer, T, ropes, max_pos)
            if self.t.startswith("gemma"):
                x = x + self.norm(p + "post_attention_layernorm", a)
                m = self.dense(p, self.norm(p + "pre_feedforward_layernorm", x))
                x = x + self.norm(p + "post_feedforward_layernorm", m)
                continue
            x = x + a
            h = self.norm(p + "post_attention_layernorm", x)
            m = self.moe(p, h, layer)
            x = x + (m if m is not None else self.dense(p, h))
        h = self.norm(pre + "ln_f" if self.t == "gpt2" else "model.norm", x)
        tied = c.get("tie_word_embeddings", self.t in ("gemma2", "gemma3_text", "gpt2"))
        if tied:
            logits = h @ self.w[(pre + "wte" if self.t == "gpt2" else "model.embed_tokens") + ".weight"].T
        else:
            logits = self.lin("lm_head", h)
        cap = c.get("final_logit_softcapping") if self.t.startswith("gemma") else None
        if cap:
            logits = np.tanh(logits / cap) * cap
        return logits

    def embed_lora(self, name, tokens):
        m = self.mods.get(name)
        if m is None:
            return 0.0
        return (m["B"] @ m["A"][:, tokens]).T * self.acfg["scale"]


def main():
    args = sys.argv[1:]
    assert args[0] == "compare"
    folder, logits_path, tokens = args[1], args[2], [int(t) for t in args[3].split(",")]
    opts = dict(zip(args[4::2], args[5::2]))
    ref = Model(folder, opts.get("--adapter")).forward(tokens)
    got = read(logits_path)[0]["logits"][3]
    scale = np.abs(ref).max()
    rel = float(np.abs(got - ref).max() / scale) if got.shape == ref.shape else float("inf")
    if not rel <= 1e-4:
        print(f"mismatch {rel:.3g}")
        return
    if "--bites" in opts:
        other = Model(folder, opts.get("--adapter"), {opts["--bites"]: None}).forward(tokens)
        if not np.abs(other - ref).max() > 1e-3 * scale:
            print("no-effect")
            return
    if "--differs" in opts and not np.abs(read(opts["--differs"])[0]["logits"][3] - ref).max() > 1e-3 * scale:
        print("no-effect")
        return
    print(f"ok {rel:.3g}")


if __name__ == "__main__":
    main()
