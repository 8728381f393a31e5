#!/usr/bin/python3
"""Writes the libFuzzer seed corpora tests/corpus/safetensors/ (small valid
files shaped like the ones real writers produce) and tests/corpus/adapter/
(adapters for fuzz-adapter: config JSON, a NUL byte, the safetensors bytes),
and the regression inputs tests/corpus/regressions/ (inputs that once
crashed or fooled a parser; both fuzz targets replay them).
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


def reference_file(tensors, metadata=None, pad=True, header_order=None, meta_null=False, fill=None):
    """tensors: list of (name, dtype, shape). Data laid out dtype-descending then by name,
    as the reference writer does; header entries in header_order (default: data order).
    fill: {name: bytes} for tensors whose values matter (the rest get a byte pattern)."""
    data_order = sorted(tensors, key=lambda t: (-ORDER.index(t[1]), t[0]))
    entries, offset, data = {}, 0, b""
    for k, (name, dtype, shape) in enumerate(data_order):
        n = nbytes(dtype, shape)
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        data += (fill or {}).get(name) or bytes((k * 31 + i * 7) % 251 for i in range(n))
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

    os.makedirs(os.path.join(HERE, "adapter"), exist_ok=True)
    for name, content in adapter_seeds().items():
        write("adapter", name, content)
    for name, content in adapter_regressions().items():
        write("regressions", name, content)


def peft(modules, ab=("A", "B"), r=4, out=12, inp=8, dtype="F32", extra=()):
    """PEFT keys for each module: lora_A [r, in], lora_B [out, r], plus extra (name, dtype, shape)."""
    t = [(f"base_model.model.{m}.lora_{x}.weight", dtype, [r, inp] if x == "A" else [out, r]) for m in modules for x in ab]
    return t + list(extra)


def fuzz_input(config, tensors, **kw):
    """fuzz-adapter's input: the config text (a dict is dumped; None: no config), NUL, the safetensors file."""
    text = "" if config is None else config if isinstance(config, str) else json.dumps(config, indent=2)
    return text.encode() + b"\0" + reference_file(tensors, **kw)


def adapter_seeds():
    f32 = lambda v: struct.pack("<f", v)  # noqa: E731
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM"}
    attn = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    mag = [(f"base_model.model.{m}.lora_magnitude_vector", "F32", [12]) for m in attn]
    return {
        "peft-basic.bin": fuzz_input(base, peft(attn)),
        "peft-rslora.bin": fuzz_input({**base, "use_rslora": True, "lora_alpha": 16.0}, peft(attn)),
        "peft-dora.bin": fuzz_input({**base, "use_dora": True}, peft(attn, extra=mag)),
        "peft-bias.bin": fuzz_input({**base, "lora_bias": True},
                                    peft(attn, extra=[(f"base_model.model.{attn[0]}.lora_B.bias", "F32", [12])])),
        "peft-fan-in-fan-out.bin": fuzz_input({**base, "fan_in_fan_out": True, "target_modules": ["c_attn"]},
                                              peft(["transformer.h.0.attn.c_attn"], out=24)),
        "peft-patterns.bin": fuzz_input({**base, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 32}},
                                        peft(attn[:1], r=2) + peft(attn[1:])),
        "peft-modules-to-save.bin": fuzz_input({**base, "modules_to_save": ["lm_head", "embed_tokens"]},
                                               peft(attn, extra=[("base_model.model.lm_head.weight", "BF16", [16, 8]),
                                                                 ("base_model.model.model.norm.bias", "F16", [8])])),
        "peft-embedding.bin": fuzz_input({**base, "target_modules": ["embed_tokens"]},
                                         [("base_model.model.model.embed_tokens.lora_embedding_A", "F32", [4, 32]),
                                          ("base_model.model.model.embed_tokens.lora_embedding_B", "F32", [8, 4])]),
        "peft-conv.bin": fuzz_input({**base, "target_modules": ["conv1"]},
                                    [("base_model.model.unet.conv1.lora_A.weight", "F16", [4, 3, 3, 3]),
                                     ("base_model.model.unet.conv1.lora_B.weight", "F16", [8, 4, 1, 1])]),
        "peft-default-keys.bin": fuzz_input(base, [(f"base_model.model.{m}.lora_{x}.default.weight", "BF16",
                                                    [4, 8] if x == "A" else [12, 4]) for m in attn for x in "AB"]),
        "peft-regex-targets.bin": fuzz_input({**base, "target_modules": ".*\\.(q|v)_proj", "init_lora_weights": "pissa",
                                              "layer_replication": None, "r": 4.0}, peft(attn)),
        "peft-no-config.bin": fuzz_input(None, peft(attn)),
        "peft-loha-type.bin": fuzz_input({**base, "peft_type": "LOHA"}, peft(attn)),
        "kohya.bin": fuzz_input(None, [
            ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "F16", [4, 8]),
            ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", "F16", [8, 4]),
            ("lora_unet_down_blocks_0_attentions_0_proj_in.alpha", "F32", []),
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "F32", [4, 8, 1, 1]),
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", "F32", [16, 4, 1, 1]),
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha", "F16", [])],
            fill={"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": f32(2.0),
                  "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": b"\x00\x40"},
            metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"}),
        "mlx.bin": fuzz_input({"fine_tune_type": "lora", "model": "mlx-community/tiny", "num_layers": 2,
                               "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0,
                                                   "keys": ["self_attn.q_proj", "self_attn.v_proj"]}},
                              [(f"model.layers.0.self_attn.{p}.lora_{x}", "F32", [8, 4] if x == "a" else [4, 8])
                               for p in ("q_proj", "v_proj") for x in "ab"], meta_null=True),
        "loha.bin": fuzz_input(None, [("lora_unet_mid_block_proj.hada_w1_a", "F32", [8, 2]),
                                      ("lora_unet_mid_block_proj.hada_w1_b", "F32", [2, 8])]),
        "lycoris.bin": fuzz_input(None, [
            ("lora_unet_a.hada_w1_a", "F32", [8, 2]), ("lora_unet_a.hada_w1_b", "F32", [2, 6]),
            ("lora_unet_a.hada_w2_a", "F32", [8, 2]), ("lora_unet_a.hada_w2_b", "F32", [2, 6]),
            ("lora_unet_b.hada_t1", "F16", [2, 2, 3, 3]), ("lora_unet_b.hada_t2", "F16", [2, 2, 3, 3]),
            ("lora_unet_b.hada_w1_a", "F16", [2, 8]), ("lora_unet_b.hada_w1_b", "F16", [2, 4]),
            ("lora_unet_b.hada_w2_a", "F16", [2, 8]), ("lora_unet_b.hada_w2_b", "F16", [2, 4]),
            ("lora_unet_c.lokr_w1", "BF16", [2, 2]), ("lora_unet_c.lokr_w2_a", "BF16", [4, 2]),
            ("lora_unet_c.lokr_w2_b", "BF16", [2, 3]), ("lora_unet_c.alpha", "F32", []),
            ("lora_unet_d.lokr_w1_a", "F32", [2, 2]), ("lora_unet_d.lokr_w1_b", "F32", [2, 2]),
            ("lora_unet_d.lokr_t2", "F32", [2, 2, 3, 3]), ("lora_unet_d.lokr_w2_a", "F32", [2, 4]),
            ("lora_unet_d.lokr_w2_b", "F32", [2, 3]),
            ("lora_unet_e.lora_down.weight", "F32", [2, 4, 1, 1]), ("lora_unet_e.lora_mid.weight", "F32", [2, 2, 3, 3]),
            ("lora_unet_e.lora_up.weight", "F32", [8, 2, 1, 1])], fill={"lora_unet_c.alpha": f32(1.0)}),
        "diffusers.bin": fuzz_input(None, [
            ("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "F32", [2, 6]),
            ("unet.down_blocks.0.attentions.0.proj_in.lora_B.weight", "F32", [8, 2]),
            ("mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight", "F16", [2, 6]),
            ("mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight", "F16", [6, 2]),
            ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight", "F32", [2, 6]),
            ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight", "F32", [6, 2])]),
        # a diffusers Flux LoRA (transformer. + lora_A / lora_B, a network alpha)
        "diffusers-flux.bin": fuzz_input(None, [
            ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "F32", [2, 8]),
            ("transformer.transformer_blocks.0.attn.to_q.lora_B.weight", "F32", [8, 2]),
            ("transformer.transformer_blocks.0.attn.to_q.alpha", "F32", []),
            ("transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight", "BF16", [2, 8]),
            ("transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight", "BF16", [32, 2])],
            fill={"transformer.transformer_blocks.0.attn.to_q.alpha": f32(4.0)}),
        # sd-scripts' split_qkv Flux LoRA in BFL names (lora_flux.py: downs stacked [3 r, in],
        # a block-diagonal up [3 h, 3 r]) and a linear1 of q / k / v / mlp
        "kohya-flux-split-qkv.bin": fuzz_input(None, [
            ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "F32", [6, 8]),
            ("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", "F32", [24, 6]),
            ("lora_unet_double_blocks_0_img_attn_qkv.alpha", "F32", []),
            ("lora_unet_single_blocks_0_linear1.lora_down.weight", "BF16", [8, 8]),
            ("lora_unet_single_blocks_0_linear1.lora_up.weight", "BF16", [56, 8])],
            fill={"lora_unet_double_blocks_0_img_attn_qkv.alpha": f32(3.0)},
            metadata={"ss_network_module": "networks.lora_flux", "ss_network_args": '{"split_qkv": "True"}'}),
        "llama-config-only.bin": json.dumps({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "rope_scaling": None,
            "torch_dtype": "bfloat16"}, indent=2).encode(),
    }


def adapter_regressions():
    """Adapter inputs that once crashed `lora` (fuzz-adapter's format)."""
    n = 100000
    tensors = peft(["model.layers.0.self_attn.q_proj"])
    return {
        # 100,000-deep lora_alpha: showing it in the error message (json::dump) overflowed the stack
        "adapter-deep-lora-alpha.bin": fuzz_input('{"peft_type":"LORA","r":4,"lora_alpha":' + "[" * n + "]" * n + "}",
                                                  tensors),
        # 100,000-deep unknown field: inspect --json printed the config with json::dump
        "adapter-deep-unknown-field.bin": fuzz_input('{"peft_type":"LORA","r":4,"x":' + "[" * n + "]" * n + "}", tensors),
        # 100,000 unclosed objects
        "adapter-deep-unclosed.bin": fuzz_input('{"a":' * n, tensors),
    }


if __name__ == "__main__":
    main()
