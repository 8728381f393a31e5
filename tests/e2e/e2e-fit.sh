#!/usr/bin/env bash
# An adapter that does not fit its base: every command renders the fit report
# the same way (core/adapter fit_error): the count, the first problem, one hint.
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
TD="$SRC/testdata"
A="$TD/lora-tiny-llama-mismatch"
B="$TD/tiny-llama"
W="$E2E_TMP/w"
mkdir -p "$W"

WANT="$A: does not fit $B: 2 problems, first base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: base model.layers.0.self_attn.q_proj.weight is [64, 64], the LoRA makes [64, 48] (does the adapter belong to this base model? its shapes are a model of another size or family)"

# the same line from each command, and nothing written
same_error() {
  local cmd=$1
  shift
  expect_exit 3 "$LORA" "$cmd" "$@"
  expect_one_line_error
  expect_eq "$cmd fit error" "$ERR" "lora $cmd: error: $WANT"
  hints=$(grep -o "does the adapter belong" "$ERR_FILE" | wc -l)
  expect_eq "$cmd hints" "$hints" 1
}
same_error merge --base "$B" --adapter "$A" --out "$W/merged"
same_error combine --adapter "$A" --base "$B" --out "$W/combined"
same_error verify --base "$B" --adapter "$A" --merged "$B"
same_error forward --model "$B" --adapter "$A" --tokens 1,2,3 --out "$W/logits.safetensors"
same_error convert "$A" --to kohya --base "$B" --out "$W/converted.safetensors"
same_error inspect "$A" --base "$B"
if [ -z "$(ls -A "$W")" ]; then pass; else fail "output left behind: $(ls -A "$W")"; fi

# a kohya adapter for another model: its names match nothing, and the hint says so
expect_exit 3 "$LORA" merge --base "$TD/tiny-unet" --adapter "$TD/lora-tiny-llama-kohya.safetensors" --out "$W/m2"
expect_stderr_contains "lora merge: error: $TD/lora-tiny-llama-kohya.safetensors: does not fit $TD/tiny-unet: "
expect_stderr_contains "problems, first lora_te_"
expect_stderr_contains "(does the adapter belong to this base model? none of its 14 targets is in the base (first lora_te_model_layers_0_mlp_down_proj): a model of another family or layout)"

finish
