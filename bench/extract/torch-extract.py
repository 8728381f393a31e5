#!/usr/bin/python3
"""The PyTorch baselines of bench/extract/run.sh, as whole processes.

usage: torch-extract.py svd|lowrank BASE_DIR TUNED_DIR OUT_DIR RANK

svd:     torch.linalg.svd(dW, full_matrices=False), truncated to RANK (what
         mergekit's extract_lora and sd-scripts' extract_lora_from_models do;
         no clamping here). Also saves every singular value (OUT_DIR/s-<module>.npy)
         so the benchmark knows the optimal rank-RANK error.
lowrank: torch.svd_lowrank(dW, q=RANK + 10, niter=2) (same oversampling and
         power iterations as lora extract).
Writes OUT_DIR/adapter_model.safetensors (BF16, PEFT keys, balanced split
B = U sqrt(S), A = sqrt(S) V^T) like lora extract does.
"""
import json
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from importlib.machinery import SourceFileLoader

gen = SourceFileLoader("gen", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "e2e",
                                           "make-extract-models.py")).load_module()


def load(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    buf = bytearray(data[8 + n:])
    out = {}
    for name, t in header.items():
        b, e = t["data_offsets"]
        assert t["dtype"] == "BF16"
        out[name] = torch.frombuffer(buf[b:e], dtype=torch.bfloat16).reshape(t["shape"])
    return out


def main():
    mode, base_dir, tuned_dir, out, r = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    base = load(os.path.join(base_dir, "model.safetensors"))
    tuned = load(os.path.join(tuned_dir, "model.safetensors"))
    os.makedirs(out, exist_ok=True)
    factors = {}
    torch.manual_seed(0)
    for name in sorted(base):
        if base[name].dim() != 2 or torch.equal(base[name], tuned[name]):
            continue
        p = name[: -len(".weight")]
        dw = tuned[name].float() - base[name].float()
        if mode == "svd":
            u, s, vh = torch.linalg.svd(dw, full_matrices=False)
            np.save(os.path.join(out, f"s-{p}.npy"), s.numpy())
            v = vh[:r].T
        else:
            u, s, v = torch.svd_lowrank(dw, q=r + 10, niter=2)
        root = s[:r].sqrt()
        b = u[:, :r] * root
        a = (v[:, :r] * root).T
        factors[f"base_model.model.{p}.lora_A.weight"] = ("BF16", a.contiguous().numpy())
        factors[f"base_model.model.{p}.lora_B.weight"] = ("BF16", b.contiguous().numpy())
    gen.write(os.path.join(out, "adapter_model.safetensors"), factors, {"format": "pt"})


if __name__ == "__main__":
    main()
