#!/usr/bin/python3
"""Errors of the extracted adapters of bench/extract/run.sh, relative to optimal.

usage: errors.py BASE_DIR TUNED_DIR SVD_OUT_DIR RANK NAME=ADAPTER_DIR ...

For each module: err = ||dW - B A||_F / ||dW||_F in float64 (factors as
written), optimal = sqrt(||dW||^2 - sum_{i<r} s_i^2) / ||dW|| with s from the
full SVD (SVD_OUT_DIR/s-*.npy). Prints, per adapter, the total error, the
total optimal error, and the worst per-module ratio err / optimal.
"""
import os
import sys

import numpy as np
import torch

from importlib.machinery import SourceFileLoader

here = os.path.dirname(os.path.abspath(__file__))
tx = SourceFileLoader("tx", os.path.join(here, "torch-extract.py")).load_module()


def main():
    base = tx.load(os.path.join(sys.argv[1], "model.safetensors"))
    tuned = tx.load(os.path.join(sys.argv[2], "model.safetensors"))
    svd_dir, r = sys.argv[3], int(sys.argv[4])
    for arg in sys.argv[5:]:
        label, path = arg.split("=", 1)
        ad = tx.load(os.path.join(path, "adapter_model.safetensors"))
        tot_d = tot_res = tot_opt = 0.0
        worst = 0.0
        for name in sorted(base):
            p = name[: -len(".weight")]
            key = f"base_model.model.{p}.lora_A.weight"
            if key not in ad:
                continue
            dw = tuned[name].double() - base[name].double()
            a = ad[key].double()
            b = ad[f"base_model.model.{p}.lora_B.weight"].double()
            d2 = float((dw * dw).sum())
            res2 = float(((dw - b @ a) ** 2).sum())
            s = np.load(os.path.join(svd_dir, f"s-{p}.npy")).astype(np.float64)
            opt2 = max(0.0, d2 - float((s[:r] ** 2).sum()))
            worst = max(worst, np.sqrt(res2 / opt2))
            tot_d += d2
            tot_res += res2
            tot_opt += opt2
        err, opt = np.sqrt(tot_res / tot_d), np.sqrt(tot_opt / tot_d)
        print(f"{label}: relative error {err:.6f} (optimal {opt:.6f}): {100 * (err / opt - 1):+.3f}% total, "
              f"worst module {100 * (worst - 1):+.3f}%")


if __name__ == "__main__":
    main()
