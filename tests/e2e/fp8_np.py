"""FP8 E4M3 (OCP "FN": bias 7, max 448, no infinities, S.1111.111 = NaN) and
block-scaled weights for the end-to-end tests, in numpy, written from the
format's definition (independently of core/dtype and core/fp8):

  decode(codes) -> float64 array      encode(x) -> uint8 codes (round once, ties to even)
  dequantize(codes [o, i], scales [ceil(o/bo), ceil(i/bi)], (bo, bi)) -> float64 [o, i]
  quantize(w [o, i], (bo, bi)) -> codes, f32 scales (scale = f32(max|block| / 448), zero block: 1)
  bf16_bits(x) -> uint16 BF16 codes of float64 x rounded once (ties to even)
"""
import numpy as np

from safetensors_np import bf16_bits  # noqa: F401 (re-exported: float64 -> BF16 codes, rounded once)


def _value(code):
    s, e, m = code >> 7, (code >> 3) & 15, code & 7
    if e == 15 and m == 7:
        return np.nan
    v = m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -v if s else v


TABLE = np.array([_value(c) for c in range(256)])  # value of every code
POSITIVE = TABLE[:0x7f]  # codes 0x00 .. 0x7e, increasing, 0 .. 448


def decode(codes):
    return TABLE[np.asarray(codes, dtype=np.uint8)]


def encode(x):
    """Nearest E4M3 value, ties to the even code; |x| > 464 (past the midpoint
    448 / 480) or NaN: the NaN code."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    hi = np.clip(np.searchsorted(POSITIVE, a), 1, len(POSITIVE) - 1)  # POSITIVE[hi-1] < a <= POSITIVE[hi]
    lo = hi - 1
    dl, dh = a - POSITIVE[lo], POSITIVE[hi] - a
    code = np.where((dl < dh) | ((dl == dh) & (lo % 2 == 0)), lo, hi)
    code = np.where(a <= POSITIVE[0], 0, code)
    code = np.where(a >= POSITIVE[-1], 0x7e, code)
    code = np.where((a > 464) | np.isnan(a), 0x7f, code)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def scale_index(shape, block):
    o, i = shape
    return np.arange(o)[:, None] // block[0], np.arange(i)[None, :] // block[1]


def dequantize(codes, scales, block):
    r, c = scale_index(codes.shape, block)
    return decode(codes) * scales.astype(np.float64)[r, c]


def block_max(w, block):
    o, i = w.shape
    nr, nc = -(-o // block[0]), -(-i // block[1])
    out = np.zeros((nr, nc))
    for br in range(nr):
        for bc in range(nc):
            out[br, bc] = np.abs(w[br * block[0]:(br + 1) * block[0], bc * block[1]:(bc + 1) * block[1]]).max()
    return out


def quantize(w, block):
    amax = block_max(w, block)
    scales = np.where(amax == 0, 1.0, amax / 448).astype(np.float32)
    r, c = scale_index(w.shape, block)
    return encode(w / scales.astype(np.float64)[r, c]), scales


