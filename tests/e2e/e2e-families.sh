#!/usr/bin/env bash
# lora forward and lora verify on every family beyond the Llama base (qwen3,
# gemma2, gemma3_text, phi3, mixtral, qwen3_moe, gpt2): tiny deterministic
# models written by tests/e2e/make_families.py (config.json as each family's
# save_pretrained writes it), their logits with and without a LoRA and a DoRA
# adapter within 1e-4 relative of the float64 numpy reference
# tests/reference/family_reference.py (Gemma 2's soft-capping shown to bite);
# merges of both adapters verify as equivalent with the model level run, as
# do merges to BF16 and of two weighted adapters with --scale; a merged model
# with one element changed fails naming the module.
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
if ! "$PY" -c 'import numpy' 2>/dev/null; then echo "skip: /usr/bin/python3 with numpy needed"; exit 77; fi
T=1,17,42,95,0,60,7,33,3,80,64,5
REF="$SRC/tests/reference/family_reference.py"

# ref NAME FOLDER LOGITS [ARGS...]: the float64 reference agrees with lora forward's logits
ref() {
  local name=$1
  shift
  local got
  got=$("$PY" "$REF" compare "$1" "$2" $T "${@:3}")
  echo "$name: $got"
  expect_eq "$name logits vs float64 reference ($got)" "${got%% *}" ok
}

for f in qwen3 gemma2 gemma3_text phi3 mixtral qwen3_moe gpt2; do
  D="$E2E_TMP/$f"
  "$PY" "$SRC/tests/e2e/make_families.py" "$f" "$D" || fail "make_families.py $f"
  # forward: base, LoRA and DoRA unmerged, against the reference
  expect_exit 0 "$LORA" forward --model "$D/model" --tokens $T --out "$D/base.safetensors" --threads 1
  extra=()
  [ "$f" = gemma2 ] && extra=(--bites attn_logit_softcapping)
  ref "$f" "$D/model" "$D/base.safetensors" "${extra[@]}"
  [ "$f" = gemma2 ] && ref "$f final soft-capping" "$D/model" "$D/base.safetensors" --bites final_logit_softcapping
  for a in lora dora; do
    expect_exit 0 "$LORA" forward --model "$D/model" --adapter "$D/$a" --tokens $T --out "$D/$a.safetensors" --threads 1
    ref "$f + $a" "$D/model" "$D/$a.safetensors" --adapter "$D/$a" --differs "$D/base.safetensors"
    # merge, verify: equivalent at every level, the model level run
    expect_exit 0 "$LORA" merge --base "$D/model" --adapter "$D/$a" --out "$D/merged-$a" --quiet
    expect_exit 0 "$LORA" verify --base "$D/model" --adapter "$D/$a" --merged "$D/merged-$a" --json --threads 1
    expect_json 'j["equivalent"] and j["model"]["ok"] and j["layers_failed"] == 0' true
  done
done

# gpt2: the hub's bare GPT2Model names (no "transformer." prefix) run as GPT2LMHeadModel's do
"$PY" "$SRC/tests/e2e/make_families.py" gpt2-bare "$E2E_TMP/gpt2-bare" || fail "make_families.py gpt2-bare"
expect_exit 0 "$LORA" forward --model "$E2E_TMP/gpt2-bare/model" --tokens $T --out "$E2E_TMP/gpt2-bare.safetensors"
ref "gpt2 bare names" "$E2E_TMP/gpt2-bare/model" "$E2E_TMP/gpt2-bare.safetensors"
got=$("$PY" -c "
import sys; sys.path.insert(0, '$SRC/tests/e2e')
from safetensors_np import read
a = read('$E2E_TMP/gpt2-bare.safetensors')[0]['logits'][3]; b = read('$E2E_TMP/gpt2/base.safetensors')[0]['logits'][3]
print(abs(a - b).max() == 0)")
expect_eq "gpt2 bare names give GPT2LMHeadModel's logits" "$got" True
# gpt2's learned positions bound the sequence (n_positions 32)
expect_exit 2 "$LORA" forward --model "$E2E_TMP/gpt2/model" --tokens "$(seq -s, 1 33)" --out "$E2E_TMP/long.safetensors"
expect_stderr_contains "33 tokens exceed the 32 learned positions"

# a merge with --dtype bf16 of these F32 models verifies: the unmerged side runs on the base rounded to BF16
for f in qwen3 gemma2 phi3 qwen3_moe gpt2; do
  D="$E2E_TMP/$f"
  expect_exit 0 "$LORA" merge --base "$D/model" --adapter "$D/lora" --out "$D/merged-bf16" --dtype bf16 --quiet
  expect_exit 0 "$LORA" verify --base "$D/model" --adapter "$D/lora" --merged "$D/merged-bf16" --json --threads 1
  expect_json 'j["equivalent"], j["model"]["ok"], j["model"]["base_rounded_to"]' '[true,true,"BF16"]'
  expect_exit 0 "$LORA" verify --base "$D/model" --adapter "$D/lora" --merged "$D/merged-bf16" --threads 1
  expect_stdout_contains "the unmerged side ran on the base weights rounded to BF16"
done

# two weighted adapters and --scale, as merge takes them: equivalent; a weight off: not
for f in mixtral gpt2; do
  D="$E2E_TMP/$f"
  expect_exit 0 "$LORA" merge --base "$D/model" --adapter "$D/lora" --weight 0.7 --adapter "$D/lora2" --weight -1.3 \
    --scale 0.5 --out "$D/merged-two" --quiet
  expect_exit 0 "$LORA" verify --base "$D/model" --adapter "$D/lora" --weight 0.7 --adapter "$D/lora2" --weight -1.3 \
    --scale 0.5 --merged "$D/merged-two" --json --threads 1
  expect_json 'j["equivalent"] and j["model"]["ok"] and all(l["adapters"] == 2 for l in j["layers"])' true
  expect_exit 1 "$LORA" verify --base "$D/model" --adapter "$D/lora" --weight 0.7 --adapter "$D/lora2" --weight -1.2 \
    --scale 0.5 --merged "$D/merged-two" --threads 1
  expect_stdout_contains "NOT equivalent"
done
expect_exit 2 "$LORA" verify --base "$D/model" --adapter "$D/lora" --adapter "$D/lora2" --weight 1 --merged "$D/merged-two"
expect_stderr_contains "1 --weight values for 2 --adapter values"
# DoRA beside another adapter on the same tensor: refused by name
expect_exit 3 "$LORA" verify --base "$D/model" --adapter "$D/dora" --adapter "$D/lora" --merged "$D/merged-two"
expect_stderr_contains "a DoRA module shares its tensor with another adapter's"

# one element changed in an adapted tensor: NOT equivalent, the module named
for f in gemma2 phi3 mixtral gpt2; do
  D="$E2E_TMP/$f"
  case $f in
    gemma2) t=model.layers.1.mlp.up_proj ;;
    phi3) t=model.layers.0.self_attn.qkv_proj ;;
    mixtral) t=model.layers.1.block_sparse_moe.experts.2.w3 ;;
    gpt2) t=transformer.h.1.attn.c_attn ;;
  esac
  cp -r "$D/merged-lora" "$D/broken"
  "$PY" - "$D/broken/model.safetensors" "$t.weight" "$SRC" <<'PY'
import sys
sys.path.insert(0, sys.argv[3] + "/tests/e2e")
import numpy as np
from safetensors_np import read, write
w = {k: v[3].astype(np.float32) for k, v in read(sys.argv[1])[0].items()}
w[sys.argv[2]][3, 5] += np.float32(0.05)
write(sys.argv[1], w)
PY
  expect_exit 1 "$LORA" verify --base "$D/model" --adapter "$D/lora" --merged "$D/broken" --threads 1
  expect_stdout_contains "NOT equivalent"
  expect_stdout_contains "FAIL $t.weight (merged)"
  expect_stdout_contains "FAIL $t ("
done

finish
