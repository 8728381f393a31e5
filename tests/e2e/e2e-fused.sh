#!/usr/bin/env bash
# Fused row slices and Flux across naming schemes (core/name-map step 3, the
# tables of core/ldm-names and core/flux-names), on tiny checkpoints with the
# real key names (tests/e2e/make_fused.py), in BF16 and F32:
#   - an SDXL SGM single file with a kohya SDXL LoRA whose lora_te2_ q / k / v
#     modules land in row thirds of OpenCLIP's attn.in_proj_weight;
#   - a Flux BFL file, bare and under model.diffusion_model., with a diffusers
#     Flux LoRA (transformer.* lora_A / lora_B) and a PEFT one (with lora_bias);
#   - a diffusers Flux transformer file with kohya LoRAs in BFL names (qkv,
#     linear1, adaLN with its halves swapped), in sd-scripts' split_qkv form and
#     as LyCORIS LoKr / LoHa; two adapters on the same fused tensors;
#   - extract --format kohya of the SDXL merge: in_proj_weight as te2 q / k / v.
# Every merged tensor is checked against numpy float64 rounded once
# (check_fused.py: BF16 byte for byte; F32 within its arithmetic bound),
# every untouched tensor and row bit-identical, `lora verify` equivalent
# (weight and layer levels; model level skipped: no config.json), and a
# tampered row is found. Refusals: exit code, the one-line message, nothing written.
LORA=$1
SRC=$2
export SRC
. "$SRC/tests/e2e/lib.sh"

# merge_check_verify NAME BASE ADAPTER EXPECT N_MERGED N_LAYERS: merge into merged-NAME.safetensors, every tensor
# against numpy (check_fused.py), then verify --json: equivalent, N_LAYERS layers, model level skipped
merge_check_verify() {
  local name=$1 base=$2 adapter=$3 expect=$4 out="$W/merged-$1.safetensors"
  expect_exit 0 "$LORA" merge --base "$base" --adapter "$adapter" --out "$out"
  local got
  got=$("$PY" "$SRC/tests/e2e/check_fused.py" "$base" "$out" "$expect" 2>&1)
  expect_eq "$name: merged tensors" "$got" "ok $5 merged"
  expect_exit 0 "$LORA" verify --base "$base" --adapter "$adapter" --merged "$out" --json
  expect_json "j['equivalent']" "true"
  expect_json "j['layers_checked']" "$6"
  expect_json "j['layers_failed']" "0"
  expect_json "j['model']['skipped']" "no config.json"
}

for DT in BF16 F32; do
  W="$E2E_TMP/$DT"
  mkdir -p "$W"
  "$PY" "$SRC/tests/e2e/make_fused.py" "$W" "$DT" || fail "make_fused.py $DT"

  # --- SDXL: lora_te2_ q / k / v into in_proj_weight rows; te2 fc1 (container rename), te1, unet as they are
  # merged: in_proj_weight of layers 0 and 1, c_fc, te1 q_proj, the UNet's to_q; layers: the same five
  merge_check_verify sdxl "$W/sdxl.safetensors" "$W/sdxl-kohya.safetensors" "$W/expect-sdxl.npz" 5 5
  expect_json "sorted(l['name'] for l in j['layers'])[1]" \
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
  # inspect --base shows the rows each module reaches
  expect_exit 0 "$LORA" inspect "$W/sdxl-kohya.safetensors" --base "$W/sdxl.safetensors" --json
  expect_json "[m.get('rows') for m in j['modules'] if m['name'].endswith('layers_0_self_attn_k_proj')]" \
    '[[{"module_rows":[0,12],"tensor":"conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight","tensor_rows":[12,24]}]]'

  # --- extract --format kohya from that merge: in_proj_weight's rows come back as the lora_te2_ q / k / v
  # modules sd-scripts names (layer 1: v only, its q and k rows are unchanged); F32: merged back, the model
  # is the merged one again (rank 4 holds every delta; to 1e-5 of the largest value)
  expect_exit 0 "$LORA" extract --base "$W/sdxl.safetensors" --tuned "$W/merged-sdxl.safetensors" --format kohya \
    --rank 4 --out "$W/extracted.safetensors"
  got=$("$PY" - "$W/extracted.safetensors" <<'PY'
import os, sys
sys.path.insert(0, os.environ["SRC"] + "/tests/e2e")
from safetensors_np import read
t, _ = read(sys.argv[1])
print(" ".join(sorted(k[:-len(".lora_down.weight")] for k in t if k.endswith(".lora_down.weight"))))
PY
)
  expect_eq "extracted kohya names" "$got" "lora_te1_text_model_encoder_layers_0_self_attn_q_proj lora_te2_text_model_encoder_layers_0_mlp_fc1 lora_te2_text_model_encoder_layers_0_self_attn_k_proj lora_te2_text_model_encoder_layers_0_self_attn_q_proj lora_te2_text_model_encoder_layers_0_self_attn_v_proj lora_te2_text_model_encoder_layers_1_self_attn_v_proj lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
  if [ "$DT" = F32 ]; then
    expect_exit 0 "$LORA" merge --base "$W/sdxl.safetensors" --adapter "$W/extracted.safetensors" \
      --out "$W/remerged.safetensors"
    got=$("$PY" - "$W/merged-sdxl.safetensors" "$W/remerged.safetensors" <<'PY'
import os, sys
import numpy as np
sys.path.insert(0, os.environ["SRC"] + "/tests/e2e")
from safetensors_np import read
a, _ = read(sys.argv[1]); b, _ = read(sys.argv[2])
bad = [k for k in a if sorted(a) != sorted(b) or np.abs(a[k][3] - b[k][3]).max() > 1e-5 * max(1e-30, np.abs(a[k][3]).max())]
print("ok" if not bad else "differ: " + ", ".join(bad[:3]))
PY
)
    expect_eq "extracted q / k / v merged back" "$got" "ok"
  fi

  # --- Flux, diffusers-named adapters into BFL files (bare, ComfyUI's prefix)
  merge_check_verify flux-diffusers-bfl "$W/flux-bfl.safetensors" "$W/flux-diffusers" \
    "$W/expect-flux-diffusers-bfl.npz" 10 10
  merge_check_verify flux-diffusers-comfy "$W/flux-comfy.safetensors" "$W/flux-diffusers" \
    "$W/expect-flux-diffusers-comfy.npz" 10 10
  # PEFT (keys base_model.model.transformer_blocks...), lora_bias on to_q and proj_mlp: qkv.bias and
  # linear1.bias rows
  merge_check_verify flux-peft-bfl "$W/flux-bfl.safetensors" "$W/flux-peft" "$W/expect-flux-peft-bfl.npz" 7 5

  # --- Flux, kohya BFL names into the diffusers transformer file: qkv rows to to_q / to_k / to_v,
  # linear1 to to_q / to_k / to_v / proj_mlp, adaLN_modulation.1 to norm_out.linear swapped
  merge_check_verify flux-kohya-dit "$W/flux-dit.safetensors" "$W/flux-kohya.safetensors" \
    "$W/expect-flux-kohya-dit.npz" 12 12
  # the same file into the BFL file it was made for (names as they are): the same deltas
  merge_check_verify flux-kohya-bfl "$W/flux-bfl.safetensors" "$W/flux-kohya.safetensors" \
    "$W/expect-flux-kohya-bfl.npz" 7 7
  # sd-scripts' split_qkv form (block-diagonal up, rank n r) into both layouts
  merge_check_verify flux-split-dit "$W/flux-dit.safetensors" "$W/flux-split.safetensors" \
    "$W/expect-flux-split-dit.npz" 7 7
  merge_check_verify flux-split-bfl "$W/flux-bfl.safetensors" "$W/flux-split.safetensors" \
    "$W/expect-flux-split-bfl.npz" 2 2

  # two adapters on the same fused tensors, one whole (kohya qkv, linear1) and one by rows (diffusers
  # to_q / to_k / to_v, proj_mlp): each tensor's deltas summed before its one rounding
  "$PY" - "$W/flux-bfl.safetensors" "$W/expect-flux-kohya-bfl.npz" "$W/expect-flux-diffusers-bfl.npz" \
    "$W/expect-mix.npz" <<'PY' || fail "expect-mix"
import os, sys
import numpy as np
sys.path.insert(0, os.environ["SRC"] + "/tests/e2e")
from safetensors_np import read
base, _ = read(sys.argv[1])
x, y = np.load(sys.argv[2]), np.load(sys.argv[3])
out = {}
for k in set(x.files) | set(y.files):
    name = k[2:]
    w0 = base[name][3] if k.startswith("v:") else np.abs(base[name][3])
    out[k] = (x[k] if k in x.files else w0) + (y[k] if k in y.files else w0) - w0
np.savez(sys.argv[4], **out)
PY
  expect_exit 0 "$LORA" merge --base "$W/flux-bfl.safetensors" --adapter "$W/flux-kohya.safetensors" \
    --adapter "$W/flux-diffusers" --out "$W/merged-mix.safetensors"
  got=$("$PY" "$SRC/tests/e2e/check_fused.py" "$W/flux-bfl.safetensors" "$W/merged-mix.safetensors" \
    "$W/expect-mix.npz" 2>&1)
  expect_eq "two adapters, whole and by rows: merged tensors" "$got" "ok 12 merged"
  expect_exit 0 "$LORA" verify --base "$W/flux-bfl.safetensors" --adapter "$W/flux-kohya.safetensors" \
    --adapter "$W/flux-diffusers" --merged "$W/merged-mix.safetensors"
  expect_stdout_contains "equivalent"

  # LyCORIS (LoKr on qkv, LoHa on linear1) split the same way
  merge_check_verify flux-lycoris-dit "$W/flux-dit.safetensors" "$W/flux-lycoris.safetensors" \
    "$W/expect-flux-lycoris-dit.npz" 7 7
  merge_check_verify flux-lycoris-bfl "$W/flux-bfl.safetensors" "$W/flux-lycoris.safetensors" \
    "$W/expect-flux-lycoris-bfl.npz" 2 2

  # --- Flux into a diffusers pipeline folder (transformer/ under the "transformer." component prefix;
  # text_encoder/, text_encoder_2/ untouched, bit-identical): kohya BFL names split by the Flux table,
  # sd-scripts' split_qkv form, and a diffusers Flux LoRA whose names are the pipeline's own
  # pipe_check NAME ADAPTER EXPECT N_MERGED N_LAYERS
  pipe_check() {
    local out="$W/pipe-$1" got
    expect_exit 0 "$LORA" merge --base "$W/flux-pipe" --adapter "$2" --out "$out"
    got=$("$PY" "$SRC/tests/e2e/check_fused.py" "$W/flux-pipe/transformer/diffusion_pytorch_model.safetensors" \
      "$out/transformer/diffusion_pytorch_model.safetensors" "$3" 2>&1)
    expect_eq "$1: pipeline transformer merged tensors" "$got" "ok $4 merged"
    for c in text_encoder text_encoder_2; do
      got=$("$PY" "$SRC/tests/e2e/check_fused.py" "$W/flux-pipe/$c/model.safetensors" "$out/$c/model.safetensors" \
        "$W/expect-none.npz" 2>&1)
      expect_eq "$1: $c untouched" "$got" "ok 0 merged"
    done
    cmp -s "$W/flux-pipe/model_index.json" "$out/model_index.json" && pass || fail "$1: model_index.json copied"
    expect_exit 0 "$LORA" verify --base "$W/flux-pipe" --adapter "$2" --merged "$out" --json
    expect_json "j['equivalent']" "true"
    expect_json "j['layers_checked']" "$5"
    expect_json "j['layers_failed']" "0"
  }
  pipe_check kohya "$W/flux-kohya.safetensors" "$W/expect-flux-kohya-dit.npz" 12 12
  pipe_check split "$W/flux-split.safetensors" "$W/expect-flux-split-dit.npz" 7 7
  pipe_check diffusers "$W/flux-diffusers" "$W/expect-flux-diffusers-dit.npz" 13 13
  # inspect --base shows where the qkv rows go in the pipeline
  expect_exit 0 "$LORA" inspect "$W/flux-kohya.safetensors" --base "$W/flux-pipe" --json
  expect_json "[m.get('rows') for m in j['modules'] if m['name'] == 'lora_unet_double_blocks_0_img_attn_qkv']" \
    '[[{"module_rows":[0,8],"tensor":"transformer.transformer_blocks.0.attn.to_q.weight","tensor_rows":[0,8]},{"module_rows":[8,16],"tensor":"transformer.transformer_blocks.0.attn.to_k.weight","tensor_rows":[0,8]},{"module_rows":[16,24],"tensor":"transformer.transformer_blocks.0.attn.to_v.weight","tensor_rows":[0,8]}]]'
  # a BFL module naming a block the pipeline lacks: exit 3 naming it, nothing written
  expect_exit 3 "$LORA" merge --base "$W/flux-pipe" --adapter "$W/bad-flux-kohya.safetensors" --out "$W/r6"
  expect_one_line_error
  expect_stderr_contains "1 problem: lora_unet_double_blocks_3_img_attn_qkv: no base tensor matches lora_unet_double_blocks_3_img_attn_qkv"
  expect_nothing_left r6

  # --- diffusers LoRA files into single files: SDXL's (unet., text_encoder., text_encoder_2.) into the SGM
  # file, SD 1.5's (unet. incl. resnets, upsampler, time embedding; text_encoder.) into an LDM file
  merge_check_verify sdxl-diffusers "$W/sdxl.safetensors" "$W/sdxl-diffusers" "$W/expect-sdxl-diffusers.npz" 7 7
  merge_check_verify sd15-diffusers "$W/sd15-ldm.safetensors" "$W/sd15-diffusers" "$W/expect-sd15-diffusers.npz" 8 8
  expect_exit 0 "$LORA" inspect "$W/sdxl-diffusers" --base "$W/sdxl.safetensors" --json
  expect_json "sorted(m['target'] for m in j['modules'] if m['target'])" \
    '["conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight","conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight","conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight","conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.weight","model.diffusion_model.input_blocks.4.0.in_layers.2.weight","model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight","model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"]'
  expect_exit 3 "$LORA" merge --base "$W/sdxl.safetensors" --adapter "$W/bad-sdxl-diffusers" --out "$W/r7.safetensors"
  expect_one_line_error
  expect_stderr_contains "1 problem: unet.down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.lora_A.weight: the base has no tensor unet.down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.weight"
  expect_nothing_left r7.safetensors

  # --- verify finds a changed element in the k third of a fused tensor
  cp "$W/sdxl.safetensors" "$W/tampered-in.safetensors"
  expect_exit 0 "$LORA" merge --base "$W/sdxl.safetensors" --adapter "$W/sdxl-kohya.safetensors" \
    --out "$W/tampered.safetensors"
  "$PY" - "$W/tampered.safetensors" <<'PY' || fail "tampering"
import json, struct, sys
p = sys.argv[1]
data = bytearray(open(p, "rb").read())
n = struct.unpack("<Q", data[:8])[0]
e = json.loads(data[8:8 + n])["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
size = 2 if e["dtype"] == "BF16" else 4
at = 8 + n + e["data_offsets"][0] + (13 * e["shape"][1] + 2) * size + size - 1  # row 13 (k), column 2: top byte
data[at] ^= 0x01
open(p, "wb").write(bytes(data))
PY
  expect_exit 1 "$LORA" verify --base "$W/sdxl.safetensors" --adapter "$W/sdxl-kohya.safetensors" \
    --merged "$W/tampered.safetensors" --json
  expect_json "j['failed']" '["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]'
  expect_json "[l['name'] for l in j['layers'] if not l['ok']]" \
    '["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]'
  cmp -s "$W/sdxl.safetensors" "$W/tampered-in.safetensors" && pass || fail "the base changed"

  # --- refusals: exit code, one line naming file / module / tensor / rows, nothing written
  expect_exit 3 "$LORA" merge --base "$W/bad-sdxl-rows.safetensors" --adapter "$W/sdxl-kohya.safetensors" \
    --out "$W/r1.safetensors"
  expect_one_line_error
  expect_stderr_contains "lora_te2_text_model_encoder_layers_0_self_attn_k_proj: base conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight is [37, 12]: its 37 rows do not divide into 3 equal parts (self_attn.q_proj, self_attn.k_proj, self_attn.v_proj) (SDXL OpenCLIP (SGM) <-> Hugging Face CLIP)"
  expect_nothing_left r1.safetensors
  expect_exit 3 "$LORA" merge --base "$W/sdxl.safetensors" --adapter "$W/bad-kohya-wide.safetensors" \
    --out "$W/r2.safetensors"
  expect_one_line_error
  expect_stderr_contains "does not fit $W/sdxl.safetensors: 1 problem: lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight: base conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight rows [0, 12) take a delta of [12, 12], the LoRA makes [13, 12]"
  expect_nothing_left r2.safetensors
  expect_exit 3 "$LORA" merge --base "$W/sdxl.safetensors" --adapter "$W/bad-kohya-nomatch.safetensors" \
    --out "$W/r3.safetensors"
  expect_one_line_error
  expect_stderr_contains "1 problem: lora_te2_text_model_encoder_layers_7_self_attn_q_proj: no base tensor matches lora_te2_text_model_encoder_layers_7_self_attn_q_proj"
  expect_nothing_left r3.safetensors
  expect_exit 3 "$LORA" merge --base "$W/flux-bfl.safetensors" --adapter "$W/bad-flux" --out "$W/r4.safetensors"
  expect_one_line_error
  expect_stderr_contains "1 problem: transformer.transformer_blocks.5.attn.to_q.lora_A.weight: the base has no tensor transformer.transformer_blocks.5.attn.to_q.weight"
  expect_nothing_left r4.safetensors
  # verify refuses the same way (exit 3, before any level runs)
  expect_exit 3 "$LORA" verify --base "$W/sdxl.safetensors" --adapter "$W/bad-kohya-wide.safetensors" \
    --merged "$W/sdxl.safetensors"
  expect_one_line_error
  # convert --base: a module whose rows land in a fused tensor has no base module path to be named by
  expect_exit 3 "$LORA" convert "$W/sdxl-kohya.safetensors" --to peft --base "$W/sdxl.safetensors" --out "$W/r5"
  expect_one_line_error
  expect_stderr_contains "convert: module lora_te2_text_model_encoder_layers_0_self_attn_k_proj changes rows [12, 24) of the base's fused conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
  expect_nothing_left r5
done
finish
