#!/usr/bin/env python3
"""check_peft_params.py BASE ADAPTER OUT: every tensor of the merged model OUT
against numpy's float64 value of BASE with ADAPTER merged the way PEFT
merges it, written independently of lora's code (numpy only):

  LoRA            W + s B A
  ParamWrapper    tuners/lora/layer.py get_delta_weight (huggingface/peft
                  5d602fdb): A.reshape(E, r, in), B.reshape(out, r, E),
                  einsum("o r e, e r i -> e o i") (or "-> e i o" for
                  transformers' is_transposed experts, gpt-oss), times s
  trainable tokens  W.index_copy(0, indices, delta) (TrainableTokensLayer.merge)

s = alpha / r or alpha / sqrt(r) (use_rslora); r and alpha from
rank_pattern / alpha_pattern matched against the parameter key as
^(.*\\.)?(KEY)$. Tolerance: BF16 outputs must be the float64 value rounded
once (to nearest even) bit for bit; F32 within 2^-22 (|W0| + |s| sum |B||A|)
per element (f32 products). Tensors the adapter does not touch: the same
bytes. Prints "ok" or the first differences.
"""
import json
import math
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_np import bf16_bits as bf16_round  # noqa: E402
from safetensors_np import read  # noqa: E402

P = "base_model.model."
ORDER = ["gate_up_proj", "gate_proj", "w1", "up_proj", "w3", "down_proj", "w2"]  # registration order




def pattern(patterns, key, default):
    for k, v in patterns.items():
        if re.fullmatch(r"(.*\.)?(%s)" % k, key):
            return v
    return default


def main(base_dir, adapter_dir, out_dir):
    base, _ = read(base_dir + "/model.safetensors")
    out, _ = read(out_dir + "/model.safetensors")
    ad, _ = read(adapter_dir + "/adapter_model.safetensors")
    c = json.load(open(adapter_dir + "/adapter_config.json"))
    mtype = json.load(open(base_dir + "/config.json")).get("model_type")
    targets = c.get("target_parameters") or []
    expect, bound = {}, {}

    def w0(name):
        return expect.setdefault(name, base[name][3].copy())

    # LoRA pairs, by saved module path
    mods = {}
    for k in ad:
        for role in ("lora_A", "lora_B"):
            if k.endswith("." + role + ".weight"):
                mods.setdefault(k[len(P):-len("." + role + ".weight")], {})[role] = ad[k][3]
    by_module = {}
    for path in mods:
        depth = path.count(".base_layer")
        by_module.setdefault(path.replace(".base_layer", ""), []).append((depth, path))
    for module, wrappers in by_module.items():
        params = [t.rsplit(".", 1)[-1] for t in targets
                  if (module + "." + t.rsplit(".", 1)[-1]) == t or (module + "." + t.rsplit(".", 1)[-1]).endswith("." + t)]
        params = sorted(dict.fromkeys(params), key=lambda p: ORDER.index(p) if p in ORDER else len(ORDER))
        for depth, path in wrappers:
            A, B = mods[path]["lora_A"], mods[path]["lora_B"]
            key = module + "." + params[len(params) - 1 - depth] if params else module
            name = key if params else module + ".weight"
            r = pattern(c.get("rank_pattern") or {}, key, c["r"])
            alpha = pattern(c.get("alpha_pattern") or {}, key, c["lora_alpha"])
            s = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
            W = w0(name)
            if W.ndim == 3:
                e = W.shape[0]
                A3, B3 = A.reshape(e, r, -1), B.reshape(B.shape[0], r, e)
                transposed = W.shape[1] == A.shape[1] and (W.shape[2] != A.shape[1] or mtype == "gpt_oss")
                spec = "ore,eri->eio" if transposed else "ore,eri->eoi"
                d = np.einsum(spec, B3, A3) * s
                t = np.einsum(spec, np.abs(B3), np.abs(A3)) * abs(s)
            else:
                d, t = s * B @ A, abs(s) * np.abs(B) @ np.abs(A)
            expect[name] = W + d
            bound[name] = bound.get(name, np.abs(W)) + t

    # trainable tokens: rows replaced
    tti = c.get("trainable_token_indices")
    if tti is not None:
        entries = {"embed_tokens": tti} if isinstance(tti, list) else tti
        for k, v in ad.items():
            if not k.endswith(".token_adapter.trainable_tokens_delta"):
                continue
            path = k[len(P):-len(".token_adapter.trainable_tokens_delta")]
            idx = next(ix for key, ix in entries.items() if path == key or path.endswith("." + key))
            W = w0(path + ".weight")
            W[np.array(idx)] = v[3]
            bound.setdefault(path + ".weight", np.abs(W))

    bad = []
    for name, (dt, shape, raw, val) in base.items():
        if name not in out:
            bad.append(name + ": missing")
            continue
        odt, oshape, oraw, oval = out[name]
        if name not in expect:
            if raw != oraw:
                bad.append(name + ": untouched tensor changed")
            continue
        x = expect[name]
        if odt == "BF16":
            got = np.frombuffer(oraw, np.uint16).reshape(oshape)
            want = bf16_round(x)
            n = int(np.sum(got != want))
            if n:
                bad.append("%s: %d BF16 elements differ from the float64 value rounded once" % (name, n))
        else:
            err = np.abs(oval - x)
            tol = 2.0 ** -22 * bound[name] + 1e-30
            n = int(np.sum(err > tol))
            if n:
                bad.append("%s: %d F32 elements off by more than 2^-22 (|W0| + |s||B||A|), max %g" %
                           (name, n, float(np.max(err))))
    extra = sorted(set(out) - set(base))
    if extra:
        bad.append("extra tensors: " + ", ".join(extra))
    print("ok" if not bad else "; ".join(bad[:5]))


if __name__ == "__main__":
    main(*sys.argv[1:4])
