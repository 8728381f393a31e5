#!/usr/bin/env bash
# lora forward and lora verify on a real trained model: ../shared/fixtures/stories260k
# (a 260K-parameter Llama with a trained PEFT LoRA and DoRA, and float64
# reference logits; see its README.md). Skipped, saying so, when the folder is absent.
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
S="$SRC/../shared/fixtures/stories260k"
if [ ! -f "$S/model/model.safetensors" ]; then echo "skip: $S is absent"; exit 77; fi
if ! "$PY" -c 'import numpy' 2>/dev/null; then echo "skip: /usr/bin/python3 with numpy needed"; exit 77; fi

# rel LOGITS KEY: max |lora - reference| / max |reference| for reference key KEY
rel() {
  "$PY" - "$1" "$S/reference/logits.safetensors" "$2" "$SRC" <<'PY'
import sys
sys.path.insert(0, sys.argv[4] + "/tests/e2e")
from safetensors_np import read
got = read(sys.argv[1])[0]["logits"][3]
ref = read(sys.argv[2])[0][sys.argv[3]][3]
print("ok" if got.shape == ref.shape and abs(got - ref).max() <= 1e-4 * abs(ref).max() else "mismatch",
      "%.3g" % (abs(got - ref).max() / abs(ref).max()))
PY
}

# forward against the float64 reference, base and both adapters unmerged, every token line
for i in 0 1 2; do
  T=$(sed -n "$((i + 1))p" "$S/tokenizer/tokens.txt")
  for a in base lora dora; do
    args=()
    [ "$a" = lora ] && args=(--adapter "$S/lora-peft")
    [ "$a" = dora ] && args=(--adapter "$S/lora-dora")
    expect_exit 0 "$LORA" forward --model "$S/model" "${args[@]}" --tokens "$T" --out "$E2E_TMP/$a.$i.safetensors"
    got=$(rel "$E2E_TMP/$a.$i.safetensors" "$a.$i")
    echo "stories260k $a line $i: $got"
    expect_eq "stories260k $a.$i vs float64 reference ($got)" "${got%% *}" ok
  done
done

# merges of both adapters verify, at every level; BF16 merges too
T=$(sed -n 2p "$S/tokenizer/tokens.txt")
for a in lora-peft lora-dora; do
  expect_exit 0 "$LORA" merge --base "$S/model" --adapter "$S/$a" --out "$E2E_TMP/m-$a" --quiet
  expect_exit 0 "$LORA" verify --base "$S/model" --adapter "$S/$a" --merged "$E2E_TMP/m-$a" --tokens "$T" --json
  expect_json 'j["equivalent"], j["tensors_checked"], j["layers_checked"], j["model"]["ok"], j["model"]["top1_agreement"]' \
    '[true,47,35,true,1.0]'
  expect_exit 0 "$LORA" merge --base "$S/model" --adapter "$S/$a" --out "$E2E_TMP/bf16-$a" --dtype bf16 --quiet
  for i in 1 2 3; do
    expect_exit 0 "$LORA" verify --base "$S/model" --adapter "$S/$a" --merged "$E2E_TMP/bf16-$a" \
      --tokens "$(sed -n ${i}p "$S/tokenizer/tokens.txt")" --json
    expect_json 'j["equivalent"], j["model"]["base_rounded_to"]' '[true,"BF16"]'
  done
done

# one element changed: NOT equivalent, the module named
cp -r "$E2E_TMP/m-lora-peft" "$E2E_TMP/broken"
"$PY" - "$E2E_TMP/broken/model.safetensors" "$SRC" <<'PY'
import sys
sys.path.insert(0, sys.argv[2] + "/tests/e2e")
import numpy as np
from safetensors_np import read, write
w = {k: v[3].astype(np.float32) for k, v in read(sys.argv[1])[0].items()}
w["model.layers.3.self_attn.o_proj.weight"][7, 11] += np.float32(0.01)
write(sys.argv[1], w)
PY
expect_exit 1 "$LORA" verify --base "$S/model" --adapter "$S/lora-peft" --merged "$E2E_TMP/broken"
expect_stdout_contains "NOT equivalent: 47 tensors checked, 1 failed"
expect_stdout_contains "FAIL model.layers.3.self_attn.o_proj.weight (merged)"
expect_stdout_contains "FAIL model.layers.3.self_attn.o_proj (linear)"

finish
