#!/usr/bin/env bash
# lora verify on `lora merge` output for every merge case, and on merged models
# broken on purpose: one tensor left unmerged, one element changed. The layer
# level (every adapted module on seeded inputs) passes on good merges and
# names the module on broken ones.
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
TD="$SRC/testdata"

# every merge case verifies (bf16 output as merged, and f32 output)
for case in "tiny-llama lora-tiny-llama" "tiny-llama lora-tiny-llama-dora" "tiny-llama lora-tiny-llama-patterns" \
            "tiny-llama lora-tiny-llama-extras" "tiny-llama lora-tiny-llama-kohya.safetensors" \
            "tiny-qwen2 lora-tiny-qwen2-bias" "tiny-llama-f16-sharded lora-tiny-llama" "tiny-llama-f32 lora-tiny-llama-dora" \
            "tiny-llama-f32 lora-tiny-llama-extras"; do
  set -- $case
  out="$E2E_TMP/m-$1-$2"
  expect_exit 0 "$LORA" merge --base "$TD/$1" --adapter "$TD/$2" --out "$out" --quiet
  expect_exit 0 "$LORA" verify --base "$TD/$1" --adapter "$TD/$2" --merged "$out" --json --threads 1
  expect_json 'j["equivalent"]' true
  expect_json 'j["model"]["ok"]' true
  expect_json 'j["layers_failed"]' 0
  expect_json 'len(j["layers"]) == j["layers_checked"] > 0 and all(l["ok"] and l["ratio"] < 1 for l in j["layers"])' true
done
# conv (kohya on a UNet, no forward pass): the layer level still runs
expect_exit 0 "$LORA" merge --base "$TD/tiny-unet" --adapter "$TD/lora-tiny-unet-kohya.safetensors" --out "$E2E_TMP/unet" --dtype bf16 --quiet
expect_exit 0 "$LORA" verify --base "$TD/tiny-unet" --adapter "$TD/lora-tiny-unet-kohya.safetensors" --merged "$E2E_TMP/unet" --json
expect_json 'sorted(l["kind"] for l in j["layers"] if l["ok"])' '["conv","conv","linear","linear"]'
expect_json '"skipped" in j["model"]' true
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --out "$E2E_TMP/f32" --dtype f32 --quiet
expect_exit 0 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/f32"
expect_stdout_contains "equivalent: 21 tensors checked, 0 failed"
expect_stdout_contains "layers: 14 adapted modules checked on 4 seeded inputs (seed 1234), 0 failed"
expect_stdout_contains "  ok   model.layers."
# another seed: other inputs, same verdict
expect_exit 0 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/f32" --seed 77 --json
expect_json 'j["layer_seed"]' 77
expect_json 'j["layers_failed"]' 0
expect_exit 2 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/f32" --seed x

# the base itself is not the merge
expect_exit 1 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --merged "$TD/tiny-llama"
expect_stdout_contains "NOT equivalent"
expect_stdout_contains "layers: 14 adapted modules checked on 4 seeded inputs (seed 1234), 14 failed"

# broken copies of the f32 merge: one tensor unmerged, one element changed
"$PY" - "$E2E_TMP" "$TD" "$SRC" <<'PY'
import os, shutil, sys
import numpy as np
sys.path.insert(0, sys.argv[3] + "/tests/e2e")
import safetensors_np
tmp, td = sys.argv[1], sys.argv[2]
m = {k: v[3].astype(np.float32) for k, v in safetensors_np.read(tmp + "/f32/model.safetensors")[0].items()}
b = {k: v[3].astype(np.float32) for k, v in safetensors_np.read(td + "/tiny-llama/model.safetensors")[0].items()}
for name, edit in (("unmerged", lambda w: w.__setitem__("model.layers.1.self_attn.v_proj.weight", b["model.layers.1.self_attn.v_proj.weight"])),
                   ("one-element", lambda w: w["model.layers.0.mlp.up_proj.weight"].__setitem__((5, 7), w["model.layers.0.mlp.up_proj.weight"][5, 7] + np.float32(1e-3))),
                   ("dropped", lambda w: w.pop("model.layers.1.self_attn.v_proj.weight"))):
    w = {k: v.copy() for k, v in m.items()}
    edit(w)
    os.makedirs(tmp + "/" + name)
    shutil.copy(tmp + "/f32/config.json", tmp + "/" + name)
    safetensors_np.write(tmp + "/" + name + "/model.safetensors", w)
# the bf16 merge with an untouched tensor (no adapter delta, same dtype as the
# base) negated: it differs everywhere, by 2 |w| (sign bit flipped, exact)
bf = safetensors_np.read(tmp + "/m-tiny-llama-lora-tiny-llama/model.safetensors")[0]
w = {k: (dt, shape, raw) for k, (dt, shape, raw, _) in bf.items()}
dt, shape, raw, v = bf["model.norm.weight"]
w["model.norm.weight"] = (dt, shape, (np.frombuffer(raw, np.uint16) ^ np.uint16(0x8000)).tobytes())
os.makedirs(tmp + "/norm-negated")
shutil.copy(tmp + "/m-tiny-llama-lora-tiny-llama/config.json", tmp + "/norm-negated")
safetensors_np.write(tmp + "/norm-negated/model.safetensors", w)
open(tmp + "/norm-negated.err", "w").write("%r %d" % (float(2 * np.abs(v).max()), v.size))
PY
expect_exit 1 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/unmerged" --json
expect_json 'j["failed"]' '["model.layers.1.self_attn.v_proj.weight"]'
expect_json 'j["model"]["ok"]' false
expect_json 'j["layers_failed"]' 1
expect_json '[l["name"] for l in j["layers"] if not l["ok"]]' '["model.layers.1.self_attn.v_proj"]'
expect_json 'j["layers"][0]["ratio"] > 1' true
expect_exit 1 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/one-element"
expect_stdout_contains "FAIL model.layers.0.mlp.up_proj.weight (merged)"
expect_stdout_contains "1 elements over"
expect_stdout_contains "FAIL model.layers.0.mlp.up_proj (linear)"
expect_exit 1 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/one-element" --json
expect_json '[l["name"] for l in j["layers"] if not l["ok"]]' '["model.layers.0.mlp.up_proj"]'

# a merged model missing a tensor is not equivalent (exit 1, not a crash of
# the model-level forward): the tensor and its layer are "missing"
expect_exit 1 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/dropped" --json
expect_json 'j["failed"]' '["model.layers.1.self_attn.v_proj.weight"]'
expect_json '[l["kind"] for l in j["layers"] if not l["ok"]]' '["missing"]'
expect_json 'j["model"]["skipped"]' 'the merged model cannot run: model.layers.1.self_attn.v_proj.weight is missing'

# an untouched tensor that differs everywhere from the base (same dtype: the
# bytes differ): the true max error (2 max |w|), every element counted, and
# a failure naming it
read -r NORM_ERR NORM_N <"$E2E_TMP/norm-negated.err"
expect_exit 1 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/norm-negated" --json
expect_json 'j["failed"]' '["model.norm.weight"]'
expect_json "[(w['kind'], w['max_error'] == $NORM_ERR > 0, w['bad_elements']) for w in j['worst'] if not w['ok']]" \
  "[[\"untouched\",true,$NORM_N]]"
expect_exit 1 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/norm-negated"
expect_stdout_contains "FAIL model.norm.weight (untouched): max error $(printf '%.3g' "$NORM_ERR"), tolerance 0, $NORM_N elements over"

# a malformed config.json is refused before the weight level starts: exit 3,
# one line naming config.json, nothing on stdout, the inputs untouched
for broken in base merged; do
  mkdir -p "$E2E_TMP/cfg-$broken"
  cp -r "$TD/tiny-llama" "$E2E_TMP/cfg-$broken/base"
  cp -r "$E2E_TMP/f32" "$E2E_TMP/cfg-$broken/merged"
  printf '{"model_type": "llama", "hidden_size": ' >"$E2E_TMP/cfg-$broken/$broken/config.json"
  sums_before=$(cd "$E2E_TMP/cfg-$broken" && find . -type f | sort | xargs sha256sum)
  expect_exit 3 "$LORA" verify --base "$E2E_TMP/cfg-$broken/base" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/cfg-$broken/merged"
  expect_one_line_error
  expect_stderr_contains "lora verify: error: $E2E_TMP/cfg-$broken/$broken/config.json: "
  expect_eq "stdout after a config refusal ($broken)" "$OUT" ""
  expect_eq "files after a config refusal ($broken)" "$(cd "$E2E_TMP/cfg-$broken" && find . -type f | sort | xargs sha256sum)" "$sums_before"
done
# a base without a forward pass does not excuse a malformed merged config.json
printf '{"model_type": "bench_no_forward"}' >"$E2E_TMP/cfg-merged/base/config.json"
expect_exit 3 "$LORA" verify --base "$E2E_TMP/cfg-merged/base" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/cfg-merged/merged"
expect_one_line_error
expect_stderr_contains "lora verify: error: $E2E_TMP/cfg-merged/merged/config.json: "
expect_eq "stdout after a config refusal (merged, no forward pass)" "$OUT" ""
cp "$TD/tiny-llama/config.json" "$E2E_TMP/cfg-merged/base/config.json"
# valid JSON, but a llama config missing a field the forward pass needs
"$PY" -c 'import json, sys; c = json.load(open(sys.argv[1])); del c["num_attention_heads"]; json.dump(c, open(sys.argv[1], "w"))' \
  "$E2E_TMP/cfg-merged/base/config.json"
expect_exit 3 "$LORA" verify --base "$E2E_TMP/cfg-merged/base" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/f32"
expect_one_line_error
expect_stderr_contains "$E2E_TMP/cfg-merged/base/config.json: field num_attention_heads is missing"
expect_eq "stdout after a config refusal (field)" "$OUT" ""
# token ids outside the vocabulary: refused before the weight level too
expect_exit 2 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/f32" --tokens 1,999999
expect_one_line_error
expect_stderr_contains "token id 999999 is outside the vocabulary"
expect_eq "stdout after a token refusal" "$OUT" ""

# refusals
expect_exit 3 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama-mismatch" --merged "$E2E_TMP/f32"
expect_one_line_error
expect_exit 2 "$LORA" verify --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/f32" --tokens 1,,2
finish
