#!/usr/bin/env bash
# FP8 merge benchmark: `lora merge` into a block-scaled FP8 model (output kept
# FP8, and --dtype bf16) against the same merge into the same weights stored
# as BF16, and `cp` of the FP8 file. Not part of the test suite; PyTorch 1.13
# (Debian) has no float8 dtype, so there is no PyTorch row.
# Usage: bench/fp8/run.sh [PATH-TO-LORA]   (env RUNS=3: runs per command, median)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
LORA=${1:-$SRC/build/lora}
RUNS=${RUNS:-3}
PY=/usr/bin/python3
OUT=$SRC/bench/out/fp8
[ -x "$LORA" ] || { echo "no lora executable at $LORA (pass its path)" >&2; exit 2; }
"$PY" "$HERE/make_model.py" "$OUT"
measure() { "$PY" "$SRC/bench/merge/measure.py" "$@"; }
echo "4 x [4096, 4096] weights, rank-16 LoRA on each; $(nproc) cores; $RUNS runs each after sync, median"
for r in \
  "$(measure cp-fp8 "$RUNS" "$OUT/cp" -- sh -c "mkdir -p '$OUT/cp' && cp '$OUT/fp8/model.safetensors' '$OUT/cp/'")" \
  "$(measure merge-fp8 "$RUNS" "$OUT/o-fp8" -- "$LORA" merge --base "$OUT/fp8" --adapter "$OUT/lora" --out "$OUT/o-fp8" --quiet)" \
  "$(measure merge-fp8-to-bf16 "$RUNS" "$OUT/o-fp8-bf16" -- "$LORA" merge --base "$OUT/fp8" --adapter "$OUT/lora" --out "$OUT/o-fp8-bf16" --dtype bf16 --quiet)" \
  "$(measure merge-bf16 "$RUNS" "$OUT/o-bf16" -- "$LORA" merge --base "$OUT/bf16" --adapter "$OUT/lora" --out "$OUT/o-bf16" --quiet)"; do
  set -- $r
  printf '%-18s %7.3f s   peak RSS %5d MiB   runs: %s\n' "$1" "$2" "$3" "$4"
done
