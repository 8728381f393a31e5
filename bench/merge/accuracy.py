"""How many merged elements differ from the once-rounded truth
round_bf16(W0 + s * B @ A) computed in float64, for each merged output.
Usage: accuracy.py BASE_DIR ADAPTER_DIR NAME=OUT_DIR..."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import safetensors_np as st  # noqa: E402


def main(base_dir, adapter_dir, outs):
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    s = cfg["lora_alpha"] / cfg["r"]
    base, _ = st.open_tensors(os.path.join(base_dir, "model.safetensors"))
    adapter, _ = st.open_tensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    merged = {label: st.open_tensors(os.path.join(d, "model.safetensors"))[0] for label, d in outs}
    off = {label: 0 for label, _ in outs}
    off2 = {label: 0 for label, _ in outs}
    untouched_same = {label: True for label, _ in outs}
    total = 0
    for name, (dt, shape, raw) in base.items():
        key = "base_model.model." + name[:-len(".weight")]
        if key + ".lora_A.weight" not in adapter:
            for label, _ in outs:
                untouched_same[label] &= bool(np.array_equal(merged[label][name][2], raw))
            continue
        a = np.frombuffer(adapter[key + ".lora_A.weight"][2], np.float32).reshape(adapter[key + ".lora_A.weight"][1])
        b = np.frombuffer(adapter[key + ".lora_B.weight"][2], np.float32).reshape(adapter[key + ".lora_B.weight"][1])
        w0 = st.bf16_bits_to_f64(np.frombuffer(raw, np.uint16)).reshape(shape)
        truth = st.f64_to_bf16_bits(w0 + s * (b.astype(np.float64) @ a.astype(np.float64))).ravel()
        total += truth.size
        t_ord = np.where(truth & 0x8000, -(truth & 0x7FFF).astype(np.int64), (truth & 0x7FFF).astype(np.int64))
        for label, _ in outs:
            got = np.frombuffer(merged[label][name][2], np.uint16)
            g_ord = np.where(got & 0x8000, -(got & 0x7FFF).astype(np.int64), (got & 0x7FFF).astype(np.int64))
            d = np.abs(g_ord - t_ord)
            off[label] += int(np.count_nonzero(d))
            off2[label] += int(np.count_nonzero(d > 1))
    for label, _ in outs:
        print("accuracy %-8s %d of %d merged elements (%.4f%%) off the once-rounded truth, %d (%.4f%%) by more "
              "than 1 ulp; untouched tensors bit-identical: %s"
              % (label, off[label], total, 100.0 * off[label] / total, off2[label], 100.0 * off2[label] / total,
                 "yes" if untouched_same[label] else "NO"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [tuple(x.split("=", 1)) for x in sys.argv[3:]])
