#!/usr/bin/env bash
# Heads (issue 14): tied embeddings, new heads, added tokens. Tiny Llama-style
# models (tests/e2e/make_heads.py: F32 and BF16 with tie_word_embeddings true
# and no lm_head.weight, as Qwen2.5 0.5B-3B / Llama 3.2 1B-3B / Gemma ship;
# an F32 one with its own lm_head) and PEFT adapters with the real key names
# (base_model.model.lm_head.lora_A.weight, modules_to_save
# base_model.model.lm_head.weight / score.weight / classifier.*).
# Merged values against numpy float64 rounded once (tests/e2e/check_heads.py:
# F32 within 1e-6 relative of |W0| + |s||B||A|, BF16 within 1 ulp), untouched
# tensors bit-identical, config.json fields, `lora verify` on each good
# output, each refusal's exit code and message with nothing left behind.
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
W="$E2E_TMP/w"
mkdir -p "$W"
"$PY" "$SRC/tests/e2e/make_heads.py" "$W" || fail "make_heads.py"

check() {  # check BASE ADAPTER OUT: values against numpy
  local got
  got=$("$PY" "$SRC/tests/e2e/check_heads.py" "$W/$1" "$W/$2" "$W/$3")
  expect_eq "values of $3" "$got" ok
}
config() {  # config OUT EXPR: a Python expression over c = OUT/config.json
  "$PY" -c 'import json, sys; c = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$W/$1/config.json" "$2"
}
keys() { "$PY" -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))))' "$W/$1/config.json"; }

# --- 1. tied base, LoRA on lm_head (and q_proj): lm_head = embedding + s B A, own head in config
expect_exit 0 "$LORA" merge --base "$W/tied-f32" --adapter "$W/a-head" --out "$W/m-head"
expect_stdout_contains "added tensors: lm_head.weight"
expect_stdout_contains "config.json: tie_word_embeddings: false"
check tied-f32 a-head m-head
expect_eq "tie_word_embeddings" "$(config m-head 'c["tie_word_embeddings"]')" False
expect_eq "config keys kept in order" "$(keys m-head)" "$(keys tied-f32)"
expect_eq "other fields" "$(config m-head '{k: v for k, v in c.items() if k != "tie_word_embeddings"}')" \
  "$(config tied-f32 '{k: v for k, v in c.items() if k != "tie_word_embeddings"}')"
expect_exit 0 "$LORA" verify --base "$W/tied-f32" --adapter "$W/a-head" --merged "$W/m-head"
expect_exit 0 "$LORA" merge --base "$W/tied-f32" --adapter "$W/a-head" --out "$W/m-dry" --dry-run
expect_stdout_contains "added tensors: lm_head.weight"
expect_nothing_left m-dry
# forward: the base with the adapter unmerged gives the merged model's logits
expect_exit 0 "$LORA" forward --model "$W/tied-f32" --adapter "$W/a-head" --tokens 1,5,9,3 --out "$W/l-base.safetensors"
expect_exit 0 "$LORA" forward --model "$W/m-head" --tokens 1,5,9,3 --out "$W/l-merged.safetensors"
same=$(SRC="$SRC" "$PY" - "$W/l-base.safetensors" "$W/l-merged.safetensors" <<'PY'
import os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read
x, y = (read(p)[0]["logits"][3] for p in sys.argv[1:3])
print(bool(np.max(np.abs(x - y)) <= 1e-4 * np.max(np.abs(x))))
PY
)
expect_eq "forward: unmerged vs merged logits" "$same" True

# a sharded tied base: the head goes into the embedding's shard, the index lists it
SRC="$SRC" "$PY" - "$W" <<'PY'
import json, os, shutil, sys
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read, write
w = sys.argv[1]
t, _ = read(w + "/tied-f32/model.safetensors")
os.makedirs(w + "/sharded", exist_ok=True)
parts = {"model-00001-of-00002.safetensors": {k: t[k][:3] for k in t if "embed" not in k},
         "model-00002-of-00002.safetensors": {k: t[k][:3] for k in t if "embed" in k}}
for name, part in parts.items():
    write(w + "/sharded/" + name, part)
index = {"metadata": {"total_size": sum(len(v[2]) for v in t.values())},
         "weight_map": {k: name for name, part in parts.items() for k in part}}
json.dump(index, open(w + "/sharded/model.safetensors.index.json", "w"))
shutil.copy(w + "/tied-f32/config.json", w + "/sharded/config.json")
PY
expect_exit 0 "$LORA" merge --base "$W/sharded" --adapter "$W/a-head" --out "$W/m-sharded"
got=$("$PY" -c '
import json, sys
j = json.load(open(sys.argv[1] + "/model.safetensors.index.json"))
print(j["weight_map"]["lm_head.weight"], j["metadata"]["total_size"])' "$W/m-sharded")
expect_eq "sharded: lm_head in the embedding's shard, total_size" "$got" "model-00002-of-00002.safetensors 17600"
expect_eq "sharded: tie_word_embeddings" "$(config m-sharded 'c["tie_word_embeddings"]')" False
expect_exit 0 "$LORA" verify --base "$W/sharded" --adapter "$W/a-head" --merged "$W/m-sharded"

# BF16 tied base: the head in BF16 (the embedding's dtype), within 1 ulp
expect_exit 0 "$LORA" merge --base "$W/tied-bf16" --adapter "$W/a-head-bf16" --out "$W/m-bf16"
check tied-bf16 a-head-bf16 m-bf16
expect_exit 0 "$LORA" verify --base "$W/tied-bf16" --adapter "$W/a-head-bf16" --merged "$W/m-bf16"

# modules_to_save lm_head on a tied base: the saved tensor becomes the head
expect_exit 0 "$LORA" merge --base "$W/tied-f32" --adapter "$W/a-save-head" --out "$W/m-save"
expect_stdout_contains "added tensors: lm_head.weight"
check tied-f32 a-save-head m-save
expect_eq "tie_word_embeddings (saved head)" "$(config m-save 'c["tie_word_embeddings"]')" False
expect_exit 0 "$LORA" verify --base "$W/tied-f32" --adapter "$W/a-save-head" --merged "$W/m-save"

# a base that stores both tensors: merged as usual, config.json copied as it is
expect_exit 0 "$LORA" merge --base "$W/untied-f32" --adapter "$W/a-head" --out "$W/m-untied"
check untied-f32 a-head m-untied
expect_eq "untied config.json unchanged" "$(cmp -s "$W/untied-f32/config.json" "$W/m-untied/config.json" && echo same)" same
expect_exit 0 "$LORA" verify --base "$W/untied-f32" --adapter "$W/a-head" --merged "$W/m-untied"

# --- 2. new heads: score.weight (SEQ_CLS), classifier.weight / .bias are added
expect_exit 0 "$LORA" merge --base "$W/tied-f32" --adapter "$W/a-seqcls" --out "$W/m-seqcls"
expect_stdout_contains "added tensors: score.weight"
check tied-f32 a-seqcls m-seqcls
expect_eq "seqcls config.json unchanged" "$(cmp -s "$W/tied-f32/config.json" "$W/m-seqcls/config.json" && echo same)" same
expect_exit 0 "$LORA" verify --base "$W/tied-f32" --adapter "$W/a-seqcls" --merged "$W/m-seqcls"
expect_exit 0 "$LORA" merge --base "$W/untied-f32" --adapter "$W/a-classifier" --out "$W/m-cls"
expect_stdout_contains "added tensors: classifier.bias, classifier.weight"
check untied-f32 a-classifier m-cls
expect_exit 0 "$LORA" verify --base "$W/untied-f32" --adapter "$W/a-classifier" --merged "$W/m-cls"

# --- 3. added tokens: saved embed_tokens / lm_head with 4 more rows replace the base's; vocab_size follows
expect_exit 0 "$LORA" merge --base "$W/untied-f32" --adapter "$W/a-tokens" --out "$W/m-tokens"
expect_stdout_contains "config.json: vocab_size: 68"
check untied-f32 a-tokens m-tokens
expect_eq "vocab_size" "$(config m-tokens 'c["vocab_size"]')" 68
expect_eq "config keys kept in order (tokens)" "$(keys m-tokens)" "$(keys untied-f32)"
expect_exit 0 "$LORA" verify --base "$W/untied-f32" --adapter "$W/a-tokens" --merged "$W/m-tokens"
expect_exit 0 "$LORA" merge --base "$W/tied-f32" --adapter "$W/a-tokens-tied" --out "$W/m-tokens-tied"
check tied-f32 a-tokens-tied m-tokens-tied
expect_eq "vocab_size (tied)" "$(config m-tokens-tied 'c["vocab_size"]')" 68
expect_eq "still tied" "$(config m-tokens-tied 'c["tie_word_embeddings"]')" True

# --- refusals: another column count, a non-embedding with more rows, fewer rows
for bad in bad-cols bad-rows bad-fewer; do
  expect_exit 3 "$LORA" merge --base "$W/tied-f32" --adapter "$W/$bad" --out "$W/m-$bad"
  expect_stderr_contains "does not fit"
  expect_one_line_error
  expect_nothing_left "m-$bad"
done
expect_exit 3 "$LORA" merge --base "$W/tied-f32" --adapter "$W/bad-cols" --out "$W/m-bad-cols"
expect_stderr_contains "base model.embed_tokens.weight is [64, 16], the saved module is [64, 20]"
expect_exit 3 "$LORA" merge --base "$W/tied-f32" --adapter "$W/bad-rows" --out "$W/m-bad-rows"
expect_stderr_contains "base model.layers.0.self_attn.q_proj.weight is [16, 16], the saved module is [20, 16]"

# --- 4. --out NAME.safetensors for a single-file base: that one file, missing parents created
mkdir -p "$W/bare"
cp "$W/tied-f32/model.safetensors" "$W/bare/base.safetensors"
expect_exit 0 "$LORA" merge --base "$W/bare/base.safetensors" --adapter "$W/a-seqcls" --out "$W/new/deep/out.safetensors"
expect_eq "a file" "$([ -f "$W/new/deep/out.safetensors" ] && echo file)" file
expect_eq "nothing else" "$(ls -A "$W/new/deep")" out.safetensors
check bare/base.safetensors a-seqcls new/deep/out.safetensors
# the same into a folder name keeps a folder
expect_exit 0 "$LORA" merge --base "$W/bare/base.safetensors" --adapter "$W/a-seqcls" --out "$W/new/folder"
expect_eq "a folder" "$(ls "$W/new/folder")" base.safetensors
# --force replaces the file
expect_exit 2 "$LORA" merge --base "$W/bare/base.safetensors" --adapter "$W/a-seqcls" --out "$W/new/deep/out.safetensors"
expect_exit 0 "$LORA" merge --base "$W/bare/base.safetensors" --adapter "$W/a-seqcls" --out "$W/new/deep/out.safetensors" --force
expect_eq "only the file" "$(ls -A "$W/new/deep")" out.safetensors
# a tied head needs config.json changed: one file cannot hold it
expect_exit 2 "$LORA" merge --base "$W/bare/base.safetensors" --adapter "$W/a-head" --out "$W/gone/x.safetensors"
expect_stderr_contains "needs its config.json changed (tie_word_embeddings: false); give --out a folder"
expect_one_line_error
expect_nothing_left gone
# a failure while writing removes the parent folders it created
expect_exit 3 "$LORA" merge --base "$W/bare/base.safetensors" --adapter "$W/a-inf" --out "$W/p1/p2/x.safetensors"
expect_stderr_contains "NaN or infinite"
expect_nothing_left p1

finish
