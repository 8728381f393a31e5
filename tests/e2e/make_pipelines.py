"""Tiny deterministic diffusers pipeline folders and the adapters that change
them, for tests/e2e/e2e-diffusers-folder.sh (numpy only).

python3 make_pipelines.py OUT [FIXTURE_LORA]

Writes into OUT:
  sd15/   an SD 1.5-like pipeline: model_index.json; unet/ (BF16, one
          diffusion_pytorch_model.safetensors); text_encoder/ (F16, sharded:
          model-0000N-of-00002.safetensors + model.safetensors.index.json);
          vae/ (F32, untouched); scheduler/, tokenizer/ with small files
  sdxl/   an SDXL-like pipeline: unet/ sharded (diffusion_pytorch_model-0000N-
          of-00002.safetensors + its index), text_encoder/ (F16),
          text_encoder_2/ (BF16), vae/, scheduler/, tokenizer/, tokenizer_2/
  kohya-sd15.safetensors        sd-scripts names from diffusers paths (lora_unet_down_blocks_...,
                                lora_te_...), a 3x3 LoCon conv, alphas
  kohya-sd15-stray.safetensors  the same plus a module that names nothing in the base
  kohya-sdxl.safetensors        LDM-named UNet (lora_unet_input_blocks_4_1_...), lora_te1_, lora_te2_
  diffusers-lora/pytorch_lora_weights.safetensors
                                unet. / text_encoder. lora_A / lora_B, some with .alpha tensors
  expect/<case>/<component>.safetensors
                                every tensor of the component as the merge must write it:
                                W0 + s up @ down in float64, rounded once to the output dtype;
                                untouched tensors as they are (or converted once with --dtype)
  fixture/ (with FIXTURE_LORA)  a pipeline whose unet/ holds every module of that real diffusers
                                LoRA file, and expect/fixture/unet.safetensors

Names are the real ones of each family: diffusers UNet2DConditionModel paths,
Hugging Face CLIPTextModel(WithProjection) paths, sd-scripts' kohya prefixes
(networks/lora.py) and SDXL's LDM UNet names (library/sdxl_model_util.py
make_unet_conversion_map, written out here independently).
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_np  # noqa: E402

OUT = sys.argv[1]
rng = np.random.default_rng(20261130)


bf16_bits = safetensors_np.bf16_bits


def encode(x, dt):
    """float64 array -> (dtype, shape, bytes), rounded once."""
    x = np.asarray(x, np.float64)
    if dt == "BF16":
        return ("BF16", list(x.shape), bf16_bits(x).tobytes())
    return (dt, list(x.shape), x.astype({"F16": np.float16, "F32": np.float32}[dt]).tobytes())


def values(x, dt):
    """the float64 values a tensor stored in dt holds."""
    _, shape, b = encode(x, dt)
    if dt == "BF16":
        v = (np.frombuffer(b, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        v = np.frombuffer(b, {"F16": np.float16, "F32": np.float32}[dt])
    return v.astype(np.float64).reshape(shape)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


class Component:
    def __init__(self, name, dtype, shapes, stem, shards=1):
        self.name, self.dtype, self.stem, self.shards = name, dtype, stem, shards
        self.w0 = {k: values(rng.standard_normal(s) * 0.5, dtype) for k, s in shapes.items()}


def write_pipeline(root, cls, components, extra_files):
    write_json(f"{root}/model_index.json", {"_class_name": cls, "_diffusers_version": "0.30.0",
                                             **{c.name: ["diffusers", "X"] for c in components}})
    for c in components:
        write_json(f"{root}/{c.name}/config.json", {"_class_name": c.name, "tiny": True})
        names = sorted(c.w0)
        tensors = {k: encode(c.w0[k], c.dtype) for k in names}
        if c.shards == 1:
            safetensors_np.write(f"{root}/{c.name}/{c.stem}.safetensors", tensors)
            continue
        weight_map, total = {}, 0
        for i in range(c.shards):
            fname = f"{c.stem}-{i + 1:05d}-of-{c.shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[i::c.shards]}
            safetensors_np.write(f"{root}/{c.name}/{fname}", part)
            for k, v in part.items():
                weight_map[k] = fname
                total += len(v[2])
        write_json(f"{root}/{c.name}/{c.stem}.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    for name, text in extra_files.items():
        write_text(f"{root}/{name}", text)


def factors(out_dim, in_shape, r):
    down = (rng.standard_normal([r, *in_shape]) * 0.5).astype(np.float32)
    up = (rng.standard_normal([out_dim, r] + [1] * (len(in_shape) - 1)) * 0.5).astype(np.float32)
    return down, up


def delta(down, up, scale, shape):
    d = up.astype(np.float64).reshape(up.shape[0], -1) @ down.astype(np.float64).reshape(down.shape[0], -1)
    return (scale * d).reshape(shape)


def expect(case, components, changes, out_dtype=None):
    """expect/<case>/<component>.safetensors: W0 + sum of deltas, rounded once."""
    os.makedirs(f"{OUT}/expect/{case}", exist_ok=True)
    for c in components:
        dt = out_dtype or c.dtype
        t = {}
        for k, w0 in c.w0.items():
            d = changes.get((c.name, k))
            t[k] = encode(w0 + d if d is not None else w0, dt)
        safetensors_np.write(f"{OUT}/expect/{case}/{c.name}.safetensors", t)


def kohya_file(path, modules, components):
    """modules: [(kohya name, component, base tensor, rank, alpha or None)] -> the file and its deltas."""
    tensors, changes = {}, {}
    comp = {c.name: c for c in components}
    for name, cname, key, r, alpha in modules:
        shape = comp[cname].w0[key].shape
        down, up = factors(shape[0], list(shape[1:]), r)
        tensors[name + ".lora_down.weight"] = down
        tensors[name + ".lora_up.weight"] = up
        if alpha is not None:
            tensors[name + ".alpha"] = np.array(alpha, np.float32)
        # sd-scripts LoRAModule: scale = alpha / r, no alpha: alpha = r
        s = (alpha if alpha is not None else r) / r
        changes[(cname, key)] = changes.get((cname, key), 0) + delta(down, up, s, shape)
    safetensors_np.write(path, tensors)
    return changes


EXTRA = {
    "scheduler/scheduler_config.json": '{"_class_name": "PNDMScheduler", "num_train_timesteps": 1000}\n',
    "tokenizer/vocab.json": '{"a": 0, "b": 1}\n',
    "tokenizer/merges.txt": "#version: 0.2\na b\n",
    "tokenizer/special_tokens_map.json": '{"bos_token": "a"}\n',
    "README.md": "tiny test pipeline\n",
}

# --- SD 1.5-like: diffusers UNet2DConditionModel names, CLIPTextModel names
attn = "down_blocks.0.attentions.0.transformer_blocks.0"
sd15 = [
    Component("unet", "BF16", {
        "conv_in.weight": [8, 4, 3, 3],
        "conv_in.bias": [8],
        "time_embedding.linear_1.weight": [16, 8],
        "down_blocks.0.resnets.0.conv1.weight": [8, 8, 3, 3],
        "down_blocks.0.attentions.0.proj_in.weight": [8, 8],
        f"{attn}.attn1.to_q.weight": [8, 8],
        f"{attn}.attn1.to_k.weight": [8, 8],
        f"{attn}.attn1.to_out.0.weight": [8, 8],
        f"{attn}.attn1.to_out.0.bias": [8],
        f"{attn}.attn2.to_k.weight": [8, 12],
        "mid_block.attentions.0.proj_out.weight": [8, 8],
    }, "diffusion_pytorch_model"),
    Component("text_encoder", "F16", {
        "text_model.embeddings.token_embedding.weight": [20, 12],
        "text_model.encoder.layers.0.self_attn.q_proj.weight": [12, 12],
        "text_model.encoder.layers.0.self_attn.k_proj.weight": [12, 12],
        "text_model.encoder.layers.0.mlp.fc1.weight": [16, 12],
        "text_model.final_layer_norm.weight": [12],
    }, "model", shards=2),
    Component("vae", "F32", {"decoder.conv_in.weight": [8, 4, 3, 3], "encoder.conv_out.bias": [8]},
              "diffusion_pytorch_model"),
]
write_pipeline(f"{OUT}/sd15", "StableDiffusionPipeline", sd15, EXTRA)

sd15_modules = [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet", "down_blocks.0.attentions.0.proj_in.weight", 2, 1.0),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "unet", f"{attn}.attn1.to_q.weight", 4, 2.0),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", "unet", f"{attn}.attn1.to_out.0.weight", 2, None),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "unet", f"{attn}.attn2.to_k.weight", 3, 1.5),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "unet", "down_blocks.0.resnets.0.conv1.weight", 2, 1.0),  # LoCon 3x3
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder",
     "text_model.encoder.layers.0.self_attn.q_proj.weight", 2, 1.0),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "text_encoder", "text_model.encoder.layers.0.mlp.fc1.weight", 4, 8.0),
]
ch = kohya_file(f"{OUT}/kohya-sd15.safetensors", sd15_modules, sd15)
expect("kohya-sd15", sd15, ch)
expect("kohya-sd15-bf16", sd15, ch, "BF16")
# the same file plus a module that maps to nothing (a down block the base does not have)
stray = sd15_modules + [("lora_unet_down_blocks_3_attentions_0_proj_in", "unet", "down_blocks.0.attentions.0.proj_in.weight", 2, 1.0)]
rng_state = rng.bit_generator.state
t, _ = safetensors_np.read(f"{OUT}/kohya-sd15.safetensors")
stray_tensors = {k: v[3].astype(np.float32) for k, v in t.items()}
d, u = factors(8, [8], 2)
stray_tensors["lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight"] = d
stray_tensors["lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight"] = u
stray_tensors["lora_te_text_model_encoder_layers_7_self_attn_v_proj.lora_down.weight"] = factors(12, [12], 2)[0]
stray_tensors["lora_te_text_model_encoder_layers_7_self_attn_v_proj.lora_up.weight"] = factors(12, [12], 2)[1]
safetensors_np.write(f"{OUT}/kohya-sd15-stray.safetensors", stray_tensors)

# diffusers LoRA file: unet. and text_encoder. keys, lora_A / lora_B, .alpha on two modules
dl, dch = {}, {}
for comp, key, r, alpha in [
    ("unet", f"{attn}.attn1.to_k", 2, 4.0),
    ("unet", "mid_block.attentions.0.proj_out", 4, None),
    ("unet", "down_blocks.0.attentions.0.proj_in", 2, None),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.k_proj", 2, 1.0),
]:
    c = {x.name: x for x in sd15}[comp]
    shape = c.w0[key + ".weight"].shape
    down, up = factors(shape[0], list(shape[1:]), r)
    dl[f"{comp}.{key}.lora_A.weight"] = down
    dl[f"{comp}.{key}.lora_B.weight"] = up
    if alpha is not None:
        dl[f"{comp}.{key}.alpha"] = np.array(alpha, np.float32)
    # diffusers: network alpha -> lora_alpha, s = alpha / r; none: lora_alpha = r, s = 1
    s = (alpha if alpha is not None else r) / r
    dch[(comp, key + ".weight")] = dch.get((comp, key + ".weight"), 0) + delta(down, up, s, shape)
os.makedirs(f"{OUT}/diffusers-lora", exist_ok=True)
safetensors_np.write(f"{OUT}/diffusers-lora/pytorch_lora_weights.safetensors", dl)
expect("diffusers", sd15, dch)
# both adapters at once, weights 0.5 and -1.25
both = {}
for k, v in ch.items():
    both[k] = both.get(k, 0) + 0.5 * v
for k, v in dch.items():
    both[k] = both.get(k, 0) - 1.25 * v
expect("both", sd15, both)

# --- SDXL-like: diffusers SDXL UNet names (3 levels, no attention in level 0), two CLIP encoders
xa = "down_blocks.1.attentions.0"
sdxl = [
    Component("unet", "BF16", {
        "conv_in.weight": [8, 4, 3, 3],
        "add_embedding.linear_1.weight": [16, 12],
        "down_blocks.0.resnets.1.conv2.weight": [8, 8, 3, 3],
        "down_blocks.0.downsamplers.0.conv.weight": [8, 8, 3, 3],
        f"{xa}.proj_in.weight": [8, 8],
        f"{xa}.transformer_blocks.0.attn1.to_q.weight": [8, 8],
        f"{xa}.transformer_blocks.1.attn2.to_v.weight": [8, 12],
        "mid_block.resnets.1.time_emb_proj.weight": [8, 16],
        "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight": [16, 8],
        "up_blocks.0.upsamplers.0.conv.weight": [8, 8, 3, 3],
        "up_blocks.2.resnets.2.conv_shortcut.weight": [8, 12, 1, 1],
        "conv_out.weight": [4, 8, 3, 3],
    }, "diffusion_pytorch_model", shards=2),
    Component("text_encoder", "F16", {
        "text_model.encoder.layers.0.self_attn.q_proj.weight": [12, 12],
        "text_model.encoder.layers.1.mlp.fc2.weight": [12, 16],
        "text_model.final_layer_norm.bias": [12],
    }, "model"),
    Component("text_encoder_2", "BF16", {
        "text_model.encoder.layers.0.self_attn.out_proj.weight": [16, 16],
        "text_model.encoder.layers.0.mlp.fc1.weight": [24, 16],
        "text_projection.weight": [16, 16],
    }, "model"),
    Component("vae", "F32", {"decoder.conv_in.weight": [8, 4, 3, 3]}, "diffusion_pytorch_model"),
]
write_pipeline(f"{OUT}/sdxl", "StableDiffusionXLPipeline", sdxl,
               {**EXTRA, "tokenizer_2/vocab.json": '{"c": 0}\n', "tokenizer_2/merges.txt": "#version: 0.2\n"})
sdxl_modules = [
    # sd-scripts' SDXL names: the LDM UNet path (make_unet_conversion_map), HF CLIP paths for both encoders
    ("lora_unet_input_blocks_4_1_proj_in", "unet", f"{xa}.proj_in.weight", 2, 1.0),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "unet", f"{xa}.transformer_blocks.0.attn1.to_q.weight", 4, 2.0),
    ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v", "unet", f"{xa}.transformer_blocks.1.attn2.to_v.weight", 2, None),
    ("lora_unet_input_blocks_2_0_out_layers_3", "unet", "down_blocks.0.resnets.1.conv2.weight", 2, 1.0),
    ("lora_unet_input_blocks_3_0_op", "unet", "down_blocks.0.downsamplers.0.conv.weight", 2, 0.5),
    ("lora_unet_middle_block_2_emb_layers_1", "unet", "mid_block.resnets.1.time_emb_proj.weight", 3, 3.0),
    ("lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_0_proj", "unet",
     "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight", 4, 4.0),
    ("lora_unet_output_blocks_2_2_conv", "unet", "up_blocks.0.upsamplers.0.conv.weight", 2, 1.0),
    ("lora_unet_output_blocks_8_0_skip_connection", "unet", "up_blocks.2.resnets.2.conv_shortcut.weight", 2, 1.0),
    ("lora_unet_label_emb_0_0", "unet", "add_embedding.linear_1.weight", 2, 1.0),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder",
     "text_model.encoder.layers.0.self_attn.q_proj.weight", 2, 1.0),
    ("lora_te1_text_model_encoder_layers_1_mlp_fc2", "text_encoder", "text_model.encoder.layers.1.mlp.fc2.weight", 2, 2.0),
    ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", "text_encoder_2",
     "text_model.encoder.layers.0.self_attn.out_proj.weight", 4, 2.0),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2", "text_model.encoder.layers.0.mlp.fc1.weight", 2, None),
]
xch = kohya_file(f"{OUT}/kohya-sdxl.safetensors", sdxl_modules, sdxl)
expect("kohya-sdxl", sdxl, xch)

# --- the real diffusers LoRA: a pipeline whose unet/ holds every module it names
if len(sys.argv) > 2 and os.path.exists(sys.argv[2]):
    t, _ = safetensors_np.read(sys.argv[2])

    def base_path(k):
        # diffusers' conversion of attention-processor keys (utils/state_dict_utils.py), written out here
        k = k.replace(".processor.", ".")
        for a, b in [("_lora.down.weight", ".down"), ("_lora.up.weight", ".up")]:
            if k.endswith(a):
                k = k[: -len(a)] + b
        k = k.removeprefix("unet.").replace(".to_out.down", ".to_out.0.down").replace(".to_out.up", ".to_out.0.up")
        return k.rsplit(".", 1)

    mods = {}
    for k, v in t.items():
        mod, part = base_path(k)
        mods.setdefault(mod, {})[part] = v[3]
    shapes = {m + ".weight": [p["up"].shape[0], *p["down"].shape[1:]] for m, p in mods.items()}
    shapes["time_embedding.linear_1.weight"] = [8, 4]
    fx = [Component("unet", "BF16", shapes, "diffusion_pytorch_model"),
          Component("text_encoder", "F32", {"text_model.final_layer_norm.weight": [8]}, "model")]
    write_pipeline(f"{OUT}/fixture", "StableDiffusionPipeline", fx, EXTRA)
    fch = {("unet", m + ".weight"): delta(p["down"], p["up"], 1.0, shapes[m + ".weight"]) for m, p in mods.items()}
    expect("fixture", fx, fch)
    print(len(mods))
