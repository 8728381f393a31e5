#!/usr/bin/env bash
# End-to-end tests of `lora resize`, `lora combine` and `lora convert` on
# testdata/ (and the real MLX adapter in ../shared/fixtures when present),
# checked by an independent numpy reading in float64:
#  - resize: every module's written delta within 1% of the optimal rank-k
#    error of s B A (numpy SVD), the --json report against the same numbers,
#    format, metadata and scale 1 kept;
#  - combine: the written delta against sum_k w_k s_k B_k A_k; merging the
#    combined adapter equals merging the adapters together (lora verify, and
#    numpy on the two merged models);
#  - convert: PEFT -> kohya -> PEFT keeps every factor's bytes and every
#    effective scale; MLX -> PEFT against mlx_lm's scale * (x @ lora_a) @ lora_b;
#  - every refusal: exit code, one-line message, nothing left behind.
# Usage: bash tests/e2e/e2e-adapter-ops.sh PATH-TO-LORA SOURCE-DIR
set -u
LORA=${1:?usage: e2e-adapter-ops.sh PATH-TO-LORA SOURCE-DIR}
SRC=${2:?usage: e2e-adapter-ops.sh PATH-TO-LORA SOURCE-DIR}
if [ ! -x /usr/bin/python3 ] || ! /usr/bin/python3 -c 'import numpy' 2>/dev/null; then
  echo "SKIP: /usr/bin/python3 with numpy is needed to check the adapters"
  exit 77
fi
. "$SRC/tests/e2e/lib.sh"
TD=$SRC/testdata
MLX=$SRC/../shared/fixtures/mlx_examples_minicpm_adapter
W=$E2E_TMP/work
mkdir -p "$W"

# expect_refusal CODE TEXT OUTNAME CMD...: exit code, one-line message holding
# TEXT, nothing named OUTNAME left in $W.
expect_refusal() {
  local code=$1 text=$2 out=$3
  shift 3
  expect_exit "$code" "$@"
  expect_stderr_contains "$text"
  expect_one_line_error
  expect_nothing_left "$out"
}

cat >"$E2E_TMP/check.py" <<'EOF'
# Independent reading of adapters (PEFT folders, kohya files, mlx_lm folders)
# and the checks of this script; prints "ok" or what is wrong.
import json, os, re, struct, sys
import numpy as np

U32 = 2.0 ** -24

sys.path.insert(0, os.environ["E2E_LIB"])
from safetensors_np import read

def pattern(pat, module, default):
    # PEFT: the first key matching ^(.*\.)?(KEY)$ wins
    for k, v in pat.items():
        if re.match(r"^(.*\.)?(%s)$" % k, module):
            return v
    return default

def adapter(path):
    """module -> dict(a [r, n], b [m, r], scale, rank, a_raw, b_raw, dtypes); plus format, metadata, config."""
    mods = {}
    if os.path.isdir(path):
        t, meta = read(os.path.join(path, "adapter_model.safetensors"))
        cfg = json.load(open(os.path.join(path, "adapter_config.json")))
        for name in t:
            m = re.match(r"^base_model\.model\.(.*)\.lora_A(\.default)?\.weight$", name)
            if not m:
                continue
            p = m.group(1)
            A = t[name]
            B = t[name.replace("lora_A", "lora_B")]
            r = A[1][0]
            alpha = pattern(cfg.get("alpha_pattern") or {}, p, cfg["lora_alpha"])
            assert pattern(cfg.get("rank_pattern") or {}, p, cfg["r"]) == r, (p, r)
            s = alpha / (np.sqrt(r) if cfg.get("use_rslora") else r)
            mods[p] = dict(a=A[3].reshape(r, -1), b=B[3].reshape(B[1][0], r), scale=s, rank=r,
                           a_raw=A[2], b_raw=B[2], a_dt=A[0], b_dt=B[0])
        return mods, "peft", meta, cfg
    t, meta = read(path)
    for name in t:
        if not name.endswith(".lora_down.weight"):
            continue
        k = name[:-len(".lora_down.weight")]
        A, B = t[name], t[k + ".lora_up.weight"]
        r = A[1][0]
        alpha = float(t[k + ".alpha"][3].reshape(-1)[0]) if k + ".alpha" in t else r
        mods[k] = dict(a=A[3].reshape(r, -1), b=B[3].reshape(B[1][0], r), scale=alpha / r, rank=r,
                       a_raw=A[2], b_raw=B[2], a_dt=A[0], b_dt=B[0])
    return mods, "kohya", meta, None

def delta(m):
    return m["scale"] * (m["b"] @ m["a"])

def magnitude(m):
    return abs(m["scale"]) * (np.abs(m["b"]) @ np.abs(m["a"]))

def unit(dt):
    return {"BF16": 2.0 ** -8, "F16": 2.0 ** -11, "F32": U32}[dt]

def weighted_sum(specs):
    """module -> (sum_k w_k s_k B_k A_k, sum |w_k s_k| |B_k| |A_k|, total rank) over PATH:WEIGHT specs."""
    out = {}
    for spec in specs:
        path, w = spec.rsplit(":", 1)
        x, _, _, _ = adapter(path)
        for p, m in x.items():
            d, size, r = out.get(p, (0, 0, 0))
            out[p] = (d + float(w) * delta(m), size + abs(float(w)) * magnitude(m), r + m["rank"])
    return out

def check_recompressed(ref, out, report, want_rank, unit_of, keeps_full=False):
    """out's modules against the optimal rank-k error of ref[p] = (delta, _, rank_in); report = its --json.
    keeps_full: a module whose rank does not change keeps its factors and scale (resize)."""
    y, _, _, _ = adapter(out)
    rep = json.load(open(report))
    problems = []
    if sorted(y) != sorted(ref) or sorted(m["module"] for m in rep["modules"]) != sorted(ref):
        return ["module sets differ"]
    worst = 0.0
    for line in rep["modules"]:
        p = line["module"]
        d, _, rank_in = ref[p]
        k = y[p]["rank"]
        sv = np.linalg.svd(d, compute_uv=False)
        opt = np.sqrt(np.sum(sv[k:] ** 2))
        nd = np.linalg.norm(d)
        err = np.linalg.norm(d - delta(y[p]))
        if y[p]["scale"] != 1.0 and not (keeps_full and k == rank_in):
            problems.append("%s: scale %r, expected 1 (alpha = rank)" % (p, y[p]["scale"]))
        if want_rank and k != min(want_rank, rank_in):
            problems.append("%s: rank %d" % (p, k))
        if line["rank_in"] != rank_in or line["rank_out"] != k:
            problems.append("%s: report ranks %d -> %d" % (p, line["rank_in"], line["rank_out"]))
        # within 1% of the optimal error, plus the rounding of the factors to their dtype
        # (8 units of it relative to ||d||: what is left when nothing is truncated)
        if err > 1.01 * opt + 8 * unit_of(p) * nd:
            problems.append("%s: error %.6g > 1.01 * optimal %.6g" % (p, err, opt))
        # the report: exact error and energy from the singular values, written error measured
        if abs(line["relative_error"] - opt / nd) > 1e-9 or abs(line["measured_error"] - err / nd) > 1e-9 \
                or abs(line["energy_kept"] - (1 - (opt / nd) ** 2)) > 1e-9:
            problems.append("%s: report %s vs errors %.12g / %.12g" % (p, line, opt / nd, err / nd))
        if opt > 1e-6 * nd:  # a real truncation
            worst = max(worst, err / opt - 1)
    if not problems:
        print("%s: worst (error / optimal error - 1) = %.2e" % (out, worst), file=sys.stderr)
    return problems

def check_resize(src, out, report, want_rank):
    x, fx, mx, _ = adapter(src)
    y, fy, my, _ = adapter(out)
    problems = []
    if fx != fy:
        problems.append("format %s -> %s" % (fx, fy))
    # metadata kept (kohya: ss_network_dim / ss_network_alpha follow the new ranks, model hashes dropped)
    for k, v in (mx or {}).items():
        if k not in ("ss_network_dim", "ss_network_alpha", "sshs_model_hash", "sshs_legacy_hash") and (my or {}).get(k) != v:
            problems.append("metadata %s: %r -> %r" % (k, v, (my or {}).get(k)))
    for p in set(x) & set(y):
        if (y[p]["a_dt"], y[p]["b_dt"]) != (x[p]["a_dt"], x[p]["b_dt"]):
            problems.append("%s: dtypes changed" % p)
        # nothing dropped: the same factor bytes, the same scale (to an ulp)
        if y[p]["rank"] == x[p]["rank"] and (y[p]["a_raw"] != x[p]["a_raw"] or y[p]["b_raw"] != x[p]["b_raw"]
                                             or abs(y[p]["scale"] - x[p]["scale"]) > 2.0 ** -52 * abs(x[p]["scale"])):
            problems.append("%s: kept at rank %d but factors or scale changed" % (p, x[p]["rank"]))
    ref = {p: (delta(m), None, m["rank"]) for p, m in x.items()}
    return problems + check_recompressed(ref, out, report, want_rank, lambda p: unit(x[p]["a_dt"]), keeps_full=True)

def check_combine_rank(out, report, want_rank, specs):
    return check_recompressed(weighted_sum(specs), out, report, want_rank, lambda p: U32)

def check_combine(out, specs):
    y, _, _, _ = adapter(out)
    want = weighted_sum(specs)
    if sorted(y) != sorted(want):
        return ["modules %s, expected %s" % (sorted(y), sorted(want))]
    problems = []
    for p, (d, size, r) in want.items():
        if y[p]["scale"] != 1.0 or y[p]["rank"] != r:
            problems.append("%s: scale %r rank %d" % (p, y[p]["scale"], y[p]["rank"]))
        # each column w_k s_k B_k rounded once to f32: 2 u sum_k |w_k s_k| |B_k| |A_k|
        if np.any(np.abs(delta(y[p]) - d) > 2 * U32 * size):
            problems.append("%s: delta off by %.3g" % (p, np.abs(delta(y[p]) - d).max()))
    return problems

def check_merged_equal(base, x, y, specs):
    # two f32 merges of the same sum W0 + sum_k w_k s_k B_k A_k: each an f32
    # dot product of total rank R rounded once, so within (R + 4) u (|W0| +
    # sum_k |w_k s_k| |B_k| |A_k|); every other tensor byte-identical
    b, _ = read(os.path.join(base, "model.safetensors"))
    mx, _ = read(os.path.join(x, "model.safetensors"))
    my, _ = read(os.path.join(y, "model.safetensors"))
    want = weighted_sum(specs)
    problems, worst = [], 0.0
    for name, (dt, shape, raw, v) in b.items():
        p = name[:-len(".weight")]
        if p not in want:
            if mx[name][2] != raw or my[name][2] != raw:
                problems.append("%s: untouched tensor changed" % name)
            continue
        d, size, r = want[p]
        vx, vy = mx[name][3], my[name][3]
        tol = (r + 4) * U32 * (np.abs(v) + size)
        ratio = (np.abs(vx - vy) / tol).max()
        worst = max(worst, ratio)
        if ratio > 1:
            problems.append("%s: merges differ by %.3g (%.3g of the bound)" % (name, np.abs(vx - vy).max(), ratio))
        # the bound is far below the delta itself: a wrong weight would not pass
        if np.abs(vx - v).max() < 1e3 * tol.max():
            problems.append("%s: delta too small to tell" % name)
    if not want:
        problems.append("nothing merged")
    if not problems:
        print("merge(combined) vs merge(adapters): worst |diff| / bound = %.3g" % worst, file=sys.stderr)
    return problems

def check_same(x_path, y_path):
    # same modules, factor bytes and effective scales (PEFT vs PEFT)
    x, _, _, _ = adapter(x_path)
    y, _, _, _ = adapter(y_path)
    problems = []
    if sorted(x) != sorted(y):
        return ["modules differ"]
    for p in x:
        for k in ("a_raw", "b_raw", "a_dt", "b_dt", "rank", "scale"):
            if x[p][k] != y[p][k]:
                problems.append("%s: %s differs" % (p, k))
    return problems

def check_kohya_scales(peft_path, kohya_path):
    # the kohya file holds the same factor bytes and s = alpha / r per module
    x, _, _, _ = adapter(peft_path)
    y, _, _, _ = adapter(kohya_path)
    problems = []
    for p, m in x.items():
        k = "lora_te_" + p.replace(".", "_")
        if k not in y:
            problems.append("%s missing" % k)
            continue
        if (m["a_raw"], m["b_raw"]) != (y[k]["a_raw"], y[k]["b_raw"]):
            problems.append("%s: bytes differ" % k)
        if abs(y[k]["scale"] - m["scale"]) > 1e-15 * m["scale"]:
            problems.append("%s: scale %r vs %r" % (k, y[k]["scale"], m["scale"]))
    return problems

def check_mlx(folder, peft):
    t, _ = read(os.path.join(folder, "adapters.safetensors"))
    scale = json.load(open(os.path.join(folder, "adapter_config.json")))["lora_parameters"]["scale"]
    y, _, _, _ = adapter(peft)
    rng = np.random.default_rng(1234)
    problems, n = [], 0
    for name in sorted(t):
        if not name.endswith(".lora_a"):
            continue
        p = name[:-len(".lora_a")]
        la, lb = t[name][3], t[p + ".lora_b"][3]  # [in, r], [r, out]
        x = rng.standard_normal((3, la.shape[0]))
        y_mlx = scale * (x @ la) @ lb            # mlx_lm LoRALinear
        y_peft = x @ delta(y[p]).T                # PEFT: x dW^T, dW = s B A
        size = abs(scale) * (np.abs(x) @ np.abs(la) @ np.abs(lb)).max()
        if np.abs(y_mlx - y_peft).max() > 1e-12 * size or np.abs(y_mlx).max() < 1e-6 * size:
            problems.append("%s: %.3g" % (p, np.abs(y_mlx - y_peft).max()))
        if not (np.array_equal(y[p]["a"], la.T) and np.array_equal(y[p]["b"], lb.T)):
            problems.append("%s: factors are not the exact transposes" % p)
        n += 1
    if n != len(y) or n == 0:
        problems.append("%d MLX modules, %d PEFT modules" % (n, len(y)))
    return problems

what = sys.argv[1]
args = sys.argv[2:]
if what == "resize":
    problems = check_resize(args[0], args[1], args[2], int(args[3]) if len(args) > 3 else 0)
elif what == "combine":
    problems = check_combine(args[0], args[1:])
elif what == "combine-rank":
    problems = check_combine_rank(args[0], args[1], int(args[2]), args[3:])
elif what == "merged-equal":
    problems = check_merged_equal(args[0], args[1], args[2], args[3:])
elif what == "same":
    problems = check_same(args[0], args[1])
elif what == "kohya-scales":
    problems = check_kohya_scales(args[0], args[1])
elif what == "mlx":
    problems = check_mlx(args[0], args[1])
print("ok" if not problems else "; ".join(problems[:5]))
EOF

check() {
  local got
  got=$(E2E_LIB="$SRC/tests/e2e" "$PY" "$E2E_TMP/check.py" "$@")
  expect_eq "check $1 (${*:2})" "$got" ok
}

# ---------------------------------------------------------------- resize

expect_exit 0 "$LORA" resize --adapter "$TD/lora-tiny-llama" --rank 2 --out "$W/r2"
expect_stdout_contains "14 modules: total rank 56 -> 28"
expect_stdout_contains "wrote peft adapter $W/r2 (alpha = rank: scale 1)"
expect_exit 0 "$LORA" resize --adapter "$TD/lora-tiny-llama" --rank 2 --out "$W/r2-json" --json
expect_json 'j["format"]' peft
expect_json 'j["scale"]' 1.0
expect_json 'len(j["modules"])' 14
expect_json 'all(m["rank_in"] == 4 and m["rank_out"] == 2 and m["target_reached"] for m in j["modules"])' true
expect_json 'all(0 < m["energy_kept"] < 1 and abs(m["energy_kept"] + m["relative_error"] ** 2 - 1) < 1e-12 for m in j["modules"])' true
echo "$OUT" >"$W/r2.json"
check resize "$TD/lora-tiny-llama" "$W/r2-json" "$W/r2.json" 2
expect_eq "resize --json writes the same factors" "$(cmp "$W/r2/adapter_model.safetensors" "$W/r2-json/adapter_model.safetensors" && echo same)" same
expect_json '"__metadata__" in open("'"$W"'/r2/adapter_model.safetensors", "rb").read(4096).decode("latin-1")' true
# rsLoRA + patterns, BF16, energy rule: ranks vary, rank_pattern carries them
expect_exit 0 "$LORA" resize --adapter "$TD/lora-tiny-llama-patterns" --energy 0.8 --out "$W/pat" --json
echo "$OUT" >"$W/pat.json"
check resize "$TD/lora-tiny-llama-patterns" "$W/pat" "$W/pat.json"
expect_json 'all(m["energy_kept"] >= 0.8 for m in j["modules"])' true
# modules already at the rank the rule picks are kept unchanged (counted, and
# checked byte for byte by `check resize`)
expect_json 'j["kept_unchanged"] == sum(m["rank_in"] == m["rank_out"] for m in j["modules"]) > 0' true
expect_exit 0 "$LORA" resize --adapter "$TD/lora-tiny-llama-patterns" --energy 0.9 --out "$W/pat9" --report "$W/pat9.svg"
expect_stdout_contains "(alpha = rank: scale 1; 10 of 14 modules were already at that rank and are kept unchanged)"
# --report: the SVG of the re-rank (core/report-svg) parses, has a panel per module, and rsvg-convert renders it
expect_eq "resize --report: one panel per module" "$("$PY" -c 'import sys, xml.etree.ElementTree as ET
print(sum("]  rank" in (t.text or "") for t in ET.parse(sys.argv[1]).getroot().iter("{http://www.w3.org/2000/svg}text")))' "$W/pat9.svg")" 14
expect_eq "resize --report renders (rsvg-convert)" "$(rsvg-convert "$W/pat9.svg" -o "$W/pat9.png" && head -c 4 "$W/pat9.png" | tail -c 3)" PNG
# --max-rank caps the energy rule and says so
expect_exit 0 "$LORA" resize --adapter "$TD/lora-tiny-llama-patterns" --energy 0.999 --max-rank 2 --out "$W/capped" --json
expect_json 'max(m["rank_out"] for m in j["modules"])' 2
expect_json 'any(not m["target_reached"] for m in j["modules"])' true
# kohya: linear (F32) and UNet with conv (F16): format and ss_ metadata kept
expect_exit 0 "$LORA" resize --adapter "$TD/lora-tiny-llama-kohya.safetensors" --rank 3 --out "$W/k3.safetensors" --json
echo "$OUT" >"$W/k3.json"
check resize "$TD/lora-tiny-llama-kohya.safetensors" "$W/k3.safetensors" "$W/k3.json" 3
expect_exit 0 "$LORA" resize --adapter "$TD/lora-tiny-unet-kohya.safetensors" --rank 1 --out "$W/u1.safetensors" --json
echo "$OUT" >"$W/u1.json"
check resize "$TD/lora-tiny-unet-kohya.safetensors" "$W/u1.safetensors" "$W/u1.json" 1
expect_exit 0 "$LORA" inspect "$W/u1.safetensors" --json
expect_json '[j["files"][0]["metadata"]["ss_network_dim"], j["files"][0]["metadata"]["ss_output_name"]]' '["1","lora-tiny-unet-kohya"]'
# resize to the full rank is exact up to rounding: written error ~ f32/f16 units
expect_exit 0 "$LORA" resize --adapter "$TD/lora-tiny-llama" --rank 4 --out "$W/r4" --json
expect_json 'all(m["relative_error"] < 1e-12 and m["measured_error"] < 1e-6 for m in j["modules"])' true

# refusals
expect_refusal 2 "give one of --rank R, --energy F or --max-error E" r-none "$LORA" resize --adapter "$TD/lora-tiny-llama" --out "$W/r-none"
expect_refusal 2 "--rank 0 must be at least 1" r-zero "$LORA" resize --adapter "$TD/lora-tiny-llama" --rank 0 --out "$W/r-zero"
expect_refusal 2 "--energy 1.5 must be in (0, 1]" r-energy "$LORA" resize --adapter "$TD/lora-tiny-llama" --energy 1.5 --out "$W/r-energy"
expect_refusal 2 "--max-error 1 must be in [0, 1)" r-err "$LORA" resize --adapter "$TD/lora-tiny-llama" --max-error 1 --out "$W/r-err"
expect_refusal 4 "$W/absent" r-absent "$LORA" resize --adapter "$W/absent" --rank 2 --out "$W/r-absent"
expect_refusal 3 "lora-missing-b" r-bad "$LORA" resize --adapter "$TD/malformed/lora-missing-b" --rank 2 --out "$W/r-bad"
expect_exit 2 "$LORA" resize --adapter "$TD/lora-tiny-llama" --rank 3 --out "$W/r2"
expect_stderr_contains "$W/r2 already exists (--force replaces it)"
expect_one_line_error
expect_eq "refused --out untouched" "$(cmp "$W/r2/adapter_model.safetensors" "$W/r2-json/adapter_model.safetensors" && echo same)" same
expect_exit 0 "$LORA" resize --adapter "$TD/lora-tiny-llama" --rank 3 --out "$W/r2" --force --json
expect_json 'j["modules"][0]["rank_out"]' 3

# ---------------------------------------------------------------- combine

A1=$TD/lora-tiny-llama
A2=$TD/lora-tiny-llama-patterns
expect_exit 0 "$LORA" combine --adapter "$A1" --weight 0.7 --adapter "$A2" --weight -1.3 --out "$W/c"
expect_stdout_contains "wrote peft adapter $W/c combining 2 adapters (exact: ranks concatenated, F32, alpha = rank: scale 1)"
expect_stdout_contains "14 modules: total rank 118 -> 118"
check combine "$W/c" "$A1:0.7" "$A2:-1.3"
# merge(combined) == merge(A1, A2): lora verify says the combined adapter explains the two-adapter merge ...
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama-f32" --adapter "$A1" --weight 0.7 --adapter "$A2" --weight -1.3 --out "$W/m12" --quiet
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama-f32" --adapter "$W/c" --out "$W/mc" --quiet
expect_exit 0 "$LORA" verify --base "$TD/tiny-llama-f32" --adapter "$W/c" --merged "$W/m12" --json
expect_json 'j["equivalent"]' true
expect_json 'j["layers_failed"]' 0
expect_json 'j["model"]["ok"]' true
# ... and the two merged models agree tensor by tensor
check merged-equal "$TD/tiny-llama-f32" "$W/mc" "$W/m12" "$A1:0.7" "$A2:-1.3"
# a wrong weight is caught: the check is not vacuous
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama-f32" --adapter "$A1" --weight 0.7 --adapter "$A2" --weight -1.2 --out "$W/m12-wrong" --quiet
expect_exit 1 "$LORA" verify --base "$TD/tiny-llama-f32" --adapter "$W/c" --merged "$W/m12-wrong"
expect_stdout_contains "NOT equivalent"
# bf16 base: both merges round once to bf16 from f32 sums; lora verify still agrees
expect_exit 0 "$LORA" merge --base "$TD/tiny-llama" --adapter "$A1" --weight 0.7 --adapter "$A2" --weight -1.3 --out "$W/b12" --quiet
expect_exit 0 "$LORA" verify --base "$TD/tiny-llama" --adapter "$W/c" --merged "$W/b12" --json
expect_json 'j["equivalent"]' true
# different targets: a kohya adapter with two modules combines module by module with A1 (--base maps the names)
E2E_LIB="$SRC/tests/e2e" "$PY" - "$W/two.safetensors" <<'PY'
import os, sys
import numpy as np
sys.path.insert(0, os.environ["E2E_LIB"])
import safetensors_np
rng = np.random.default_rng(7)
t = {}
for p, (o, i) in {"model_layers_0_self_attn_q_proj": (64, 64), "model_layers_1_mlp_down_proj": (64, 176)}.items():
    t["lora_te_%s.lora_down.weight" % p] = rng.uniform(-0.2, 0.2, (2, i)).astype(np.float32)
    t["lora_te_%s.lora_up.weight" % p] = rng.uniform(-0.2, 0.2, (o, 2)).astype(np.float32)
    t["lora_te_%s.alpha" % p] = np.array(3.0, np.float32)
safetensors_np.write(sys.argv[1], t)
PY
expect_exit 0 "$LORA" combine --adapter "$W/two.safetensors" --weight 2 --adapter "$A1" --weight 0.5 --base "$TD/tiny-llama" --format kohya --out "$W/ck.safetensors" --json
expect_json 'j["format"]' kohya
expect_json '[(m["module"], m["rank_out"]) for m in j["modules"] if m["rank_out"] != 4]' '[["lora_te_model_layers_0_self_attn_q_proj",6],["lora_te_model_layers_1_mlp_down_proj",6]]'
expect_json 'len(j["modules"])' 14
# rank-compressed: every module at rank 3, within 1% of the optimal rank-3 error of the weighted sum
expect_exit 0 "$LORA" combine --adapter "$A1" --weight 0.7 --adapter "$A2" --weight -1.3 --rank 3 --out "$W/c3" --json
expect_json 'j["exact"]' false
expect_json 'all(m["rank_out"] == 3 and m["relative_error"] > 0 for m in j["modules"])' true
echo "$OUT" >"$W/c3.json"
check combine-rank "$W/c3" "$W/c3.json" 3 "$A1:0.7" "$A2:-1.3"
expect_exit 0 "$LORA" combine --adapter "$A1" --weight 0.7 --adapter "$A2" --weight -1.3 --energy 0.9 --out "$W/c90" --json
expect_json 'all(m["energy_kept"] >= 0.9 for m in j["modules"])' true

# refusals
expect_refusal 2 "1 --weight values for 2 --adapter values: give one per adapter, or none" c-w \
  "$LORA" combine --adapter "$A1" --adapter "$A2" --weight 1 --out "$W/c-w"
expect_refusal 4 "$W/absent" c-absent "$LORA" combine --adapter "$A1" --adapter "$W/absent" --out "$W/c-absent"
expect_refusal 3 "module model.layers.0.self_attn.q_proj cannot be combined: linear [4, 48] with B [64, 4] here, linear [4, 64]" c-shape \
  "$LORA" combine --adapter "$A1" --adapter "$TD/lora-tiny-llama-mismatch" --out "$W/c-shape"
expect_refusal 3 "DoRA modules cannot be combined" c-dora "$LORA" combine --adapter "$A1" --adapter "$TD/lora-tiny-llama-dora" --out "$W/c-dora"
expect_refusal 3 "modules_to_save tensors cannot be combined" c-save "$LORA" combine --adapter "$A1" --adapter "$TD/lora-tiny-llama-extras" --out "$W/c-save"
expect_refusal 2 "give --base MODEL to match kohya names" c-mixed \
  "$LORA" combine --adapter "$A1" --adapter "$TD/lora-tiny-llama-kohya.safetensors" --out "$W/c-mixed"
expect_refusal 3 "does the adapter belong to this base model?" c-fit \
  "$LORA" combine --adapter "$A1" --adapter "$TD/lora-tiny-llama-kohya.safetensors" --base "$TD/tiny-unet" --out "$W/c-fit"
expect_refusal 2 "--kohya-prefix lora_x_ is not one of" c-prefix \
  "$LORA" combine --adapter "$A1" --format kohya --kohya-prefix lora_x_ --out "$W/c-prefix"
expect_refusal 2 "--format: yaml not in {peft,kohya}" c-format "$LORA" combine --adapter "$A1" --format yaml --out "$W/c-format"
expect_exit 2 "$LORA" combine --adapter "$A1" --out "$W/c"
expect_stderr_contains "$W/c already exists (--force replaces it)"
expect_one_line_error
expect_exit 0 "$LORA" combine --adapter "$A1" --weight 2 --out "$W/c" --force
check combine "$W/c" "$A1:2"

# ---------------------------------------------------------------- convert

# PEFT -> kohya -> PEFT: factor bytes and effective scales kept (plain, and rsLoRA + rank/alpha patterns)
for a in lora-tiny-llama lora-tiny-llama-patterns; do
  expect_exit 0 "$LORA" convert "$TD/$a" --to kohya --out "$W/$a.safetensors"
  expect_stdout_contains "converted 14 LoRA modules (peft -> kohya) into $W/$a.safetensors"
  check kohya-scales "$TD/$a" "$W/$a.safetensors"
  expect_exit 0 "$LORA" convert "$W/$a.safetensors" --to peft --base "$TD/tiny-llama" --out "$W/$a-back" --json
  expect_json 'j["from"]' kohya
  check same "$TD/$a" "$W/$a-back"
done
expect_json '[j["rank"], j["scale"][1]]' '[[2,8],16.0]'
# the testdata kohya copy of lora-tiny-llama is that adapter
expect_exit 0 "$LORA" convert "$TD/lora-tiny-llama-kohya.safetensors" --to peft --base "$TD/tiny-llama" --out "$W/from-kohya"
check same "$TD/lora-tiny-llama" "$W/from-kohya"
# kohya UNet (conv, 1x1 conv, F16, a missing alpha) -> PEFT -> kohya: the same file content
expect_exit 0 "$LORA" convert "$TD/lora-tiny-unet-kohya.safetensors" --to peft --base "$TD/tiny-unet" --out "$W/unet-peft"
expect_exit 0 "$LORA" convert "$W/unet-peft" --to kohya --out "$W/unet-back.safetensors"
expect_stdout_contains "converted 4 LoRA modules (peft -> kohya)"
expect_exit 0 "$LORA" merge --base "$TD/tiny-unet" --adapter "$W/unet-back.safetensors" --out "$W/unet-m1" --quiet
expect_exit 0 "$LORA" merge --base "$TD/tiny-unet" --adapter "$TD/lora-tiny-unet-kohya.safetensors" --out "$W/unet-m2" --quiet
expect_eq "kohya round trip merges to the same bytes" \
  "$("$PY" -c 'import sys; a, b = (open(p, "rb").read() for p in sys.argv[1:]); import struct; n, m = (struct.unpack("<Q", x[:8])[0] for x in (a, b)); print("same" if a[8 + n:] == b[8 + m:] else "differ")' "$W/unet-m1/model.safetensors" "$W/unet-m2/model.safetensors")" same
# the real mlx_lm adapter (mlx-examples MiniCPM): delta = scale * (x @ lora_a) @ lora_b
if [ -f "$MLX/adapters.safetensors" ]; then
  expect_exit 0 "$LORA" convert "$MLX" --to peft --out "$W/mlx" --json
  expect_json 'j["from"]' mlx
  expect_json '[j["modules"], j["rank"], j["scale"]]' '[8,[8,8],[10.0,10.0]]'
  check mlx "$MLX" "$W/mlx"
  expect_json 'json.load(open("'"$W"'/mlx/adapter_config.json"))["lora_alpha"]' 80
else
  echo "note: $MLX absent, MLX fixture checks skipped"
fi

# malformed MLX adapters, made here from a valid pair
E2E_LIB="$SRC/tests/e2e" "$PY" - "$W" <<'PY'
import json, os, sys
import numpy as np
sys.path.insert(0, os.environ["E2E_LIB"])
import safetensors_np
w = sys.argv[1]
def st(path, t):
    safetensors_np.write(path, {k: v.astype(np.float32) for k, v in t.items()})
rng = np.random.default_rng(3)
pair = {"m.q_proj.lora_a": rng.standard_normal((8, 2)), "m.q_proj.lora_b": rng.standard_normal((2, 6))}
cases = {
    "mlx-ok": (pair, '{"lora_parameters": {"rank": 2, "scale": 20.0}}'),
    "mlx-noconfig": (pair, None),
    "mlx-garbled": (pair, '{"lora_parameters": {"scale": 20.0'),
    "mlx-noscale": (pair, '{"lora_parameters": {"rank": 2}}'),
    "mlx-rank": (pair, '{"lora_parameters": {"rank": 4, "scale": 20.0}}'),
    "mlx-half": ({"m.q_proj.lora_a": pair["m.q_proj.lora_a"]}, '{"lora_parameters": {"scale": 20.0}}'),
}
for name, (t, cfg) in cases.items():
    os.makedirs(os.path.join(w, name))
    st(os.path.join(w, name, "adapters.safetensors"), t)
    if cfg is not None:
        open(os.path.join(w, name, "adapter_config.json"), "w").write(cfg)
PY
expect_exit 0 "$LORA" convert "$W/mlx-ok" --to peft --out "$W/mlx-ok-peft" --json
expect_json 'j["scale"]' '[20.0,20.0]'
expect_refusal 3 "adapters.safetensors: MLX LoRA weights without adapter_config.json beside them" x1 "$LORA" convert "$W/mlx-noconfig" --to peft --out "$W/x1"
expect_refusal 3 "adapter_config.json: adapter config is not valid JSON" x2 "$LORA" convert "$W/mlx-garbled" --to peft --out "$W/x2"
expect_refusal 3 "lora_parameters.scale: missing" x3 "$LORA" convert "$W/mlx-noscale" --to peft --out "$W/x3"
expect_refusal 3 "m.q_proj.lora_a: rank 2 from the shapes, but" x4 "$LORA" convert "$W/mlx-rank" --to peft --out "$W/x4"
expect_refusal 3 "lora_a without its lora_b" x5 "$LORA" convert "$W/mlx-half" --to peft --out "$W/x5"
expect_refusal 3 "the base has no tensor m.q_proj.weight" x6 "$LORA" convert "$W/mlx-ok" --to peft --base "$TD/tiny-llama" --out "$W/x6"
# other refusals
expect_refusal 2 "--to: safetensors not in {peft,kohya}" x7 "$LORA" convert "$A1" --to safetensors --out "$W/x7"
expect_refusal 2 "needs --base MODEL" x8 "$LORA" convert "$TD/lora-tiny-llama-kohya.safetensors" --to peft --out "$W/x8"
expect_refusal 4 "$W/absent" x9 "$LORA" convert "$W/absent" --to kohya --out "$W/x9"
expect_refusal 3 "kohya files cannot hold DoRA" x10 "$LORA" convert "$TD/lora-tiny-llama-dora" --to kohya --out "$W/x10"
expect_refusal 3 "kohya files cannot hold a LoRA bias" x11 "$LORA" convert "$TD/lora-tiny-qwen2-bias" --to kohya --out "$W/x11"
expect_refusal 3 "kohya files cannot hold modules_to_save" x12 "$LORA" convert "$TD/lora-tiny-llama-extras" --to kohya --out "$W/x12"
expect_refusal 3 "does the adapter belong to this base model?" x13 "$LORA" convert "$TD/lora-tiny-llama-mismatch" --to kohya --base "$TD/tiny-llama" --out "$W/x13"
expect_exit 2 "$LORA" convert "$A1" --to kohya --out "$W/lora-tiny-llama.safetensors"
expect_stderr_contains "lora-tiny-llama.safetensors already exists (--force replaces it)"
expect_one_line_error
expect_exit 0 "$LORA" convert "$A2" --to kohya --out "$W/lora-tiny-llama.safetensors" --force
check kohya-scales "$A2" "$W/lora-tiny-llama.safetensors"
# ---------------------------------------------------------------- finite inputs, finite outputs
# a huge but finite lora_alpha (s = 2.5e37): resize and combine give finite
# factors equal to the double reference, or refuse naming file and module
cp -r "$TD/lora-tiny-llama" "$W/huge" && sed -i 's/"lora_alpha": *[0-9.]*/"lora_alpha": 1e38/' "$W/huge/adapter_config.json"
cp -r "$TD/lora-tiny-llama" "$W/vast" && sed -i 's/"lora_alpha": *[0-9.]*/"lora_alpha": 1e300/' "$W/vast/adapter_config.json"
expect_exit 0 "$LORA" resize --adapter "$W/huge" --rank 2 --out "$W/huge-r2" --json
cp "$OUT_FILE" "$W/huge-r2.json"
check resize "$W/huge" "$W/huge-r2" "$W/huge-r2.json" 2
# weight 100: w s B_1 (~4e38) alone would overflow f32; the split keeps it finite and exact
expect_exit 0 "$LORA" combine --adapter "$W/huge" --weight 100 --adapter "$A1" --weight 1 --out "$W/huge-c"
check combine "$W/huge-c" "$W/huge:100" "$A1:1"
expect_exit 0 "$LORA" combine --adapter "$W/huge" --weight 100 --adapter "$A1" --weight 1 --rank 4 --out "$W/huge-c4" --json
cp "$OUT_FILE" "$W/huge-c4.json"
check combine-rank "$W/huge-c4" "$W/huge-c4.json" 4 "$W/huge:100" "$A1:1"
# s = 2.5e299: the delta's energy overflows f64 and its factors any dtype
expect_refusal 3 "vast/adapter_model.safetensors: model.layers.0.mlp.down_proj: the delta s B A (s = 2.5e+299) is too large: its squared norm overflows f64" vast-r "$LORA" resize --adapter "$W/vast" --rank 2 --out "$W/vast-r"
expect_refusal 3 "vast/adapter_model.safetensors + $A1/adapter_model.safetensors: model.layers.0.mlp.down_proj: the delta is too large" vast-c4 "$LORA" combine --adapter "$W/vast" --weight 1 --adapter "$A1" --weight 1 --rank 4 --out "$W/vast-c4"
expect_refusal 3 "model.layers.0.mlp.down_proj: the new lora_A overflows F32: a value of magnitude 1.08e+149" vast-c "$LORA" combine --adapter "$W/vast" --weight 1 --adapter "$A1" --weight 1 --out "$W/vast-c"
# NaN in one factor: every command refuses it, naming the file and the tensor
cp -r "$TD/lora-tiny-llama" "$W/nan"
"$PY" "$SRC/tests/e2e/make_inputs.py" nan-factor "$W/nan/adapter_model.safetensors"
NAN_MSG="nan/adapter_model.safetensors: base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight: 1 of its 256 values are NaN or infinite (module model.layers.0.self_attn.q_proj)"
expect_refusal 3 "$NAN_MSG" nan-r "$LORA" resize --adapter "$W/nan" --rank 2 --out "$W/nan-r"
expect_refusal 3 "$NAN_MSG" nan-c "$LORA" combine --adapter "$A1" --weight 1 --adapter "$W/nan" --weight 1 --out "$W/nan-c"
expect_refusal 3 "$NAN_MSG" nan-k.safetensors "$LORA" convert "$W/nan" --to kohya --out "$W/nan-k.safetensors"
finish
