"""Minimal safetensors reading/writing for the merge benchmark (numpy only;
the Debian image has no `safetensors` Python package). Reads through
numpy.memmap; writes the reference layout (tensors sorted by dtype, then
name; compact JSON with __metadata__ first; header padded to 8 bytes)."""
import json
import struct

import numpy as np

# the reference writer's dtype order (descending = written first)
DTYPE_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
               "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
NP_STORAGE = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}


def read_header(path):
    """(header dict without __metadata__, metadata or None, data start offset)"""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    meta = h.pop("__metadata__", None)
    return h, meta, 8 + n


def open_tensors(path, mode="r"):
    """name -> numpy view of the tensor's storage (BF16 as uint16), memory-mapped."""
    h, meta, start = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode=mode)
    out = {}
    for name, e in h.items():
        b, end = e["data_offsets"]
        out[name] = (e["dtype"], e["shape"], mm[start + b:start + end])
    return out, meta


def layout(specs, metadata=None):
    """specs: {name: (dtype, shape)} -> (header bytes, {name: (begin, end)}) in reference order."""
    def nbytes(dt, shape):
        n = 1
        for d in shape:
            n *= d
        return n * np.dtype(NP_STORAGE[dt]).itemsize
    names = sorted(specs, key=lambda k: (-DTYPE_ORDER.index(specs[k][0]), k))
    h, offsets, off = {}, {}, 0
    if metadata is not None:
        h["__metadata__"] = metadata
    for k in names:
        dt, shape = specs[k]
        size = nbytes(dt, shape)
        h[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + size]}
        offsets[k] = (off, off + size)
        off += size
    hj = json.dumps(h, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    return struct.pack("<Q", len(hj)) + hj, offsets, names


def f32_to_bf16_bits(x):
    """float32 array -> bf16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    return r.astype(np.uint16)


def bf16_bits_to_f64(h):
    return (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def f64_to_bf16_bits(x):
    """float64 -> bf16 bits rounded ONCE (round to nearest, ties to even): the
    float32 candidate may be double-rounded, so pick the nearest of it and its
    two neighbours, preferring the even pattern on a tie."""
    x = np.asarray(x, dtype=np.float64)
    c = f32_to_bf16_bits(x.astype(np.float32)).astype(np.int32)
    best = c.copy()
    best_d = np.abs(bf16_bits_to_f64(c.astype(np.uint16)) - x)
    for step in (-1, 1):
        cand = c + step
        ok = (cand >= 0) & (cand <= 0xFFFF) & ((cand & 0x7F80) != 0x7F80)
        cand = np.where(ok, cand, c)
        d = np.abs(bf16_bits_to_f64(cand.astype(np.uint16)) - x)
        better = (d < best_d) | ((d == best_d) & ((cand & 1) == 0) & ((best & 1) == 1))
        best = np.where(better, cand, best)
        best_d = np.where(better, d, best_d)
    return best.astype(np.uint16)
