"""Tiny deterministic LyCORIS inputs and their independent float64 references.

make_lycoris.py OUT_DIR DTYPE   (DTYPE: BF16 or F32)

Writes OUT_DIR/base.safetensors (a UNet-shaped file with diffusers module
paths), OUT_DIR/{loha,lokr,locon}.safetensors (LyCORIS files with the real key
names: lora_unet_<path with '_'>.hada_w1_a, .lokr_w1, .lora_mid.weight, ...)
and OUT_DIR/{loha,lokr,locon}.expected.safetensors: W0 + dW computed in
float64 with numpy from LyCORIS's formulas as written in its source
(KohakuBlueleaf/LyCORIS @ f49d30d6: lycoris/functional/loha.py make_weight /
make_weight_tucker, lycoris/functional/lokr.py make_kron + rebuild_tucker,
lycoris/functional/locon.py diff_weight; the scale rules of
lycoris/modules/{loha,lokr,locon}.py), rounded once to DTYPE. Nothing here
calls lora's code.
"""
import sys

import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__file__))
import safetensors_np  # noqa: E402

OUT, DTYPE = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(15)


bf16_bits = safetensors_np.bf16_bits


def stored(x):
    """A tensor in DTYPE for the file, and its exact float64 value."""
    if DTYPE == "BF16":
        bits = bf16_bits(x)
        return ("BF16", list(x.shape), bits.tobytes()), (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    v = np.asarray(x, np.float32)
    return v, v.astype(np.float64)


def rand(*shape, s=1.0):
    return rng.standard_normal(shape) * s


def kohya(path):
    return "lora_unet_" + path.replace(".", "_")


# the base: module path -> shape
base_shapes = {
    "conv_in": [8, 4, 3, 3],
    "time_embedding.linear_1": [16, 8],
    "down_blocks.0.attentions.0.proj_in": [16, 12],
    "down_blocks.0.attentions.0.proj_out": [16, 12],
    "down_blocks.0.resnets.0.conv1": [8, 6, 3, 3],
    "down_blocks.0.resnets.0.conv2": [8, 8, 3, 3],
    "mid_block.attentions.0.proj_out": [16, 12],
    "mid_block.resnets.0.conv1": [8, 6, 3, 3],
    "up_blocks.0.resnets.0.conv1": [8, 6, 3, 3],
    "up_blocks.0.resnets.0.conv2": [8, 8, 3, 3],
    "up_blocks.0.attentions.0.proj_in": [16, 12],
}
base_file, base = {}, {}
for p, shape in base_shapes.items():
    base_file[p + ".weight"], base[p + ".weight"] = stored(rand(*shape))
base_file["down_blocks.0.resnets.0.conv1.bias"], base["down_blocks.0.resnets.0.conv1.bias"] = stored(rand(8))
safetensors_np.write(f"{OUT}/base.safetensors", base_file)


def adapter(name, modules):
    """modules: path -> (tensors {suffix: float64 array}, dW float64 in the base's shape)."""
    tensors, expected = {}, dict(base)
    for path, (parts, delta) in modules.items():
        for suffix, v in parts.items():
            tensors[kohya(path) + suffix] = v
        expected[path + ".weight"] = base[path + ".weight"] + delta
    out = {}
    for k, v in expected.items():
        out[k] = ("BF16", list(v.shape), bf16_bits(v).tobytes()) if DTYPE == "BF16" else v.astype(np.float32)
    file_tensors = {k: (v.astype(np.float32) if k.endswith(".alpha") else stored(v)[0]) for k, v in tensors.items()}
    safetensors_np.write(f"{OUT}/{name}.safetensors", file_tensors)
    safetensors_np.write(f"{OUT}/{name}.expected.safetensors", out)


def exact(x):
    """The float64 value the file stores for x (what LyCORIS reads)."""
    return stored(x)[1]


# ---------------------------------------------------------------- LoHa
def loha(path, r, alpha, tucker=False):
    out, inn, *k = base_shapes[path]
    if tucker:
        # hada_t [r, r, kh, kw], hada_w_a [r, out], hada_w_b [r, in]
        t1, t2 = exact(rand(r, r, *k, s=0.5)), exact(rand(r, r, *k, s=0.5))
        w1a, w1b = exact(rand(r, out, s=0.5)), exact(rand(r, inn, s=0.5))
        w2a, w2b = exact(rand(r, out, s=0.5)), exact(rand(r, inn, s=0.5))
        # make_weight_tucker: einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a)
        m1 = np.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
        m2 = np.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
        parts = {".hada_t1": t1, ".hada_t2": t2}
    else:
        n = int(np.prod([inn, *k]))
        w1a, w1b = exact(rand(out, r, s=0.5)), exact(rand(r, n, s=0.5))
        w2a, w2b = exact(rand(out, r, s=0.5)), exact(rand(r, n, s=0.5))
        # make_weight: (w1a @ w1b) * (w2a @ w2b), reshaped to the weight
        m1, m2 = (w1a @ w1b).reshape(base_shapes[path]), (w2a @ w2b).reshape(base_shapes[path])
        parts = {}
    parts.update({".hada_w1_a": w1a, ".hada_w1_b": w1b, ".hada_w2_a": w2a, ".hada_w2_b": w2b})
    # LoHaModule: alpha None or 0 -> lora_dim; scale = alpha / lora_dim, lora_dim = hada_w1_b.shape[0]
    scale = 1.0
    if alpha is not None:
        parts[".alpha"] = np.array(alpha, np.float64)
        scale = alpha / r
    return parts, m1 * m2 * scale


adapter(
    "loha",
    {
        "down_blocks.0.attentions.0.proj_in": loha("down_blocks.0.attentions.0.proj_in", 4, 3.0),
        "down_blocks.0.attentions.0.proj_out": loha("down_blocks.0.attentions.0.proj_out", 2, None),
        "down_blocks.0.resnets.0.conv1": loha("down_blocks.0.resnets.0.conv1", 3, 5.0),
        "down_blocks.0.resnets.0.conv2": loha("down_blocks.0.resnets.0.conv2", 2, 1.0, tucker=True),
    },
)


# ---------------------------------------------------------------- LoKr
def kron(w1, w2):
    # make_kron: w1 unsqueezed to w2's dims, torch.kron
    while w1.ndim < w2.ndim:
        w1 = w1[..., None]
    return np.kron(w1, w2)


def lokr_linear(path, r, alpha):
    # out 16 = 4 * 4, in 12 = 3 * 4: w1 [4, 3] full, w2 = w2_a [4, r] @ w2_b [r, 4]
    w1 = exact(rand(4, 3, s=0.5))
    w2a, w2b = exact(rand(4, r, s=0.5)), exact(rand(r, 4, s=0.5))
    # LoKrModule: lora_dim = w2_a.shape[1] (w1 full); scale = alpha / lora_dim
    return {".lokr_w1": w1, ".lokr_w2_a": w2a, ".lokr_w2_b": w2b, ".alpha": np.array(alpha)}, kron(w1, w2a @ w2b) * (alpha / r)


def lokr_full(path, alpha):
    # both full: w1 [2, 2], w2 [4, 3, 3, 3]; "if self.use_w2 and self.use_w1: alpha = lora_dim" -> scale 1
    w1, w2 = exact(rand(2, 2, s=0.5)), exact(rand(4, 3, 3, 3, s=0.5))
    return {".lokr_w1": w1, ".lokr_w2": w2, ".alpha": np.array(alpha)}, kron(w1, w2)


def lokr_tucker(path, r, alpha):
    # w1 = w1_a [2, r] @ w1_b [r, 2]; w2 = rebuild_tucker(t2 [r, r, 3, 3], w2_a [r, 4], w2_b [r, 3])
    w1a, w1b = exact(rand(2, r, s=0.5)), exact(rand(r, 2, s=0.5))
    t2 = exact(rand(r, r, 3, 3, s=0.5))
    w2a, w2b = exact(rand(r, 4, s=0.5)), exact(rand(r, 3, s=0.5))
    w2 = np.einsum("ijkl,ip,jr->prkl", t2, w2a, w2b)
    parts = {".lokr_w1_a": w1a, ".lokr_w1_b": w1b, ".lokr_t2": t2, ".lokr_w2_a": w2a, ".lokr_w2_b": w2b,
             ".alpha": np.array(alpha)}
    # lora_dim = w1_a.shape[1] (w1 decomposed)
    return parts, kron(w1a @ w1b, w2) * (alpha / r)


adapter(
    "lokr",
    {
        "mid_block.attentions.0.proj_out": lokr_linear("mid_block.attentions.0.proj_out", 2, 3.0),
        "mid_block.resnets.0.conv1": lokr_full("mid_block.resnets.0.conv1", 7.0),
        "up_blocks.0.resnets.0.conv1": lokr_tucker("up_blocks.0.resnets.0.conv1", 3, 2.0),
    },
)


# ---------------------------------------------------------------- LoCon (+ Tucker)
def locon_tucker(path, r, alpha):
    out, inn, kh, kw = base_shapes[path]
    down, mid, up = exact(rand(r, inn, 1, 1, s=0.5)), exact(rand(r, r, kh, kw, s=0.5)), exact(rand(out, r, 1, 1, s=0.5))
    # diff_weight with mid: rebuild_tucker(mid, up^T, down) = einsum("i j ..., i p, j r -> p r ...")
    dw = np.einsum("ijkl,ip,jr->prkl", mid, up.reshape(out, r).T, down.reshape(r, inn))
    return {".lora_down.weight": down, ".lora_mid.weight": mid, ".lora_up.weight": up, ".alpha": np.array(alpha)}, dw * (
        alpha / r)


def locon_linear(path, r, alpha):
    out, inn = base_shapes[path]
    down, up = exact(rand(r, inn, s=0.5)), exact(rand(out, r, s=0.5))
    return {".lora_down.weight": down, ".lora_up.weight": up, ".alpha": np.array(alpha)}, up @ down * (alpha / r)


adapter(
    "locon",
    {
        "up_blocks.0.resnets.0.conv2": locon_tucker("up_blocks.0.resnets.0.conv2", 3, 2.0),
        "up_blocks.0.attentions.0.proj_in": locon_linear("up_blocks.0.attentions.0.proj_in", 4, 2.0),
    },
)


# ---------------------------------------------------------------- weight decomposition (dora_scale)
# LyCORIS @ f49d30d6, lycoris/modules/{locon,loha,lokr}.py get_merged_weight +
# apply_weight_decompose (the same code in the three):
#   V = W0 + dW (the module's delta at multiplier 1)
#   norm: wd_on_out, dora_scale [out, 1, ...]: over each output row;
#         else dora_scale [1, in, 1, ...]: over out, kh, kw of each input channel
#   g = dora_scale / (norm + torch.finfo(dora_scale.dtype).eps)
#   W' = V * g, and for a multiplier w != 1: V * (w * (g - 1) + 1)
# dora_scale is stored in DTYPE, so eps is 2^-7 (BF16) or 2^-23 (F32).
EPS = 2.0**-7 if DTYPE == "BF16" else 2.0**-23
DORA_WEIGHT = 0.6  # the --weight of the second merge (e2e-lycoris.sh)


def decompose(path, parts, delta, on_out, w):
    """The LyCORIS merged weight of a module with dora_scale, in float64."""
    w0 = base[path + ".weight"]
    v = w0 + delta
    shape = w0.shape
    if on_out:
        norm = np.sqrt((v.reshape(shape[0], -1) ** 2).sum(axis=1)).reshape(shape[0], *[1] * (len(shape) - 1))
        m = exact(norm * (1 + 0.2 * rng.uniform(-1, 1, norm.shape)))
    else:
        axes = tuple(i for i in range(len(shape)) if i != 1)
        norm = np.sqrt((v**2).sum(axis=axes, keepdims=True))  # [1, in, 1, ...]
        m = exact(norm * (1 + 0.2 * rng.uniform(-1, 1, norm.shape)))
    parts = dict(parts)
    parts[".dora_scale"] = m
    g = m / (norm + EPS)
    return parts, v * g, v * (w * (g - 1) + 1)


def dora_adapter(name, modules):
    """modules: path -> ((parts, delta), on_out). Writes NAME.safetensors, NAME.expected (w = 1)
    and NAME.w.expected (w = DORA_WEIGHT)."""
    tensors, expected, expected_w = {}, dict(base), dict(base)
    for path, ((parts, delta), on_out) in modules.items():
        p, e1, ew = decompose(path, parts, delta.reshape(base[path + ".weight"].shape), on_out, DORA_WEIGHT)
        for suffix, v in p.items():
            tensors[kohya(path) + suffix] = v
        expected[path + ".weight"], expected_w[path + ".weight"] = e1, ew
    file_tensors = {k: (v.astype(np.float32) if k.endswith(".alpha") else stored(v)[0]) for k, v in tensors.items()}
    safetensors_np.write(f"{OUT}/{name}.safetensors", file_tensors)
    for suffix, exp in ((".expected", expected), (".w.expected", expected_w)):
        out = {
            k: ("BF16", list(v.shape), bf16_bits(v).tobytes()) if DTYPE == "BF16" else v.astype(np.float32)
            for k, v in exp.items()
        }
        safetensors_np.write(f"{OUT}/{name}{suffix}.safetensors", out)


def locon_conv(path, r, alpha):
    out, inn, kh, kw = base_shapes[path]
    down, up = exact(rand(r, inn, kh, kw, s=0.5)), exact(rand(out, r, 1, 1, s=0.5))
    dw = (up.reshape(out, r) @ down.reshape(r, -1)).reshape(out, inn, kh, kw) * (alpha / r)
    return {".lora_down.weight": down, ".lora_up.weight": up, ".alpha": np.array(alpha)}, dw


# LyCORIS file: every algorithm, both axis forms, linear and kxk conv targets
dora_adapter(
    "dora",
    {
        "down_blocks.0.attentions.0.proj_in": (locon_linear("down_blocks.0.attentions.0.proj_in", 4, 2.0), True),
        "down_blocks.0.attentions.0.proj_out": (locon_linear("down_blocks.0.attentions.0.proj_out", 3, 6.0), False),
        "down_blocks.0.resnets.0.conv1": (locon_conv("down_blocks.0.resnets.0.conv1", 3, 1.5), False),
        "up_blocks.0.resnets.0.conv2": (locon_tucker("up_blocks.0.resnets.0.conv2", 3, 2.0), True),
        "mid_block.attentions.0.proj_out": (loha("mid_block.attentions.0.proj_out", 4, 3.0), True),
        "down_blocks.0.resnets.0.conv2": (loha("down_blocks.0.resnets.0.conv2", 2, 1.0, tucker=True), False),
        "up_blocks.0.attentions.0.proj_in": (lokr_linear("up_blocks.0.attentions.0.proj_in", 2, 3.0), False),
        "mid_block.resnets.0.conv1": (lokr_full("mid_block.resnets.0.conv1", 7.0), True),
    },
)

# kohya-style DoRA file (LoCon modules only: read by the kohya loader)
dora_adapter(
    "kohya-dora",
    {
        "time_embedding.linear_1": (locon_linear("time_embedding.linear_1", 2, 1.0), True),
        "conv_in": (locon_conv("conv_in", 2, 2.0), False),
        "up_blocks.0.resnets.0.conv1": (locon_conv("up_blocks.0.resnets.0.conv1", 2, 1.0), True),
    },
)
