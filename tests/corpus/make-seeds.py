#!/usr/bin/python3
"""Writes the libFuzzer seed corpus tests/corpus/safetensors/ (small valid
files shaped like the ones real writers produce) and the regression inputs
tests/corpus/regressions/ (inputs that once crashed or fooled the parser).
Standard library only. Run: /usr/bin/python3 tests/corpus/make-seeds.py"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
        "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
        "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
ORDER = list(BITS)


def nbytes(dtype, shape):
    n = 1
    for d in shape:
        n *= d
    return n * BITS[dtype] // 8


def reference_file(tensors, metadata=None, pad=True, header_order=None, meta_null=False):
    """tensors: list of (name, dtype, shape). Data laid out dtype-descending then by name,
    as the reference writer does; header entries in header_order (default: data order)."""
    data_order = sorted(tensors, key=lambda t: (-ORDER.index(t[1]), t[0]))
    entries, offset, data = {}, 0, b""
    for k, (name, dtype, shape) in enumerate(data_order):
        n = nbytes(dtype, shape)
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        data += bytes((k * 31 + i * 7) % 251 for i in range(n))
        offset += n
    header = {}
    if meta_null:
        header["__metadata__"] = None
    elif metadata is not None:
        header["__metadata__"] = metadata
    for name in (header_order or [t[0] for t in data_order]):
        header[name] = entries[name]
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def write(folder, name, content):
    with open(os.path.join(HERE, folder, name), "wb") as f:
        f.write(content)


def main():
    seeds = {
        "empty.safetensors": reference_file([]),
        "metadata-only.safetensors": reference_file([], {"format": "pt"}),
        "attn0-f32.safetensors": reference_file([("attn.0", "F32", [1, 2, 3])]),
        "all-dtypes.safetensors": reference_file([("t." + d, d, [2, 2]) for d in ORDER], {"note": "all dtypes"}),
        "fluxml-like.safetensors": reference_file(
            [(f"{n}_{s}", d, shape) for n, d in (("float64", "F64"), ("float32", "F32"), ("float16", "F16"),
                                                  ("bfloat16", "BF16"), ("int8", "I8"), ("bool", "BOOL"))
             for s, shape in (("3", [3]), ("35", [3, 5]))], {"test": "metadata", "version": "2.2"}),
        "peft-adapter.safetensors": reference_file(
            [(f"base_model.model.h.{i}.attn.c_attn.lora_{ab}.weight", "F32", [4, 8] if ab == "A" else [12, 4])
             for i in range(2) for ab in "AB"]),
        "zero-size.safetensors": reference_file([("z0", "F32", [0]), ("z1", "F16", [3, 0]), ("a", "U8", [2]),
                                                 ("s", "I64", [])]),
        "unpadded-unaligned.safetensors": reference_file([("unet:0:down", "F32", [4, 2]), ("unet:0:up", "F16", [2, 4])],
                                                         {"rank": "4", "lora": "{\"a\": 1}"}, pad=False),
        "mlx-null-metadata.safetensors": reference_file(
            [("layers.0.lora_a", "F32", [8, 2]), ("layers.0.lora_b", "F32", [2, 8]), ("layers.1.lora_a", "BF16", [8, 2])],
            meta_null=True, pad=False, header_order=["layers.1.lora_a", "layers.0.lora_b", "layers.0.lora_a"]),
        "sub-byte.safetensors": reference_file([("q", "F4", [2, 4]), ("r", "F6_E3M2", [8]), ("s", "F8_E8M0", [5])]),
        "unicode-names.safetensors": reference_file([("caf\u00e9.w", "F16", [2]), ("\u6f22.b", "BF16", [1])],
                                                    {"desc": "line\nbreak \"quoted\""}),
    }
    for name, content in seeds.items():
        write("safetensors", name, content)

    # Regressions: each once crashed or fooled the parser.
    # A 100,000-deep nested array in a shape: describing it with json::dump()
    # recursed once per level and overflowed the stack.
    deep = "[" * 100000 + "]" * 100000
    text = ('{"w":{"dtype":"F32","shape":' + deep + ',"data_offsets":[0,4]}}').encode()
    write("regressions", "deep-nested-shape.safetensors", struct.pack("<Q", len(text)) + text + b"\0" * 4)
    # NUL bytes after the JSON: nlohmann stops at NUL, so the garbage behind it was ignored.
    text = b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}\0}garbage'
    write("regressions", "nul-then-garbage.safetensors", struct.pack("<Q", len(text)) + text + b"\x01")
    # A UTF-8 byte order mark before the JSON: nlohmann skipped it, the reference refuses it.
    text = b'\xef\xbb\xbf{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    write("regressions", "bom-before-json.safetensors", struct.pack("<Q", len(text)) + text + b"\x01")
    # An unterminated 1 MB string: the JSON error quoted the whole token.
    text = b'{"' + b"a" * 1000000
    write("regressions", "long-unterminated-string.safetensors", struct.pack("<Q", len(text)) + text)


if __name__ == "__main__":
    main()
