"""Checks a merged single file against its base and the float64 expectation
written by make_fused.py (numpy only).

  check_fused.py BASE MERGED EXPECT.npz

Prints "ok <n> merged" or what differs:
  - the same tensor names, dtypes and shapes as the base (the output keeps the base's layout);
  - every tensor of EXPECT (v:<name> = W0 + sum s B A in float64):
      BF16: byte for byte the expectation rounded once to BF16 (ties to even);
      F32:  within 2^-24 |E| + 16 2^-24 m of it (m = |W0| + sum |s| |B| |A|: f32 arithmetic before the
            one rounding, as e2e-merge bounds F32 merges);
      and in both, every element no module reaches (m = |W0|) bit-identical to the base;
  - every other tensor bit-identical to the base.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_np import read  # noqa: E402


def bf16_round(x):
    m, e = np.frexp(np.asarray(x, np.float64))
    return np.ldexp(np.rint(m * 256.0) / 256.0, e)


base, _ = read(sys.argv[1])
out, _ = read(sys.argv[2])
want = np.load(sys.argv[3])
bad = []
if sorted(out) != sorted(base):
    bad.append("names differ: %s" % sorted(set(out) ^ set(base))[:4])
merged = 0
for name, (dt, shape, raw, v) in base.items():
    if name not in out:
        continue
    odt, oshape, oraw, ov = out[name]
    if (odt, oshape) != (dt, shape):
        bad.append("%s: %s %s, base %s %s" % (name, odt, oshape, dt, shape))
        continue
    if "v:" + name not in want:
        if oraw != raw:
            bad.append("%s changed (untouched)" % name)
        continue
    merged += 1
    e, m = want["v:" + name], want["m:" + name]
    untouched = (m - np.abs(v)) == 0
    size = {"BF16": 2, "F16": 2, "F32": 4}[dt]
    ob = np.frombuffer(oraw, np.uint8).reshape(-1, size)
    bb = np.frombuffer(raw, np.uint8).reshape(-1, size)
    same = (ob == bb).all(axis=1).reshape(v.shape)
    if not same[untouched].all():
        bad.append("%s: %d elements no module reaches changed" % (name, int((~same[untouched]).sum())))
    if dt == "BF16":
        r = bf16_round(e)
        n = int((ov != r).sum())
        if n:
            bad.append("%s: %d of %d elements differ from the float64 value rounded once" % (name, n, r.size))
    else:
        err = np.abs(ov - e) - (2.0 ** -24 * np.abs(e) + 16 * 2.0 ** -24 * m)
        if (err > 0).any():
            bad.append("%s: over the F32 bound by %.3g" % (name, err.max()))
missing = [k[2:] for k in want.files if k.startswith("v:") and k[2:] not in base]
if missing:
    bad.append("expected tensors the base lacks: %s" % missing[:3])
print("ok %d merged" % merged if not bad else "; ".join(bad[:5]))
