# End-to-end tests of `lora merge`: merged folders (single file, sharded,
# --dtype, kohya conv, two adapters, bare .safetensors base) cross-checked by
# an independent numpy reading; every refusal with its exit code and one-line
# message; atomicity (nothing left after any failure, including a write that
# hits the file size limit); --dry-run writes nothing; --force replaces.
# Usage: bash tests/e2e/e2e-merge.sh PATH-TO-LORA SOURCE-DIR
set -u
LORA=${1:?usage: e2e-merge.sh PATH-TO-LORA SOURCE-DIR}
SRC=${2:?usage: e2e-merge.sh PATH-TO-LORA SOURCE-DIR}
if [ ! -x /usr/bin/python3 ] || ! /usr/bin/python3 -c 'import numpy' 2>/dev/null; then
  echo "SKIP: /usr/bin/python3 with numpy is needed to check merged values"
  exit 77
fi
. "$SRC/tests/e2e/lib.sh"
TD=$SRC/testdata
W=$E2E_TMP/work
mkdir -p "$W"

# Independent check of a merged PEFT-adapter model (numpy, float64):
# merged tensors within one unit in the last place of W0 + sum_k w_k s_k B_k A_k
# (F32: within 1e-6 relative to |W0| + sum |terms|)
# (linear and conv on the [out, -1] view), every other tensor byte-identical
# (or equal in value when --dtype changed it). Args: BASE OUT SCALE ADAPTER:WEIGHT...
# Prints "ok" or what differs.
check_merge() {
  E2E_LIB="$SRC/tests/e2e" "$PY" - "$@" <<'EOF'
import json, os, struct, sys
import numpy as np

sys.path.insert(0, os.environ["E2E_LIB"])
import safetensors_np

def read(path):
    return safetensors_np.read(path)[0]

def model(path):
    if path.endswith(".safetensors"):
        return read(path)
    idx = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(read(os.path.join(path, f)))
    return out

def ulp(x, dt):
    mant, emin = {"BF16": (7, -126), "F16": (10, -14), "F32": (23, -126)}[dt]
    e = np.maximum(np.floor(np.log2(np.maximum(np.abs(x), 1e-300))), emin)
    return np.exp2(e - mant)

base_path, out_path, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
base, out = model(base_path), model(out_path)
want, mag = {}, {}
for spec in sys.argv[4:]:
    path, weight = spec.rsplit(":", 1)
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    s = cfg["lora_alpha"] / cfg["r"] * float(weight) * scale
    ad = read(os.path.join(path, "adapter_model.safetensors"))
    for name in ad:
        if not name.endswith(".lora_A.weight"):
            continue
        target = name[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
        A, B = ad[name][3], ad[name.replace("lora_A", "lora_B")][3]
        r = A.shape[0]
        w = want.setdefault(target, base[target][3].copy())
        w += s * (B.reshape(B.shape[0], r) @ A.reshape(r, -1)).reshape(w.shape)
        m = mag.setdefault(target, np.abs(base[target][3]))
        m += abs(s) * (np.abs(B.reshape(B.shape[0], r)) @ np.abs(A.reshape(r, -1))).reshape(w.shape)
problems = []
if sorted(base) != sorted(out):
    problems.append("tensor names differ")
for name, (dt, shape, raw, v) in out.items():
    bdt, bshape, braw, bv = base[name]
    if shape != bshape:
        problems.append("%s: shape %s != %s" % (name, shape, bshape))
    if name in want:
        if dt == "F32":  # within 1e-6 relative to |W0| + sum |terms|
            err = np.abs(v - want[name]) / np.maximum(mag[name], 1e-30)
            if err.max() > 1e-6:
                problems.append("%s: %.3g relative error" % (name, err.max()))
        else:  # within one unit in the last place
            err = np.abs(v - want[name]) / ulp(want[name], dt)
            if err.max() > 1.0:
                problems.append("%s: %.3g ulp off" % (name, err.max()))
    elif dt == bdt and raw != braw:
        problems.append("%s: untouched tensor changed" % name)
    elif dt != bdt and np.abs(v - bv).max() > 0.5 * ulp(bv, dt).max():
        problems.append("%s: converted values differ" % name)
if not want:
    problems.append("nothing merged")
print("ok" if not problems else "; ".join(problems[:5]))
EOF
}

expect_check() {
  local got
  got=$(check_merge "$@")
  expect_eq "merged values ($*)" "$got" ok
}

# ---------------------------------------------------------------- success

expect_exit 0 "$LORA" merge --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --out "$W/m1"
expect_stdout_contains "merged 14 LoRA modules from 1 adapter"
expect_stdout_contains "14 merged, 0 replaced, 0 converted, 7 copied"
expect_stdout_contains "GB/s"
expect_eq "stderr when not a terminal" "$ERR" ""
expect_check "$TD/tiny-llama" "$W/m1" 1 "$TD/lora-tiny-llama:1"
expect_eq "config.json copied" "$(cmp "$TD/tiny-llama/config.json" "$W/m1/config.json" && echo same)" same
expect_eq "generation_config.json copied" "$(cmp "$TD/tiny-llama/generation_config.json" "$W/m1/generation_config.json" && echo same)" same
expect_eq "output files" "$(cd "$W/m1" && ls | tr '\n' ' ')" "config.json generation_config.json model.safetensors "

# sharded F16: same shard names, a fresh index naming every tensor
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama-f16-sharded" --adapter "$TD/lora-tiny-llama" --out "$W/m2" --threads 1
expect_check "$TD/tiny-llama-f16-sharded" "$W/m2" 1 "$TD/lora-tiny-llama:1"
expect_eq "shards" "$(cd "$W/m2" && ls *.safetensors | tr '\n' ' ')" "$(cd "$TD/tiny-llama-f16-sharded" && ls *.safetensors | tr '\n' ' ')"
expect_eq "index" "$(cmp "$TD/tiny-llama-f16-sharded/model.safetensors.index.json" "$W/m2/model.safetensors.index.json" && echo same)" same

# --dtype f32 from BF16, --scale, two adapters with weights
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --weight 0.5 \
  --adapter "$TD/lora-tiny-llama" --weight -0.25 --out "$W/m3" --dtype f32 --scale 3 --quiet
expect_eq "--quiet prints nothing" "$OUT$ERR" ""
expect_check "$TD/tiny-llama" "$W/m3" 3 "$TD/lora-tiny-llama:0.5" "$TD/lora-tiny-llama:-0.25"

# kohya file: the same tensors as the PEFT folder with the same A, B
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama-kohya.safetensors" --out "$W/m4"
expect_eq "kohya == peft" "$("$PY" -c '
import json, struct, sys
def body(p):
    d = open(p, "rb").read(); n = struct.unpack("<Q", d[:8])[0]; h = json.loads(d[8:8 + n]); h.pop("__metadata__")
    return h, d[8 + n:]
print("same" if body(sys.argv[1]) == body(sys.argv[2]) else "differ")' "$W/m1/model.safetensors" "$W/m4/model.safetensors")" same

# kohya UNet (3x3 and 1x1 conv, linear) and a bare .safetensors base
expect_exit 0 "$LORA" merge --base "$TD/tiny-unet/model.safetensors" --adapter "$TD/lora-tiny-unet-kohya.safetensors" --out "$W/m5"
expect_eq "bare base output" "$(cd "$W/m5" && ls | tr '\n' ' ')" "config.json model.safetensors "

# metadata: the base's kept, provenance added
expect_eq "metadata" "$("$PY" -c '
import json, struct, sys
d = open(sys.argv[1], "rb").read(); n = struct.unpack("<Q", d[:8])[0]; m = json.loads(d[8:8 + n])["__metadata__"]
print(m["format"], m["lora.adapters"], m["lora.scale"], m["lora.adapter.0.weight"], m["lora.adapter.1.weight"], m["lora.tool"].split()[0])' "$W/m3/model.safetensors")" "pt 2 3 0.5 -0.25 lora"

# --dry-run writes nothing; --force replaces
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --out "$W/dry" --dry-run
expect_stdout_contains "nothing written"
expect_nothing_left dry
mkdir -p "$W/old" && echo old >"$W/old/stale.txt"
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --out "$W/old" --dry-run --force
expect_eq "dry run keeps the old output" "$(ls "$W/old")" stale.txt
expect_exit 2 "$LORA" merge --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --out "$W/old"
expect_stderr_contains "already exists (--force replaces it)"
expect_one_line_error
expect_eq "refused output untouched" "$(ls "$W/old")" stale.txt
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --out "$W/old/" --force
expect_eq "--force replaced" "$(ls "$W/old" | tr '\n' ' ')" "config.json generation_config.json model.safetensors "
expect_eq "no temp or old copy beside" "$(cd "$W" && ls -d old* | tr '\n' ' ')" "old "

# ---------------------------------------------------------------- refusals

refuse() {  # refuse CODE TEXT ARGS...: exit code, one-line message, nothing left
  local code=$1 text=$2
  shift 2
  expect_exit "$code" "$LORA" merge "$@" --out "$W/bad"
  expect_stderr_contains "lora merge: error: "
  expect_stderr_contains "$text"
  expect_one_line_error
  expect_nothing_left bad
}
refuse 3 "does the adapter belong to this base model?" --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama-mismatch"
refuse 3 "q_proj.lora_A.weight" --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama-mismatch"
refuse 3 "does the adapter belong to this base model?" --base "$TD/tiny-unet" --adapter "$TD/lora-tiny-llama"
refuse 3 "lora_A without its lora_B" --base "$TD/tiny-llama" --adapter "$TD/malformed/lora-missing-b"
refuse 3 "truncated" --base "$TD/malformed/truncated.safetensors" --adapter "$TD/lora-tiny-llama"
refuse 4 "no such file" --base "$TD/tiny-llama" --adapter "$W/no-such-adapter"
refuse 2 "give one per adapter" --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --weight 1 --weight 2
refuse 2 "--dtype" --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --dtype f8
refuse 2 "--adapter is required" --base "$TD/tiny-llama"
expect_exit 2 "$LORA" merge --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama"
expect_stderr_contains "--out is required"
cp -r "$TD/tiny-llama" "$W/base-copy"
expect_exit 2 "$LORA" merge --base "$W/base-copy" --adapter "$TD/lora-tiny-llama" --out "$W/base-copy" --force
expect_stderr_contains "would replace the base model"
expect_eq "base untouched" "$(cmp "$TD/tiny-llama/model.safetensors" "$W/base-copy/model.safetensors" && echo same)" same

# a merge that overflows: exit 3 naming the tensor; --allow-nonfinite writes it
mkdir -p "$W/huge"
E2E_LIB="$SRC/tests/e2e" "$PY" - "$W/huge" <<'EOF'
import json, os, sys
import numpy as np
sys.path.insert(0, os.environ["E2E_LIB"])
import safetensors_np
d = sys.argv[1]
json.dump({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"]}, open(d + "/adapter_config.json", "w"))
t = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.full((1, 64), 1e30, np.float32),
     "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.full((64, 1), 1e30, np.float32)}
safetensors_np.write(d + "/adapter_model.safetensors", t)
EOF
refuse 3 "model.layers.0.self_attn.q_proj.weight: the merge produced 4096 NaN or infinite values" --base "$TD/tiny-llama" --adapter "$W/huge"
expect_stderr_contains "--allow-nonfinite"
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama" --adapter "$W/huge" --out "$W/inf" --allow-nonfinite

# durability: no fsync by default (like cp and PyTorch's save); --sync syncs
# every file written and both folders; the bytes are the same either way
if strace -f -qq -o /dev/null true 2>/dev/null; then
  sync_calls() {  # CMD...: how many fsync / fdatasync / sync_file_range calls it made
    strace -f -qq -e trace=fsync,fdatasync,sync_file_range -o "$W/strace.log" "$@" >/dev/null 2>&1
    grep -c -E '(fsync|fdatasync|sync_file_range)\(' "$W/strace.log"
  }
  n=$(sync_calls "$LORA" merge --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --out "$W/unsynced")
  expect_eq "sync calls without --sync" "$n" 0
  n=$(sync_calls "$LORA" merge --base "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --out "$W/synced" --sync)
  # 2 config files, model.safetensors, the temp folder, the parent folder
  if [ "$n" -ge 5 ]; then pass; else fail "--sync made $n sync calls, expected at least 5"; fi
  expect_eq "--sync writes the same files" "$(diff -r "$W/unsynced" "$W/synced" && echo same)" same
else
  echo "SKIP: strace cannot trace here, the --sync checks did not run" >&2
fi

# interrupted (SIGINT, SIGTERM) while writing: exit 130, one line, nothing left.
# A merge slow enough to be caught mid-way: one 4096 x 4096 BF16 weight and a
# rank-1024 adapter on it (34 GFLOP, about a second on one thread)
"$PY" "$SRC/tests/e2e/make_inputs.py" slow-merge "$W/slow-base" "$W/slow-lora"
interrupt_merge() {  # SIGNAL NAME: starts the slow merge, signals it once its temp folder exists
  LAST_CMD="lora merge (slow) interrupted by SIG$1"
  "$LORA" merge --base "$W/slow-base" --adapter "$W/slow-lora" --out "$W/$2" --threads 1 --quiet \
    >"$OUT_FILE" 2>"$ERR_FILE" &
  local pid=$! i
  for i in $(seq 1000); do
    compgen -G "$W/$2.tmp-*" >/dev/null && break
    sleep 0.01
  done
  kill "-$1" "$pid"
  wait "$pid"
  CODE=$?
  ERR=$(cat "$ERR_FILE")
}
interrupt_merge INT int
expect_eq "exit code after SIGINT" "$CODE" 130
expect_stderr_contains "lora merge: error: interrupted by SIGINT; nothing was left behind"
expect_one_line_error
expect_nothing_left int
interrupt_merge TERM term
expect_eq "exit code after SIGTERM" "$CODE" 130
expect_stderr_contains "interrupted by SIGTERM"
expect_nothing_left term
# the same merge left alone completes
expect_exit 0 "$LORA" merge --base "$W/slow-base" --adapter "$W/slow-lora" --out "$W/slow-done" --quiet

# disk full: the file size limit (SIGXFSZ ignored so write() fails with EFBIG)
expect_exit 4 bash -c "trap '' XFSZ; ulimit -f 100; exec \"\$0\" merge --base \"\$1\" --adapter \"\$2\" --out \"\$3\"" \
  "$LORA" "$TD/tiny-llama" "$TD/lora-tiny-llama" "$W/bad"
expect_stderr_contains "File too large"
expect_one_line_error
expect_nothing_left bad
# NaN in one adapter factor: --dry-run refuses it with the real merge's exit
# code and message (the factor scan is part of the checks), nothing written
cp -r "$TD/lora-tiny-llama" "$W/nan"
"$PY" "$SRC/tests/e2e/make_inputs.py" nan-factor "$W/nan/adapter_model.safetensors"
NAN_MSG="nan/adapter_model.safetensors: base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight: 1 of its 256 values are NaN or infinite (module model.layers.0.self_attn.q_proj)"
expect_exit 3 "$LORA" merge --base "$TD/tiny-llama" --adapter "$W/nan" --out "$W/nan-m" --dry-run
expect_stderr_contains "$NAN_MSG"
expect_one_line_error
dry_err=$ERR
expect_nothing_left nan-m
expect_exit 3 "$LORA" merge --base "$TD/tiny-llama" --adapter "$W/nan" --out "$W/nan-m"
expect_eq "dry run and merge refuse alike" "${ERR/--dry-run/}" "$dry_err"
expect_nothing_left nan-m
finish
