"""Checks a merged model of tests/e2e/e2e-heads.sh against numpy float64.

check_heads.py BASE ADAPTER_DIR OUT [SCALE] (BASE, OUT: a folder or a .safetensors file)
Every adapter LoRA target: base (a tied base's missing lm_head: the embedding)
+ scale * alpha/r * B A, rounded once: F32 within 1e-6 relative of
|W0| + |s| |B| |A|, BF16 within 1 ulp. Every modules_to_save tensor: bit-identical
when its dtype is the output's. Every other base tensor: bit-identical. No
other tensor in the output. Prints "ok" or the first problem.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_np import read  # noqa: E402

PREFIX = "base_model.model."


def main(base_dir, adapter_dir, out_dir, scale=1.0):
    file = lambda p: p if p.endswith(".safetensors") else p + "/model.safetensors"  # noqa: E731
    base, _ = read(file(base_dir))
    ad, _ = read(adapter_dir + "/adapter_model.safetensors")
    out, _ = read(file(out_dir))
    cfg = json.load(open(adapter_dir + "/adapter_config.json"))
    s = scale * cfg["lora_alpha"] / cfg["r"]
    modules = {k[len(PREFIX):-len(".lora_A.weight")] for k in ad if k.endswith(".lora_A.weight")}
    saved = {k[len(PREFIX):] for k in ad if ".lora_" not in k}
    want = set(base) | {m + ".weight" for m in modules} | saved
    if set(out) != want:
        return f"tensors {sorted(set(out) ^ want)} differ from the expected set"
    for name, (dt, shape, raw, v) in out.items():
        if name in saved:
            sdt, sshape, sraw, sv = ad[PREFIX + name]
            if list(sshape) != list(shape):
                return f"{name}: shape {shape}, saved {sshape}"
            if sdt == dt and sraw != raw:
                return f"{name}: not the saved tensor's bytes"
            continue
        module = name[:-len(".weight")]
        if module in modules:
            w0 = base[name][3] if name in base else base["model.embed_tokens.weight"][3]
            a = ad[PREFIX + module + ".lora_A.weight"][3]
            b = ad[PREFIX + module + ".lora_B.weight"][3]
            exact = w0 + s * (b @ a)
            if dt == "F32":
                tol = 1e-6 * (np.abs(w0) + abs(s) * (np.abs(b) @ np.abs(a)))
            elif dt == "BF16":
                tol = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
            else:
                return f"{name}: unexpected dtype {dt}"
            bad = np.abs(v - exact) > tol
            if list(shape) != list(w0.shape) or bad.any():
                return f"{name}: {int(bad.sum())} values off"
            base_dt = base[name][0] if name in base else base["model.embed_tokens.weight"][0]
            if dt != base_dt:
                return f"{name}: dtype {dt}, expected {base_dt}"
            continue
        if base[name][2] != raw or base[name][0] != dt:
            return f"{name}: not bit-identical to the base"
    return "ok"


if __name__ == "__main__":
    print(main(*sys.argv[1:4], *(float(x) for x in sys.argv[4:5])))
