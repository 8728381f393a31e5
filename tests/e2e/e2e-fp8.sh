#!/usr/bin/env bash
# Block-scaled FP8 bases (issue 14, item 6): tiny Qwen3 models as Qwen3-8B-FP8
# ships them (tests/e2e/make_fp8.py: F8_E4M3 projections with F32
# weight_scale_inv per block, BF16 embeddings / norms / head, its
# quantization_config), once with the default 128x128 blocks and once with
# weight_block_size [16, 24] (many partial edge blocks, an all-zero block),
# merged with a PEFT LoRA on 4 of the 7 projections, and checked against
# float64 by tests/e2e/check_fp8.py (its own E4M3 codec, tests/e2e/fp8_np.py):
# - default: merged weights stay FP8, each block's new scale is
#   max|truth| / 448 in f32, each element within half an E4M3 unit of the
#   truth at that scale and equal to truth / scale rounded once; untouched FP8
#   weights and scales and BF16 tensors bit-identical; config.json unchanged;
# - --dtype bf16: every FP8 weight dequantized (plus its delta) and rounded
#   once to BF16, bit for bit; scales dropped; quantization_config removed,
#   torch_dtype bfloat16;
# - verify equivalent on every output; inspect --base names the scheme and
#   what merge will do; each refusal (scale shape or dtype wrong, scale
#   missing, per-tensor scales, E5M2, per-tensor config, another quant_method)
#   exits 3 with its one-line message and writes nothing.
LORA=$1
SRC=$2
export SRC
. "$SRC/tests/e2e/lib.sh"
W="$E2E_TMP/w"
mkdir -p "$W"
"$PY" "$SRC/tests/e2e/make_fp8.py" "$W" || fail "make_fp8.py failed"

for m in fp8-128 fp8-small; do
  # --- default: the output stays FP8
  expect_exit 0 "$LORA" merge --base "$W/$m" --adapter "$W/lora" --out "$W/out-$m"
  expect_stdout_contains "output stays FP8; 4 merged weights requantized to E4M3 with new block scales"
  expect_stdout_contains "21 tensors: 4 merged, 0 replaced, 0 converted, 13 copied, 4 FP8 scales rewritten"
  run "$PY" "$SRC/tests/e2e/check_fp8.py" "$W/$m" "$W/lora" "$W/out-$m" fp8
  if [ "$CODE" = 0 ]; then pass; else fail "$m fp8: $OUT"; fi
  expect_stdout_contains "failures: 0"
  # --- --dtype bf16: dequantized
  expect_exit 0 "$LORA" merge --base "$W/$m" --adapter "$W/lora" --out "$W/bf16-$m" --dtype bf16
  expect_stdout_contains "dequantized to BF16; 7 block scale tensors (weight_scale_inv) dropped"
  expect_stdout_contains "config.json: quantization_config: removed, torch_dtype: bfloat16"
  run "$PY" "$SRC/tests/e2e/check_fp8.py" "$W/$m" "$W/lora" "$W/bf16-$m" bf16
  if [ "$CODE" = 0 ]; then pass; else fail "$m bf16: $OUT"; fi
  # --- verify: equivalent on both outputs; the model level runs the FP8 base
  # (dequantized per row block, rounded to BF16) against the BF16 output, and
  # says why it does not run on the FP8 output
  for o in out bf16; do
    expect_exit 0 "$LORA" verify --base "$W/$m" --adapter "$W/lora" --merged "$W/$o-$m"
    expect_stdout_contains "equivalent: 21 tensors checked, 0 failed"
    expect_stdout_contains "layers: 4 adapted modules checked on 4 seeded inputs (seed 1234), 0 failed"
  done
  expect_exit 0 "$LORA" verify --base "$W/$m" --adapter "$W/lora" --merged "$W/out-$m"
  expect_stdout_contains "model: skipped (FP8 forward of the merged model not checked: no logit tolerance for requantized FP8 weights yet)"
  expect_exit 0 "$LORA" verify --base "$W/$m" --adapter "$W/lora" --merged "$W/bf16-$m" --json
  expect_json '[j["model"]["tokens"], j["model"]["ok"], j["model"]["top1_agreement"], j["model"]["base_rounded_to"]]' '[16,true,1.0,"BF16"]'
  # --- forward on an FP8 model: the same logits, bit for bit, as on its F32
  # dequantization (merge --dtype f32 with the adapter weighted 0: code x
  # scale rounded once to f32, as the forward's per-block dequantization does)
  expect_exit 0 "$LORA" merge --base "$W/$m" --adapter "$W/lora" --weight 0 --dtype f32 --out "$W/f32-$m"
  expect_exit 0 "$LORA" forward --model "$W/$m" --tokens 1,5,9,33,90 --out "$W/logits8-$m.safetensors"
  expect_exit 0 "$LORA" forward --model "$W/f32-$m" --tokens 1,5,9,33,90 --out "$W/logits32-$m.safetensors"
  if cmp -s "$W/logits8-$m.safetensors" "$W/logits32-$m.safetensors"; then pass; else fail "$m: FP8 forward differs from F32"; fi
  # and not equivalent when the adapter's weight differs from the merge's
  expect_exit 1 "$LORA" verify --base "$W/$m" --adapter "$W/lora" --weight 0.9 --merged "$W/out-$m"
  expect_stdout_contains "NOT equivalent: 21 tensors checked, 4 failed"
  expect_exit 1 "$LORA" verify --base "$W/$m" --adapter "$W/lora" --weight 0.97 --merged "$W/bf16-$m"
  expect_stdout_contains "NOT equivalent: 21 tensors checked, 4 failed"
done

# --- a sharded FP8 model whose q_proj scale sits in another shard than its
# weight: the requantized weight's new scale is written into the scale's shard
SRC="$SRC" "$PY" - "$W/fp8-small" "$W/sharded" <<'PY'
import json, os, shutil, sys
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read, write
src, dst = sys.argv[1:3]
t = {k: (v[0], v[1], v[2]) for k, v in read(src + "/model.safetensors")[0].items()}
os.makedirs(dst, exist_ok=True)
shutil.copy(src + "/config.json", dst + "/config.json")
second = {"model.layers.0.self_attn.q_proj.weight_scale_inv", "model.layers.0.mlp.up_proj.weight",
          "model.layers.0.mlp.up_proj.weight_scale_inv", "lm_head.weight"}
names = {"model-00001-of-00002.safetensors": {k: v for k, v in t.items() if k not in second},
         "model-00002-of-00002.safetensors": {k: v for k, v in t.items() if k in second}}
for f, part in names.items():
    write(dst + "/" + f, part)
index = {"metadata": {"total_size": sum(len(v[2]) for v in t.values())},
         "weight_map": {k: f for f, part in names.items() for k in part}}
open(dst + "/model.safetensors.index.json", "w").write(json.dumps(index, indent=2))
PY
expect_exit 0 "$LORA" merge --base "$W/sharded" --adapter "$W/lora" --out "$W/out-sharded"
expect_exit 0 "$LORA" verify --base "$W/sharded" --adapter "$W/lora" --merged "$W/out-sharded"
expect_stdout_contains "equivalent: 21 tensors checked, 0 failed"
# the same bytes as the one-file merge, tensor by tensor
SRC="$SRC" "$PY" - "$W/out-fp8-small/model.safetensors" "$W/out-sharded" >"$OUT_FILE" 2>&1 <<'PY'
import glob, os, sys
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read
one = read(sys.argv[1])[0]
many = {}
for f in sorted(glob.glob(sys.argv[2] + "/model-*.safetensors")):
    many.update(read(f)[0])
print("same" if {k: v[2] for k, v in one.items()} == {k: v[2] for k, v in many.items()} else "different")
PY
expect_eq "sharded merge against the one-file merge" "$(cat "$OUT_FILE")" "same"

# --- DoRA into an FP8 base (q_proj, v_proj, down_proj; not gate_proj, whose
# zero rows have no norm): verify equivalent on both outputs
SRC="$SRC" "$PY" - "$W/lora" "$W/dora" <<'PY'
import json, os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read, write
src, dst = sys.argv[1:3]
t = {k: v[3].astype(np.float32) for k, v in read(src + "/adapter_model.safetensors")[0].items() if "gate_proj" not in k}
rng = np.random.default_rng(3)
for k in list(t):
    if k.endswith("lora_B.weight"):
        t[k.replace("lora_B.weight", "lora_magnitude_vector")] = (1 + 0.1 * rng.standard_normal(t[k].shape[0])).astype(np.float32)
os.makedirs(dst, exist_ok=True)
write(dst + "/adapter_model.safetensors", t)
c = json.load(open(src + "/adapter_config.json"))
c["use_dora"], c["target_modules"] = True, ["q_proj", "v_proj", "down_proj"]
json.dump(c, open(dst + "/adapter_config.json", "w"))
PY
for d in "" "--dtype bf16"; do
  rm -rf "$W/out-dora"
  expect_exit 0 "$LORA" merge --base "$W/fp8-small" --adapter "$W/dora" --out "$W/out-dora" $d
  expect_exit 0 "$LORA" verify --base "$W/fp8-small" --adapter "$W/dora" --merged "$W/out-dora"
  expect_stdout_contains "equivalent: 21 tensors checked, 0 failed"
  expect_stdout_contains "layers: 3 adapted modules checked on 4 seeded inputs (seed 1234), 0 failed"
done

# --- the block size is the config's: [16, 24] names it
expect_exit 0 "$LORA" merge --base "$W/fp8-small" --adapter "$W/lora" --out "$W/dry" --dry-run
expect_stdout_contains "fp8 base (fp8 e4m3, block 16x24, activation_scheme dynamic)"
expect_nothing_left dry

# --- inspect names the scheme; inspect --base says what merge will do
expect_exit 0 "$LORA" inspect "$W/fp8-128"
expect_stdout_contains "quantization: fp8 e4m3, block 128x128, activation_scheme dynamic; 7 FP8 weights with block scales (weight_scale_inv)"
expect_exit 0 "$LORA" inspect "$W/lora" --base "$W/fp8-small"
expect_stdout_contains "fp8 base: fp8 e4m3, block 16x24, activation_scheme dynamic; 7 FP8 weights with block scales (weight_scale_inv), 4 of them adapted"
expect_stdout_contains "merge: the output stays FP8: the 4 adapted weights dequantized, merged and requantized to E4M3 with new 16x24 block scales (max|w| / 448)"
expect_stdout_contains "merge --dtype bf16|f16|f32: every FP8 weight dequantized with its block scales and rounded once; the 7 weight_scale_inv tensors and quantization_config dropped"
expect_exit 0 "$LORA" inspect "$W/lora" --base "$W/fp8-128" --json
expect_json 'j["base_quantization"]' '{"adapted_weights":4,"block":[128,128],"scaled_weights":7,"scheme":"fp8 e4m3, block 128x128, activation_scheme dynamic","supported":true}'

# --- refusals: exit 3, one line naming the file and tensor, nothing written
# make_bad NAME EDIT: a copy of fp8-128 with EDIT (python over t = tensors, c = config) applied
make_bad() {
  SRC="$SRC" "$PY" - "$W/fp8-128" "$W/$1" "$2" <<'PY'
import json, os, sys
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read, write
src, dst, edit = sys.argv[1:4]
t = {k: (v[0], v[1], v[2]) for k, v in read(src + "/model.safetensors")[0].items()}
c = json.load(open(src + "/config.json"))
exec(edit)
os.makedirs(dst, exist_ok=True)
write(dst + "/model.safetensors", t)
open(dst + "/config.json", "w").write(json.dumps(c, indent=2))
PY
}
Q=model.layers.0.self_attn.q_proj.weight
K=model.layers.0.self_attn.k_proj.weight
make_bad bad-shape "t['${Q}_scale_inv'] = ('F32', [1, 1], t['${Q}_scale_inv'][2][:4])"
make_bad bad-dtype "t['${Q}_scale_inv'] = ('BF16', [1, 2], t['${Q}_scale_inv'][2][:4])"
make_bad no-scale "del t['${K}_scale_inv']"
make_bad per-tensor "t['model.layers.0.self_attn.k_proj.weight_scale'] = ('F32', [], t.pop('${K}_scale_inv')[2][:4])"
make_bad e5m2 "c['quantization_config']['fmt'] = 'e5m2'"
make_bad block-null "c['quantization_config']['weight_block_size'] = None"
make_bad other-method "c['quantization_config'] = {'quant_method': 'compressed-tensors', 'format': 'float-quantized'}"
refuse() {
  local name=$1 msg=$2
  expect_exit 3 "$LORA" merge --base "$W/$name" --adapter "$W/lora" --out "$W/out-$name"
  expect_stderr_contains "$msg"
  expect_one_line_error
  expect_nothing_left "out-$name"
}
refuse bad-shape "$W/bad-shape/model.safetensors: ${Q}_scale_inv: the block scale of $Q [64, 136] is [1, 1], expected [1, 2] (blocks of 128x128)"
refuse bad-dtype "$W/bad-dtype/model.safetensors: ${Q}_scale_inv: the block scale of $Q is BF16, expected F32"
refuse no-scale "$W/no-scale/model.safetensors: $K: this FP8 weight has no block scale ${K}_scale_inv"
refuse per-tensor "$W/per-tensor/model.safetensors: $K: per-tensor or per-channel FP8 scales (weight_scale) are not supported (only block scales, weight_scale_inv)"
refuse e5m2 "$W/e5m2/config.json: quantization_config.fmt e5m2 is not supported (only e4m3, OCP E4M3 FN)"
refuse block-null "$W/block-null/config.json: quantization_config.weight_block_size null is not supported (block scales need two positive integers up to 2^31; per-tensor FP8 scales are not supported)"
refuse other-method "$W/other-method/config.json: quantization_config.quant_method compressed-tensors is not supported"
# inspect --base refuses what merge refuses
expect_exit 3 "$LORA" inspect "$W/lora" --base "$W/e5m2"
expect_stdout_contains "quantization of the base: merge refuses it: $W/e5m2/config.json: quantization_config.fmt e5m2 is not supported"
expect_stderr_contains "quantization_config.fmt e5m2 is not supported"
expect_one_line_error
# --dtype does not get around a bad scale either
expect_exit 3 "$LORA" merge --base "$W/bad-shape" --adapter "$W/lora" --out "$W/out-bad-bf16" --dtype bf16
expect_stderr_contains "expected [1, 2] (blocks of 128x128)"
expect_nothing_left out-bad-bf16


# --- corrupt block scales (zero, negative, inf, NaN) are refused by merge, verify and forward:
# exit 3, one line naming the file, the scale tensor and the block, nothing written
V=model.layers.0.self_attn.v_proj.weight
make_bad scale-neg "import struct; t['${Q}_scale_inv'] = ('F32', t['${Q}_scale_inv'][1], struct.pack('<f', -0.01) + t['${Q}_scale_inv'][2][4:])"
make_bad scale-zero "import struct; t['${Q}_scale_inv'] = ('F32', t['${Q}_scale_inv'][1], t['${Q}_scale_inv'][2][:4] + struct.pack('<f', 0.0))"
make_bad scale-nan "import struct; t['${V}_scale_inv'] = ('F32', t['${V}_scale_inv'][1], struct.pack('<f', float('nan')) + t['${V}_scale_inv'][2][4:])"
make_bad scale-inf "import struct; t['${Q}_scale_inv'] = ('F32', t['${Q}_scale_inv'][1], struct.pack('<f', float('inf')) + t['${Q}_scale_inv'][2][4:])"
refuse scale-neg "$W/scale-neg/model.safetensors: ${Q}_scale_inv: the scale of block (0, 0) is -0.01: a block scale must be finite and positive"
refuse scale-zero "$W/scale-zero/model.safetensors: ${Q}_scale_inv: the scale of block (0, 1) is 0: a block scale must be finite and positive"
refuse scale-nan "$W/scale-nan/model.safetensors: ${V}_scale_inv: the scale of block (0, 0) is nan: a block scale must be finite and positive"
refuse scale-inf "$W/scale-inf/model.safetensors: ${Q}_scale_inv: the scale of block (0, 0) is inf: a block scale must be finite and positive"
expect_exit 3 "$LORA" merge --base "$W/scale-neg" --adapter "$W/lora" --out "$W/out-neg-bf16" --dtype bf16
expect_stderr_contains "${Q}_scale_inv: the scale of block (0, 0) is -0.01"
expect_one_line_error
expect_nothing_left out-neg-bf16
# verify: the merged side's scale (a good merge, then its scale corrupted) and the base's
cp -r "$W/out-fp8-128" "$W/merged-neg"
"$PY" - "$W/merged-neg/model.safetensors" "${Q}_scale_inv" <<'PY'
import json, struct, sys
p, name = sys.argv[1:3]
d = bytearray(open(p, "rb").read()); n = struct.unpack("<Q", d[:8])[0]; e = json.loads(d[8:8 + n])[name]
o = 8 + n + e["data_offsets"][0]
d[o:o + 4] = struct.pack("<f", -struct.unpack("<f", d[o:o + 4])[0])
open(p, "wb").write(d)
PY
expect_exit 3 "$LORA" verify --base "$W/fp8-128" --adapter "$W/lora" --merged "$W/merged-neg"
expect_stderr_contains "$W/merged-neg/model.safetensors: ${Q}_scale_inv: the scale of block (0, 0) is -"
expect_one_line_error
expect_exit 3 "$LORA" verify --base "$W/scale-zero" --adapter "$W/lora" --merged "$W/out-fp8-128"
expect_stderr_contains "$W/scale-zero/model.safetensors: ${Q}_scale_inv: the scale of block (0, 1) is 0"
expect_one_line_error
expect_exit 3 "$LORA" forward --model "$W/scale-nan" --tokens 1,2,3 --out "$W/fw-nan.safetensors"
expect_stderr_contains "$W/scale-nan/model.safetensors: ${V}_scale_inv: the scale of block (0, 0) is nan"
expect_one_line_error
expect_nothing_left fw-nan.safetensors

# --- modules_to_save replacing an FP8 weight (q_proj) beside a LoRA on v_proj: refused without --dtype
# (merge and inspect --base give the same message), merged with --dtype bf16: q_proj the saved F32
# tensor rounded once to BF16, v_proj dequantized + 2 B A rounded once, the other FP8 weights
# dequantized and rounded once, BF16 tensors bit-identical, no scale left
"$PY" - "$W/mts" <<'PY'
import json, os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import write
rng = np.random.default_rng(21)
f = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)
p = "base_model.model.model.layers.0.self_attn."
os.makedirs(sys.argv[1], exist_ok=True)
write(sys.argv[1] + "/adapter_model.safetensors",
      {p + "q_proj.weight": f(64, 136), p + "v_proj.lora_A.weight": f(4, 136), p + "v_proj.lora_B.weight": f(32, 4)})
json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["v_proj"], "modules_to_save": ["q_proj"],
           "fan_in_fan_out": False, "bias": "none"}, open(sys.argv[1] + "/adapter_config.json", "w"))
PY
MTS_MSG="$W/mts/adapter_model.safetensors: $Q: modules_to_save replaces this FP8 weight, which would leave its block scale stale; merge with --dtype bf16 to dequantize the model"
expect_exit 3 "$LORA" merge --base "$W/fp8-128" --adapter "$W/mts" --out "$W/out-mts"
expect_stderr_contains "$MTS_MSG"
expect_one_line_error
expect_nothing_left out-mts
expect_exit 0 "$LORA" inspect "$W/mts" --base "$W/fp8-128"
expect_stdout_contains "merge: refused without --dtype: $MTS_MSG"
expect_exit 0 "$LORA" inspect "$W/mts" --base "$W/fp8-128" --json
expect_json 'j["base_quantization"]["needs_dtype"]' "$MTS_MSG"
expect_exit 0 "$LORA" merge --base "$W/fp8-128" --adapter "$W/mts" --out "$W/out-mts" --dtype bf16
got=$("$PY" - "$W/fp8-128" "$W/mts" "$W/out-mts" <<'PY'
import os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read
from fp8_np import bf16_bits, dequantize
base, _ = read(sys.argv[1] + "/model.safetensors")
ad, _ = read(sys.argv[2] + "/adapter_model.safetensors")
out, _ = read(sys.argv[3] + "/model.safetensors")
p = "base_model.model.model.layers.0.self_attn."
bad, n = [], 0
want_names = sorted(k for k in base if not k.endswith("_scale_inv"))
if sorted(out) != want_names:
    bad.append("names differ: %s" % sorted(set(out) ^ set(want_names))[:3])
for k in want_names:
    if k not in out:
        continue
    dt, shape, raw, v = base[k]
    if k == "model.layers.0.self_attn.q_proj.weight":
        want = ad[p + "q_proj.weight"][3]
    elif dt == "F8_E4M3":
        codes = np.frombuffer(raw, np.uint8).reshape(shape)
        want = dequantize(codes, base[k + "_scale_inv"][3], (128, 128))
        if k == "model.layers.0.self_attn.v_proj.weight":
            want = want + 2.0 * (ad[p + "v_proj.lora_B.weight"][3] @ ad[p + "v_proj.lora_A.weight"][3])
    else:
        if out[k][:3] != base[k][:3]:
            bad.append(k + " changed")
        continue
    n += 1
    if out[k][0] != "BF16" or np.frombuffer(out[k][2], np.uint16).tolist() != bf16_bits(want).ravel().tolist():
        bad.append(k + " differs from the float64 value rounded once to BF16")
print("ok %d" % n if not bad else "; ".join(bad[:3]))
PY
)
expect_eq "mts --dtype bf16: every weight" "$got" "ok 7"
expect_exit 0 "$LORA" verify --base "$W/fp8-128" --adapter "$W/mts" --merged "$W/out-mts" --json
expect_json "j['equivalent']" "true"


# --- trainable tokens alone on an FP8 base: no FP8 weight changes, so no requantization is reported;
# the rows are the delta's rounded once to BF16, every other tensor bit-identical; verify runs the
# model level (the FP8 weights are the base's)
"$PY" - "$W/tok" <<'PY'
import json, os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import write
rng = np.random.default_rng(22)
os.makedirs(sys.argv[1], exist_ok=True)
p = "base_model.model."
write(sys.argv[1] + "/adapter_model.safetensors",
      {p + "model.embed_tokens.token_adapter.trainable_tokens_delta": (rng.standard_normal((2, 136)) * 0.1).astype(np.float32),
       p + "lm_head.token_adapter.trainable_tokens_delta": (rng.standard_normal((2, 136)) * 0.1).astype(np.float32)})
json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [], "fan_in_fan_out": False,
           "bias": "none", "trainable_token_indices": {"embed_tokens": [5, 31], "lm_head": [0, 95]}},
          open(sys.argv[1] + "/adapter_config.json", "w"))
PY
expect_exit 0 "$LORA" merge --base "$W/fp8-128" --adapter "$W/tok" --out "$W/out-tok"
expect_stdout_contains "output stays FP8; no FP8 weight changed: every FP8 weight and scale copied byte for byte"
if [[ "$OUT" == *requantized* ]]; then fail "tokens only: the report speaks of requantization: $OUT"; else pass; fi
got=$("$PY" - "$W/fp8-128" "$W/tok" "$W/out-tok" <<'PY'
import os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read
from fp8_np import bf16_bits
base, _ = read(sys.argv[1] + "/model.safetensors")
ad, _ = read(sys.argv[2] + "/adapter_model.safetensors")
out, _ = read(sys.argv[3] + "/model.safetensors")
rows = {"model.embed_tokens.weight": [5, 31], "lm_head.weight": [0, 95]}
bad = [] if sorted(out) == sorted(base) else ["names differ"]
for k in base:
    if k not in out:
        continue
    if k not in rows:
        if out[k][:3] != base[k][:3]:
            bad.append(k + " changed")
        continue
    want = base[k][3].copy()
    d = ad["base_model.model." + k[:-len(".weight")] + ".token_adapter.trainable_tokens_delta"][3]
    want[rows[k]] = d  # PEFT TrainableTokensLayer: the rows replaced by the delta
    if np.frombuffer(out[k][2], np.uint16).tolist() != bf16_bits(want).ravel().tolist():
        bad.append(k + " differs")
print("ok" if not bad else "; ".join(bad))
PY
)
expect_eq "tokens on an FP8 base: every tensor" "$got" "ok"
expect_exit 0 "$LORA" verify --base "$W/fp8-128" --adapter "$W/tok" --merged "$W/out-tok" --json
expect_json "j['equivalent']" "true"
expect_json "j['model'].get('skipped', '')" ""
expect_json "j['model']['ok']" "true"

# --- a merged single file (--out NAME.safetensors from the single file of a model folder) has no
# config.json beside it: verify's model level uses the base's when the tensors are the base's
# names and shapes, else says the merged model has none
expect_exit 0 "$LORA" merge --base "$W/fp8-128/model.safetensors" --adapter "$W/tok" --out "$W/one-tok.safetensors"
expect_exit 0 "$LORA" verify --base "$W/fp8-128" --adapter "$W/tok" --merged "$W/one-tok.safetensors" --json
expect_json "j['equivalent']" "true"
expect_json "j['model']['ok']" "true"
expect_json "j['model'].get('skipped', '')" ""
# a merged file whose tensors are not the base's (one dropped): the model level is skipped, saying why
"$PY" - "$W/one-tok.safetensors" "$W/one-short.safetensors" <<'PY'
import os, sys
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read, write
t, _ = read(sys.argv[1])
write(sys.argv[2], {k: v[:3] for k, v in t.items() if k != "model.norm.weight"})
PY
expect_exit 1 "$LORA" verify --base "$W/fp8-128" --adapter "$W/tok" --merged "$W/one-short.safetensors" --json
expect_json "j['failed']" '["model.norm.weight"]'
expect_json "j['model']['skipped']" "the merged model has no config.json"


# --- an untouched FP8 weight that differs (one code bumped in the merged output): verify reports
# the dequantized error (code difference times the block scale), not 0
cp -r "$W/out-fp8-128" "$W/merged-code"
want=$("$PY" - "$W/merged-code/model.safetensors" "$K" <<'PY'
import json, os, struct, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from fp8_np import decode
p, name = sys.argv[1:3]
d = bytearray(open(p, "rb").read()); n = struct.unpack("<Q", d[:8])[0]; h = json.loads(d[8:8 + n])
o = 8 + n + h[name]["data_offsets"][0]
so = 8 + n + h[name + "_scale_inv"]["data_offsets"][0]
scale = struct.unpack("<f", d[so:so + 4])[0]
old = d[o]
d[o] = (old & 0x80) | min((old & 0x7f) + 1, 0x7e)
open(p, "wb").write(d)
print(repr(float(abs(decode(d[o]) - decode(old)) * np.float64(scale))))
PY
)
expect_exit 1 "$LORA" verify --base "$W/fp8-128" --adapter "$W/lora" --merged "$W/merged-code" --json
expect_json "[(t['name'], t['bad_elements'], repr(t['max_error'])) for t in j['worst'] if not t['ok']]" \
  "[[\"$K\",1,\"$want\"]]"


# --- F8_E4M3 weights without any block scale (per-tensor / unscaled FP8, as ComfyUI stores Flux): inspect
# names them and says merge refuses; merge refuses into them (exit 3, one line, nothing written)
"$PY" - "$W/fp8-128/model.safetensors" "$W/noscale.safetensors" <<'PY'
import os, sys
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read, write
t, _ = read(sys.argv[1])
write(sys.argv[2], {k: v[:3] for k, v in t.items() if not k.endswith("_scale_inv")})
PY
UNSCALED="F8_E4M3 weights without block scales (per-tensor / unscaled FP8, as ComfyUI stores Flux)"
expect_exit 0 "$LORA" inspect "$W/noscale.safetensors"
expect_stdout_contains "quantization: $UNSCALED: 7 tensors; merge refuses to merge into them"
NOSCALE_MSG="$W/noscale.safetensors: model.layers.0.mlp.down_proj.weight: cannot merge into $UNSCALED: not supported; merge into a BF16 or block-scaled FP8 checkpoint"
expect_exit 3 "$LORA" inspect "$W/lora" --base "$W/noscale.safetensors"
expect_stdout_contains "quantization of the base: merge refuses it: $NOSCALE_MSG"
expect_one_line_error
expect_exit 3 "$LORA" merge --base "$W/noscale.safetensors" --adapter "$W/lora" --out "$W/out-noscale.safetensors"
expect_stderr_contains "$NOSCALE_MSG"
expect_one_line_error
expect_nothing_left out-noscale.safetensors


# --- inspect --base: the base column's dtypes line up whatever the shapes' widths
expect_exit 0 "$LORA" inspect "$W/lora" --base "$W/fp8-128"
cols=$(grep -o '^.*\] *F8_E4M3' <<<"$OUT" | awk '{ print length($0) }' | sort -u | tr '\n' ' ')
expect_eq "inspect --base: one column for the base dtype" "$(wc -w <<<"$cols" | tr -d ' ')" 1
expect_eq "inspect --base: four modules on FP8 weights" "$(grep -c '\] *F8_E4M3 ' <<<"$OUT")" 4

# --- help text: merge's arithmetic, adapter formats and what --weight / --scale leave alone; extract's --out
expect_exit 0 "$LORA" merge --help
expect_stdout_contains "computed in f32 (f64 for F64 tensors and FP8 weights) and rounded once"
expect_stdout_contains "kohya / LyCORIS (LoCon, LoHa, LoKr, full) .safetensors or a diffusers LoRA"
expect_stdout_contains "--weight and --scale do not apply to either"
expect_exit 0 "$LORA" extract --help
expect_stdout_contains "must not exist unless --force"

finish
