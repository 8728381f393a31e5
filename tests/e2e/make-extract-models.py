#!/usr/bin/python3
"""Tuned models for tests/e2e/e2e-extract.sh, made at test time (numpy only).

usage: make-extract-models.py BASE_FOLDER OUT_DIR

Reads BASE_FOLDER/model.safetensors (BF16, e.g. testdata/tiny-llama) and writes
folders under OUT_DIR, each with config.json and model.safetensors:
  tuned/        base + per linear weight a rank-8 delta with singular values
                0.5 * q^i (i < 8, q = 0.45 attention, 0.7 MLP) + N(0, 1e-4^2) noise, rounded to bf16
                (layer-1 o_proj left unchanged), input_layernorm of layer 0
                shifted by 0.01 (a 1-D delta)
  missing/      tuned without model.norm.weight
  shape/        tuned with lm_head.weight cut to [255, 64]
  base-int/     base plus the I32 tensor "extra.ids" = 0..7
  tuned-int/    tuned plus "extra.ids" = 1..8 (an integer delta: cannot be subtracted)
Deterministic: fixed seed.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np

DTYPE_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
               "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
               "F64", "I64", "U64"]


def read(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    buf = data[8 + n:]
    out = {}
    for name, t in header.items():
        b, e = t["data_offsets"]
        raw = buf[b:e]
        if t["dtype"] == "BF16":
            u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32).reshape(t["shape"])
        elif t["dtype"] == "F32":
            arr = np.frombuffer(raw, dtype="<f4").reshape(t["shape"]).copy()
        else:
            raise SystemExit(f"unexpected dtype {t['dtype']}")
        out[name] = (t["dtype"], arr)
    return out, meta


def to_bf16_bits(x):
    """f32 -> bf16 bits, round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype("<u2")


def write(path, tensors, meta):
    items = []
    for name, (dt, arr) in tensors.items():
        if dt == "BF16":
            raw = to_bf16_bits(arr).tobytes()
        elif dt == "F32":
            raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        elif dt == "I32":
            raw = np.ascontiguousarray(arr, dtype="<i4").tobytes()
        else:
            raise SystemExit(dt)
        items.append((name, dt, list(arr.shape), raw))
    items.sort(key=lambda t: (-DTYPE_ORDER.index(t[1]), t[0]))
    header = {}
    if meta is not None:
        header["__metadata__"] = meta
    off = 0
    for name, dt, shape, raw in items:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, _, raw in items:
            f.write(raw)


def folder(out, name, base_dir, tensors, meta):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(base_dir, "config.json"), os.path.join(d, "config.json"))
    write(os.path.join(d, "model.safetensors"), tensors, meta)


def main():
    base_dir, out = sys.argv[1], sys.argv[2]
    base, meta = read(os.path.join(base_dir, "model.safetensors"))
    rng = np.random.default_rng(1234)
    tuned = {}
    for name, (dt, w) in sorted(base.items()):
        w = w.astype(np.float64)
        linear = w.ndim == 2 and name.endswith("_proj.weight")
        if linear and name != "model.layers.1.self_attn.o_proj.weight":
            m, n = w.shape
            k = 8
            u, _ = np.linalg.qr(rng.standard_normal((m, k)))
            v, _ = np.linalg.qr(rng.standard_normal((n, k)))
            s = 0.5 * (0.45 if "self_attn" in name else 0.7) ** np.arange(k)
            w = w + (u * s) @ v.T + 1e-4 * rng.standard_normal((m, n))
        if name == "model.layers.0.input_layernorm.weight":
            w = w + 0.01
        tuned[name] = (dt, w.astype(np.float32))
    folder(out, "tuned", base_dir, tuned, meta)

    missing = dict(tuned)
    del missing["model.norm.weight"]
    folder(out, "missing", base_dir, missing, meta)

    shape = dict(tuned)
    dt, w = shape["lm_head.weight"]
    shape["lm_head.weight"] = (dt, w[:255])
    folder(out, "shape", base_dir, shape, meta)

    base_int = dict(base)
    base_int["extra.ids"] = ("I32", np.arange(8, dtype=np.int32))
    folder(out, "base-int", base_dir, base_int, meta)
    tuned_int = dict(tuned)
    tuned_int["extra.ids"] = ("I32", np.arange(1, 9, dtype=np.int32))
    folder(out, "tuned-int", base_dir, tuned_int, meta)


if __name__ == "__main__":
    main()
