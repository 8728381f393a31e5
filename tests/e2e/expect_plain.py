"""The float64 expectation of merging a LoRA (lora_A / lora_B keys, PEFT or
diffusers names) into a single-file base whose names follow the adapter's
after prefix rewrites, in check_fused.py's form (numpy only).

  expect_plain.py BASE ADAPTER OUT.npz SCALE RULE...

RULE is "from=to": a module path (the key without "base_model.model." and
without ".lora_A.weight") starting with `from` starts with `to` instead (the
first matching rule; "from=" drops a prefix). A module whose rewritten
"<path>.weight" the base lacks is a stray: printed as "stray <path>", sorted
by path as the adapter spells it (without "base_model.model."); the rest are written to OUT.npz as
v:<name> = W0 + s B A and m:<name> = |W0| + |s| |B| |A|, in float64, with s =
alpha / r when the adapter stores "<path>.alpha" (diffusers), else SCALE
(PEFT: lora_alpha / r from adapter_config.json). Last line: "n <merged>".
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_np import read  # noqa: E402

base, _ = read(sys.argv[1])
ad, _ = read(sys.argv[2])
out_path, scale = sys.argv[3], float(sys.argv[4])
rules = [r.split("=", 1) for r in sys.argv[5:]]
out, strays = {}, []
for key in sorted(ad):
    if not key.endswith(".lora_A.weight"):
        continue
    path = key[: -len(".lora_A.weight")]
    a = ad[key][3]
    b = ad[path + ".lora_B.weight"][3]
    s = float(ad[path + ".alpha"][3]) / a.shape[0] if path + ".alpha" in ad else scale
    p = path[len("base_model.model."):] if path.startswith("base_model.model.") else path
    for f, t in rules:
        if p.startswith(f):
            p = t + p[len(f):]
            break
    name = p + ".weight"
    if name not in base:
        strays.append(path[len("base_model.model."):] if path.startswith("base_model.model.") else path)
        continue
    w0 = base[name][3]
    out["v:" + name] = w0 + s * (b @ a)
    out["m:" + name] = np.abs(w0) + abs(s) * (np.abs(b) @ np.abs(a))
np.savez(out_path, **out)
for p in strays:
    print("stray", p)
print("n", len(out) // 2)
