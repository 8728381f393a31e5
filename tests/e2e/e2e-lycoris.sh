#!/usr/bin/env bash
# LyCORIS adapters (LoHa, LoKr, LoCon with a Tucker core) merged into a
# UNet-shaped base: every merged tensor equals the float64 reference of
# LyCORIS's formula rounded once (tests/e2e/make_lycoris.py, numpy only),
# untouched tensors are bit-identical, verify finds the merge equivalent,
# inspect names the kinds, and what cannot take them refuses by name; the
# same for their weight decomposition (dora_scale).
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
W="$E2E_TMP/w"
mkdir -p "$W"

# Every tensor of $1 byte for byte equal to $2's (same names, dtypes,
# shapes), except the tensors named in $3 (comma-separated), which may be
# off by 8 f32 units in the last place of the tensor's largest value (the
# f32 sgemm path of a plain LoRA). Prints "<n> differ".
same_tensors() {
  "$PY" -c '
import sys
sys.path.insert(0, sys.argv[3])
import numpy as np, safetensors_np
got, _ = safetensors_np.read(sys.argv[1])
want, _ = safetensors_np.read(sys.argv[2])
loose = set(sys.argv[4].split(",")) if len(sys.argv) > 4 else set()
def ok(k):
    if k not in got or got[k][:2] != want[k][:2]:
        return False
    if got[k][2] == want[k][2]:
        return True
    g, w = got[k][3].astype(np.float32), want[k][3].astype(np.float32)
    return k in loose and np.all(np.abs(g - w) <= 8 * np.spacing(np.abs(w).max()))
bad = [k for k in want if not ok(k)]
for k in bad[:3]:
    if k in got:
        d = np.abs(got[k][3] - want[k][3]); print(k, "max diff", d.max(), "elements off", int((d > 0).sum()))
print(("extra tensors, " if set(got) - set(want) else "") + "%d differ" % len(bad))
' "$1" "$2" "$SRC/tests/e2e" "${3:-}"
}

for dt in BF16 F32; do
  D="$W/$dt"
  mkdir -p "$D"
  "$PY" "$SRC/tests/e2e/make_lycoris.py" "$D" "$dt" || fail "make_lycoris.py $dt"
  for kind in loha lokr locon; do
    expect_exit 0 "$LORA" merge --base "$D/base.safetensors" --adapter "$D/$kind.safetensors" --out "$D/$kind-merged"
    # the plain LoCon (B A) module of locon goes through sgemm into f32: to an
    # F32 output that is within a few units in the last place, not rounded once
    loose=$([ "$dt" = F32 ] && [ "$kind" = locon ] && echo up_blocks.0.attentions.0.proj_in.weight)
    res=$(same_tensors "$D/$kind-merged/base.safetensors" "$D/$kind.expected.safetensors" "$loose")
    expect_eq "$dt $kind merged = float64 reference rounded once, untouched bit-identical" "$res" "0 differ"
    expect_exit 0 "$LORA" verify --base "$D/base.safetensors" --adapter "$D/$kind.safetensors" --merged "$D/$kind-merged/base.safetensors"
    expect_stdout_contains "equivalent"
  done
  # a merge of another adapter is not equivalent
  expect_exit 1 "$LORA" verify --base "$D/base.safetensors" --adapter "$D/loha.safetensors" --merged "$D/lokr-merged/base.safetensors"
  expect_exit 1 "$LORA" verify --base "$D/base.safetensors" --adapter "$D/lokr.safetensors" --merged "$D/locon-merged/base.safetensors"
  expect_exit 1 "$LORA" verify --base "$D/base.safetensors" --adapter "$D/locon.safetensors" --merged "$D/loha-merged/base.safetensors"
done

D="$W/BF16"
# inspect names the kinds
expect_exit 0 "$LORA" inspect "$D/loha.safetensors"
expect_stdout_contains "(LyCORIS LoHa, 4 modules)"
expect_exit 0 "$LORA" inspect "$D/lokr.safetensors"
expect_stdout_contains "(LyCORIS LoKr, 3 modules)"
expect_exit 0 "$LORA" inspect "$D/locon.safetensors"
expect_stdout_contains "(LyCORIS LoCon + LoCon+Tucker, 2 modules)"
expect_exit 0 "$LORA" inspect "$D/loha.safetensors" --base "$D/base.safetensors" --json
expect_json 'sorted({m["form"] for m in j["modules"]})' '["LoHa"]'
expect_json 'j["adapter_kind"]' 'LyCORIS LoHa'

# commands that work on LoRA factors refuse, naming the module
expect_exit 3 "$LORA" resize --adapter "$D/loha.safetensors" --rank 1 --out "$W/resized.safetensors"
expect_stderr_contains "resize works on LoRA factors (B A); this module is LoHa"
expect_one_line_error
expect_nothing_left resized.safetensors
expect_exit 3 "$LORA" convert "$D/lokr.safetensors" --to peft --base "$D/base.safetensors" --out "$W/conv"
expect_stderr_contains "convert works on LoRA factors (B A); this module is LoKr"

# a LyCORIS module whose shape does not fit the base: the fit report
"$PY" -c '
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np, safetensors_np
t, _ = safetensors_np.read(sys.argv[1] + "/loha.safetensors")
out = {k: np.asarray(v[3], np.float32) for k, v in t.items()}
k = "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b"
out[k] = np.zeros((4, 11), np.float32)
out[k.replace("w1_b", "w2_b")] = np.zeros((4, 11), np.float32)
safetensors_np.write(sys.argv[1] + "/misfit.safetensors", out)
' "$D" "$SRC/tests/e2e"
expect_exit 3 "$LORA" merge --base "$D/base.safetensors" --adapter "$D/misfit.safetensors" --out "$W/misfit-merged"
expect_stderr_contains "the LoHa makes [16, 11]"
expect_nothing_left misfit-merged

# LyCORIS weight decomposition (dora_scale) on LoCon (LyCORIS and kohya
# files), LoHa and LoKr, both axis forms ([out, 1, ...] and [1, in, 1, ...]),
# linear and 3x3 conv targets: the merged weight equals the float64 value of
# LyCORIS's formula rounded once, at --weight 1 and at --weight 0.6 (the
# multiplier acting on the rescaling), untouched tensors bit-identical, and
# verify finds each merge equivalent and a tampered one not
for dt in BF16 F32; do
  D="$W/$dt"
  for kind in dora kohya-dora; do
    expect_exit 0 "$LORA" merge --base "$D/base.safetensors" --adapter "$D/$kind.safetensors" --out "$D/$kind-merged"
    res=$(same_tensors "$D/$kind-merged/base.safetensors" "$D/$kind.expected.safetensors")
    expect_eq "$dt $kind merged = float64 LyCORIS DoRA rounded once, untouched bit-identical" "$res" "0 differ"
    expect_exit 0 "$LORA" verify --base "$D/base.safetensors" --adapter "$D/$kind.safetensors" --merged "$D/$kind-merged/base.safetensors"
    expect_stdout_contains "equivalent"
    # --weight 0.6: V * (0.6 (g - 1) + 1); the same through --scale
    expect_exit 0 "$LORA" merge --base "$D/base.safetensors" --adapter "$D/$kind.safetensors" --weight 0.6 --out "$D/$kind-w-merged"
    res=$(same_tensors "$D/$kind-w-merged/base.safetensors" "$D/$kind.w.expected.safetensors")
    expect_eq "$dt $kind --weight 0.6 = float64 reference rounded once" "$res" "0 differ"
    expect_exit 0 "$LORA" merge --base "$D/base.safetensors" --adapter "$D/$kind.safetensors" --weight 1.2 --scale 0.5 --out "$D/$kind-s-merged"
    res=$(same_tensors "$D/$kind-s-merged/base.safetensors" "$D/$kind.w.expected.safetensors")
    expect_eq "$dt $kind --weight 1.2 --scale 0.5 = the 0.6 reference" "$res" "0 differ"
    expect_exit 0 "$LORA" verify --base "$D/base.safetensors" --adapter "$D/$kind.safetensors" --weight 0.6 --merged "$D/$kind-w-merged/base.safetensors"
    expect_stdout_contains "equivalent"
    # the merge at weight 1 is not the merge at 0.6
    expect_exit 1 "$LORA" verify --base "$D/base.safetensors" --adapter "$D/$kind.safetensors" --weight 0.6 --merged "$D/$kind-merged/base.safetensors"
  done
  # one element of one DoRA tensor changed by a few ulps of its row: not equivalent
  for t in down_blocks.0.resnets.0.conv1.weight mid_block.attentions.0.proj_out.weight; do
    "$PY" -c '
import sys
sys.path.insert(0, sys.argv[3])
import numpy as np, safetensors_np
t, meta = safetensors_np.read(sys.argv[1])
out = {}
for k, (dt, shape, raw, v) in t.items():
    if k == sys.argv[2]:
        v = np.array(v, np.float64); v.flat[5] += 8 * np.spacing(np.float32(np.abs(v).max())) * (2**16 if dt == "BF16" else 1)
        out[k] = (dt, shape, (np.asarray(v, np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()) if dt == "BF16" else np.asarray(v, np.float32)
    else:
        out[k] = (dt, shape, raw)
safetensors_np.write(sys.argv[4], out)
' "$D/dora-merged/base.safetensors" "$t" "$SRC/tests/e2e" "$D/tampered.safetensors"
    expect_exit 1 "$LORA" verify --base "$D/base.safetensors" --adapter "$D/dora.safetensors" --merged "$D/tampered.safetensors"
    expect_stdout_contains "$t"
  done
done

D="$W/BF16"
# refusals, each naming the file and tensor, nothing written: a dora_scale of
# neither axis form, one of the wrong length, a NaN, one without its module
bad_dora() {
  "$PY" -c '
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np, safetensors_np
t, _ = safetensors_np.read(sys.argv[1] + "/dora.safetensors")
out = {k: (v[0], v[1], v[2]) for k, v in t.items()}
k, what = sys.argv[3], sys.argv[4]
if what == "nan":
    v = np.array(t[k][3], np.float32); v.flat[1] = np.nan; out[k] = v
elif what == "orphan":
    out["lora_unet_conv_in.dora_scale"] = np.ones((8, 1, 1, 1), np.float32)
else:
    out[k] = np.ones(tuple(int(d) for d in what.split("x")), np.float32)
safetensors_np.write(sys.argv[1] + "/bad-dora.safetensors", out)
' "$D" "$SRC/tests/e2e" "$1" "$2"
}
for case in "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale 16x2" \
  "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale 15x1" \
  "lora_unet_down_blocks_0_resnets_0_conv1.dora_scale 1x6x3x1" \
  "lora_unet_mid_block_resnets_0_conv1.dora_scale 1x8x1x1"; do
  set -- $case
  bad_dora "$1" "$2"
  expect_exit 3 "$LORA" merge --base "$D/base.safetensors" --adapter "$D/bad-dora.safetensors" --out "$W/bad-merged"
  expect_stderr_contains "$1"
  expect_stderr_contains "(a norm per output row) or"
  expect_one_line_error
  expect_nothing_left bad-merged
done
bad_dora lora_unet_mid_block_attentions_0_proj_out.dora_scale nan
expect_exit 3 "$LORA" merge --base "$D/base.safetensors" --adapter "$D/bad-dora.safetensors" --out "$W/bad-merged"
expect_stderr_contains "lora_unet_mid_block_attentions_0_proj_out.dora_scale"
expect_stderr_contains "NaN or infinite"
expect_one_line_error
expect_nothing_left bad-merged
expect_exit 3 "$LORA" verify --base "$D/base.safetensors" --adapter "$D/bad-dora.safetensors" --merged "$D/dora-merged/base.safetensors"
expect_stderr_contains "NaN or infinite"
bad_dora x orphan
expect_exit 3 "$LORA" merge --base "$D/base.safetensors" --adapter "$D/bad-dora.safetensors" --out "$W/bad-merged"
expect_stderr_contains "lora_unet_conv_in.dora_scale"
expect_stderr_contains "dora_scale without the tensors of a LyCORIS module"
expect_nothing_left bad-merged
# inspect lists it; commands that rewrite LoRA factors refuse it by name
expect_exit 0 "$LORA" inspect "$D/kohya-dora.safetensors" --json
expect_json '[(m["dora"], m["dora_scale_shape"]) for m in j["modules"]]' '[[true,[1,4,1,1]],[true,[16,1]],[true,[8,1,1,1]]]'
expect_exit 3 "$LORA" resize --adapter "$D/kohya-dora.safetensors" --rank 1 --out "$W/resized.safetensors"
expect_stderr_contains "resize does not take LyCORIS weight decomposition (dora_scale) yet"
expect_nothing_left resized.safetensors
expect_exit 3 "$LORA" convert "$D/kohya-dora.safetensors" --to peft --base "$D/base.safetensors" --out "$W/conv"
expect_stderr_contains "dora_scale"
expect_nothing_left conv

# an LLM base: a kohya LoRA with dora_scale on two of its modules merges and
# verifies at the weight and layer levels; the model level (the forward pass,
# which does not apply dora_scale unmerged) says skipped and why, and
# `forward` with the adapter refuses naming the tensor
TD="$SRC/testdata"
"$PY" -c '
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np, safetensors_np
t, _ = safetensors_np.read(sys.argv[1])
out = {k: np.asarray(v[3], np.float32) for k, v in t.items()}
rng = np.random.default_rng(3)
out["lora_te_model_layers_0_mlp_gate_proj.dora_scale"] = rng.uniform(0.5, 2, (176, 1)).astype(np.float32)
out["lora_te_model_layers_0_mlp_down_proj.dora_scale"] = rng.uniform(0.5, 2, (1, 176)).astype(np.float32)
safetensors_np.write(sys.argv[3], out)
' "$TD/lora-tiny-llama-kohya.safetensors" "$SRC/tests/e2e" "$W/llama-dora.safetensors"
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama" --adapter "$W/llama-dora.safetensors" --out "$W/llama-dora-merged"
expect_exit 0 "$LORA" verify --base "$TD/tiny-llama" --adapter "$W/llama-dora.safetensors" --merged "$W/llama-dora-merged"
expect_stdout_contains "equivalent"
expect_stdout_contains "model.layers.0.mlp.gate_proj (linear+dora)"
expect_stdout_contains "model: skipped (model.layers.0.mlp.down_proj has LyCORIS weight decomposition (dora_scale)"
expect_exit 3 "$LORA" forward --model "$TD/tiny-llama" --adapter "$W/llama-dora.safetensors" --tokens 1,2,3 --out "$W/fwd.safetensors"
expect_stderr_contains "dora_scale"
expect_stderr_contains "does not apply LyCORIS weight decomposition"
expect_nothing_left fwd.safetensors

finish
