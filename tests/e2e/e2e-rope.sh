#!/usr/bin/env bash
# lora forward with scaled rotary embeddings (every rope_type, 4.x rope_scaling
# and 5.x rope_parameters, nested per layer type) and sliding-window attention
# (mistral, qwen2), on testdata weights under edited config.json files; logits
# within 1e-4 relative (max|got - ref| <= 1e-4 max|ref|) of the float64 numpy
# reference tests/reference/rope_reference.py, and different from the plain
# model's where the setting should matter. lora verify on a Llama 3.1-style config.
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
TD="$SRC/testdata"
T=1,17,42,255,0,128,7,99,3,200,64,5
REF="$SRC/tests/reference/rope_reference.py"

# make_model NAME BASE JSON_CHANGES: $E2E_TMP/NAME = BASE's weights + BASE's config.json updated by JSON_CHANGES
# (keys mapped to null are removed), written as save_pretrained writes it (indent 2, sorted keys)
make_model() {
  mkdir -p "$E2E_TMP/$1"
  cp "$TD/$2/model.safetensors" "$E2E_TMP/$1/model.safetensors"
  "$PY" - "$TD/$2/config.json" "$3" "$E2E_TMP/$1/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
for k, v in json.loads(sys.argv[2]).items():
    if v is None: c.pop(k, None)
    else: c[k] = v
open(sys.argv[3], "w").write(json.dumps(c, indent=2, sort_keys=True) + "\n")
PY
}

# check NAME [PLAIN_LOGITS]: lora forward on NAME matches the reference (and differs from PLAIN_LOGITS)
check() {
  expect_exit 0 "$LORA" forward --model "$E2E_TMP/$1" --tokens $T --out "$E2E_TMP/$1.logits.safetensors" --threads 1
  local got
  if [ -n "$2" ]; then
    got=$("$PY" "$REF" compare "$E2E_TMP/$1" "$E2E_TMP/$1.logits.safetensors" $T --min-diff "$2")
  else
    got=$("$PY" "$REF" compare "$E2E_TMP/$1" "$E2E_TMP/$1.logits.safetensors" $T)
  fi
  echo "$1: $got"; expect_eq "$1 logits vs float64 reference ($got)" "${got%% *}" ok
}

make_model plain tiny-llama '{}'
check plain
PLAIN="$E2E_TMP/plain.logits.safetensors"

make_model v5-theta tiny-llama '{"rope_theta": null, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}'
check v5-theta "$PLAIN"
make_model linear tiny-llama '{"rope_scaling": {"factor": 4.0, "type": "linear"}}'
check linear "$PLAIN"
make_model dynamic tiny-llama '{"max_position_embeddings": 8, "rope_scaling": {"factor": 2.0, "rope_type": "dynamic"}}'
check dynamic "$PLAIN"
make_model llama3 tiny-llama '{"rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 64, "rope_type": "llama3"}}'
check llama3 "$PLAIN"
# Llama 3.1's own values (original 8192): runs, matches (the effect on 12 positions is tiny)
make_model llama31 tiny-llama '{"max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}}'
check llama31
make_model yarn tiny-llama '{"rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32, "rope_type": "yarn"}}'
check yarn "$PLAIN"
make_model yarn-v5 tiny-llama '{"rope_theta": null, "rope_parameters": {"beta_fast": 16.0, "factor": 3.0, "mscale": 0.707, "mscale_all_dim": 1.0, "original_max_position_embeddings": 64, "rope_theta": 20000.0, "rope_type": "yarn", "truncate": false}}'
check yarn-v5 "$PLAIN"
make_model longrope tiny-llama '{"original_max_position_embeddings": 8, "rope_scaling": {"long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0], "rope_type": "longrope", "short_factor": [1.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]}}'
check longrope "$PLAIN"
make_model nested tiny-llama '{"layer_types": ["full_attention", "sliding_attention"], "rope_theta": null, "rope_parameters": {"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"}, "sliding_attention": {"factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0, "rope_type": "yarn"}}}'
check nested "$PLAIN"

# sliding windows shorter than the sequence
make_model mistral tiny-llama '{"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 4}'
check mistral "$PLAIN"
make_model qwen2-full tiny-qwen2 '{}'
check qwen2-full
make_model qwen2-swa tiny-qwen2 '{"max_window_layers": 1, "sliding_window": 3, "use_sliding_window": true}'
check qwen2-swa "$E2E_TMP/qwen2-full.logits.safetensors"

# an unknown rope_type is refused by name, nothing written
make_model unknown tiny-llama '{"rope_scaling": {"factor": 2.0, "rope_type": "su"}}'
expect_exit 3 "$LORA" forward --model "$E2E_TMP/unknown" --tokens $T --out "$E2E_TMP/bad.safetensors"
expect_stderr_contains "config.json: field rope_scaling.rope_type su is not supported"
expect_one_line_error
if ls "$E2E_TMP"/bad.safetensors* >/dev/null 2>&1; then fail "a refused run left output behind"; else pass; fi

# lora verify on a Llama 3.1-style model runs its weight and model levels
expect_exit 0 "$LORA" merge --base "$E2E_TMP/llama31" --adapter "$TD/lora-tiny-llama" --out "$E2E_TMP/llama31-merged" --dtype f32 --quiet
[ -f "$E2E_TMP/llama31-merged/config.json" ] || cp "$E2E_TMP/llama31/config.json" "$E2E_TMP/llama31-merged/"
expect_exit 0 "$LORA" verify --base "$E2E_TMP/llama31" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/llama31-merged" --json --tokens $T
expect_json 'j["equivalent"] and j["model"]["ok"]' true
expect_exit 3 "$LORA" verify --base "$E2E_TMP/unknown" --adapter "$TD/lora-tiny-llama" --merged "$E2E_TMP/llama31-merged"
expect_stderr_contains "rope_type su"
finish
