#!/usr/bin/env bash
# LyCORIS adapters (LoHa, LoKr, LoCon with a Tucker core) merged into a
# UNet-shaped base: every merged tensor equals the float64 reference of
# LyCORIS's formula rounded once (tests/e2e/make_lycoris.py, numpy only),
# untouched tensors are bit-identical, verify finds the merge equivalent,
# inspect names the kinds, and what cannot take them refuses by name.
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

# LyCORIS weight decomposition is refused by name (not read yet); inspect still lists the file
"$PY" -c '
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np, safetensors_np
t, _ = safetensors_np.read(sys.argv[1] + "/loha.safetensors")
out = {k: np.asarray(v[3], np.float32) for k, v in t.items()}
out["lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"] = np.ones((16, 1), np.float32)
safetensors_np.write(sys.argv[1] + "/dora.safetensors", out)
' "$D" "$SRC/tests/e2e"
expect_exit 3 "$LORA" merge --base "$D/base.safetensors" --adapter "$D/dora.safetensors" --out "$W/dora-merged"
expect_stderr_contains "dora_scale"
expect_exit 0 "$LORA" inspect "$D/dora.safetensors"
expect_stdout_contains "that does not load"
expect_stdout_contains "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w2_b"

finish
