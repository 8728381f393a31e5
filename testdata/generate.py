#!/usr/bin/python3
"""Generates every file under testdata/ (run: /usr/bin/python3 testdata/generate.py).

Usage: generate.py [--out DIR]   (default: this script's folder; tests
regenerate into a temp folder and compare with the committed files).

Deterministic: fixed numpy seeds, sorted JSON, no timestamps; running it twice
gives identical bytes. Needs numpy only. It writes safetensors with its OWN
minimal writer (below), independent of the C++ writer, following the
reference rules: tensors sorted by dtype (descending reference enum order),
then by name; compact JSON with `__metadata__` first and fields dtype, shape,
data_offsets; header padded with spaces to a multiple of 8. BF16 is rounded
from float32 with round-to-nearest-even here in numpy.

Base weights are drawn in float64, rounded to bf16 and values below 2^-14 in
magnitude flushed to 0, so that BF16, F16 and F32 copies hold the SAME values
exactly (asserted below).

What it writes (see testdata/README.md for what each is for):
  tiny-llama/                 config.json, generation_config.json, model.safetensors (BF16, HF Llama names)
  tiny-llama-f16-sharded/     same weights, F16, 3 shards + model.safetensors.index.json
  tiny-llama-f32/             same weights, F32, single file
  tiny-llama-tied/            F32, tie_word_embeddings true, no lm_head.weight
  tiny-qwen2/                 qwen2 with q/k/v biases, F32
  lora-tiny-llama/            PEFT LoRA r 4, alpha 8, all seven linear modules, F32
  lora-tiny-llama-dora/       PEFT DoRA (lora_magnitude_vector), r 4, alpha 8
  lora-tiny-llama-patterns/   rsLoRA + rank_pattern + alpha_pattern, BF16, some `.default.` keys
  lora-tiny-llama-extras/     lora_embedding_A/B on embed_tokens, modules_to_save lm_head
  lora-tiny-qwen2-bias/       lora_bias true: lora_B.bias on q/k/v of tiny-qwen2 (which has those biases)
  lora-tiny-llama-mismatch/   PEFT adapter that does NOT fit tiny-llama (wrong shape, absent module)
  lora-tiny-llama-kohya.safetensors   kohya-style (lora_te_) copy of lora-tiny-llama's weights
  tiny-unet/                  config.json + model.safetensors: tiny SD-like UNet (conv 3x3, conv 1x1, linear)
  lora-tiny-unet-kohya.safetensors    kohya/sd-scripts LoRA for tiny-unet (F16, F32 alpha, one without alpha)
  all-dtypes.safetensors      one tensor of each of the 22 dtypes
  unpadded.safetensors        valid file whose header is not padded (data unaligned)
  malformed/                  broken files for error tests (one rule each)
"""

import json
import os
import shutil
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))  # output folder; --out changes it

# --- minimal safetensors writer -----------------------------------------------

# The reference implementation's enum order; the writer sorts by it descending.
DTYPE_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
               "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
               "C64", "F64", "I64", "U64"]
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
              "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
              "I64": 64, "U64": 64}
NUMPY_DTYPE = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I16": "<i2",
               "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "u1"}


def f32_to_bf16_bits(x):
    """float32 -> bf16 bit patterns, round to nearest even (no NaN in our data)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return b.astype(np.uint16)


def bf16_bits_to_f32(h):
    return (np.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def tensor_bytes(dtype, array):
    """The little-endian bytes of `array` stored as `dtype` (F32/F16/BF16/ints)."""
    if dtype == "BF16":
        return f32_to_bf16_bits(np.asarray(array, dtype=np.float32)).astype("<u2").tobytes()
    return np.ascontiguousarray(np.asarray(array).astype(NUMPY_DTYPE[dtype])).tobytes()


def n_bytes(dtype, shape):
    n = 1
    for d in shape:
        n *= d
    bits = n * DTYPE_BITS[dtype]
    assert bits % 8 == 0
    return bits // 8


def header_json(entries, metadata, order_names):
    """Compact header JSON: __metadata__ first, then tensors in `order_names`."""
    parts = []
    if metadata is not None:
        parts.append('"__metadata__":' + json.dumps(dict(sorted(metadata.items())), separators=(",", ":"),
                                                     ensure_ascii=False))
    for name in order_names:
        dtype, shape, begin, end = entries[name]
        parts.append(json.dumps(name, ensure_ascii=False) + ':{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}'
                     % (dtype, json.dumps(list(shape), separators=(",", ":")), begin, end))
    return "{" + ",".join(parts) + "}"


def safetensors_bytes(tensors, metadata=None, pad=True):
    """tensors: {name: (dtype, shape, raw_bytes)} -> the whole file, reference layout."""
    order = sorted(tensors, key=lambda n: (-DTYPE_ORDER.index(tensors[n][0]), n))
    entries, offset, chunks = {}, 0, []
    for name in order:
        dtype, shape, raw = tensors[name]
        assert len(raw) == n_bytes(dtype, shape), name
        entries[name] = (dtype, shape, offset, offset + len(raw))
        offset += len(raw)
        chunks.append(raw)
    header = header_json(entries, metadata, order).encode("utf-8")
    if pad:
        header += b" " * ((8 - len(header) % 8) % 8)
    return struct.pack("<Q", len(header)) + header + b"".join(chunks)


def write_bytes(rel, data):
    path = os.path.join(HERE, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_safetensors(rel, named_arrays, dtype, metadata=None, dtypes=None):
    """named_arrays: {name: array}; every tensor stored as `dtype` unless dtypes[name] says otherwise."""
    tensors = {}
    for name, a in named_arrays.items():
        d = (dtypes or {}).get(name, dtype)
        a = np.asarray(a)
        tensors[name] = (d, list(a.shape), tensor_bytes(d, a))
    write_bytes(rel, safetensors_bytes(tensors, metadata))
    return tensors


def write_json(rel, obj, newline=True):
    """JSON as transformers / PEFT write it: two-space indent, sorted keys."""
    text = json.dumps(obj, indent=2, sort_keys=True)
    write_bytes(rel, (text + ("\n" if newline else "")).encode("utf-8"))


# --- weights ------------------------------------------------------------------

def exact_weights(rng, shape, std, mean=0.0):
    """float32 values exactly representable in bf16 AND f16 (see module docstring)."""
    x = (mean + rng.standard_normal(shape) * std).astype(np.float32)
    x = bf16_bits_to_f32(f32_to_bf16_bits(x))
    x[np.abs(x) < 2.0 ** -14] = 0.0
    assert np.array_equal(x.astype(np.float16).astype(np.float32), x)
    return x


def random_f32(rng, shape, std):
    return (rng.standard_normal(shape) * std).astype(np.float32)


LLAMA = dict(hidden=64, inter=176, layers=2, heads=4, kv_heads=2, vocab=256)
HEAD_DIM = LLAMA["hidden"] // LLAMA["heads"]
LINEAR_SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (LLAMA["heads"] * HEAD_DIM, LLAMA["hidden"]),
    "self_attn.k_proj": (LLAMA["kv_heads"] * HEAD_DIM, LLAMA["hidden"]),
    "self_attn.v_proj": (LLAMA["kv_heads"] * HEAD_DIM, LLAMA["hidden"]),
    "self_attn.o_proj": (LLAMA["hidden"], LLAMA["heads"] * HEAD_DIM),
    "mlp.gate_proj": (LLAMA["inter"], LLAMA["hidden"]),
    "mlp.up_proj": (LLAMA["inter"], LLAMA["hidden"]),
    "mlp.down_proj": (LLAMA["hidden"], LLAMA["inter"]),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_weights(seed, tied=False, qkv_bias=False):
    """HF Llama/Qwen2 state dict, {name: float32 array} (exact in bf16/f16)."""
    rng = np.random.default_rng(seed)
    h, v = LLAMA["hidden"], LLAMA["vocab"]
    w = {"model.embed_tokens.weight": exact_weights(rng, (v, h), 0.5)}
    for i in range(LLAMA["layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = exact_weights(rng, (h,), 0.1, mean=1.0)
        w[p + "post_attention_layernorm.weight"] = exact_weights(rng, (h,), 0.1, mean=1.0)
        for mod, (out, inp) in LINEAR_SHAPES.items():
            w[p + mod + ".weight"] = exact_weights(rng, (out, inp), 1.0 / np.sqrt(inp))
            if qkv_bias and mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                w[p + mod + ".bias"] = exact_weights(rng, (out,), 0.1)
    w["model.norm.weight"] = exact_weights(rng, (h,), 0.1, mean=1.0)
    if not tied:
        w["lm_head.weight"] = exact_weights(rng, (v, h), 1.0 / np.sqrt(h))
    return w


def llama_config(dtype, tied=False):
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": LLAMA["hidden"],
        "intermediate_size": LLAMA["inter"],
        "max_position_embeddings": 128,
        "model_type": "llama",
        "num_attention_heads": LLAMA["heads"],
        "num_hidden_layers": LLAMA["layers"],
        "num_key_value_heads": LLAMA["kv_heads"],
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "vocab_size": LLAMA["vocab"],
    }


def qwen2_config():
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": LLAMA["hidden"],
        "intermediate_size": LLAMA["inter"],
        "max_position_embeddings": 128,
        "max_window_layers": LLAMA["layers"],
        "model_type": "qwen2",
        "num_attention_heads": LLAMA["heads"],
        "num_hidden_layers": LLAMA["layers"],
        "num_key_value_heads": LLAMA["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 128,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_sliding_window": False,
        "vocab_size": LLAMA["vocab"],
    }


HF_METADATA = {"format": "pt"}


def write_models():
    w = llama_weights(seed=1)
    write_json("tiny-llama/config.json", llama_config("bfloat16"))
    write_json("tiny-llama/generation_config.json",
               {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2})
    write_safetensors("tiny-llama/model.safetensors", w, "BF16", HF_METADATA)

    write_json("tiny-llama-f32/config.json", llama_config("float32"))
    write_safetensors("tiny-llama-f32/model.safetensors", w, "F32", HF_METADATA)

    # 3 shards: embeddings + layer 0 | layer 1 | final norm + lm_head
    write_json("tiny-llama-f16-sharded/config.json", llama_config("float16"))
    groups = [lambda n: n.startswith("model.embed_tokens") or n.startswith("model.layers.0."),
              lambda n: n.startswith("model.layers.1."),
              lambda n: n in ("model.norm.weight", "lm_head.weight")]
    weight_map, total = {}, 0
    for k, pick in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {n: a for n, a in w.items() if pick(n)}
        for n, a in part.items():
            weight_map[n] = fname
            total += a.size * 2
        write_safetensors("tiny-llama-f16-sharded/" + fname, part, "F16", HF_METADATA)
    assert sorted(weight_map) == sorted(w)
    write_json("tiny-llama-f16-sharded/model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": weight_map})

    wt = llama_weights(seed=2, tied=True)
    write_json("tiny-llama-tied/config.json", llama_config("float32", tied=True))
    write_safetensors("tiny-llama-tied/model.safetensors", wt, "F32", HF_METADATA)

    wq = llama_weights(seed=3, qkv_bias=True)
    write_json("tiny-qwen2/config.json", qwen2_config())
    write_safetensors("tiny-qwen2/model.safetensors", wq, "F32", HF_METADATA)
    return w


# --- PEFT adapters --------------------------------------------------------------

def peft_config(**changes):
    """adapter_config.json as PEFT (0.13+) writes it for a LoRA on tiny-llama."""
    c = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "tiny-llama",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 8,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 4,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(TARGETS),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    c.update(changes)
    return c


def lora_pair(rng, out, inp, r):
    """A [r, in] ~ N(0, 0.1^2), B [out, r] ~ N(0, 0.05^2): B non-zero so merges change weights."""
    return random_f32(rng, (r, inp), 0.1), random_f32(rng, (out, r), 0.05)


def linear_modules(layers=range(LLAMA["layers"]), mods=None):
    """(module path, out, in) for the chosen linear modules of tiny-llama."""
    for i in layers:
        for mod, (out, inp) in LINEAR_SHAPES.items():
            if mods is None or mod.split(".")[-1] in mods:
                yield f"model.layers.{i}.{mod}", out, inp


def write_peft(folder, config, tensors, dtype, dtypes=None):
    write_json(folder + "/adapter_config.json", config, newline=False)
    write_safetensors(folder + "/adapter_model.safetensors", tensors, dtype, HF_METADATA, dtypes)


def write_adapters(base):
    # plain LoRA: r 4, alpha 8, all seven linear modules of both layers
    rng = np.random.default_rng(10)
    plain = {}
    for path, out, inp in linear_modules():
        a, b = lora_pair(rng, out, inp, 4)
        plain[f"base_model.model.{path}.lora_A.weight"] = a
        plain[f"base_model.model.{path}.lora_B.weight"] = b
    write_peft("lora-tiny-llama", peft_config(), plain, "F32")

    # kohya copy of the same weights: merging either must give the same model
    kohya = {}
    for path, out, inp in linear_modules():
        k = "lora_te_" + path.replace(".", "_")
        kohya[k + ".lora_down.weight"] = plain[f"base_model.model.{path}.lora_A.weight"]
        kohya[k + ".lora_up.weight"] = plain[f"base_model.model.{path}.lora_B.weight"]
        kohya[k + ".alpha"] = np.array(8.0, dtype=np.float32)
    write_safetensors("lora-tiny-llama-kohya.safetensors", kohya, "F32",
                      {"ss_network_alpha": "8.0", "ss_network_dim": "4", "ss_network_module": "networks.lora",
                       "ss_output_name": "lora-tiny-llama-kohya"})

    # DoRA: q, v, down; m = ||W0 + s B A||_row * (1 + 0.05 noise)
    rng = np.random.default_rng(11)
    dora, s = {}, 8 / 4
    for path, out, inp in linear_modules(mods=("q_proj", "v_proj", "down_proj")):
        a, b = lora_pair(rng, out, inp, 4)
        v = base[path + ".weight"].astype(np.float64) + s * (b.astype(np.float64) @ a.astype(np.float64))
        m = np.linalg.norm(v, axis=1) * (1.0 + 0.05 * rng.standard_normal(out))
        dora[f"base_model.model.{path}.lora_A.weight"] = a
        dora[f"base_model.model.{path}.lora_B.weight"] = b
        dora[f"base_model.model.{path}.lora_magnitude_vector"] = m.astype(np.float32)
    write_peft("lora-tiny-llama-dora", peft_config(use_dora=True, target_modules=["down_proj", "q_proj", "v_proj"]),
               dora, "F32")

    # rsLoRA with rank/alpha patterns, BF16 tensors, `.default.` keys on two modules
    rng = np.random.default_rng(12)
    pat = {}
    default_form = {"model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.o_proj"}
    for path, out, inp in linear_modules():
        r = 8 if path.endswith("q_proj") else 2 if path == "model.layers.1.mlp.down_proj" else 4
        a, b = lora_pair(rng, out, inp, r)
        if path.endswith("v_proj"):
            b *= 0.25  # alpha 32 / sqrt(4) = 16: keep the delta modest
        tag = ".default" if path in default_form else ""
        pat[f"base_model.model.{path}.lora_A{tag}.weight"] = a
        pat[f"base_model.model.{path}.lora_B{tag}.weight"] = b
    write_peft("lora-tiny-llama-patterns",
               peft_config(use_rslora=True, rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2},
                           alpha_pattern={"v_proj": 32}),
               pat, "BF16")

    # extras: embedding LoRA on embed_tokens, q/v linear, lm_head saved whole
    rng = np.random.default_rng(13)
    ext = {
        "base_model.model.model.embed_tokens.lora_embedding_A": random_f32(rng, (4, LLAMA["vocab"]), 0.1),
        "base_model.model.model.embed_tokens.lora_embedding_B": random_f32(rng, (LLAMA["hidden"], 4), 0.05),
    }
    for path, out, inp in linear_modules(mods=("q_proj", "v_proj")):
        a, b = lora_pair(rng, out, inp, 4)
        ext[f"base_model.model.{path}.lora_A.weight"] = a
        ext[f"base_model.model.{path}.lora_B.weight"] = b
    ext["base_model.model.lm_head.weight"] = random_f32(rng, (LLAMA["vocab"], LLAMA["hidden"]), 0.125)
    write_peft("lora-tiny-llama-extras",
               peft_config(target_modules=["embed_tokens", "q_proj", "v_proj"], modules_to_save=["lm_head"]),
               ext, "F32")

    # lora_bias: every lora_B carries a bias (PEFT: nn.Linear(r, out, bias=True));
    # on tiny-qwen2, whose q/k/v have biases (PEFT refuses to merge a bias into a layer without one)
    rng = np.random.default_rng(14)
    bias = {}
    for path, out, inp in linear_modules(mods=("q_proj", "k_proj", "v_proj")):
        a, b = lora_pair(rng, out, inp, 4)
        bias[f"base_model.model.{path}.lora_A.weight"] = a
        bias[f"base_model.model.{path}.lora_B.weight"] = b
        bias[f"base_model.model.{path}.lora_B.bias"] = random_f32(rng, (out,), 0.05)
    write_peft("lora-tiny-qwen2-bias",
               peft_config(lora_bias=True, target_modules=["k_proj", "q_proj", "v_proj"],
                           base_model_name_or_path="tiny-qwen2"),
               bias, "F32")

    # does not fit tiny-llama: q_proj A has in 48 (base: 64); layer 2 does not exist
    rng = np.random.default_rng(15)
    bad = {}
    a, b = lora_pair(rng, 64, 48, 4)
    bad["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = a
    bad["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = b
    a, b = lora_pair(rng, 32, 64, 4)
    bad["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"] = a
    bad["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] = b
    a, b = lora_pair(rng, 64, 64, 4)
    bad["base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"] = a
    bad["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"] = b
    write_peft("lora-tiny-llama-mismatch", peft_config(target_modules=["q_proj", "v_proj"]), bad, "F32")


# --- tiny UNet + kohya LoRA -------------------------------------------------------

UNET_ATTN = "down_blocks.0.attentions.0."
UNET_TB = UNET_ATTN + "transformer_blocks.0.attn1."


def write_unet():
    rng = np.random.default_rng(20)
    u = {
        "conv_in.weight": exact_weights(rng, (4, 4, 3, 3), 0.2),
        "conv_in.bias": exact_weights(rng, (4,), 0.1),
        "down_blocks.0.resnets.0.norm1.weight": exact_weights(rng, (4,), 0.1, mean=1.0),
        "down_blocks.0.resnets.0.norm1.bias": exact_weights(rng, (4,), 0.1),
        "down_blocks.0.resnets.0.conv1.weight": exact_weights(rng, (8, 4, 3, 3), 0.2),
        "down_blocks.0.resnets.0.conv1.bias": exact_weights(rng, (8,), 0.1),
        UNET_ATTN + "proj_in.weight": exact_weights(rng, (8, 8, 1, 1), 0.35),
        UNET_ATTN + "proj_in.bias": exact_weights(rng, (8,), 0.1),
        UNET_TB + "to_q.weight": exact_weights(rng, (8, 8), 0.35),
        UNET_TB + "to_k.weight": exact_weights(rng, (8, 8), 0.35),
        UNET_TB + "to_v.weight": exact_weights(rng, (8, 8), 0.35),
        UNET_TB + "to_out.0.weight": exact_weights(rng, (8, 8), 0.35),
        UNET_TB + "to_out.0.bias": exact_weights(rng, (8,), 0.1),
    }
    write_json("tiny-unet/config.json", {"_class_name": "UNet2DConditionModel", "in_channels": 4,
                                         "block_out_channels": [8], "sample_size": 8})
    write_safetensors("tiny-unet/model.safetensors", u, "F32", HF_METADATA)

    # kohya / sd-scripts: lora_unet_<diffusers path, dots as underscores>
    # conv kxk: down [r, in, k, k], up [out, r, 1, 1]; 1x1 conv: both 1x1; linear: 2-D
    rng = np.random.default_rng(21)
    r = 2
    mods = [  # (base path, down shape, up shape, alpha or None)
        ("down_blocks.0.resnets.0.conv1", (r, 4, 3, 3), (8, r, 1, 1), 1.0),
        (UNET_ATTN + "proj_in", (r, 8, 1, 1), (8, r, 1, 1), 4.0),
        (UNET_TB + "to_q", (r, 8), (8, r), 2.0),
        (UNET_TB + "to_out.0", (r, 8), (8, r), None),
    ]
    k, dtypes = {}, {}
    for path, dshape, ushape, alpha in mods:
        name = "lora_unet_" + path.replace(".", "_")
        k[name + ".lora_down.weight"] = random_f32(rng, dshape, 0.2)
        k[name + ".lora_up.weight"] = random_f32(rng, ushape, 0.1)
        if alpha is not None:
            k[name + ".alpha"] = np.array(alpha, dtype=np.float32)
            dtypes[name + ".alpha"] = "F32"
    write_safetensors("lora-tiny-unet-kohya.safetensors", k, "F16",
                      {"ss_network_dim": str(r), "ss_network_module": "networks.lora",
                       "ss_output_name": "lora-tiny-unet-kohya"}, dtypes)


# --- every dtype, unpadded header -------------------------------------------------

def write_dtype_files():
    rng = np.random.default_rng(30)
    t = {}
    for d in DTYPE_ORDER:
        # 8 elements: a whole number of bytes for F4 (4 bytes) and F6 (6 bytes)
        nb = n_bytes(d, [2, 4])
        raw = rng.integers(0, 256, nb, dtype=np.uint8).tobytes()
        if d == "BOOL":
            raw = bytes(b & 1 for b in raw)
        t["t_" + d.lower()] = (d, [2, 4], raw)
    write_bytes("all-dtypes.safetensors", safetensors_bytes(t, {"what": "one tensor per dtype"}))

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    u = {"ab": ("F32", [2, 3], tensor_bytes("F32", a)), "c": ("F16", [3], tensor_bytes("F16", np.array([1, 2, 3])))}
    data = safetensors_bytes(u, None, pad=False)
    assert (struct.unpack("<Q", data[:8])[0]) % 8 != 0
    write_bytes("unpadded.safetensors", data)


# --- malformed files ------------------------------------------------------------

def raw_file(header_text, buffer, header_len=None):
    h = header_text.encode("utf-8") if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(h) if header_len is None else header_len) + h + buffer


def write_malformed():
    f8 = bytes(range(8))  # two F32 values
    one = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    cases = {
        "too-small.safetensors": b"\x05\x00\x00\x00",
        "header-past-eof.safetensors": raw_file(one, f8, header_len=4096),
        "header-too-large.safetensors": raw_file(one, f8, header_len=200_000_000),
        "bad-utf8.safetensors": raw_file(b'{"\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', f8),
        "bad-json.safetensors": raw_file('{"a":{"dtype":"F32","shape":[2],', f8),
        "not-object.safetensors": raw_file("[1,2]", b""),
        "unknown-dtype.safetensors": raw_file('{"a":{"dtype":"F12","shape":[2],"data_offsets":[0,8]}}', f8),
        "missing-field.safetensors": raw_file('{"a":{"dtype":"F32","data_offsets":[0,8]}}', f8),
        "negative-shape.safetensors": raw_file('{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', f8),
        "wrong-byte-count.safetensors": raw_file('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', f8),
        "offsets-gap.safetensors": raw_file(
            '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
            '"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}', bytes(20)),
        "offsets-overlap.safetensors": raw_file(
            '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
            '"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', bytes(12)),
        "trailing-bytes.safetensors": raw_file(one, f8 + b"\x00\x00\x00\x00"),
        "truncated.safetensors": raw_file(one, f8[:6]),
        "metadata-not-strings.safetensors": raw_file(
            '{"__metadata__":{"n":1},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', f8),
        "duplicate-key.safetensors": raw_file(
            '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
            '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', f8),
    }
    for name, data in cases.items():
        write_bytes("malformed/" + name, data)

    # sharded model whose index total_size is wrong, and one whose shard is absent
    w = {"x.weight": np.ones((2, 2), dtype=np.float32), "y.weight": np.ones((2,), dtype=np.float32)}
    for folder, total, write_second in (("sharded-bad-total", 999, True), ("sharded-missing-shard", 24, False)):
        base = "malformed/" + folder + "/"
        write_json(base + "config.json", {"model_type": "llama"})
        write_safetensors(base + "model-00001-of-00002.safetensors", {"x.weight": w["x.weight"]}, "F32", HF_METADATA)
        if write_second:
            write_safetensors(base + "model-00002-of-00002.safetensors", {"y.weight": w["y.weight"]}, "F32",
                              HF_METADATA)
        write_json(base + "model.safetensors.index.json",
                   {"metadata": {"total_size": total},
                    "weight_map": {"x.weight": "model-00001-of-00002.safetensors",
                                   "y.weight": "model-00002-of-00002.safetensors"}})

    # PEFT adapter with lora_A but no lora_B for one module
    rng = np.random.default_rng(40)
    a, b = lora_pair(rng, 64, 64, 4)
    write_peft("malformed/lora-missing-b", peft_config(target_modules=["q_proj", "v_proj"]),
               {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b,
                "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": a}, "F32")
    # A says rank 4, B says rank 3
    write_peft("malformed/lora-rank-mismatch", peft_config(target_modules=["q_proj"]),
               {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b[:, :3]}, "F32")


GENERATED = ["tiny-llama", "tiny-llama-f16-sharded", "tiny-llama-f32", "tiny-llama-tied", "tiny-qwen2",
             "lora-tiny-llama", "lora-tiny-llama-dora", "lora-tiny-llama-patterns", "lora-tiny-llama-extras",
             "lora-tiny-qwen2-bias", "lora-tiny-llama-mismatch", "lora-tiny-llama-kohya.safetensors", "tiny-unet",
             "lora-tiny-unet-kohya.safetensors", "all-dtypes.safetensors", "unpadded.safetensors", "malformed"]


def main():
    global HERE
    if len(sys.argv) == 3 and sys.argv[1] == "--out":
        HERE = os.path.abspath(sys.argv[2])
        os.makedirs(HERE, exist_ok=True)
    elif len(sys.argv) != 1:
        sys.exit("usage: generate.py [--out DIR]")
    # start from a clean slate: remove only what this script writes
    for entry in GENERATED:
        p = os.path.join(HERE, entry)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    base = write_models()
    write_adapters(base)
    write_unet()
    write_dtype_files()
    write_malformed()
    total = 0
    for root, _, files in os.walk(HERE):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(f"testdata: {total} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
