#!/usr/bin/env bash
# diffusers pipeline folders as bases (model_index.json + unet/, text_encoder/,
# text_encoder_2/, vae/, scheduler/, tokenizer/): tiny SD 1.5-like and
# SDXL-like pipelines (tests/e2e/make_pipelines.py: real file names, one
# sharded component each) merged with a kohya SD 1.5 file (diffusers-named
# UNet, lora_te_), a kohya SDXL file (LDM-named UNet, lora_te1_ / lora_te2_)
# and a diffusers LoRA file (unet. / text_encoder., .alpha tensors). Every
# merged tensor equals W0 + s up @ down computed in float64 and rounded once;
# every untouched tensor and every copied file is bit-identical; the output
# tree has the base's file list (check_pipeline.py); verify is equivalent at
# the weight and layer levels and skips the model level. Refusals (a module
# matching nothing, a broken component index) assert exit code, message and
# that nothing is written. The real ../shared/fixtures/diffusers_sd15_lora is
# merged into a pipeline built from its shapes (skipped when absent).
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
W="$E2E_TMP/w"
mkdir -p "$W"
FX="$SRC/../shared/fixtures/diffusers_sd15_lora/pytorch_lora_weights.safetensors"

n_fixture=$("$PY" "$SRC/tests/e2e/make_pipelines.py" "$W" "$FX")
check() { "$PY" "$SRC/tests/e2e/check_pipeline.py" "$@"; }

# --- inspect lists the components
expect_exit 0 "$LORA" inspect "$W/sd15"
expect_stdout_contains "diffusers pipeline: $W/sd15/model_index.json (3 components)"
expect_stdout_contains "text_encoder/  2 files (model.safetensors.index.json), 5 tensors (5 F16)"
expect_stdout_contains "unet/  1 file, 11 tensors (11 BF16)"
expect_exit 0 "$LORA" inspect "$W/sdxl" --json
expect_json '[c["name"] for c in j["pipeline"]["components"]]' '["text_encoder","text_encoder_2","unet","vae"]'
expect_json '[c["tensors"] for c in j["pipeline"]["components"]]' '[3,3,12,1]'
expect_json 'j["pipeline"]["components"][2]["index"]' "diffusion_pytorch_model.safetensors.index.json"
expect_json 'sorted(f["name"] for f in j["files"])[0]' "text_encoder/model.safetensors"
# inspect --base: every module of each adapter finds its component's tensor
expect_exit 0 "$LORA" inspect "$W/kohya-sdxl.safetensors" --base "$W/sdxl" --json
expect_json 'sorted(m["target"] for m in j["modules"])[0]' "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"
expect_json 'all(m["base_shape"] is not None for m in j["modules"]) and len(j["modules"])' 14

# --- merges: each against its float64 reference, then verify
merge_case() {  # CASE BASE OUT ARGS...
  local case=$1 base=$2 out=$3
  shift 3
  expect_exit 0 "$LORA" merge --base "$W/$base" --out "$W/$out" "$@"
  expect_eq "$case: merged pipeline = float64 reference rounded once, the rest bit-identical" \
    "$(check "$W/$base" "$W/$out" "$W/expect/$case" | sed 's/ [0-9]* tensors$//')" "ok"
}
merge_case kohya-sd15 sd15 m-kohya-sd15 --adapter "$W/kohya-sd15.safetensors"
expect_stdout_contains "merged 7 LoRA modules from 1 adapter"
expect_exit 0 "$LORA" verify --base "$W/sd15" --adapter "$W/kohya-sd15.safetensors" --merged "$W/m-kohya-sd15"
expect_stdout_contains "equivalent: 18 tensors checked, 0 failed"
expect_stdout_contains "layers: 7 adapted modules checked"
expect_stdout_contains "model: skipped (image model)"

merge_case kohya-sdxl sdxl m-kohya-sdxl --adapter "$W/kohya-sdxl.safetensors"
expect_stdout_contains "merged 14 LoRA modules from 1 adapter"
expect_exit 0 "$LORA" verify --base "$W/sdxl" --adapter "$W/kohya-sdxl.safetensors" --merged "$W/m-kohya-sdxl" --json
expect_json 'j["equivalent"]' true
expect_json 'j["model"]["skipped"]' "image model"

merge_case diffusers sd15 m-diffusers --adapter "$W/diffusers-lora"
expect_exit 0 "$LORA" verify --base "$W/sd15" --adapter "$W/diffusers-lora/pytorch_lora_weights.safetensors" --merged "$W/m-diffusers"
expect_stdout_contains "equivalent"

merge_case both sd15 m-both --adapter "$W/kohya-sd15.safetensors" --weight 0.5 --adapter "$W/diffusers-lora" --weight -1.25
expect_exit 0 "$LORA" verify --base "$W/sd15" --adapter "$W/kohya-sd15.safetensors" --weight 0.5 \
  --adapter "$W/diffusers-lora" --weight -1.25 --merged "$W/m-both"
expect_stdout_contains "equivalent"

# --dtype converts the weights of every component (vae F32 and text_encoder F16 -> BF16)
merge_case kohya-sd15-bf16 sd15 m-bf16 --adapter "$W/kohya-sd15.safetensors" --dtype bf16
expect_exit 0 "$LORA" verify --base "$W/sd15" --adapter "$W/kohya-sd15.safetensors" --merged "$W/m-bf16"
expect_stdout_contains "equivalent"

# a wrong merge is caught: the kohya merge checked against the diffusers adapter
expect_exit 1 "$LORA" verify --base "$W/sd15" --adapter "$W/diffusers-lora" --merged "$W/m-kohya-sd15"
expect_stdout_contains "NOT equivalent"

# --sync (every file and folder fsynced) writes the same tree
merge_case kohya-sdxl sdxl m-sync --adapter "$W/kohya-sdxl.safetensors" --sync
# inspect --base: a diffusers LoRA's modules found in their components
expect_exit 0 "$LORA" inspect "$W/diffusers-lora" --base "$W/sd15" --json
expect_json 'sorted(m["target"] for m in j["modules"] if m["base_shape"] is not None)[0]' "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.weight"
expect_json 'len(j["modules"])' 4
# an --out inside the pipeline is refused before anything is read or written
expect_exit 2 "$LORA" merge --base "$W/sd15" --adapter "$W/kohya-sd15.safetensors" --out "$W/sd15/unet/merged"
expect_one_line_error
expect_eq "nothing written inside the base" "$(ls "$W/sd15/unet")" "$(printf 'config.json\ndiffusion_pytorch_model.safetensors')"

# --dry-run writes nothing
expect_exit 0 "$LORA" merge --base "$W/sd15" --adapter "$W/kohya-sd15.safetensors" --out "$W/dry" --dry-run
expect_nothing_left dry

# --- refusals: nothing written
# a module that maps to nothing: exit 3 naming it and the file
expect_exit 3 "$LORA" merge --base "$W/sd15" --adapter "$W/kohya-sd15-stray.safetensors" --out "$W/stray"
expect_stderr_contains "kohya-sd15-stray.safetensors: does not fit $W/sd15: 2 problems, first lora_te_text_model_encoder_layers_7_self_attn_v_proj: no base tensor matches"
expect_one_line_error
expect_nothing_left stray
expect_exit 3 "$LORA" verify --base "$W/sd15" --adapter "$W/kohya-sd15-stray.safetensors" --merged "$W/m-kohya-sd15"
expect_stderr_contains "first lora_te_text_model_encoder_layers_7_self_attn_v_proj: no base tensor matches"

# --- --skip-unmatched: the rest merges, every skipped module is listed (text and --json)
merge_case kohya-sd15 sd15 skipped --adapter "$W/kohya-sd15-stray.safetensors" --skip-unmatched
expect_stdout_contains "skipped 2 adapter modules that match no base tensor (--skip-unmatched):
  $W/kohya-sd15-stray.safetensors: lora_te_text_model_encoder_layers_7_self_attn_v_proj
  $W/kohya-sd15-stray.safetensors: lora_unet_down_blocks_3_attentions_0_proj_in
merged 7 LoRA modules"
expect_exit 0 "$LORA" merge --base "$W/sd15" --adapter "$W/kohya-sd15-stray.safetensors" --skip-unmatched --out "$W/dry" --dry-run --json
expect_json '[m["module"] for m in j["skipped_modules"]]' '["lora_te_text_model_encoder_layers_7_self_attn_v_proj","lora_unet_down_blocks_3_attentions_0_proj_in"]'
expect_json 'j["modules"]' 7
expect_nothing_left dry
expect_exit 0 "$LORA" verify --base "$W/sd15" --adapter "$W/kohya-sd15-stray.safetensors" --merged "$W/skipped" --skip-unmatched --json
expect_json 'j["equivalent"]' true
expect_json 'len(j["skipped_modules"])' 2
# skipping covers "maps to nothing" only: a shape that does not fit is still an error
"$PY" - "$W/kohya-sd15.safetensors" "$W/kohya-bad-shape.safetensors" "$W/kohya-only-stray.safetensors" "$SRC/tests/e2e" <<'EOF'
import sys
sys.path.insert(0, sys.argv[4])
import numpy as np, safetensors_np
t = {k: v[3].astype(np.float32) for k, v in safetensors_np.read(sys.argv[1])[0].items()}
k = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"
t[k] = np.concatenate([t[k], t[k][:, :1]], axis=1)  # [4, 13]: fc1 takes 12 inputs
safetensors_np.write(sys.argv[2], t)
safetensors_np.write(sys.argv[3], {"lora_unet_foo_bar.lora_down.weight": np.ones([2, 8], np.float32),
                                   "lora_unet_foo_bar.lora_up.weight": np.ones([8, 2], np.float32)})
EOF
expect_exit 3 "$LORA" merge --base "$W/sd15" --adapter "$W/kohya-bad-shape.safetensors" --skip-unmatched --out "$W/bad"
expect_stderr_contains "1 problem: lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"
expect_one_line_error
expect_nothing_left bad
# nothing left to merge is an error too
expect_exit 3 "$LORA" merge --base "$W/sd15" --adapter "$W/kohya-only-stray.safetensors" --skip-unmatched --out "$W/bad"
expect_stderr_contains "kohya-only-stray.safetensors: no module of the adapter matches a tensor of $W/sd15 (1 skipped)"
expect_one_line_error
expect_nothing_left bad
# a component whose index names a shard that is not there
cp -r "$W/sd15" "$W/broken"
"$PY" - "$W/broken/text_encoder/model.safetensors.index.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
j["weight_map"]["text_model.final_layer_norm.weight"] = "model-00003-of-00002.safetensors"
json.dump(j, open(sys.argv[1], "w"))
EOF
expect_exit 4 "$LORA" merge --base "$W/broken" --adapter "$W/kohya-sd15.safetensors" --out "$W/broken-out"
expect_stderr_contains "model-00003-of-00002.safetensors"
expect_one_line_error
expect_nothing_left broken-out
# an index whose weight_map misses a tensor of a shard
cp "$W/sd15/text_encoder/model.safetensors.index.json" "$W/broken/text_encoder/model.safetensors.index.json"
"$PY" - "$W/broken/text_encoder/model.safetensors.index.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
del j["weight_map"]["text_model.final_layer_norm.weight"]
json.dump(j, open(sys.argv[1], "w"))
EOF
expect_exit 3 "$LORA" merge --base "$W/broken" --adapter "$W/kohya-sd15.safetensors" --out "$W/broken-out"
expect_stderr_contains "text_encoder/model.safetensors.index.json: text_model.final_layer_norm.weight: tensor in"
expect_one_line_error
expect_nothing_left broken-out
# a pipeline without any component weights
mkdir -p "$W/empty/unet" && cp "$W/sd15/model_index.json" "$W/empty/" && echo '{}' >"$W/empty/unet/config.json"
expect_exit 3 "$LORA" merge --base "$W/empty" --adapter "$W/kohya-sd15.safetensors" --out "$W/empty-out"
expect_stderr_contains "without any component holding safetensors weights"
expect_nothing_left empty-out
# a symlink out of the tree and a nested folder are not copied, and said so
cp -r "$W/sd15" "$W/links"
ln -s /etc/passwd "$W/links/tokenizer/passwd.txt"
mkdir -p "$W/links/scheduler/nested" && echo x >"$W/links/scheduler/nested/x.txt"
expect_exit 0 "$LORA" merge --base "$W/links" --adapter "$W/kohya-sd15.safetensors" --out "$W/links-out" --json
expect_json 'sorted(s["name"] for s in j["skipped_files"])' '["scheduler/nested","tokenizer/passwd.txt"]'
expect_eq "no link out of the tree copied" "$(ls "$W/links-out/tokenizer")" "$(printf 'merges.txt\nspecial_tokens_map.json\nvocab.json')"

# --- model_index.json against the folders (review items 3, 13, 14): exit
# code, the one-line message, nothing written
bad_pipe() {  # NAME: a copy of sd15 to break
  rm -rf "${W:?}/$1" && cp -r "$W/sd15" "$W/$1"
}
refused_pipe() {  # CODE TEXT NAME: merge, verify and inspect of $W/NAME refused
  local code=$1 text=$2 name=$3
  expect_exit "$code" "$LORA" merge --base "$W/$name" --adapter "$W/kohya-sd15.safetensors" --out "$W/$name-out"
  expect_stderr_contains "$text"
  expect_one_line_error
  expect_nothing_left "$name-out"
  expect_exit "$code" "$LORA" verify --base "$W/$name" --adapter "$W/kohya-sd15.safetensors" --merged "$W/m-kohya-sd15"
  expect_stderr_contains "$text"
  expect_exit "$code" "$LORA" inspect "$W/$name"
  expect_stderr_contains "$text"
}
bad_pipe missing-unet && rm -rf "$W/missing-unet/unet"
refused_pipe 3 "model_index.json lists unet (X), but unet/ is missing" missing-unet
bad_pipe missing-te2
"$PY" -c "import json,sys;p=sys.argv[1];d=json.load(open(p));d['text_encoder_2']=['transformers','CLIPTextModel'];d['scheduler']=['diffusers','PNDMScheduler'];d['feature_extractor']=[None,None];json.dump(d,open(p,'w'))" "$W/missing-te2/model_index.json"
refused_pipe 3 "model_index.json lists text_encoder_2 (CLIPTextModel), but text_encoder_2/ is missing" missing-te2
bad_pipe bad-index && echo '{"unet": ["diffusers", ' >"$W/bad-index/model_index.json"
refused_pipe 3 "bad-index/model_index.json: model_index.json is not valid JSON" bad-index
bad_pipe array-index && echo '[1, 2]' >"$W/array-index/model_index.json"
refused_pipe 3 "model_index.json is a JSON array, not an object" array-index
bad_pipe dir-index && rm "$W/dir-index/model_index.json" && mkdir "$W/dir-index/model_index.json"
refused_pipe 3 "model_index.json is not a regular file" dir-index
mkdir -p "$W/elsewhere" && rm -rf "$W/elsewhere/unet" && cp -r "$W/sd15/unet" "$W/elsewhere/unet"
bad_pipe linked-unet && rm -rf "$W/linked-unet/unet" && ln -s "$W/elsewhere/unet" "$W/linked-unet/unet"
refused_pipe 3 "model_index.json lists unet, but unet/ is a symlink out of the pipeline folder (to $W/elsewhere/unet)" linked-unet
# a scheduler listed without its folder is fine (it holds no weights)
bad_pipe no-scheduler && rm -rf "$W/no-scheduler/scheduler"
"$PY" -c "import json,sys;p=sys.argv[1];d=json.load(open(p));d['scheduler']=['diffusers','PNDMScheduler'];json.dump(d,open(p,'w'))" "$W/no-scheduler/model_index.json"
expect_exit 0 "$LORA" merge --base "$W/no-scheduler" --adapter "$W/kohya-sd15.safetensors" --out "$W/no-scheduler-out"
# a folder base merges into a folder: --out NAME.safetensors is refused
expect_exit 2 "$LORA" merge --base "$W/sd15" --adapter "$W/kohya-sd15.safetensors" --out "$W/p.safetensors"
expect_stderr_contains "a pipeline folder merges into a folder: --out $W/p.safetensors names a .safetensors file"
expect_one_line_error
expect_nothing_left p.safetensors
# a JSON file given as the base is named as such
for f in model_index.json unet/config.json; do
  expect_exit 3 "$LORA" inspect "$W/sd15/$f"
  expect_stderr_contains "is a JSON file, not safetensors (pass the folder that holds it)"
done
# a component folder alone is a model folder
expect_exit 0 "$LORA" inspect "$W/sd15/unet"
expect_stdout_contains "11 tensors"

# --- the real diffusers LoRA file merged into a pipeline built from its shapes
if [ -n "$n_fixture" ]; then
  expect_eq "fixture modules" "$n_fixture" 128
  merge_case fixture fixture m-fixture --adapter "$(dirname "$FX")"
  expect_stdout_contains "merged 128 LoRA modules"
  expect_exit 0 "$LORA" verify --base "$W/fixture" --adapter "$FX" --merged "$W/m-fixture"
  expect_stdout_contains "equivalent"
else
  echo "fixture absent, skipped: $FX"
fi

finish
