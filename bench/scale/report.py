#!/usr/bin/python3
"""Prints bench/scale's table (medians) and ratios from measure.py's JSON lines;
for extract, the relative error of each module against the BF16 rounding
floor of layer 0's modules: ||W_merged - W0 - s B A|| / ||W_merged - W0||
in float64 (no rank-16 factorization of W_merged - W0 can beat it by much:
the rounding noise is spread over every direction).
Usage: report.py RESULTS.jsonl OUT_DIR BASE MERGED"""
import json
import os
import struct
import sys

import numpy as np


def main():
    results, out, base, merged = sys.argv[1:5]
    rows = [json.loads(l) for l in open(results) if l.strip()]
    by = {(r["label"], r["cache"]): r for r in rows}
    print("%-9s %-5s %9s %8s %8s %11s %6s  %s" % ("command", "cache", "wall s", "user s", "sys s", "anon MiB", "load",
                                                  "runs (wall s)"))
    for r in rows:
        runs = ", ".join("%.1f%s" % (x["wall"], "" if x["exit"] == 0 else "(exit %d)" % x["exit"]) for x in r["runs"])
        print("%-9s %-5s %9.1f %8.1f %8.1f %11.1f %6.2f  %s" % (r["label"], r["cache"], r["wall"], r["user"], r["sys"],
                                                                r["anon_mib"], r["load"], runs))
    for cache in ("cold", "warm"):
        mg, cp = by.get(("merge", cache)), by.get(("cp -r", cache))
        if mg and cp:
            print("merge / cp -r, %s cache: wall %.2fx, system time %.2fx (target: wall <= 1.15x)" % (
                cache, mg["wall"] / cp["wall"], mg["sys"] / max(cp["sys"], 1e-9)))
    mg = by.get(("merge", "cold"))
    for label in ("verify", "extract", "forward"):
        r = by.get((label, "cold"))
        if r and mg:
            print("%s / merge (cold): %.2fx wall%s; peak anon %.0f MiB%s" % (
                label, r["wall"] / mg["wall"], " (target <= 4x)" if label != "forward" else "", r["anon_mib"],
                " (target < 2048)" if label != "forward" else ""))
    if ("extract", "cold") in by:
        extract_floor(out, base, merged)


def tensor(folder, name):
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]
    path = os.path.join(folder, index[name])
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    e = h[name]
    b, end = e["data_offsets"]
    raw = np.fromfile(path, dtype=np.uint16, count=(end - b) // 2, offset=8 + n + b)
    return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64).reshape(e["shape"])


def extract_floor(out, base, merged):
    path = os.path.join(out, "extract.out")
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    rep = json.load(open(path))
    errors = {m["module"]: m["relative_error"] for m in rep["modules"]}
    adapter = os.path.join(os.path.dirname(base), "adapter", "adapter_model.safetensors")
    with open(adapter, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    def factor(key):
        e = h[key]
        b, end = e["data_offsets"]
        return np.fromfile(adapter, dtype=np.float32, count=(end - b) // 4, offset=8 + n + b).astype(
            np.float64).reshape(e["shape"])
    print("extract --rank 16: total relative error %.4e over %d modules; worst %.4e" % (
        rep["total"]["relative_error"], len(errors), max(errors.values())))
    for mod in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        name = "model.layers.0." + mod
        w0, wm = tensor(base, name + ".weight"), tensor(merged, name + ".weight")
        key = "base_model.model." + name
        d = 2.0 * factor(key + ".lora_B.weight") @ factor(key + ".lora_A.weight")  # alpha 32 / r 16
        dt = wm - w0
        floor = np.linalg.norm(dt - d) / np.linalg.norm(dt)
        print("  %-32s extracted error %.4e, BF16 rounding floor %.4e (ratio %.3f)" % (
            name, errors.get(name, float("nan")), floor, errors.get(name, float("nan")) / floor))


if __name__ == "__main__":
    main()
