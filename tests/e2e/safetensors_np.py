"""An independent safetensors reader for the end-to-end checks (numpy only).

read(path) -> ({name: (dtype, shape, raw bytes, float64 array)}, metadata or None)
for files holding BF16 / F16 / F32 / F64 tensors.
"""
import json
import struct

import numpy as np


def read(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    h = json.loads(data[8:8 + n])
    meta = h.pop("__metadata__", None)
    out = {}
    for name, e in h.items():
        b = data[8 + n + e["data_offsets"][0]:8 + n + e["data_offsets"][1]]
        dt = e["dtype"]
        if dt == "BF16":
            v = (np.frombuffer(b, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            v = np.frombuffer(b, {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dt])
        out[name] = (dt, e["shape"], b, v.astype(np.float64).reshape(e["shape"]))
    return out, meta
