#!/usr/bin/env bash
# PEFT target_parameters (lora.ParamWrapper on fused MoE experts) and
# trainable_token_indices (issue 14, items 5 and 3). Tiny bases and PEFT
# adapters with the real key names and adapter_config.json fields
# (tests/e2e/make_peft_params.py): gpt-oss shaped experts gate_up_proj
# [E, H, 2I] / down_proj [E, I, H] (F32 and BF16), a square one, transformers
# 5.x fused qwen3_moe experts [E, 2I, H]; Llama-shaped bases for trainable
# tokens (untied F32 / BF16, tied BF16). Merged values against numpy float64
# rounded once (tests/e2e/check_peft_params.py: BF16 bit for bit, F32 within
# 2^-22 of the terms), untouched tensors bit-identical, `lora verify` on each
# good output, each refusal's exit code and message with nothing written.
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
W="$E2E_TMP/w"
mkdir -p "$W"
"$PY" "$SRC/tests/e2e/make_peft_params.py" "$W" || fail "make_peft_params.py"

check() {  # check BASE ADAPTER OUT: values against numpy
  local got
  got=$("$PY" "$SRC/tests/e2e/check_peft_params.py" "$W/$1" "$W/$2" "$W/$3")
  expect_eq "values of $3 ($2 on $1)" "$got" ok
}
good() {  # good BASE ADAPTER OUT [VERIFY ARGS...]: merge, values, verify
  local base=$1 ad=$2 out=$3
  shift 3
  expect_exit 0 "$LORA" merge --base "$W/$base" --adapter "$W/$ad" --out "$W/$out"
  MERGE_OUT=$OUT
  check "$base" "$ad" "$out"
  expect_exit 0 "$LORA" verify --base "$W/$base" --adapter "$W/$ad" --merged "$W/$out" "$@"
  expect_stdout_contains "equivalent:"
}
# the replaced tokens and a few others: the model level runs them unmerged
TOKS=(--tokens 5,31,0,7,8,1,20,2,30,17,3)
refused() {  # refused BASE ADAPTER MESSAGE: exit 3, the one-line message, nothing written
  expect_exit 3 "$LORA" merge --base "$W/$1" --adapter "$W/$2" --out "$W/r-$2"
  expect_stderr_contains "$3"
  expect_one_line_error
  expect_nothing_left "r-$2"
}

# --- 1. target_parameters on gpt-oss experts ([E, in, out]), nested wrappers, rank_pattern, LoRA beside
for dt in f32 bf16; do
  good "oss-$dt" p-oss "m-oss-$dt"
done
expect_exit 0 "$LORA" verify --base "$W/oss-bf16" --adapter "$W/p-oss" --merged "$W/m-oss-bf16" --json
expect_json 'j["layers_skipped"]' '["model.layers.0.mlp.experts.down_proj","model.layers.0.mlp.experts.gate_up_proj"]'
expect_json 'j["model"]["skipped"]' "model_type gpt_oss has no forward pass"
expect_json '[t["kind"] for t in j["worst"] if t["name"].endswith("experts.gate_up_proj")]' '["merged"]'
# a wrong merge is caught: verify against the base itself
expect_exit 1 "$LORA" verify --base "$W/oss-f32" --adapter "$W/p-oss" --merged "$W/oss-f32"
expect_stdout_contains "FAIL model.layers.0.mlp.experts"

# inspect: the parameter modules, their experts and layout
expect_exit 0 "$LORA" inspect "$W/p-oss"
expect_stdout_contains "target_parameters: mlp.experts.gate_up_proj, mlp.experts.down_proj (lora.ParamWrapper)"
expect_stdout_contains "model.layers.0.mlp.experts.down_proj"
expect_exit 0 "$LORA" inspect "$W/p-oss" --base "$W/oss-f32" --json
expect_json '[(m["name"], m["kind"], m["rank"], m["experts"], m["fan_in_fan_out"]) for m in j["modules"] if m["kind"] == "parameter"]' \
  '[["model.layers.0.mlp.experts.down_proj","parameter",3,4,true],["model.layers.0.mlp.experts.gate_up_proj","parameter",2,4,true]]'

# square experts: only model_type gpt_oss says [E, in, out]
good oss-square-f32 p-oss-sq m-oss-sq
# transformers 5.x fused qwen3_moe experts ([E, out, in]), rsLoRA
good qwen-f32 p-qwen m-qwen
# a 2-D parameter (target_parameters self_attn.q_proj.weight): the linear case,
# on a Llama the forward pass runs with the module unmerged
good tok-f32 p-2d m-2d
expect_stdout_contains "model: 16 tokens"
expect_exit 0 "$LORA" verify --base "$W/tok-f32" --adapter "$W/p-2d" --merged "$W/m-2d" --json
expect_json 'j["model"]["ok"]' true
expect_json 'j["layers_checked"]' 1
# fused experts on a model the forward pass runs: its model level says why not (the 2-D
# base with a fused experts tensor added)
good tok-experts-f32 p-qwen m-te
expect_exit 0 "$LORA" verify --base "$W/tok-experts-f32" --adapter "$W/p-qwen" --merged "$W/m-te" --json
expect_json 'j["model"]["skipped"]' "the forward pass does not run fused experts (target_parameters, lora.ParamWrapper on model.layers.0.mlp.experts.gate_up_proj) yet"

# a complete transformers 5.x qwen3_moe with fused experts: the model level runs
# the experts with their ParamWrapper modules unmerged
for dt in f32 bf16; do
  good "qwen-full-$dt" p-qwen-full "m-qf-$dt" --tokens 1,5,9,3,30,2
  expect_stdout_contains "model: 6 tokens"
done
expect_exit 0 "$LORA" verify --base "$W/qwen-full-f32" --adapter "$W/p-qwen-full" --merged "$W/m-qf-f32" --json
expect_json 'j["model"]["ok"]' true
expect_exit 0 "$LORA" forward --model "$W/qwen-full-f32" --adapter "$W/p-qwen-full" --tokens 1,5,9,3 --out "$W/lq-base.safetensors"
expect_exit 0 "$LORA" forward --model "$W/m-qf-f32" --tokens 1,5,9,3 --out "$W/lq-merged.safetensors"
expect_exit 0 "$LORA" forward --model "$W/qwen-full-f32" --tokens 1,5,9,3 --out "$W/lq-plain.safetensors"
cmp=$(SRC="$SRC" "$PY" - "$W/lq-base.safetensors" "$W/lq-merged.safetensors" "$W/lq-plain.safetensors" <<'PY'
import os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read
x, y, z = (read(p)[0]["logits"][3] for p in sys.argv[1:4])
print(bool(np.max(np.abs(x - y)) <= 1e-5 * np.max(np.abs(x))), bool(np.max(np.abs(x - z)) > 1e-2 * np.max(np.abs(x))))
PY
)
expect_eq "forward: fused experts unmerged = merged, and differ from the base" "$cmp" "True True"
# the merged experts are wrong: verify's model level fails too
expect_exit 1 "$LORA" verify --base "$W/qwen-full-f32" --adapter "$W/p-qwen-full" --merged "$W/qwen-full-f32" --json
expect_json 'j["model"]["ok"]' false

# refusals
refused oss-f32 p-missing "the base has no parameter model.layers.0.mlp.experts.gate_proj (named by target_parameters)"
refused oss-f32 p-shape "base parameter model.layers.0.mlp.experts.gate_up_proj is [4, 16, 24], the lora.ParamWrapper factors (lora_A [8, 20], lora_B [24, 8], r 2) make 4 experts of [24, 20] (or [20, 24])"
refused oss-f32 p-rows "base_model.model.model.layers.0.mlp.experts.lora_A.weight: 7 rows, not a multiple of r = 2"
refused oss-f32 p-count "model.layers.0.mlp.experts holds 1 lora.ParamWrapper(s), but"
expect_exit 3 "$LORA" convert "$W/p-oss" --to kohya --out "$W/c-oss"
expect_stderr_contains "convert does not take target_parameters modules (lora.ParamWrapper on model.layers.0.mlp.experts.down_proj) yet"
expect_nothing_left c-oss
expect_exit 3 "$LORA" resize --adapter "$W/p-oss" --rank 1 --out "$W/rs-oss"
expect_stderr_contains "resize does not take target_parameters modules"
expect_nothing_left rs-oss

# --- 2. trainable_token_indices: rows replaced, every other row bit-identical
good tok-f32 t-list m-tl-f32 "${TOKS[@]}"
expect_stdout_contains "model: 11 tokens"
expect_eq "merge reports the rows" "$(grep -c 'trainable tokens: 3 rows replaced' <<<"$MERGE_OUT")" 1
good tok-bf16 t-list m-tl-bf16 "${TOKS[@]}"
expect_stdout_contains "model: 11 tokens"
# dict form with a LoRA beside it: embed_tokens and lm_head rows (untied)
for dt in f32 bf16; do
  good "tok-$dt" t-dict "m-td-$dt" "${TOKS[@]}"
  expect_stdout_contains "model: 11 tokens"
done
# tied base: only the embedding is stored; the head follows it (the model level runs it unmerged)
good tok-tied-bf16 t-tied m-tt "${TOKS[@]}"
expect_stdout_contains "model: 11 tokens"
expect_eq "still tied" "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["tie_word_embeddings"])' "$W/m-tt/config.json")" True
# forward: logits of the base with the tokens unmerged = the merged model's, also at a replaced token
expect_exit 0 "$LORA" forward --model "$W/tok-f32" --adapter "$W/t-dict" --tokens 5,1,31,7 --out "$W/l-base.safetensors"
expect_exit 0 "$LORA" forward --model "$W/m-td-f32" --tokens 5,1,31,7 --out "$W/l-merged.safetensors"
same=$(SRC="$SRC" "$PY" - "$W/l-base.safetensors" "$W/l-merged.safetensors" "$W/tok-f32" <<'PY'
import os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read
x, y = (read(p)[0]["logits"][3] for p in sys.argv[1:3])
print(bool(np.max(np.abs(x - y)) <= 1e-5 * np.max(np.abs(x))))
PY
)
expect_eq "forward: unmerged vs merged logits (trainable tokens)" "$same" True
# a wrong merge is caught: the base itself as the merged model
expect_exit 1 "$LORA" verify --base "$W/tok-f32" --adapter "$W/t-list" --merged "$W/tok-f32"
expect_stdout_contains "FAIL model.embed_tokens.weight (merged)"
# inspect
expect_exit 0 "$LORA" inspect "$W/t-dict"
expect_stdout_contains "trainable_token_indices embed_tokens: 5, 31"
expect_stdout_contains "model.embed_tokens.weight  rows [5, 31]  <- base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta  F32 [2, 16]"
expect_exit 0 "$LORA" inspect "$W/t-list" --json
expect_json '[(t["target"], t["indices"]) for t in j["trainable_tokens"]]' '[["model.embed_tokens.weight",[30,2,17]]]'
# refusals
refused tok-f32 t-range "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta: token index 32 is out of range: base model.embed_tokens.weight has 32 rows"
refused tok-f32 t-rows "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta: shape mismatch: expected [2, dim] (trainable_token_indices lists 2 tokens), found [3, 16]"
refused tok-f32 t-width "base model.embed_tokens.weight is [32, 16], the trainable tokens delta is [2, 17] (rows of width 17)"
refused tok-f32 t-dup "adapter_config.json: trainable_token_indices: token index 4 is listed twice"
refused tok-tied-bf16 t-tied-head "model.embed_tokens.weight is also changed by the LoRA module lm_head (the tied head): trainable_token_indices beside it is not supported"
expect_exit 3 "$LORA" combine --adapter "$W/t-list" --weight 1 --adapter "$W/t-list" --weight 1 --out "$W/cb-t"
expect_stderr_contains "combine does not take trainable_token_indices (rows of model.embed_tokens.weight) yet"
expect_nothing_left cb-t

finish
