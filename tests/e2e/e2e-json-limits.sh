# End-to-end tests of the JSON nesting limit: an adapter_config.json, a base
# config.json or a shard index nested 100,000 levels deep is refused with
# exit 3 and one line naming the file (it used to overflow the stack in
# json::dump: SIGSEGV), the inputs stay intact and nothing is left beside --out.
# Usage: bash tests/e2e/e2e-json-limits.sh PATH-TO-LORA SOURCE-DIR
set -u
LORA=${1:?usage: e2e-json-limits.sh PATH-TO-LORA SOURCE-DIR}
SRC=${2:?usage: e2e-json-limits.sh PATH-TO-LORA SOURCE-DIR}
if [ ! -x /usr/bin/python3 ]; then
  echo "SKIP: /usr/bin/python3 is needed to write the nested JSON"
  exit 77
fi
. "$SRC/tests/e2e/lib.sh"
TD=$SRC/testdata
W=$E2E_TMP/work
mkdir -p "$W"

# deep_json FILE HEAD TAIL: writes HEAD, 100,000 nested arrays, TAIL
deep_json() {
  "$PY" -c 'import sys; n = 100000; open(sys.argv[1], "w").write(sys.argv[2] + "[" * n + "]" * n + sys.argv[3])' "$@"
}
sums() { (cd "$W" && find . -type f | LC_ALL=C sort | xargs sha256sum); }
DEEPER="has JSON nested deeper than 64 levels"

# expect_deep_refusal "FILE: DOC" CMD...: exit 3, the one line
# "error: FILE: DOC has JSON nested deeper than 64 levels"
expect_deep_refusal() {
  local what=$1
  shift
  expect_exit 3 "$@"
  expect_one_line_error
  expect_stderr_contains "error: $what $DEEPER"
}

# an adapter whose adapter_config.json nests 100,000 levels (in lora_alpha: the
# refusal message used to show it; in an unknown field: inspect --json printed it)
cp -r "$TD/lora-tiny-llama" "$W/deep-alpha"
deep_json "$W/deep-alpha/adapter_config.json" '{"peft_type": "LORA", "r": 4, "lora_alpha": ' '}'
cp -r "$TD/lora-tiny-llama" "$W/deep-field"
deep_json "$W/deep-field/adapter_config.json" '{"peft_type": "LORA", "r": 4, "x": ' '}'
# a base model whose config.json does, and a sharded one whose index does
cp -r "$TD/tiny-llama" "$W/deep-config-base"
deep_json "$W/deep-config-base/config.json" '{"model_type": "llama", "x": ' '}'
cp -r "$TD/tiny-llama-f16-sharded" "$W/deep-index-base"
deep_json "$W/deep-index-base/model.safetensors.index.json" '' ''
before=$(sums)

for a in deep-alpha deep-field; do
  expect_deep_refusal "$W/$a/adapter_config.json: adapter config" "$LORA" inspect "$W/$a"
  expect_deep_refusal "$W/$a/adapter_config.json: adapter config" "$LORA" inspect --json "$W/$a"
  expect_deep_refusal "$W/$a/adapter_config.json: adapter config" \
    "$LORA" merge --base "$TD/tiny-llama" --adapter "$W/$a" --out "$W/merged" --dry-run
  expect_deep_refusal "$W/$a/adapter_config.json: adapter config" \
    "$LORA" merge --base "$TD/tiny-llama" --adapter "$W/$a" --out "$W/merged"
  expect_nothing_left merged
done

# the base's config.json is read to decide fan_in_fan_out (merge) and for inspect
expect_deep_refusal "$W/deep-config-base/config.json: config" \
  "$LORA" merge --base "$W/deep-config-base" --adapter "$TD/lora-tiny-llama" --out "$W/merged" --dry-run
expect_nothing_left merged
expect_deep_refusal "$W/deep-config-base/config.json: config" "$LORA" inspect "$W/deep-config-base"
expect_deep_refusal "$W/deep-index-base/model.safetensors.index.json: index" "$LORA" inspect "$W/deep-index-base"
expect_deep_refusal "$W/deep-index-base/model.safetensors.index.json: index" \
  "$LORA" merge --base "$W/deep-index-base" --adapter "$TD/lora-tiny-llama" --out "$W/merged"
expect_nothing_left merged

# the inputs are untouched
expect_eq "inputs after the refusals" "$(sums)" "$before"
finish
