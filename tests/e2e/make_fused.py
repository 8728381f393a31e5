"""Tiny deterministic checkpoints with the real key names of fused layouts,
adapters in the names of the other layout, and the float64 values a merge
must produce (numpy only). Used by e2e-fused.sh.

  make_fused.py OUT DTYPE      DTYPE: BF16 or F32 (the bases' dtype; adapters are F32)

Writes into OUT:
  sdxl.safetensors             SGM single file: conditioner.embedders.0.transformer.* (CLIP-L),
                               conditioner.embedders.1.model.transformer.resblocks.{0,1}.attn.in_proj_weight /
                               in_proj_bias (OpenCLIP, q / k / v row thirds), model.diffusion_model.*
  sdxl-kohya.safetensors       kohya SDXL LoRA: lora_te2_ q / k / v (layer 0 all three, layer 1 v only),
                               lora_te2_ mlp_fc1, lora_te1_, lora_unet_
  flux-bfl.safetensors         Flux in BFL names (double_blocks.0, single_blocks.0, the embedders, final_layer)
  flux-comfy.safetensors       the same under ComfyUI's model.diffusion_model.
  flux-dit.safetensors         the same model as a diffusers FluxTransformer2DModel file (transformer_blocks.0 ...)
  flux-diffusers/pytorch_lora_weights.safetensors   diffusers Flux LoRA ("transformer." + lora_A / lora_B, .alpha)
  flux-peft/                   PEFT adapter of FluxTransformer2DModel (adapter_config.json, lora_bias on to_q)
  flux-kohya.safetensors       kohya Flux LoRA in BFL names (qkv, linear1, proj, linear2, adaLN, img_in)
  flux-lycoris.safetensors     LyCORIS in BFL names: LoKr on img_attn.qkv, LoHa on linear1
  flux-split.safetensors       sd-scripts' split_qkv form: txt_attn.qkv and linear1 with down = cat of the
                               per-part downs [n r, in] and a block-diagonal up [rows, n r] (lora_flux.py state_dict)
  expect-<case>.npz            per changed tensor of the case's output: the float64 value W0 + sum s B A
                               ("v:<name>") and |W0| + sum |s| |B| |A| ("m:<name>") for the F32 bound
  bad-*.safetensors            refusals (see e2e-fused.sh)

Sources of the key names and row layouts: sd-scripts library/sdxl_model_util.py
(convert_sdxl_text_encoder_2_checkpoint: in_proj chunked into q, k, v), diffusers
loaders/single_file_utils.py convert_flux_transformer_checkpoint_to_diffusers (qkv thirds,
linear1 = q, k, v, mlp; norm_out swap_scale_shift), sd-scripts networks/lora_flux.py
(split_qkv state_dict).
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_np import write  # noqa: E402

OUT, DTYPE = sys.argv[1], sys.argv[2]
os.makedirs(OUT, exist_ok=True)
rng = np.random.default_rng(1509)


def bf16_round(x):
    """float64 -> the nearest BF16 value (ties to even), as float64: rounded once."""
    x = np.asarray(x, np.float64)
    m, e = np.frexp(x)  # x = m 2^e, 0.5 <= |m| < 1: 8 significant bits kept
    return np.ldexp(np.rint(m * 256.0) / 256.0, e)


def stored(x):
    """(file entry, exact float64 value) of x in the base dtype."""
    if DTYPE == "BF16":
        v = bf16_round(x)
        bits = (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return ("BF16", list(v.shape), bits.tobytes()), v
    v = np.asarray(x, np.float32)
    return v, v.astype(np.float64)


def base_file(path, shapes):
    """A base of these shapes; returns its float64 values."""
    entries, values = {}, {}
    for name, shape in shapes.items():
        entries[name], values[name] = stored(rng.standard_normal(shape) * 0.1)
    write(path, entries)
    return values


def factors(n_out, n_in, r):
    a = (rng.standard_normal((r, n_in)) * 0.3).astype(np.float32)
    b = (rng.standard_normal((n_out, r)) * 0.3).astype(np.float32)
    return a, b


def save_expect(case, base, deltas, mags):
    """expected values of the changed tensors: W0 + delta (float64) and the F32 bound's magnitude."""
    out = {}
    for name, d in deltas.items():
        out["v:" + name] = base[name] + d
        out["m:" + name] = np.abs(base[name]) + mags[name]
    np.savez(os.path.join(OUT, "expect-%s.npz" % case), **out)


def add(deltas, mags, base, name, rows, d, m):
    """adds d (and its magnitude m) at rows [rows, rows + len(d)) of base tensor name."""
    if name not in deltas:
        deltas[name] = np.zeros_like(base[name])
        mags[name] = np.zeros_like(base[name])
    deltas[name][rows:rows + d.shape[0]] += d
    mags[name][rows:rows + d.shape[0]] += m


# ------------------------------------------------------------------ SDXL (SGM)
W1, W2 = 8, 12  # CLIP-L and OpenCLIP widths
te1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0."
te2 = "conditioner.embedders.1.model."
unet = "model.diffusion_model."
sdxl_shapes = {
    te1 + "self_attn.q_proj.weight": (W1, W1), te1 + "self_attn.k_proj.weight": (W1, W1),
    te1 + "self_attn.v_proj.weight": (W1, W1), te1 + "self_attn.out_proj.weight": (W1, W1),
    te1 + "mlp.fc1.weight": (4 * W1, W1), te1 + "layer_norm1.weight": (W1,),
    te2 + "positional_embedding": (5, W2), te2 + "text_projection": (W2, W2),
    unet + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (16, 16),
    unet + "input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight": (16, 16),
    unet + "input_blocks.4.0.in_layers.2.weight": (16, 8, 3, 3),
}
for i in range(2):
    blk = te2 + "transformer.resblocks.%d." % i
    sdxl_shapes.update({
        blk + "attn.in_proj_weight": (3 * W2, W2), blk + "attn.in_proj_bias": (3 * W2,),
        blk + "attn.out_proj.weight": (W2, W2), blk + "attn.out_proj.bias": (W2,),
        blk + "mlp.c_fc.weight": (4 * W2, W2), blk + "mlp.c_proj.weight": (W2, 4 * W2), blk + "ln_1.weight": (W2,),
    })
sdxl = base_file(os.path.join(OUT, "sdxl.safetensors"), sdxl_shapes)


def kohya_file(path, modules):
    """modules: kohya name -> (a, b, alpha or None)."""
    t = {}
    for name, (a, b, alpha) in modules.items():
        t[name + ".lora_down.weight"] = a
        t[name + ".lora_up.weight"] = b
        if alpha is not None:
            t[name + ".alpha"] = np.array(alpha, np.float32)
    write(path, t)


def sdxl_case():
    mods, deltas, mags = {}, {}, {}

    def module(kname, target, rows, n_out, n_in, r, alpha):
        a, b = factors(n_out, n_in, r)
        mods[kname] = (a, b, alpha)
        s = (alpha if alpha is not None else r) / r
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        add(deltas, mags, sdxl, target, rows, s * (b64 @ a64), abs(s) * (np.abs(b64) @ np.abs(a64)))

    ip0 = te2 + "transformer.resblocks.0.attn.in_proj_weight"
    ip1 = te2 + "transformer.resblocks.1.attn.in_proj_weight"
    module("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", ip0, 0, W2, W2, 4, 2.0)
    module("lora_te2_text_model_encoder_layers_0_self_attn_k_proj", ip0, W2, W2, W2, 4, 8.0)
    module("lora_te2_text_model_encoder_layers_0_self_attn_v_proj", ip0, 2 * W2, W2, W2, 2, None)
    module("lora_te2_text_model_encoder_layers_1_self_attn_v_proj", ip1, 2 * W2, W2, W2, 3, 1.5)  # q, k rows untouched
    module("lora_te2_text_model_encoder_layers_0_mlp_fc1", te2 + "transformer.resblocks.0.mlp.c_fc.weight", 0, 4 * W2,
           W2, 4, 4.0)
    module("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", te1 + "self_attn.q_proj.weight", 0, W1, W1, 2, 1.0)
    # a 2-D LoRA on a linear of the SGM UNet (kohya names the SGM UNet by its own paths)
    module("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
           unet + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", 0, 16, 16, 4, 4.0)
    kohya_file(os.path.join(OUT, "sdxl-kohya.safetensors"), mods)
    save_expect("sdxl", sdxl, deltas, mags)
    return mods


sdxl_mods = sdxl_case()

# refusals: an in_proj_weight whose rows do not divide into thirds; a q module one row too wide;
# a module the base does not have
bad_shapes = dict(sdxl_shapes)
bad_shapes[te2 + "transformer.resblocks.0.attn.in_proj_weight"] = (3 * W2 + 1, W2)
base_file(os.path.join(OUT, "bad-sdxl-rows.safetensors"), bad_shapes)
a, b = factors(W2 + 1, W2, 2)
kohya_file(os.path.join(OUT, "bad-kohya-wide.safetensors"),
           {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (a, b, 2.0)})
a, b = factors(W2, W2, 2)
kohya_file(os.path.join(OUT, "bad-kohya-nomatch.safetensors"),
           {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (a, b, 2.0),
            "lora_te2_text_model_encoder_layers_7_self_attn_q_proj": (a, b, 2.0)})

# ------------------------------------------------------------------ Flux
H, MLP, C_IMG, C_TXT, C_T, C_VEC = 8, 32, 16, 12, 16, 10
flux_shapes = {
    "img_in.weight": (H, C_IMG), "img_in.bias": (H,), "txt_in.weight": (H, C_TXT), "txt_in.bias": (H,),
    "time_in.in_layer.weight": (H, C_T), "time_in.in_layer.bias": (H,), "time_in.out_layer.weight": (H, H),
    "time_in.out_layer.bias": (H,), "vector_in.in_layer.weight": (H, C_VEC), "vector_in.in_layer.bias": (H,),
    "vector_in.out_layer.weight": (H, H), "vector_in.out_layer.bias": (H,),
    "guidance_in.in_layer.weight": (H, C_T), "guidance_in.in_layer.bias": (H,),
    "guidance_in.out_layer.weight": (H, H), "guidance_in.out_layer.bias": (H,),
    "final_layer.linear.weight": (C_IMG, H), "final_layer.linear.bias": (C_IMG,),
    "final_layer.adaLN_modulation.1.weight": (2 * H, H), "final_layer.adaLN_modulation.1.bias": (2 * H,),
}
for s in ("img", "txt"):
    d = "double_blocks.0.%s_" % s
    flux_shapes.update({
        d + "mod.lin.weight": (6 * H, H), d + "mod.lin.bias": (6 * H,),
        d + "attn.qkv.weight": (3 * H, H), d + "attn.qkv.bias": (3 * H,),
        d + "attn.norm.query_norm.scale": (4,), d + "attn.norm.key_norm.scale": (4,),
        d + "attn.proj.weight": (H, H), d + "attn.proj.bias": (H,),
        d + "mlp.0.weight": (MLP, H), d + "mlp.0.bias": (MLP,), d + "mlp.2.weight": (H, MLP), d + "mlp.2.bias": (H,),
    })
flux_shapes.update({
    "single_blocks.0.linear1.weight": (3 * H + MLP, H), "single_blocks.0.linear1.bias": (3 * H + MLP,),
    "single_blocks.0.linear2.weight": (H, H + MLP), "single_blocks.0.linear2.bias": (H,),
    "single_blocks.0.modulation.lin.weight": (3 * H, H), "single_blocks.0.modulation.lin.bias": (3 * H,),
    "single_blocks.0.norm.query_norm.scale": (4,), "single_blocks.0.norm.key_norm.scale": (4,),
})

# the BFL model, written bare and under ComfyUI's prefix with the same values
flux_entries, flux = {}, {}
for name, shape in flux_shapes.items():
    flux_entries[name], flux[name] = stored(rng.standard_normal(shape) * 0.1)
write(os.path.join(OUT, "flux-bfl.safetensors"), flux_entries)
write(os.path.join(OUT, "flux-comfy.safetensors"), {"model.diffusion_model." + k: v for k, v in flux_entries.items()})


# the same model in diffusers names: where each diffusers tensor's rows come from in BFL
# (convert_flux_transformer_checkpoint_to_diffusers): name -> (BFL name, first row, rows, swap halves)
def bfl_sources():
    src = {}

    def whole(d, b):
        for end in ("weight", "bias"):
            src["%s.%s" % (d, end)] = ("%s.%s" % (b, end), 0, flux_shapes["%s.%s" % (b, end)][0], False)

    for d, b in (("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                 ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                 ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                 ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                 ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                 ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
                 ("context_embedder", "txt_in"), ("x_embedder", "img_in"), ("proj_out", "final_layer.linear")):
        whole(d, b)
    for end in ("weight", "bias"):
        src["norm_out.linear." + end] = ("final_layer.adaLN_modulation.1." + end, 0, 2 * H, True)
    t, db = "transformer_blocks.0.", "double_blocks.0."
    for d, b in (("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                 ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                 ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                 ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
        whole(t + d, db + b)
    for end in ("weight", "bias"):
        for i, p in enumerate(("to_q", "to_k", "to_v")):
            src[t + "attn.%s.%s" % (p, end)] = (db + "img_attn.qkv." + end, i * H, H, False)
        for i, p in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            src[t + "attn.%s.%s" % (p, end)] = (db + "txt_attn.qkv." + end, i * H, H, False)
        for i, p in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
            src["single_transformer_blocks.0.%s.%s" % (p, end)] = (
                "single_blocks.0.linear1." + end, i * H, MLP if p == "proj_mlp" else H, False)
    whole("single_transformer_blocks.0.norm.linear", "single_blocks.0.modulation.lin")
    whole("single_transformer_blocks.0.proj_out", "single_blocks.0.linear2")
    for d, b in (("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
                 ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
                 ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
                 ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale")):
        src[t + d] = (db + b, 0, 4, False)
    src["single_transformer_blocks.0.attn.norm_q.weight"] = ("single_blocks.0.norm.query_norm.scale", 0, 4, False)
    src["single_transformer_blocks.0.attn.norm_k.weight"] = ("single_blocks.0.norm.key_norm.scale", 0, 4, False)
    return src


SRC = bfl_sources()
assert sorted({v[0] for v in SRC.values()}) == sorted(flux_shapes), "every BFL tensor has a diffusers place"


def to_diffusers(values):
    out = {}
    for d, (b, r0, n, swap) in SRC.items():
        v = values[b][r0:r0 + n]
        out[d] = np.concatenate([v[n // 2:], v[:n // 2]]) if swap else v
    return out


flux_dit = to_diffusers(flux)
write(os.path.join(OUT, "flux-dit.safetensors"), {k: stored(v)[0] for k, v in flux_dit.items()})
assert all(np.array_equal(stored(v)[1], v) for v in flux_dit.values())  # values stay exact


def diffusers_rows_in_bfl(dname):
    """(BFL tensor, rows) of a diffusers weight's rows in order, as a list of (bfl name, bfl row, n, module row)."""
    b, r0, n, swap = SRC[dname]
    if swap:
        return [(b, r0 + n // 2, n // 2, 0), (b, r0, n // 2, n // 2)]
    return [(b, r0, n, 0)]


def flux_diffusers_case(case, base, prefix, mods):
    """mods: diffusers module path -> (a, b, s, bias or None). Expected values in BFL names under prefix."""
    deltas, mags = {}, {}
    for path, (a, b, s, bias) in mods.items():
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        d, m = s * (b64 @ a64), abs(s) * (np.abs(b64) @ np.abs(a64))
        for bname, row, n, mrow in diffusers_rows_in_bfl(path + ".weight"):
            add(deltas, mags, base, prefix + bname, row, d[mrow:mrow + n], m[mrow:mrow + n])
        if bias is not None:
            for bname, row, n, mrow in diffusers_rows_in_bfl(path + ".bias"):
                bv = s * bias.astype(np.float64)
                add(deltas, mags, base, prefix + bname, row, bv[mrow:mrow + n], np.abs(bv[mrow:mrow + n]))
    save_expect(case, base, deltas, mags)


# a diffusers Flux LoRA: "transformer." + module + lora_A / lora_B, alphas for some modules
fd_mods = {}
fd_tensors = {}
for path, n_out, n_in, r, alpha in (
        ("transformer_blocks.0.attn.to_q", H, H, 4, 2.0), ("transformer_blocks.0.attn.to_k", H, H, 4, None),
        ("transformer_blocks.0.attn.to_v", H, H, 2, 4.0), ("transformer_blocks.0.attn.add_k_proj", H, H, 2, None),
        ("transformer_blocks.0.attn.to_out.0", H, H, 2, None), ("transformer_blocks.0.ff.net.0.proj", MLP, H, 4, 8.0),
        ("transformer_blocks.0.norm1_context.linear", 6 * H, H, 2, None),
        ("single_transformer_blocks.0.attn.to_q", H, H, 4, None), ("single_transformer_blocks.0.proj_mlp", MLP, H, 4, 2.0),
        ("single_transformer_blocks.0.proj_out", H, H + MLP, 2, None),
        ("norm_out.linear", 2 * H, H, 2, None), ("x_embedder", H, C_IMG, 2, 1.0),
        ("time_text_embed.guidance_embedder.linear_2", H, H, 2, None)):
    a, b = factors(n_out, n_in, r)
    fd_tensors["transformer.%s.lora_A.weight" % path] = a
    fd_tensors["transformer.%s.lora_B.weight" % path] = b
    if alpha is not None:
        fd_tensors["transformer.%s.alpha" % path] = np.array(alpha, np.float32)
    fd_mods[path] = (a, b, (alpha if alpha is not None else r) / r, None)
os.makedirs(os.path.join(OUT, "flux-diffusers"), exist_ok=True)
write(os.path.join(OUT, "flux-diffusers/pytorch_lora_weights.safetensors"), fd_tensors)
flux_diffusers_case("flux-diffusers-bfl", flux, "", fd_mods)
flux_diffusers_case("flux-diffusers-comfy", {"model.diffusion_model." + k: v for k, v in flux.items()},
                    "model.diffusion_model.", fd_mods)

# a PEFT adapter of FluxTransformer2DModel (keys base_model.model.<module>), lora_bias on to_q / proj_mlp
R_PEFT, ALPHA_PEFT = 4, 8
peft_mods, peft_tensors = {}, {}
for path, n_out, n_in, bias in (("transformer_blocks.0.attn.to_q", H, H, True),
                                ("transformer_blocks.0.attn.to_v", H, H, False),
                                ("transformer_blocks.0.attn.add_q_proj", H, H, False),
                                ("transformer_blocks.0.attn.to_add_out", H, H, False),
                                ("single_transformer_blocks.0.attn.to_k", H, H, False),
                                ("single_transformer_blocks.0.proj_mlp", MLP, H, True),
                                ("context_embedder", H, C_TXT, False)):
    a, b = factors(n_out, n_in, R_PEFT)
    peft_tensors["base_model.model.%s.lora_A.weight" % path] = a
    peft_tensors["base_model.model.%s.lora_B.weight" % path] = b
    bv = None
    if bias:
        bv = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
        peft_tensors["base_model.model.%s.lora_B.bias" % path] = bv
    peft_mods[path] = (a, b, ALPHA_PEFT / R_PEFT, bv)
os.makedirs(os.path.join(OUT, "flux-peft"), exist_ok=True)
write(os.path.join(OUT, "flux-peft/adapter_model.safetensors"), peft_tensors)
with open(os.path.join(OUT, "flux-peft/adapter_config.json"), "w") as f:
    json.dump({"peft_type": "LORA", "r": R_PEFT, "lora_alpha": ALPHA_PEFT, "lora_bias": True,
               "target_modules": sorted({p.rsplit(".", 1)[-1] for p in peft_mods}), "fan_in_fan_out": False,
               "bias": "none"}, f, indent=2)
flux_diffusers_case("flux-peft-bfl", flux, "", peft_mods)


# kohya Flux LoRAs in BFL names onto the diffusers transformer file: each BFL module's delta rows
# go to the diffusers tensors holding them
def flux_kohya_case(case, kmods):
    """kmods: BFL module path -> (a, b, alpha); writes the file and both expectations (dit and bfl)."""
    deltas = {}
    for path, (a, b, alpha) in kmods.items():
        r = a.shape[0]
        s = (alpha if alpha is not None else r) / r
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        deltas[path] = (s * (b64 @ a64), abs(s) * (np.abs(b64) @ np.abs(a64)))
    kohya_file(os.path.join(OUT, case + ".safetensors"),
               {"lora_unet_" + p.replace(".", "_"): v for p, v in kmods.items()})
    bfl_module_case(case, deltas)


def bfl_module_case(case, module_deltas):
    """module_deltas: BFL module path -> (dW, |terms|) in float64; both expectations (dit and bfl)."""
    deltas, mags, bdeltas, bmags = {}, {}, {}, {}
    for path, (d, m) in module_deltas.items():
        add(bdeltas, bmags, flux, path + ".weight", 0, d, m)
        for dname, (bname, r0, n, swap) in SRC.items():
            if bname != path + ".weight":
                continue
            dd, mm = d[r0:r0 + n], m[r0:r0 + n]
            if swap:
                dd, mm = np.concatenate([dd[n // 2:], dd[:n // 2]]), np.concatenate([mm[n // 2:], mm[:n // 2]])
            add(deltas, mags, flux_dit, dname, 0, dd, mm)
    save_expect(case + "-dit", flux_dit, deltas, mags)
    save_expect(case + "-bfl", flux, bdeltas, bmags)


km = {}
for path, n_out, n_in, r, alpha in (("double_blocks.0.img_attn.qkv", 3 * H, H, 4, 2.0),
                                    ("double_blocks.0.txt_attn.proj", H, H, 2, None),
                                    ("double_blocks.0.img_mod.lin", 6 * H, H, 2, 1.0),
                                    ("single_blocks.0.linear1", 3 * H + MLP, H, 4, 4.0),
                                    ("single_blocks.0.linear2", H, H + MLP, 2, 2.0),
                                    ("final_layer.adaLN_modulation.1", 2 * H, H, 2, None),
                                    ("img_in", H, C_IMG, 2, 3.0)):
    a, b = factors(n_out, n_in, r)
    km[path] = (a, b, alpha)
flux_kohya_case("flux-kohya", km)


# sd-scripts' split_qkv form (networks/lora_flux.py LoRANetwork.state_dict): per part a down [r, in]
# and an up [part rows, r]; saved as down = cat(downs) [n r, in], up block-diagonal [rows, n r], one alpha
# (read back, as flux_merge_lora.py and diffusers do, with rank n r: s = alpha / (n r))
def split_form(dims, n_in, r):
    downs = [factors(1, n_in, r)[0] for _ in dims]
    up = np.zeros((sum(dims), len(dims) * r), np.float32)
    row = 0
    for j, n in enumerate(dims):
        up[row:row + n, j * r:(j + 1) * r] = factors(n, 1, r)[1]
        row += n
    return np.concatenate(downs, 0), up


sm = {}
a, b = split_form([H, H, H], H, 2)
sm["double_blocks.0.txt_attn.qkv"] = (a, b, 3.0)
a, b = split_form([H, H, H, MLP], H, 2)
sm["single_blocks.0.linear1"] = (a, b, 4.0)
flux_kohya_case("flux-split", sm)

# LyCORIS in BFL names (lycoris/modules/lokr.py, loha.py): a LoKr on img_attn.qkv (w1 [3, 1] full,
# w2 = w2_a [8, r] @ w2_b [r, 8]: dW = alpha / r kron(w1, w2), r = w2_a's columns) and a LoHa on linear1
# (dW = alpha / r (w1a w1b) * (w2a w2b), r = hada_w1_b's rows); the same rows as a LoRA's
def f32(x):
    return np.asarray(x, np.float32)


lyc, lyc_deltas = {}, {}
w1, w2a, w2b = f32(rng.standard_normal((3, 1))), f32(rng.standard_normal((H, 2)) * 0.3), f32(rng.standard_normal((2, H)) * 0.3)
k = "lora_unet_double_blocks_0_img_attn_qkv"
lyc.update({k + ".lokr_w1": w1, k + ".lokr_w2_a": w2a, k + ".lokr_w2_b": w2b, k + ".alpha": np.array(3.0, np.float32)})
s = 3.0 / 2
w1, w2a, w2b = (v.astype(np.float64) for v in (w1, w2a, w2b))
lyc_deltas["double_blocks.0.img_attn.qkv"] = (s * np.kron(w1, w2a @ w2b),
                                               s * np.kron(np.abs(w1), np.abs(w2a) @ np.abs(w2b)))
h = [f32(rng.standard_normal(sh) * 0.3) for sh in ((3 * H + MLP, 2), (2, H), (3 * H + MLP, 2), (2, H))]
k = "lora_unet_single_blocks_0_linear1"
lyc.update({k + ".hada_w1_a": h[0], k + ".hada_w1_b": h[1], k + ".hada_w2_a": h[2], k + ".hada_w2_b": h[3],
            k + ".alpha": np.array(1.0, np.float32)})
h = [v.astype(np.float64) for v in h]
lyc_deltas["single_blocks.0.linear1"] = (0.5 * (h[0] @ h[1]) * (h[2] @ h[3]),
                                         0.5 * (np.abs(h[0]) @ np.abs(h[1])) * (np.abs(h[2]) @ np.abs(h[3])))
write(os.path.join(OUT, "flux-lycoris.safetensors"), lyc)
bfl_module_case("flux-lycoris", lyc_deltas)

# refusal: a diffusers Flux LoRA naming a block the base does not have
a, b = factors(H, H, 2)
os.makedirs(os.path.join(OUT, "bad-flux"), exist_ok=True)
write(os.path.join(OUT, "bad-flux/pytorch_lora_weights.safetensors"),
      {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
       "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b,
       "transformer.transformer_blocks.5.attn.to_q.lora_A.weight": a,
       "transformer.transformer_blocks.5.attn.to_q.lora_B.weight": b})

# ------------------------------------------------------------------ across layouts (issue 15 gaps)
# a diffusers Flux pipeline folder (model_index.json, transformer/ = the diffusers file above,
# text_encoder/ CLIP-L, text_encoder_2/ T5, scheduler/): formats/model-files names its tensors
# "<component>.<name>", so the Flux table must split BFL modules under "transformer."
def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


PIPE = os.path.join(OUT, "flux-pipe")
write_json(os.path.join(PIPE, "model_index.json"),
           {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0", "transformer": ["diffusers", "FluxTransformer2DModel"],
            "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]})
write_json(os.path.join(PIPE, "transformer/config.json"), {"_class_name": "FluxTransformer2DModel"})
write(os.path.join(PIPE, "transformer/diffusion_pytorch_model.safetensors"), {k: stored(v)[0] for k, v in flux_dit.items()})
write_json(os.path.join(PIPE, "text_encoder/config.json"), {"architectures": ["CLIPTextModel"]})
write(os.path.join(PIPE, "text_encoder/model.safetensors"),
      {"text_model.encoder.layers.0.self_attn.q_proj.weight": stored(rng.standard_normal((W1, W1)) * 0.1)[0],
       "text_model.final_layer_norm.weight": stored(rng.standard_normal((W1,)) * 0.1)[0]})
write_json(os.path.join(PIPE, "text_encoder_2/config.json"), {"architectures": ["T5EncoderModel"]})
write(os.path.join(PIPE, "text_encoder_2/model.safetensors"),
      {"encoder.block.0.layer.0.SelfAttention.q.weight": stored(rng.standard_normal((W2, W2)) * 0.1)[0]})
write_json(os.path.join(PIPE, "scheduler/scheduler_config.json"), {"_class_name": "FlowMatchEulerDiscreteScheduler"})
np.savez(os.path.join(OUT, "expect-none.npz"))  # a component nothing changes: every tensor bit-identical

# the diffusers Flux LoRA into the diffusers transformer: each module its own tensor
fdd, fdm = {}, {}
for path, (a, b, s, _) in fd_mods.items():
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    add(fdd, fdm, flux_dit, path + ".weight", 0, s * (b64 @ a64), abs(s) * (np.abs(b64) @ np.abs(a64)))
save_expect("flux-diffusers-dit", flux_dit, fdd, fdm)

# refusal: a kohya BFL module naming a double block the base lacks (the qkv of block 0 fits)
a, b = factors(3 * H, H, 2)
kohya_file(os.path.join(OUT, "bad-flux-kohya.safetensors"),
           {"lora_unet_double_blocks_0_img_attn_qkv": (a, b, 2.0), "lora_unet_double_blocks_3_img_attn_qkv": (a, b, 2.0)})


# diffusers LoRA files (component prefix + module + lora_A / lora_B, .alpha: s = alpha / r, none: 1)
# into single files: SDXL's into the SGM file above (unet. through sd-scripts' make_unet_conversion_map
# read the other way, text_encoder. into conditioner.embedders.0.transformer., text_encoder_2. through
# the OpenCLIP table), SD 1.5's into an LDM file (unet. through convert_ldm_unet_checkpoint's names,
# text_encoder. into cond_stage_model.transformer.)
def diffusers_single_case(case, base, mods, folder):
    """mods: [(diffusers module, base tensor, first row, n_out, in shape, r, alpha)]"""
    tensors, deltas, mags = {}, {}, {}
    for path, target, row, n_out, in_shape, r, alpha in mods:
        a = (rng.standard_normal([r, *in_shape]) * 0.3).astype(np.float32)
        b = (rng.standard_normal([n_out, r] + [1] * (len(in_shape) - 1)) * 0.3).astype(np.float32)
        tensors[path + ".lora_A.weight"] = a
        tensors[path + ".lora_B.weight"] = b
        if alpha is not None:
            tensors[path + ".alpha"] = np.array(alpha, np.float32)
        s = (alpha if alpha is not None else r) / r
        a64, b64 = a.astype(np.float64).reshape(r, -1), b.astype(np.float64).reshape(n_out, r)
        shape = [n_out, *in_shape]
        add(deltas, mags, base, target, row, (s * (b64 @ a64)).reshape(shape),
            (abs(s) * (np.abs(b64) @ np.abs(a64))).reshape(shape))
    os.makedirs(os.path.join(OUT, folder), exist_ok=True)
    write(os.path.join(OUT, folder, "pytorch_lora_weights.safetensors"), tensors)
    save_expect(case, base, deltas, mags)


xb = "down_blocks.1.attentions.0.transformer_blocks.0."
diffusers_single_case("sdxl-diffusers", sdxl, [
    ("unet." + xb + "attn1.to_q", unet + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", 0, 16, [16], 4, 2.0),
    ("unet." + xb + "attn1.to_k", unet + "input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight", 0, 16, [16], 2, None),
    ("unet.down_blocks.1.resnets.0.conv1", unet + "input_blocks.4.0.in_layers.2.weight", 0, 16, [8, 3, 3], 2, 1.0),
    ("text_encoder.text_model.encoder.layers.0.self_attn.v_proj", te1 + "self_attn.v_proj.weight", 0, W1, [W1], 2, 4.0),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc1", te1 + "mlp.fc1.weight", 0, 4 * W1, [W1], 2, None),
    ("text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj",
     te2 + "transformer.resblocks.0.attn.in_proj_weight", W2, W2, [W2], 4, 8.0),
    ("text_encoder_2.text_model.encoder.layers.1.mlp.fc2", te2 + "transformer.resblocks.1.mlp.c_proj.weight", 0, W2,
     [4 * W2], 2, None),
], "sdxl-diffusers")

ld, cs = "model.diffusion_model.", "cond_stage_model.transformer.text_model.encoder.layers.0."
sd15 = base_file(os.path.join(OUT, "sd15-ldm.safetensors"), {
    ld + "time_embed.0.weight": (32, 8), ld + "time_embed.0.bias": (32,),
    ld + "input_blocks.1.1.proj_in.weight": (8, 8, 1, 1),
    ld + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    ld + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 12),
    ld + "input_blocks.2.0.in_layers.2.weight": (8, 8, 3, 3),
    ld + "middle_block.1.proj_out.weight": (16, 16, 1, 1),
    ld + "output_blocks.3.1.transformer_blocks.0.ff.net.2.weight": (16, 32),
    ld + "output_blocks.2.1.conv.weight": (16, 16, 3, 3),
    ld + "out.2.weight": (4, 8, 3, 3),
    cs + "self_attn.q_proj.weight": (12, 12), cs + "mlp.fc1.weight": (16, 12), cs + "layer_norm1.weight": (12,),
    "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3),
})
diffusers_single_case("sd15-diffusers", sd15, [
    ("unet.time_embedding.linear_1", ld + "time_embed.0.weight", 0, 32, [8], 2, None),
    ("unet.down_blocks.0.attentions.0.proj_in", ld + "input_blocks.1.1.proj_in.weight", 0, 8, [8, 1, 1], 2, 1.0),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     ld + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", 0, 8, [8], 4, 2.0),
    ("unet.down_blocks.0.resnets.1.conv1", ld + "input_blocks.2.0.in_layers.2.weight", 0, 8, [8, 3, 3], 2, None),
    ("unet.mid_block.attentions.0.proj_out", ld + "middle_block.1.proj_out.weight", 0, 16, [16, 1, 1], 2, 3.0),
    ("unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
     ld + "output_blocks.3.1.transformer_blocks.0.ff.net.2.weight", 0, 16, [32], 2, None),
    ("unet.up_blocks.0.upsamplers.0.conv", ld + "output_blocks.2.1.conv.weight", 0, 16, [16, 3, 3], 2, 1.0),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc1", cs + "mlp.fc1.weight", 0, 16, [12], 2, 2.0),
], "sd15-diffusers")

# refusal: a diffusers SDXL LoRA naming a down block the SGM file lacks
a, b = factors(16, 16, 2)
os.makedirs(os.path.join(OUT, "bad-sdxl-diffusers"), exist_ok=True)
write(os.path.join(OUT, "bad-sdxl-diffusers/pytorch_lora_weights.safetensors"),
      {"unet." + xb + "attn1.to_q.lora_A.weight": a, "unet." + xb + "attn1.to_q.lora_B.weight": b,
       "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
       "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.lora_B.weight": b})
