"""The merge PEFT does, on CPU, in PyTorch, streamed tensor by tensor:
delta = (B @ A) * scaling in float32 (PEFT's get_delta_weight upcasts on CPU),
cast to the weight's dtype (bf16), added in bf16, written as safetensors.
Usage: peft_merge.py BASE_DIR ADAPTER_DIR OUT_DIR"""
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import safetensors_np as st  # noqa: E402

TORCH_DTYPE = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def view(raw, dt, shape):
    return torch.frombuffer(raw, dtype=TORCH_DTYPE[dt]).reshape(shape)


def main(base_dir, adapter_dir, out_dir):
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    scaling = cfg["lora_alpha"] / cfg["r"]
    # copy-on-write maps: torch.frombuffer wants a writable buffer; nothing is written back
    base, meta = st.open_tensors(os.path.join(base_dir, "model.safetensors"), mode="c")
    adapter, _ = st.open_tensors(os.path.join(adapter_dir, "adapter_model.safetensors"), mode="c")
    header, _, names = st.layout({k: (dt, shape) for k, (dt, shape, _) in base.items()}, meta)
    os.makedirs(out_dir)
    shutil.copy(os.path.join(base_dir, "config.json"), out_dir)
    with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
        f.write(header)
        for name in names:
            dt, shape, raw = base[name]
            key = "base_model.model." + name[:-len(".weight")]
            if key + ".lora_A.weight" not in adapter:
                f.write(memoryview(raw))
                continue
            a_dt, a_shape, a_raw = adapter[key + ".lora_A.weight"]
            b_dt, b_shape, b_raw = adapter[key + ".lora_B.weight"]
            w = view(raw, dt, shape)
            delta = (view(b_raw, b_dt, b_shape) @ view(a_raw, a_dt, a_shape)) * scaling  # float32
            merged = w + delta.to(w.dtype)  # rounded to bf16, then the bf16 sum rounded again
            f.write(merged.view(torch.int16).numpy().tobytes())


if __name__ == "__main__":
    main(*sys.argv[1:4])
