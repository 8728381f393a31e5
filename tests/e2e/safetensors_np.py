"""An independent safetensors reader and writer for the end-to-end tests
(numpy only).

read(path) -> ({name: (dtype, shape, raw bytes, float64 array)}, metadata or None)
for files holding BF16 / F16 / F32 / F64 tensors (other dtypes, e.g. F8_E4M3:
the array is None, the raw bytes are there).
write(path, {name: numpy array of float16/32/64, or (dtype, shape, raw bytes)})
writes a file the way the reference does (names sorted, header padded to 8).
"""
import json
import struct

import numpy as np



def bf16_bits(x):
    """float64 -> uint16 BF16 codes of x rounded once, to nearest, ties to
    even (no float32 step: the float32 value is moved toward zero first, so
    that its low bits never decide a tie). Finite values."""
    x = np.asarray(x, np.float64)
    f32 = x.astype(np.float32)
    b = f32.view(np.uint32).copy()
    b[np.abs(f32.astype(np.float64)) > np.abs(x)] -= 1  # toward zero on the f32 grid
    lo = b & np.uint32(0xFFFF0000)
    hi = lo + np.uint32(0x10000)
    dlo = np.abs(x - lo.view(np.float32).astype(np.float64))
    dhi = np.abs(hi.view(np.float32).astype(np.float64) - x)
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (((lo >> 16) & 1) == 1))
    return (np.where(pick_hi, hi, lo) >> 16).astype(np.uint16)

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
        elif dt not in ("F16", "F32", "F64"):
            out[name] = (dt, e["shape"], b, None)
            continue
        else:
            v = np.frombuffer(b, {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dt])
        out[name] = (dt, e["shape"], b, v.astype(np.float64).reshape(e["shape"]))
    return out, meta


def write(path, tensors):
    names = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}
    h, off, blobs = {}, 0, []
    for k in sorted(tensors):
        v = tensors[k]
        dt, shape, b = v if isinstance(v, tuple) else (names[v.dtype], list(v.shape), v.tobytes())
        h[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    hj = json.dumps(h, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)) + hj)
        for b in blobs:
            f.write(b)
