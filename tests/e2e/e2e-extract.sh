#!/usr/bin/env bash
# End-to-end: lora extract on testdata/tiny-llama and tuned models generated
# here (tests/e2e/make-extract-models.py: base + rank-8 deltas + noise).
# usage: e2e-extract.sh LORA_BIN SOURCE_DIR   (exit 77: skipped)
set -u
LORA=$1
SRC=$2
PY=/usr/bin/python3
BASE=$SRC/testdata/tiny-llama
if [ ! -x "$PY" ] || ! "$PY" -c 'import numpy' 2>/dev/null; then echo "skip: /usr/bin/python3 with numpy needed"; exit 77; fi
if [ ! -f "$BASE/model.safetensors" ]; then echo "skip: $BASE missing"; exit 77; fi

T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fails=0
pass() { echo "ok: $1"; }
fail() { echo "FAIL: $1"; fails=$((fails + 1)); }

"$PY" "$SRC/tests/e2e/make-extract-models.py" "$BASE" "$T/m" || { echo "generator failed"; exit 1; }
TUNED=$T/m/tuned

# expect_error NAME WANT_RC WANT_TEXT OUT -- ARGS...: exit code, message, nothing left behind
expect_error() {
  local name=$1 want_rc=$2 want_text=$3 out=$4
  shift 5
  "$LORA" extract "$@" >"$T/stdout" 2>"$T/stderr"
  local rc=$?
  local msg
  msg=$(cat "$T/stderr")
  if [ "$rc" != "$want_rc" ]; then fail "$name: exit $rc, want $want_rc ($msg)"; return; fi
  if ! grep -qF -- "$want_text" "$T/stderr"; then fail "$name: message '$msg' lacks '$want_text'"; return; fi
  if [ "$(wc -l <"$T/stderr")" != 1 ]; then fail "$name: error is not one line"; return; fi
  if [ -n "$out" ] && ls -d "$out" "$out".tmp-* >/dev/null 2>&1; then fail "$name: output left behind"; return; fi
  pass "$name ($msg)"
}

# --- a plain extraction, report checked against a float64 recomputation
"$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$T/r8" --rank 8 --json >"$T/r8.json" 2>"$T/err" \
  && pass "extract --rank 8" || fail "extract --rank 8: $(cat "$T/err")"

cat >"$T/check.py" <<'EOF'
import json, struct, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from importlib.machinery import SourceFileLoader
gen = SourceFileLoader("gen", sys.argv[1] + "/make-extract-models.py").load_module()

def load(path):
    t, meta = gen.read(path)
    return {k: v[1].astype(np.float64) for k, v in t.items()}, t

def check_peft(base_dir, tuned_dir, out_dir, report_path, want_rank=None):
    base, _ = load(base_dir + "/model.safetensors")
    tuned, _ = load(tuned_dir + "/model.safetensors")
    ad, raw = load(out_dir + "/adapter_model.safetensors")
    cfg = json.load(open(out_dir + "/adapter_config.json"))
    rep = json.load(open(report_path))
    assert cfg["peft_type"] == "LORA"
    r = cfg["r"]
    assert cfg["lora_alpha"] == r, cfg
    assert rep["rank"] == r
    mods = {m["module"]: m for m in rep["modules"]}
    assert sorted(cfg["target_modules"]) == sorted(mods), (cfg["target_modules"], list(mods))
    total_d, total_res = 0.0, 0.0
    for p, m in mods.items():
        a = ad[f"base_model.model.{p}.lora_A.weight"]
        b = ad[f"base_model.model.{p}.lora_B.weight"]
        assert raw[f"base_model.model.{p}.lora_A.weight"][0] == "BF16"
        rank = a.shape[0]
        assert b.shape[1] == rank and rank == m["rank"]
        if want_rank is not None:
            assert rank == want_rank, (p, rank)
        # config: rank and alpha from r or the pattern (PEFT rule ^(.*\.)?(KEY)$)
        import re
        def lookup(pat, default):
            for k, v in pat.items():
                if re.match(rf"^(.*\.)?({k})$", p):
                    return v
            return default
        assert lookup(cfg["rank_pattern"], r) == rank, (p, rank, cfg["rank_pattern"])
        assert lookup(cfg["alpha_pattern"], cfg["lora_alpha"]) == rank, p
        d = tuned[p + ".weight"] - base[p + ".weight"]
        res = np.linalg.norm(d - b @ a)
        err = res / np.linalg.norm(d)
        assert abs(err - m["relative_error"]) <= 1e-4 * m["relative_error"] + 1e-7, (p, err, m["relative_error"])
        assert abs(np.linalg.norm(d) - m["delta_norm"]) <= 1e-6 * m["delta_norm"]
        total_d += np.linalg.norm(d) ** 2
        total_res += res ** 2
    assert abs(np.sqrt(total_res / total_d) - rep["total"]["relative_error"]) <= 1e-4 * rep["total"]["relative_error"]
    return rep

what = sys.argv[2]
if what == "peft":
    check_peft(*sys.argv[3:7], want_rank=int(sys.argv[7]) if len(sys.argv) > 7 else None)
elif what == "energy":
    rep = check_peft(*sys.argv[3:7])
    f = float(sys.argv[7])
    for m in rep["modules"]:
        assert m["energy_kept"] >= f, m
    assert len({m["rank"] for m in rep["modules"]}) > 1, "ranks should differ per module"
elif what == "compare":  # randomized within 1% of exact, per module
    ra = {m["module"]: m for m in json.load(open(sys.argv[3]))["modules"]}
    ex = {m["module"]: m for m in json.load(open(sys.argv[4]))["modules"]}
    assert ra.keys() == ex.keys()
    for p in ra:
        assert ex[p]["method"] == "exact"
        assert ra[p]["relative_error"] <= 1.01 * ex[p]["relative_error"], (p, ra[p], ex[p])
elif what == "merged":  # lora merge output vs the tuned model, bound by the reported error
    base, _ = load(sys.argv[3] + "/model.safetensors")
    tuned, _ = load(sys.argv[4] + "/model.safetensors")
    merged, _ = load(sys.argv[5] + "/model.safetensors")
    rep = json.load(open(sys.argv[6]))
    for m in rep["modules"]:
        k = m["tensor"]
        d = np.linalg.norm(tuned[k] - base[k])
        # merged is rounded to bf16 once more: half an ulp per element at most
        half_ulp = np.linalg.norm(np.abs(merged[k]) * 2.0 ** -8 / 2)
        got = np.linalg.norm(merged[k] - tuned[k])
        assert got <= m["relative_error"] * d + half_ulp, (k, got, m["relative_error"] * d, half_ulp)
elif what == "kohya":
    ad, raw = load(sys.argv[3])
    rep = json.load(open(sys.argv[4]))
    for m in rep["modules"]:
        k = "lora_te_" + m["module"].replace(".", "_")
        assert ad[k + ".lora_down.weight"].shape == (m["rank"], m["shape"][1])
        assert ad[k + ".lora_up.weight"].shape == (m["shape"][0], m["rank"])
        assert raw[k + ".alpha"][0] == "F32" and float(ad[k + ".alpha"]) == m["rank"]
    assert len(ad) == 3 * len(rep["modules"])
elif what == "saved":
    ad, raw = load(sys.argv[3] + "/adapter_model.safetensors")
    cfg = json.load(open(sys.argv[3] + "/adapter_config.json"))
    tuned, _ = load(sys.argv[4] + "/model.safetensors")
    assert cfg["modules_to_save"] == ["model.layers.0.input_layernorm"], cfg["modules_to_save"]
    k = "model.layers.0.input_layernorm.weight"
    assert np.array_equal(ad["base_model.model." + k], tuned[k])
print("ok")
EOF
check() { local name=$1; shift; if "$PY" "$T/check.py" "$SRC/tests/e2e" "$@" >"$T/chk" 2>&1; then pass "$name"; else fail "$name: $(tail -3 "$T/chk")"; fi; }

check "rank-8 adapter: keys, shapes, config, errors recomputed in f64" peft "$BASE" "$TUNED" "$T/r8" "$T/r8.json" 8
grep -q '"reason": "not a 2-D weight"' "$T/r8.json" && grep -q 'model.layers.0.input_layernorm.weight' "$T/r8.json" \
  && pass "1-D delta listed" || fail "1-D delta not listed"
grep -q '"unchanged": 7' "$T/r8.json" && pass "unchanged tensors counted (o_proj of layer 1 among them)" \
  || fail "unchanged count"

# --- energy target: per-module ranks through rank_pattern / alpha_pattern
"$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$T/e" --energy 0.995 --json >"$T/e.json" 2>"$T/err" \
  && check "--energy 0.995: ranks reach the target, patterns give each module its rank" energy "$BASE" "$TUNED" "$T/e" "$T/e.json" 0.995 \
  || fail "extract --energy: $(cat "$T/err")"

# --- exact method; randomized within 1% of it
"$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$T/x" --rank 8 --method exact --json >"$T/x.json" 2>"$T/err" \
  && check "--method exact: report recomputed" peft "$BASE" "$TUNED" "$T/x" "$T/x.json" 8 \
  || fail "extract --method exact: $(cat "$T/err")"
check "randomized error within 1% of exact, every module" compare "$T/r8.json" "$T/x.json"

# --- deterministic for a seed
"$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$T/r8b" --rank 8 --quiet 2>/dev/null
cmp -s "$T/r8/adapter_model.safetensors" "$T/r8b/adapter_model.safetensors" && pass "same seed, same bytes" \
  || fail "two runs with the same seed differ"
"$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$T/r8c" --rank 8 --seed 5 --quiet 2>/dev/null
cmp -s "$T/r8/adapter_model.safetensors" "$T/r8c/adapter_model.safetensors" && fail "--seed has no effect" \
  || pass "another seed, another sketch"

# --- extract then merge reproduces the tuned model within the reported error
if "$LORA" merge --help >/dev/null 2>&1; then
  if "$LORA" merge --base "$BASE" --adapter "$T/r8" --out "$T/merged" --quiet 2>"$T/err"; then
    check "merge(extract) = tuned within the reported error (+ bf16 rounding)" merged "$BASE" "$TUNED" "$T/merged" "$T/r8.json"
  else
    fail "lora merge of the extracted adapter: $(cat "$T/err")"
  fi
else
  echo "note: lora merge not built: merge check left to the f64 recomputation above"
fi

# --- kohya, save-modules, targets
"$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$T/k.safetensors" --rank 4 --format kohya --json >"$T/k.json" 2>"$T/err" \
  && check "--format kohya: lora_te_ names, down/up shapes, alpha = r (F32)" kohya "$T/k.safetensors" "$T/k.json" \
  || fail "extract --format kohya: $(cat "$T/err")"
"$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$T/s" --rank 4 --save-modules --quiet 2>"$T/err" \
  && check "--save-modules: the norm delta saved whole, modules_to_save" saved "$T/s" "$TUNED" \
  || fail "extract --save-modules: $(cat "$T/err")"
"$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$T/t" --rank 4 --targets 'q_proj|v_proj' --json >"$T/t.json" 2>"$T/err"
n_mod=$("$PY" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["modules"]))' "$T/t.json" 2>/dev/null)
n_excl=$(grep -c '"reason": "excluded by --targets"' "$T/t.json")
[ "$n_mod" = 4 ] && [ "$n_excl" = 9 ] && pass "--targets q_proj|v_proj: 4 modules, 9 excluded and listed" \
  || fail "--targets: $n_mod modules, $n_excl excluded"

# --- refusals: exit code, one-line message, nothing left behind
expect_error "identical models" 3 "models are identical: nothing to extract" "$T/o1" -- \
  --base "$BASE" --tuned "$BASE" --out "$T/o1" --rank 4
expect_error "tensor missing in tuned" 3 "model.norm.weight: missing" "$T/o2" -- \
  --base "$BASE" --tuned "$T/m/missing" --out "$T/o2" --rank 4
expect_error "tensor only in tuned" 3 "model.norm.weight: not in the base model" "$T/o3" -- \
  --base "$T/m/missing" --tuned "$TUNED" --out "$T/o3" --rank 4
expect_error "shape mismatch" 3 "lm_head.weight" "$T/o4" -- \
  --base "$BASE" --tuned "$T/m/shape" --out "$T/o4" --rank 4
expect_error "integer delta" 3 "extra.ids: differs from the base, and I32 and I32 cannot be subtracted" "$T/o5" -- \
  --base "$T/m/base-int" --tuned "$T/m/tuned-int" --out "$T/o5" --rank 4
expect_error "existing --out" 2 "exists" "" -- --base "$BASE" --tuned "$TUNED" --out "$T/r8" --rank 4
# --force replaces it atomically: the rank-4 adapter takes the place of the rank-8 one
cp -r "$T/r8" "$T/forced" && touch "$T/forced/stale-file"
if "$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$T/forced" --rank 4 --force --quiet 2>"$T/err" \
  && grep -q '"r": 4' "$T/forced/adapter_config.json" && [ ! -e "$T/forced/stale-file" ]; then
  pass "--force replaces an existing --out"
else
  fail "--force: $(cat "$T/err")"
fi
expect_error "no rank option" 2 "give one of --rank R, --energy F, --max-error E or --budget N" "$T/o6" -- \
  --base "$BASE" --tuned "$TUNED" --out "$T/o6"
expect_error "bad --targets regex" 2 "--targets" "$T/o7" -- --base "$BASE" --tuned "$TUNED" --out "$T/o7" --rank 4 --targets '('
expect_error "kohya with --save-modules" 2 "--save-modules needs --format peft" "$T/o8" -- \
  --base "$BASE" --tuned "$TUNED" --out "$T/o8" --rank 4 --format kohya --save-modules
expect_error "--energy out of range" 2 "--energy 1.5 must be in (0, 1]" "$T/o9" -- \
  --base "$BASE" --tuned "$TUNED" --out "$T/o9" --energy 1.5
expect_error "unreadable base" 4 "nope" "$T/o10" -- --base "$T/nope" --tuned "$TUNED" --out "$T/o10" --rank 4

# --- a delta W_tuned - W_base that overflows f32 (3e38 - (-3e38)) from finite weights:
# the randomized (f32) path refuses naming file and tensor; the exact (f64) path
# writes finite factors whose product is the f64 delta
mkdir -p "$T/ovf"
"$PY" - "$T/ovf" "$SRC/tests/e2e" <<'PY'
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np
from safetensors_np import write
rng = np.random.default_rng(7)
w = rng.standard_normal((16, 8)).astype(np.float32)
u, v = rng.standard_normal((16, 2)), rng.standard_normal((2, 8))
t = (w + u @ v).astype(np.float32)
w[3, 5], t[3, 5] = -3e38, 3e38
write(sys.argv[1] + "/base.safetensors", {"model.layers.0.self_attn.q_proj.weight": w})
write(sys.argv[1] + "/tuned.safetensors", {"model.layers.0.self_attn.q_proj.weight": t})
PY
expect_error "f32 delta overflow" 3 "tuned.safetensors: model.layers.0.self_attn.q_proj.weight: W_tuned - W_base overflows f32" "$T/ovf/r" -- \
  --base "$T/ovf/base.safetensors" --tuned "$T/ovf/tuned.safetensors" --out "$T/ovf/r" --rank 3
if "$LORA" extract --base "$T/ovf/base.safetensors" --tuned "$T/ovf/tuned.safetensors" --out "$T/ovf/x" --rank 8 \
  --method exact >/dev/null 2>"$T/err"; then
  got=$("$PY" - "$T/ovf" "$SRC/tests/e2e" <<'PY'
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np
from safetensors_np import read
b, _ = read(sys.argv[1] + "/base.safetensors")
t, _ = read(sys.argv[1] + "/tuned.safetensors")
a, _ = read(sys.argv[1] + "/x/adapter_model.safetensors")
k = "model.layers.0.self_attn.q_proj.weight"
d = t[k][3] - b[k][3]
pre = "base_model.model.model.layers.0.self_attn.q_proj."
A, B = a[pre + "lora_A.weight"][3], a[pre + "lora_B.weight"][3]
# f32 factors of a rank-8 split of [16, 8]: off by a few f32 units of ||dW||
err = np.linalg.norm(B @ A - d) / np.linalg.norm(d)
print("ok" if np.all(np.isfinite(A)) and np.all(np.isfinite(B)) and err < 1e-6 else "err %.3g" % err)
PY
)
  [ "$got" = ok ] && pass "exact extract of an f32-overflowing delta" || fail "exact extract of an f32-overflowing delta: $got"
else
  fail "exact extract of an f32-overflowing delta: $(cat "$T/err")"
fi

# --- kohya names of a DiT (diffusers transformer_blocks): lora_unet_, as convert --to kohya names them
mkdir -p "$T/dit"
"$PY" - "$SRC/tests/e2e" "$T/dit" <<'PY'
import sys; sys.path.insert(0, sys.argv[1])
import numpy as np
from safetensors_np import write
rng = np.random.default_rng(12)
base = {f"transformer_blocks.0.attn.to_{p}.weight": rng.standard_normal((8, 8)).astype(np.float32) for p in "qkv"}
tuned = {k: v + np.outer(rng.standard_normal(8), rng.standard_normal(8)).astype(np.float32) for k, v in base.items()}
write(sys.argv[2] + "/base.safetensors", base)
write(sys.argv[2] + "/tuned.safetensors", tuned)
PY
dit_keys() {
  "$PY" - "$SRC/tests/e2e" "$1" <<'PY'
import sys; sys.path.insert(0, sys.argv[1])
from safetensors_np import read
print(" ".join(sorted(k for k in read(sys.argv[2])[0] if k.endswith(".lora_down.weight"))))
PY
}
want="lora_unet_transformer_blocks_0_attn_to_k.lora_down.weight lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight lora_unet_transformer_blocks_0_attn_to_v.lora_down.weight"
if "$LORA" extract --base "$T/dit/base.safetensors" --tuned "$T/dit/tuned.safetensors" --out "$T/dit/k.safetensors" \
     --rank 1 --format kohya >/dev/null 2>"$T/err" &&
   "$LORA" extract --base "$T/dit/base.safetensors" --tuned "$T/dit/tuned.safetensors" --out "$T/dit/peft" \
     --rank 1 >/dev/null 2>>"$T/err" &&
   "$LORA" convert "$T/dit/peft" --to kohya --out "$T/dit/c.safetensors" >/dev/null 2>>"$T/err"; then
  got=$(dit_keys "$T/dit/k.safetensors")
  converted=$(dit_keys "$T/dit/c.safetensors")
  if [ "$got" = "$want" ] && [ "$converted" = "$want" ]; then pass "DiT --format kohya: lora_unet_ names, as convert --to kohya"
  else fail "DiT kohya names: extract [$got], convert [$converted], want [$want]"; fi
else
  fail "DiT extract / convert: $(cat "$T/err")"
fi

# --- --report: the SVG parses as XML, has one panel per module, and rsvg-convert renders it
if "$LORA" extract --base "$BASE" --tuned "$TUNED" --out "$T/rep" --energy 0.9 --report "$T/rep.svg" --json \
     >"$T/rep.json" 2>"$T/err"; then
  got=$("$PY" - "$T/rep.svg" "$T/rep.json" <<'PY'
import sys, json, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
report = json.load(open(sys.argv[2]))
ns = "{http://www.w3.org/2000/svg}"
texts = [t.text or "" for t in root.iter(ns + "text")]
titles = [t for t in texts if "]  rank" in t]
problems = []
if root.tag != ns + "svg": problems.append("root " + root.tag)
if len(titles) != len(report["modules"]): problems.append("%d panels for %d modules" % (len(titles), len(report["modules"])))
for m in report["modules"]:
    if not any(t.startswith(m["module"] + "  [") for t in titles): problems.append("no panel for " + m["module"])
    if len(m["singular_values"]) <= m["rank"] and m["rank"] < min(m["matrix"]): problems.append("short spectrum " + m["module"])
print("ok" if not problems else "; ".join(problems))
PY
)
  [ "$got" = ok ] && pass "--report: well-formed SVG, one panel per module" || fail "--report: $got"
  if rsvg-convert "$T/rep.svg" -o "$T/rep.png" 2>"$T/err" && [ "$(head -c 4 "$T/rep.png" | tail -c 3)" = PNG ]; then
    pass "--report: rsvg-convert renders it"
  else
    fail "--report: rsvg-convert: $(cat "$T/err")"
  fi
else
  fail "--report: $(cat "$T/err")"
fi

# --- GPT-2 Conv1D: extract (fan_in_fan_out), merge, and the merged square c_proj is W0 + (B A)^T
mkdir -p "$T/gpt2/base" "$T/gpt2/tuned"
"$PY" - "$SRC/tests/e2e" "$T/gpt2" <<'PY'
import sys; sys.path.insert(0, sys.argv[1])
import numpy as np
from safetensors_np import write
rng = np.random.default_rng(21)
shapes = {"h.0.attn.c_attn.weight": (16, 48), "h.0.attn.c_proj.weight": (16, 16), "h.0.mlp.c_fc.weight": (16, 64)}
base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
tuned = {k: v + (rng.standard_normal((v.shape[0], 3)) @ rng.standard_normal((3, v.shape[1]))).astype(np.float32)
         for k, v in base.items()}
for side, m in (("base", base), ("tuned", tuned)):
    write(sys.argv[2] + "/" + side + "/model.safetensors", m)
    open(sys.argv[2] + "/" + side + "/config.json", "w").write('{"model_type": "gpt2"}')
PY
if "$LORA" extract --base "$T/gpt2/base" --tuned "$T/gpt2/tuned" --out "$T/gpt2/peft" --rank 3 --quiet 2>"$T/err" &&
   "$LORA" merge --base "$T/gpt2/base" --adapter "$T/gpt2/peft" --out "$T/gpt2/merged" >/dev/null 2>>"$T/err"; then
  got=$("$PY" - "$SRC/tests/e2e" "$T/gpt2" <<'PY'
import sys, json; sys.path.insert(0, sys.argv[1])
import numpy as np
from safetensors_np import read
d = sys.argv[2]
b, _ = read(d + "/base/model.safetensors"); t, _ = read(d + "/tuned/model.safetensors")
m, _ = read(d + "/merged/model.safetensors"); a, _ = read(d + "/peft/adapter_model.safetensors")
cfg = json.load(open(d + "/peft/adapter_config.json"))
bad = [] if cfg["fan_in_fan_out"] else ["fan_in_fan_out false"]
for k in b:
    p = "base_model.model." + k[:-7]
    A, B = a[p + ".lora_A.weight"][3], a[p + ".lora_B.weight"][3]
    if A.shape != (3, b[k][3].shape[0]): bad.append("%s lora_A %s" % (k, A.shape))
    want = b[k][3].astype(np.float64) + (B.astype(np.float64) @ A).T
    if np.abs(m[k][3] - want).max() > 1e-5 * np.abs(want).max(): bad.append(k + " merged differs")
    if np.linalg.norm(m[k][3] - t[k][3]) > 1e-4 * np.linalg.norm(t[k][3] - b[k][3]): bad.append(k + " != tuned")
print("ok" if not bad else "; ".join(bad))
PY
)
  [ "$got" = ok ] && pass "GPT-2 Conv1D: fan_in_fan_out adapter, merged back to the tuned model (square c_proj too)" \
    || fail "GPT-2 Conv1D: $got"
else
  fail "GPT-2 Conv1D extract / merge: $(cat "$T/err")"
fi

# --- the real full fine-tune of stories260K: --budget and --energy, whole-model totals
S=$SRC/../shared/fixtures/stories260k
if [ -f "$S/tuned-full/model.safetensors" ]; then
  for args in "--budget 60000" "--energy 0.9"; do
    # shellcheck disable=SC2086
    if "$LORA" extract --base "$S/model" --tuned "$S/tuned-full" --out "$T/s260k" $args --json --force \
         >"$T/s.json" 2>"$T/err"; then
      got=$("$PY" - "$T/s.json" "$args" <<'PY'
import sys, json
r = json.load(open(sys.argv[1]))
bad = []
if r["budget"] is not None and r["params"] > r["budget"]: bad.append("budget exceeded")
if sum(m["params"] for m in r["modules"]) != r["params"]: bad.append("params")
print("ok" if not bad else "; ".join(bad),
      "modules %d params %d extracted error %.4f whole-model energy %.4f error %.4f" %
      (len(r["modules"]), r["params"], r["total"]["relative_error"], r["model"]["energy_kept"], r["model"]["relative_error"]))
PY
)
      case $got in ok*) pass "stories260K $args: ${got#ok }";; *) fail "stories260K $args: $got";; esac
    else
      fail "stories260K $args: $(cat "$T/err")"
    fi
  done
else
  echo "skip: $S absent (stories260K extraction)"
fi

if ls "$T"/*.tmp-* >/dev/null 2>&1; then fail "temporary files left in $T"; else pass "no temporary files left"; fi
echo "$fails failure(s)"
[ "$fails" = 0 ]
