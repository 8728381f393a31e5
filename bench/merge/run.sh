#!/usr/bin/env bash
# Merge benchmark: `lora merge` against the same merge done the way PEFT does
# it in PyTorch, and against `cp` of the base file (the floor), on a
# deterministic Llama-shaped BF16 model (~0.6 GB) with a rank-16 adapter on all
# seven linear modules. Not part of the test suite.
# Usage: bench/merge/run.sh [PATH-TO-LORA]   (env RUNS=3: runs per command, median)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
LORA=${1:-$SRC/build/lora}
RUNS=${RUNS:-3}
PY=/usr/bin/python3
OUT=$SRC/bench/out/merge
[ -x "$LORA" ] || { echo "no lora executable at $LORA (pass its path)" >&2; exit 2; }

# 1. inputs (generated once, deterministic)
"$PY" "$HERE/make_model.py" "$OUT"
BASE=$OUT/base
ADAPTER=$OUT/adapter
echo "base: $(du -h "$BASE/model.safetensors" | cut -f1) BF16, adapter: rank 16 on q,k,v,o,gate,up,down x 4 layers;" \
  "$(nproc) cores; $RUNS runs each after sync, median"

# 2. timings: label, median seconds, peak RSS MiB, every run
measure() { "$PY" "$HERE/measure.py" "$@"; }
R_CP=$(measure cp "$RUNS" "$OUT/cp" -- sh -c "mkdir -p '$OUT/cp' && cp '$BASE/model.safetensors' '$OUT/cp/'")
R_CPS=$(measure cp+sync "$RUNS" "$OUT/cp" -- sh -c "mkdir -p '$OUT/cp' && cp '$BASE/model.safetensors' '$OUT/cp/' && sync")
R_LORA=$(measure lora "$RUNS" "$OUT/lora" -- "$LORA" merge --base "$BASE" --adapter "$ADAPTER" --out "$OUT/lora" --quiet)
R_LORAS=$(measure lora+sync "$RUNS" "$OUT/lora-sync" -- "$LORA" merge --base "$BASE" --adapter "$ADAPTER" --out "$OUT/lora-sync" --quiet --sync)
R_PT=$(measure pytorch "$RUNS" "$OUT/pytorch" -- "$PY" "$HERE/peft_merge.py" "$BASE" "$ADAPTER" "$OUT/pytorch")
R_PTS=$(measure pytorch+sync "$RUNS" "$OUT/pytorch" -- sh -c "'$PY' '$HERE/peft_merge.py' '$BASE' '$ADAPTER' '$OUT/pytorch' && sync")

field() { echo "$1" | cut -d' ' -f"$2"; }
for r in "$R_CP" "$R_CPS" "$R_LORA" "$R_LORAS" "$R_PT" "$R_PTS"; do
  printf '%-13s %7.3f s   peak RSS %5d MiB   runs: %s\n' "$(field "$r" 1)" "$(field "$r" 2)" "$(field "$r" 3)" "$(field "$r" 4)"
done
echo "(lora, cp and the PyTorch script return with the data in the page cache, written back by the kernel later;" \
  "the +sync rows wait until it is on disk: lora merge --sync fsyncs before renaming its output into place)"
cmp -s "$OUT/lora/model.safetensors" "$OUT/lora-sync/model.safetensors" ||
  { echo "lora merge --sync wrote different bytes" >&2; exit 1; }

# 3. ratios and targets
"$PY" - "$R_CP" "$R_CPS" "$R_LORA" "$R_LORAS" "$R_PT" "$R_PTS" <<'PYEOF'
import sys
t = {r.split()[0]: float(r.split()[1]) for r in sys.argv[1:]}
rss = int(sys.argv[3].split()[2])
def line(what, num, den, target):
    ratio = t[num] / t[den]
    print("ratio %-24s %6.3fx  (target <= %sx: %s)" % (what, ratio, target, "met" if ratio <= target else "NOT met"))
line("lora / pytorch", "lora", "pytorch", 0.1)
line("lora / cp", "lora", "cp", 1.5)
line("lora+sync / pytorch+sync", "lora+sync", "pytorch+sync", 0.1)
line("lora+sync / cp+sync", "lora+sync", "cp+sync", 1.5)
print("peak RSS lora %d MiB (target <= 200 MiB: %s)" % (rss, "met" if rss <= 200 else "NOT met"))
PYEOF

# 4. accuracy against the once-rounded float64 truth
"$PY" "$HERE/accuracy.py" "$BASE" "$ADAPTER" "lora=$OUT/lora" "pytorch=$OUT/pytorch"
