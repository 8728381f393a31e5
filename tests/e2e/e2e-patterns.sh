# End-to-end tests of rank_pattern / alpha_pattern keys and --targets regexes
# (core/module-pattern, RE2): keys that made std::regex backtrack for minutes
# ((a+)+b, (.+)+z) or overflow its stack (a 50,000-character module path)
# answer at once; keys RE2 cannot compile (backreference, lookaround) are
# refused in one line naming adapter_config.json and the key, inputs intact.
# Every command runs under `timeout -k 5 20` (the old build ignored SIGTERM
# while matching): exit 124/137 means it hung.
# Usage: bash tests/e2e/e2e-patterns.sh PATH-TO-LORA SOURCE-DIR
set -u
LORA=${1:?usage: e2e-patterns.sh PATH-TO-LORA SOURCE-DIR}
SRC=${2:?usage: e2e-patterns.sh PATH-TO-LORA SOURCE-DIR}
if [ ! -x /usr/bin/python3 ] || ! /usr/bin/python3 -c 'import numpy' 2>/dev/null; then
  echo "SKIP: /usr/bin/python3 with numpy is needed"
  exit 77
fi
. "$SRC/tests/e2e/lib.sh"
TD=$SRC/testdata
BASE=$TD/tiny-llama
W=$E2E_TMP/w
mkdir -p "$W"
T="timeout -k 5 20"

# patterns_adapter NAME PYTHON-EXPR: a copy of testdata/lora-tiny-llama-patterns
# whose config c is changed by PYTHON-EXPR (e.g. c["rank_pattern"] = {...})
patterns_adapter() {
  cp -r "$TD/lora-tiny-llama-patterns" "$W/$1"
  "$PY" -c '
import json, sys
p = sys.argv[1] + "/adapter_config.json"
c = json.load(open(p))
exec(sys.argv[2])
json.dump(c, open(p, "w"), indent=2)
' "$W/$1" "$2"
}

# rank, alpha and scale of every module in the last `inspect --json`
modules_of_last() { json_query '[[m["name"], m["rank"], m["alpha"], m["scale"]] for m in j["modules"]]'; }

expect_exit 0 "$LORA" inspect "$TD/lora-tiny-llama-patterns" --json
want_modules=$(modules_of_last)

# --- catastrophic-backtracking keys first in rank_pattern / alpha_pattern: same modules, at once
patterns_adapter evil 'c["rank_pattern"] = {"(a+)+b": 16, "(.+)+z": 16, **c["rank_pattern"]}
c["alpha_pattern"] = {"(x+x+)+y": 1, **c["alpha_pattern"]}'
start=$(date +%s%N)
expect_exit 0 $T "$LORA" inspect "$W/evil" --json
expect_eq "modules with (a+)+b and (.+)+z keys" "$(modules_of_last)" "$want_modules"
expect_exit 0 $T "$LORA" inspect "$W/evil"
expect_stdout_contains "rank_pattern: (a+)+b -> 16"
expect_exit 0 $T "$LORA" merge --base "$BASE" --adapter "$W/evil" --out "$W/evil-merged" --dry-run
expect_stdout_contains "14 LoRA modules"
expect_eq "stderr of merge --dry-run" "$ERR" ""
expect_nothing_left evil-merged
ms=$((($(date +%s%N) - start) / 1000000))
echo "inspect x2 + merge --dry-run with (a+)+b, (.+)+z keys: $ms ms"
if [ "$ms" -lt 10000 ]; then pass; else fail "took $ms ms"; fi

# a real merge with those keys writes the same tensors as with the plain config
# (the metadata differs: it records the adapter's path)
expect_exit 0 $T "$LORA" merge --base "$BASE" --adapter "$W/evil" --out "$W/evil-out"
expect_exit 0 $T "$LORA" merge --base "$BASE" --adapter "$TD/lora-tiny-llama-patterns" --out "$W/plain-out"
same=$("$PY" -c '
import sys
sys.path.insert(0, sys.argv[3])
import safetensors_np
a, _ = safetensors_np.read(sys.argv[1] + "/model.safetensors")
b, _ = safetensors_np.read(sys.argv[2] + "/model.safetensors")
print("same" if a.keys() == b.keys() and all(a[k][:3] == b[k][:3] for k in a) else "differ")
' "$W/evil-out" "$W/plain-out" "$SRC/tests/e2e")
expect_eq "merged tensors with and without the extra keys" "$same" same

# --- a 50,000-character key in rank_pattern (matches nothing)
patterns_adapter longkey 'c["rank_pattern"] = {"x" * 50000: 16, **c["rank_pattern"]}'
expect_exit 0 $T "$LORA" inspect "$W/longkey" --json
expect_eq "modules with a 50,000-character key" "$(modules_of_last)" "$want_modules"
expect_exit 0 $T "$LORA" merge --base "$BASE" --adapter "$W/longkey" --out "$W/longkey-merged" --dry-run
expect_nothing_left longkey-merged

# --- a module path of 50,000 characters, with rank_pattern keys that reach its end
mkdir -p "$W/longpath"
"$PY" - "$W/longpath" "$SRC/tests/e2e" <<'EOF'
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import safetensors_np
out = sys.argv[1]
path = "model." + "".join("layer%d." % (i % 10) for i in range(7200)) + "self_attn.q_proj"
assert len(path) >= 50000, len(path)
rng = np.random.default_rng(7)
pre = "base_model.model." + path
safetensors_np.write(out + "/adapter_model.safetensors", {
    pre + ".lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
    pre + ".lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32)})
config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
          "rank_pattern": {"(a+)+b": 16, "(.+)+z": 16, "self_attn\\.q_proj": 2}, "alpha_pattern": {"q_proj": 6}}
json.dump(config, open(out + "/adapter_config.json", "w"))
open(out + "/module-path", "w").write(path)
EOF
long_path=$(cat "$W/longpath/module-path")
rm "$W/longpath/module-path"
expect_exit 0 $T "$LORA" inspect "$W/longpath" --json
expect_json '[(len(m["name"]), m["rank"], m["alpha"], m["scale"]) for m in j["modules"]]' "[[${#long_path},2,6.0,3.0]]"
# the module is not in tiny-llama: refused by name (exit 3), nothing written
expect_exit 3 $T "$LORA" merge --base "$BASE" --adapter "$W/longpath" --out "$W/longpath-merged" --dry-run
expect_one_line_error
expect_stderr_contains "lora merge: error: "
expect_stderr_contains "self_attn.q_proj"
expect_nothing_left longpath-merged

# --- keys RE2 cannot compile: exit 3, one line naming the config and the key, inputs intact
patterns_adapter backref 'c["rank_pattern"] = {**c["rank_pattern"], "(q)_\\1": 4}'
sum_before=$(cd "$W/backref" && cat adapter_config.json adapter_model.safetensors | md5sum)
for cmd in "inspect $W/backref" "merge --base $BASE --adapter $W/backref --out $W/backref-merged"; do
  expect_exit 3 $T "$LORA" $cmd
  expect_one_line_error
  expect_eq "backreference refusal (${cmd%% *})" "$ERR" \
    "lora ${cmd%% *}: error: $W/backref/adapter_config.json: rank_pattern.(q)_\\1: not a valid regular expression: invalid escape sequence: \\1 (a backreference is not supported: patterns are matched by RE2, in linear time)"
done
expect_nothing_left backref-merged
expect_eq "backref adapter intact" "$(cd "$W/backref" && cat adapter_config.json adapter_model.safetensors | md5sum)" "$sum_before"

patterns_adapter lookahead 'c["alpha_pattern"] = {"q_proj(?!x)": 4}'
expect_exit 3 $T "$LORA" merge --base "$BASE" --adapter "$W/lookahead" --out "$W/lookahead-merged" --dry-run
expect_one_line_error
expect_stderr_contains "$W/lookahead/adapter_config.json: alpha_pattern.q_proj(?!x): not a valid regular expression: invalid perl operator: (?! (a lookahead is not supported"
expect_nothing_left lookahead-merged

# --- extract --targets: catastrophic regexes answer at once, unsupported ones are usage errors
"$PY" "$SRC/tests/e2e/make-extract-models.py" "$BASE" "$W/m" >/dev/null || fail "make-extract-models.py failed"
TUNED=$W/m/tuned
expect_exit 3 $T "$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$W/x1" --rank 4 --targets '(a+)+b'
expect_one_line_error
expect_stderr_contains "no selected 2-D weight differs from the base"
expect_nothing_left x1
expect_exit 0 $T "$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$W/x2" --rank 4 --targets '(a+)+b|(.+)+z|q_proj' --json
expect_exit 0 "$LORA" inspect "$W/x2" --json
expect_json '[m["name"] for m in j["modules"]]' '["model.layers.0.self_attn.q_proj","model.layers.1.self_attn.q_proj"]'
expect_exit 2 $T "$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$W/x3" --rank 4 --targets '(?<=attn\.)q_proj'
expect_one_line_error
expect_stderr_contains "lora extract: error: --targets '(?<=attn\\.)q_proj' is not a valid regex: invalid perl operator: (?< (a lookbehind is not supported"
expect_nothing_left x3

finish
