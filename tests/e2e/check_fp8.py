#!/usr/bin/python3
"""Checks a merge into a block-scaled FP8 model against float64 (numpy only).

  check_fp8.py BASE ADAPTER OUT fp8|bf16

truth = dequantize(base codes, base scales) + (alpha / r) B A, in float64.
fp8: every merged weight's new scales equal f32(max|truth block| / 448) (an
     all-zero block: its old scale) within one f32 unit; every element
     dequantized is within half an E4M3 unit of truth at its block's scale,
     and its code is truth / scale rounded once to E4M3 (except within 1e-9
     of a midpoint, where double-precision noise may pick either side);
     untouched FP8 weights and scales, and every BF16 tensor, bit-identical;
     config.json unchanged.
bf16: every FP8 weight is BF16, truth (merged) or the dequantized base
     (untouched) rounded once to BF16, bit for bit (same midpoint rule); no
     weight_scale_inv; BF16 tensors bit-identical; config.json without
     quantization_config, torch_dtype bfloat16, every other field equal.
Prints one line per failure and "checks: N, failures: M"; exit 1 on failure.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp8_np import POSITIVE, block_max, decode, dequantize, encode  # noqa: E402
from safetensors_np import read  # noqa: E402

base_dir, adapter_dir, out_dir, mode = sys.argv[1:5]
base, _ = read(os.path.join(base_dir, "model.safetensors"))
out, _ = read(os.path.join(out_dir, "model.safetensors"))
lora, _ = read(os.path.join(adapter_dir, "adapter_model.safetensors"))
acfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
bcfg = json.load(open(os.path.join(base_dir, "config.json")))
ocfg = json.load(open(os.path.join(out_dir, "config.json")))
block = bcfg["quantization_config"]["weight_block_size"]
s = acfg["lora_alpha"] / acfg["r"]
checks, failures = 0, []


def check(ok, what):
    global checks
    checks += 1
    if not ok:
        failures.append(what)


def codes(name, t):
    return np.frombuffer(t[name][2], np.uint8).reshape(t[name][1])


def delta(name):
    key = "base_model.model." + name[: -len(".weight")]
    if key + ".lora_A.weight" not in lora:
        return None
    return s * lora[key + ".lora_B.weight"][3] @ lora[key + ".lora_A.weight"][3]


def near_midpoint(y):
    """|y| within 1e-9 (relative) of a midpoint between two E4M3 values."""
    a = np.abs(y)
    mids = (POSITIVE[1:] + POSITIVE[:-1]) / 2
    i = np.clip(np.searchsorted(mids, a), 1, len(mids) - 1)
    return np.minimum(np.abs(a - mids[i]), np.abs(a - mids[i - 1])) <= 1e-9 * np.maximum(a, 2.0 ** -9)


def half_unit(y):
    a = np.abs(y)
    e = np.floor(np.log2(np.maximum(a, 2.0 ** -6)))
    return np.where(a < 2.0 ** -6, 2.0 ** -10, 2.0 ** (e - 4))


n_merged = 0
for name, (dt, shape, raw, v) in base.items():
    scale_name = name + "_scale_inv"
    if dt != "F8_E4M3":
        if name.endswith("_scale_inv"):
            if mode == "bf16":
                check(name not in out, "%s: a scale tensor left in the bf16 output" % name)
            continue
        check(name in out and out[name][0] == dt and out[name][2] == raw, "%s: not copied bit for bit" % name)
        continue
    w0 = dequantize(codes(name, base), base[scale_name][3], block)
    d = delta(name)
    truth = w0 if d is None else w0 + d
    if mode == "bf16":
        check(out[name][0] == "BF16", "%s: dtype %s" % (name, out[name][0]))
        got = np.frombuffer(out[name][2], np.uint16).reshape(shape)
        want = __import__("fp8_np").bf16_bits(truth)
        # a midpoint of two BF16 values: the low 16 bits of its f64 mantissa
        # scaled to bf16's last place is exactly 0.5; allow either there
        m, e = np.frexp(truth)
        frac = np.abs(truth / np.ldexp(1.0, e - 8)) % 1.0
        tie = np.abs(frac - 0.5) <= 1e-7
        bad = (got != want) & ~tie
        check(not bad.any(), "%s: %d elements not truth rounded once to BF16" % (name, bad.sum()))
        continue
    if d is None:
        check(out[name][2] == raw and out[scale_name][2] == base[scale_name][2],
              "%s: untouched FP8 weight or scale not bit-identical" % name)
        continue
    n_merged += 1
    check(out[name][0] == "F8_E4M3" and out[scale_name][0] == "F32", "%s: output dtypes" % name)
    new_scales = out[scale_name][3]
    amax = block_max(truth, block)
    want_scales = np.where(amax == 0, base[scale_name][3], (amax / 448).astype(np.float32))
    ulps = np.abs(new_scales - want_scales) / np.spacing(want_scales.astype(np.float32))
    check((ulps <= 1).all(), "%s: scales off max|block|/448 by up to %g f32 units" % (name, ulps.max()))
    check((amax == 0).sum() == (-(-shape[1] // block[1]) if (name.endswith("gate_proj.weight") and block[0] == 16) else 0),
          "%s: unexpected number of zero blocks" % name)
    r, c = np.arange(shape[0])[:, None] // block[0], np.arange(shape[1])[None, :] // block[1]
    sc = new_scales[r, c]
    q = codes(name, out)
    got = decode(q) * sc
    y = truth / sc
    err = np.abs(got - truth)
    bound = half_unit(y) * sc * (1 + 1e-9)
    check((err <= bound).all(), "%s: %d elements beyond half an E4M3 unit (worst %g of the bound)"
          % (name, (err > bound).sum(), (err / bound).max()))
    bad = (q != encode(y)) & ~near_midpoint(y)
    check(not bad.any(), "%s: %d codes not truth / scale rounded once" % (name, bad.sum()))

if mode == "fp8":
    check(n_merged == 4, "expected 4 merged FP8 weights, got %d" % n_merged)
    check(ocfg == bcfg, "config.json changed")
    check(sorted(out) == sorted(base), "the output's tensor names differ from the base's")
else:
    check("quantization_config" not in ocfg, "quantization_config kept")
    check(ocfg.get("torch_dtype") == "bfloat16", "torch_dtype %s" % ocfg.get("torch_dtype"))
    rest = {k: v for k, v in bcfg.items() if k not in ("quantization_config", "torch_dtype")}
    check({k: v for k, v in ocfg.items() if k != "torch_dtype"} == rest, "other config fields changed")
    check(sorted(out) == sorted(n for n in base if not n.endswith("_scale_inv")), "output tensor names")

for f in failures:
    print("FAIL", f)
print("checks: %d, failures: %d" % (checks, len(failures)))
sys.exit(1 if failures else 0)
