# End-to-end tests of `lora inspect`: every testdata file and every file in
# ../shared/fixtures is listed correctly (cross-checked against an independent
# Python reading of the headers), adapters are classified, malformed files and
# bad command lines are refused with the documented exit code and message.
# Usage: bash tests/e2e/e2e-inspect.sh PATH-TO-LORA SOURCE-DIR
set -u
LORA=${1:?usage: e2e-inspect.sh PATH-TO-LORA SOURCE-DIR}
SRC=${2:?usage: e2e-inspect.sh PATH-TO-LORA SOURCE-DIR}
if [ ! -x /usr/bin/python3 ]; then
  echo "SKIP: /usr/bin/python3 is needed to check JSON output"
  exit 77
fi
. "$SRC/tests/e2e/lib.sh"
TD=$SRC/testdata
FX=$SRC/../shared/fixtures

# The last run's --json listing agrees with the files' headers read here in
# Python: every tensor (name, dtype, shape, bytes, file), file sizes, header
# lengths, metadata and totals. Prints "ok" or what differs.
listing_vs_headers() {
  "$PY" -c '
import json, os, struct, sys
j = json.load(open(sys.argv[1]))
want, problems, n_params, n_bytes = [], [], 0, 0
for f in j["files"]:
    data = open(f["path"], "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    h = json.loads(data[8:8 + n].decode("utf-8"))
    meta = h.pop("__metadata__", None)
    if f["bytes"] != len(data): problems.append("%s: bytes %s != %d" % (f["name"], f["bytes"], len(data)))
    if f["header_bytes"] != n: problems.append("%s: header_bytes %s != %d" % (f["name"], f["header_bytes"], n))
    if f["tensors"] != len(h): problems.append("%s: tensors %s != %d" % (f["name"], f["tensors"], len(h)))
    if f["metadata"] != meta: problems.append("%s: metadata %r != %r" % (f["name"], f["metadata"], meta))
    for name, e in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"]):
        b, end = e["data_offsets"]
        want.append({"name": name, "dtype": e["dtype"], "shape": e["shape"], "bytes": end - b, "file": f["name"]})
        count = 1
        for d in e["shape"]: count *= d
        n_params += count
        n_bytes += end - b
if j["tensors"] != want: problems.append("tensor list differs from the headers (data order)")
tot = j["totals"]
if tot != {"tensors": len(want), "parameters": n_params, "bytes": n_bytes}: problems.append("totals %r" % tot)
if j["metadata"] != (j["files"][0]["metadata"] if j["files"] else None): problems.append("top-level metadata")
print("; ".join(problems) if problems else "ok")
' "$OUT_FILE"
}

# inspect PATH --json succeeds and agrees with the headers
expect_listed() {
  expect_exit 0 "$LORA" inspect "$1" --json
  expect_eq "listing of $1" "$(listing_vs_headers)" ok
}

# a malformed file: exit 3, one line naming the file and the rule
expect_refused() {
  local path=$1 rule=$2
  expect_exit 3 "$LORA" inspect "$path"
  expect_one_line_error
  expect_stderr_contains "lora inspect: error: $path"
  expect_stderr_contains "$rule"
}

# --- testdata is what generate.py writes (deterministic, committed up to date) -----

if "$PY" -c 'import numpy' 2>/dev/null; then
  expect_exit 0 "$PY" "$TD/generate.py" --out "$E2E_TMP/gen"
  if diff -r -x README.md -x generate.py -x __pycache__ "$E2E_TMP/gen" "$TD" >"$E2E_TMP/gen.diff" 2>&1; then pass
  else fail "testdata differs from a fresh run of generate.py: $(head -c 400 "$E2E_TMP/gen.diff")"; fi
else
  echo "SKIP: numpy is absent: testdata/generate.py not re-run"
fi

# --- models ---------------------------------------------------------------------

expect_listed "$TD/tiny-llama"
expect_json 'j["kind"]' model
expect_json 'j["model_type"]' llama
expect_json 'j["totals"]' '{"bytes":250496,"parameters":125248,"tensors":21}'
expect_json 'j["metadata"]' '{"format":"pt"}'
expect_json '[f["name"] for f in j["files"]]' '["model.safetensors"]'
expect_json '[t for t in j["tensors"] if t["name"] == "lm_head.weight"]' \
  '[{"bytes":32768,"dtype":"BF16","file":"model.safetensors","name":"lm_head.weight","shape":[256,64]}]'
expect_json 'sorted({t["dtype"] for t in j["tensors"]})' '["BF16"]'
expect_json '[t["shape"] for t in j["tensors"] if t["name"] == "model.layers.1.mlp.down_proj.weight"]' '[[64,176]]'

# the human table: aligned columns, totals line
expect_exit 0 "$LORA" inspect "$TD/tiny-llama"
expect_stdout_contains "model: $TD/tiny-llama (model_type llama)"
expect_stdout_contains "format: pt"
expect_stdout_contains "totals: 21 tensors, 125,248 parameters, 250,496 bytes"
if echo "$OUT" | grep -Eq '^  lm_head\.weight +BF16 +\[256, 64\] +32,768$'; then pass; else fail "no aligned row for lm_head.weight"; fi
cols=$(echo "$OUT" | grep -E '^  model\.layers\.[01]\.' | awk '{ print index($0, $2) }' | sort -u | wc -l)
expect_eq "dtype column aligned" "$cols" 1

expect_listed "$TD/tiny-llama/model.safetensors"
expect_json 'j["model_type"]' llama

expect_listed "$TD/tiny-llama-f16-sharded"
expect_json '[f["name"] for f in j["files"]]' \
  '["model-00001-of-00003.safetensors","model-00002-of-00003.safetensors","model-00003-of-00003.safetensors"]'
expect_json 'j["index"]["total_size"] == j["totals"]["bytes"] == 250496' true
expect_json 'sorted({t["dtype"] for t in j["tensors"]})' '["F16"]'
expect_json '[t["file"] for t in j["tensors"] if t["name"] == "lm_head.weight"]' '["model-00003-of-00003.safetensors"]'
expect_listed "$TD/tiny-llama-f16-sharded/model.safetensors.index.json"
expect_json 'len(j["files"])' 3
expect_exit 0 "$LORA" inspect "$TD/tiny-llama-f16-sharded"
expect_stdout_contains "index: $TD/tiny-llama-f16-sharded/model.safetensors.index.json (total_size 250,496)"
if echo "$OUT" | grep -Eq '^  lm_head\.weight +F16 +\[256, 64\] +32,768 +model-00003-of-00003\.safetensors$'; then pass
else fail "sharded table lacks the file column"; fi

expect_listed "$TD/tiny-llama-f32"
expect_json 'j["totals"]' '{"bytes":500992,"parameters":125248,"tensors":21}'
expect_listed "$TD/tiny-llama-tied"
expect_json 'j["totals"]["tensors"]' 20
expect_json '"lm_head.weight" in [t["name"] for t in j["tensors"]]' false
expect_listed "$TD/tiny-qwen2"
expect_json 'j["model_type"]' qwen2
expect_json 'sorted(t["name"] for t in j["tensors"] if t["name"].endswith(".bias"))[:3]' \
  '["model.layers.0.self_attn.k_proj.bias","model.layers.0.self_attn.q_proj.bias","model.layers.0.self_attn.v_proj.bias"]'
expect_listed "$TD/tiny-unet"
expect_json '[t["shape"] for t in j["tensors"] if t["name"] == "down_blocks.0.resnets.0.conv1.weight"]' '[[8,4,3,3]]'

expect_listed "$TD/all-dtypes.safetensors"
expect_json 'sorted(t["dtype"] for t in j["tensors"])' \
  '["BF16","BOOL","C64","F16","F32","F4","F64","F6_E2M3","F6_E3M2","F8_E4M3","F8_E4M3FNUZ","F8_E5M2","F8_E5M2FNUZ","F8_E8M0","I16","I32","I64","I8","U16","U32","U64","U8"]'
expect_json '{t["dtype"]: t["bytes"] for t in j["tensors"] if t["dtype"] in ("F4", "F6_E2M3", "C64", "BOOL")}' \
  '{"BOOL":8,"C64":64,"F4":4,"F6_E2M3":6}'
expect_listed "$TD/unpadded.safetensors"
expect_json 'j["files"][0]["header_bytes"] % 8 != 0' true
expect_json 'j["metadata"]' null

# --- PEFT and kohya adapters ---------------------------------------------------

expect_listed "$TD/lora-tiny-llama"
expect_json 'j["kind"]' adapter
expect_json 'j["format"]' peft
expect_json 'j["config"]["r"], j["config"]["lora_alpha"], j["config"]["peft_type"]' '[4,8,"LORA"]'
expect_json 'len(j["modules"])' 14
expect_json '[m for m in j["modules"] if m["name"] == "model.layers.0.self_attn.q_proj"][0]' \
  '{"a_shape":[4,64],"alpha":8.0,"b_shape":[64,4],"dora":false,"dtype":"F32","fan_in_fan_out":false,"form":"LoRA","kind":"linear","name":"model.layers.0.self_attn.q_proj","rank":4,"scale":2.0,"target":"model.layers.0.self_attn.q_proj.weight"}'
expect_json '{(m["rank"], m["scale"]) for m in j["modules"]} == {(4, 2.0)}' true
expect_json 'j["modules_to_save"]' '[]'
expect_exit 0 "$LORA" inspect "$TD/lora-tiny-llama"
expect_stdout_contains "adapter: $TD/lora-tiny-llama (peft LoRA, 14 modules)"
if echo "$OUT" | grep -Eq '^  model\.layers\.1\.mlp\.down_proj +linear +4 +8 +2 +no +\[4, 176\] +\[64, 4\] +F32$'; then pass
else fail "no module row for model.layers.1.mlp.down_proj"; fi
expect_listed "$TD/lora-tiny-llama/adapter_model.safetensors"
expect_json 'j["format"], len(j["modules"])' '["peft",14]'

expect_exit 0 "$LORA" inspect "$TD/lora-tiny-llama" --base "$TD/tiny-llama" --json
expect_json 'j["fit"]' "{\"base\":\"$TD/tiny-llama\",\"ok\":true,\"problems\":[]}"
expect_json 'sorted({tuple(m["base_shape"]) == (m["b_shape"][0], m["a_shape"][1]) for m in j["modules"]})' '[true]'
expect_exit 0 "$LORA" inspect "$TD/lora-tiny-llama" --base "$TD/tiny-llama-f16-sharded"
expect_stdout_contains "fit: ok: every module matches $TD/tiny-llama-f16-sharded"

expect_listed "$TD/lora-tiny-llama-kohya.safetensors"
expect_json 'j["format"], len(j["modules"])' '["kohya",14]'
expect_json '{(m["rank"], m["alpha"], m["scale"]) for m in j["modules"]} == {(4, 8.0, 2.0)}' true
expect_json 'j["metadata"]["ss_network_dim"]' 4
expect_exit 0 "$LORA" inspect "$TD/lora-tiny-llama-kohya.safetensors" --base "$TD/tiny-llama" --json
expect_json 'j["fit"]["ok"]' true
expect_json 'sorted(m["target"] for m in j["modules"])[0]' model.layers.0.mlp.down_proj.weight

expect_listed "$TD/lora-tiny-llama-dora"
expect_json '[(m["name"], m["dora"], m["magnitude_shape"]) for m in j["modules"] if "layers.0" in m["name"]]' \
  '[["model.layers.0.mlp.down_proj",true,[64]],["model.layers.0.self_attn.q_proj",true,[64]],["model.layers.0.self_attn.v_proj",true,[32]]]'

expect_listed "$TD/lora-tiny-llama-patterns"
expect_json 'sorted({t["dtype"] for t in j["tensors"]})' '["BF16"]'
expect_json '{m["name"]: (m["rank"], m["alpha"], round(m["scale"], 12)) for m in j["modules"] if "layers.1" in m["name"]}' \
  '{"model.layers.1.mlp.down_proj":[2,8.0,5.656854249492],"model.layers.1.mlp.gate_proj":[4,8.0,4.0],"model.layers.1.mlp.up_proj":[4,8.0,4.0],"model.layers.1.self_attn.k_proj":[4,8.0,4.0],"model.layers.1.self_attn.o_proj":[4,8.0,4.0],"model.layers.1.self_attn.q_proj":[8,8.0,2.828427124746],"model.layers.1.self_attn.v_proj":[4,32.0,16.0]}'
expect_json '[m["target"] for m in j["modules"] if m["name"] == "model.layers.0.self_attn.k_proj"]' \
  '["model.layers.0.self_attn.k_proj.weight"]'
expect_exit 0 "$LORA" inspect "$TD/lora-tiny-llama-patterns" --base "$TD/tiny-llama"

expect_listed "$TD/lora-tiny-llama-extras"
expect_json '[(m["kind"], m["a_shape"], m["b_shape"], m["target"]) for m in j["modules"] if m["kind"] != "linear"]' \
  '[["embedding",[4,256],[64,4],"model.embed_tokens.weight"]]'
expect_json 'j["modules_to_save"]' \
  '[{"dtype":"F32","key":"base_model.model.lm_head.weight","shape":[256,64],"target":"lm_head.weight"}]'
expect_exit 0 "$LORA" inspect "$TD/lora-tiny-llama-extras"
expect_stdout_contains "lm_head.weight  <- base_model.model.lm_head.weight  F32 [256, 64]"

expect_listed "$TD/lora-tiny-qwen2-bias"
expect_json 'sorted({tuple(m["bias_shape"]) == (m["b_shape"][0],) for m in j["modules"]})' '[true]'
expect_exit 0 "$LORA" inspect "$TD/lora-tiny-qwen2-bias" --base "$TD/tiny-qwen2" --json
expect_json 'j["fit"]["ok"]' true

expect_listed "$TD/lora-tiny-unet-kohya.safetensors"
expect_json 'j["format"], len(j["modules"])' '["kohya",4]'
expect_exit 0 "$LORA" inspect "$TD/lora-tiny-unet-kohya.safetensors" --base "$TD/tiny-unet" --json
expect_json 'j["fit"]["ok"]' true
expect_json '{m["target"]: (m["kind"], m["rank"], m["scale"], m["a_shape"], m["b_shape"]) for m in j["modules"]}' \
  '{"down_blocks.0.attentions.0.proj_in.weight":["conv",2,2.0,[2,8,1,1],[8,2,1,1]],"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight":["linear",2,1.0,[2,8],[8,2]],"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":["linear",2,1.0,[2,8],[8,2]],"down_blocks.0.resnets.0.conv1.weight":["conv",2,0.5,[2,4,3,3],[8,2,1,1]]}'

# --- an adapter that does not fit its base: exit 3, every misfit listed ------------

expect_exit 3 "$LORA" inspect "$TD/lora-tiny-llama-mismatch" --base "$TD/tiny-llama" --json
expect_one_line_error
expect_stderr_contains "lora inspect: error: $TD/lora-tiny-llama-mismatch: does not fit $TD/tiny-llama: 2 problems"
expect_json 'j["fit"]["ok"], len(j["fit"]["problems"])' '[false,2]'
expect_json 'sorted(any(s in p["key"] for p in j["fit"]["problems"]) for s in ("layers.0.self_attn.q_proj", "layers.2.self_attn.q_proj"))' \
  '[true,true]'
expect_json 'any("v_proj" in p["key"] for p in j["fit"]["problems"])' false
expect_exit 3 "$LORA" inspect "$TD/lora-tiny-llama-mismatch" --base "$TD/tiny-llama"
expect_stdout_contains "fit: 2 problems against $TD/tiny-llama:"
if echo "$OUT" | grep -q '^  .*layers\.2\.self_attn\.q_proj.*: '; then pass; else fail "human output does not list the layer-2 key"; fi
# without --base the same adapter is fine
expect_exit 0 "$LORA" inspect "$TD/lora-tiny-llama-mismatch"
# an adapter against the wrong base
expect_exit 3 "$LORA" inspect "$TD/lora-tiny-unet-kohya.safetensors" --base "$TD/tiny-llama" --json
expect_json 'len(j["fit"]["problems"])' 4

# --- malformed files: exit 3, the file and the rule named ---------------------------

M=$TD/malformed
expect_refused "$M/too-small.safetensors" "too small to hold a safetensors header"
expect_refused "$M/header-past-eof.safetensors" "header length 4096 runs past the end of the file"
expect_refused "$M/header-too-large.safetensors" "exceeds the limit"
expect_refused "$M/bad-utf8.safetensors" "not valid UTF-8"
expect_refused "$M/bad-json.safetensors" "header is not valid JSON"
expect_refused "$M/not-object.safetensors" "header is not a JSON object"
expect_refused "$M/unknown-dtype.safetensors" 'unknown dtype "F12"'
expect_refused "$M/missing-field.safetensors" 'has no "shape"'
expect_refused "$M/negative-shape.safetensors" "non-negative integers"
expect_refused "$M/wrong-byte-count.safetensors" "span 8 bytes but F32 [3] needs 12"
expect_refused "$M/offsets-gap.safetensors" "data_offsets leave a gap"
expect_refused "$M/offsets-overlap.safetensors" "data_offsets overlap"
expect_refused "$M/trailing-bytes.safetensors" "trailing bytes after the last tensor"
expect_refused "$M/truncated.safetensors" "file is truncated"
expect_refused "$M/metadata-not-strings.safetensors" 'value of "n" is not a string'
expect_refused "$M/duplicate-key.safetensors" "duplicate"
expect_exit 3 "$LORA" inspect "$M/sharded-bad-total"
expect_one_line_error
expect_stderr_contains "total_size is 999"
expect_exit 4 "$LORA" inspect "$M/sharded-missing-shard"
expect_one_line_error
expect_stderr_contains "model-00002-of-00002.safetensors"
expect_exit 3 "$LORA" inspect "$M/lora-missing-b"
expect_one_line_error
expect_stderr_contains "v_proj"
expect_exit 3 "$LORA" inspect "$M/lora-rank-mismatch"
expect_one_line_error
expect_stderr_contains "q_proj"

# --- I/O and usage errors -------------------------------------------------------------

expect_exit 4 "$LORA" inspect "$TD/no-such-model"
expect_one_line_error
expect_stderr_contains "lora inspect: error: $TD/no-such-model: no such file or folder"
expect_exit 4 "$LORA" inspect "$TD/lora-tiny-llama" --base "$TD/no-such-model"
expect_stderr_contains "$TD/no-such-model"
expect_exit 2 "$LORA" inspect
expect_one_line_error
expect_exit 2 "$LORA" inspect "$TD/tiny-llama" --no-such-option
expect_exit 2 "$LORA" inspect "$TD/tiny-llama" --base "$TD/tiny-llama"
expect_stderr_contains "--base applies to a LoRA adapter"
expect_exit 2 "$LORA" inspect "$TD/tiny-llama" --base

# --- third-party files -----------------------------------------------------------------

if [ ! -d "$FX" ]; then
  echo "SKIP: $FX is absent: third-party fixture checks skipped"
else
  F=$FX/fluxml_safetensors_jl
  for f in "$F"/non_sharded/*.safetensors "$F"/sharded/*.safetensors "$FX"/mlverse_r/hello.safetensors \
           "$FX"/swift_safetensors/data.safetensors "$FX"/syoyo_safetensors_cpp/model.safetensors \
           "$FX"/cloneofsimo_lora/*.safetensors "$FX"/diffusers_sd15_lora/*.safetensors \
           "$FX"/mlx_examples_minicpm_adapter/adapters.safetensors "$FX"/gradience_tiny_lora/adapter_model.safetensors; do
    expect_listed "$f"
  done

  expect_listed "$F/non_sharded/model.safetensors"
  expect_json 'j["kind"], j["totals"]["tensors"]' '["model",36]'
  expect_json 'sorted({t["dtype"] for t in j["tensors"]})' \
    '["BF16","BOOL","F16","F32","F64","F8_E4M3","F8_E5M2","I16","I32","I64","I8","U8"]'
  expect_json 'sorted({str(t["shape"]) for t in j["tensors"]})' '["[3, 5, 7]","[3, 5]","[3]"]'
  expect_listed "$F/non_sharded/model.with_metadata.safetensors"
  expect_json 'j["metadata"]' '{"test":"metadata","version":"2.2"}'
  expect_listed "$F/non_sharded/model.numpy.safetensors"
  expect_json 'j["totals"]["tensors"]' 27
  expect_listed "$F/sharded"
  expect_json 'len(j["files"]), j["totals"]["tensors"], j["index"]["total_size"], j["totals"]["bytes"]' '[6,36,4305,4305]'

  expect_listed "$FX/gradience_tiny_lora"
  expect_json 'j["kind"], j["format"], len(j["modules"])' '["adapter","peft",12]'
  expect_json '{(m["rank"], m["alpha"], m["scale"]) for m in j["modules"]} == {(8, 16.0, 2.0)}' true
  expect_json 'j["config"]["base_model_name_or_path"]' microsoft/DialoGPT-small

  expect_listed "$FX/mlx_examples_minicpm_adapter"
  expect_json 'j["kind"], j["metadata"]' '["other_adapter",null]'
  expect_json '"MLX" in j["adapter_kind"]' true
  expect_json 'j["config"]["lora_parameters"]["scale"]' 10.0
  expect_exit 0 "$LORA" inspect "$FX/mlx_examples_minicpm_adapter/adapters.safetensors"
  expect_stdout_contains "other adapter: $FX/mlx_examples_minicpm_adapter/adapters.safetensors: "
  expect_stdout_contains "MLX"
  expect_stdout_contains "metadata: none"

  expect_listed "$FX/diffusers_sd15_lora/pytorch_lora_weights.safetensors"
  expect_json 'j["kind"], j["totals"]["tensors"]' '["adapter",256]'
  expect_json '"diffusers" in j["adapter_kind"].lower()' true
  for f in "$FX"/cloneofsimo_lora/*.safetensors; do
    expect_listed "$f"
    expect_json 'j["kind"]' other_adapter
    expect_json '"cloneofsimo" in j["adapter_kind"].lower()' true
    expect_json 'j["files"][0]["header_bytes"] % 8 != 0' true
  done
  expect_exit 0 "$LORA" inspect "$FX/cloneofsimo_lora/analog_svd_rank4.safetensors"
  expect_stdout_contains "text_encoder:0:rank: 4"

  expect_listed "$FX/syoyo_safetensors_cpp/model.safetensors"
  expect_json '[t["dtype"] for t in j["tensors"]]' '["F64","F64"]'
  expect_listed "$FX/swift_safetensors/data.safetensors"
  expect_json 'j["files"][0]["bytes"], j["totals"]["tensors"]' '[84,1]'
  expect_listed "$FX/mlverse_r/hello.safetensors"
  expect_json '[t["name"] for t in j["tensors"]]' '["hello","world"]'

  A=$FX/syoyo_safetensors_cpp/safetensors_abuse_attempt_1.safetensors
  expect_exit 3 "$LORA" inspect "$A"
  expect_one_line_error
  expect_stderr_contains "lora inspect: error: $A: "
  expect_exit 3 "$LORA" inspect "$A" --json
  expect_eq "no JSON on stdout after an error" "$OUT" ""
fi

finish
