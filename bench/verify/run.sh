#!/usr/bin/env bash
# Verify benchmark: peak resident memory of `lora verify` on a model with a
# 512 MiB F32 embedding, for a LoRA on the embedding and a DoRA on a 256 MiB
# linear (see make_model.py). Verify should stay near a few row blocks, like
# merge, whatever the tensor's size. Not part of the test suite.
# Usage: bench/verify/run.sh [PATH-TO-LORA]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
LORA=${1:-$SRC/build/lora}
PY=/usr/bin/python3
OUT=$SRC/bench/out/verify
[ -x "$LORA" ] || { echo "no lora executable at $LORA (pass its path)" >&2; exit 2; }

"$PY" "$HERE/make_model.py" "$OUT"
for case in emb dora; do
  [ -f "$OUT/merged-$case/model.safetensors" ] ||
    "$LORA" merge --base "$OUT/base" --adapter "$OUT/adapter-$case" --out "$OUT/merged-$case" --quiet
  /usr/bin/time -v "$LORA" verify --base "$OUT/base" --adapter "$OUT/adapter-$case" --merged "$OUT/merged-$case" \
    --threads 1 >"$OUT/verify-$case.txt" 2>"$OUT/time-$case.txt" || true
  printf '%-5s %s; %s; %s\n' "$case" "$(head -1 "$OUT/verify-$case.txt")" \
    "$(grep 'Maximum resident' "$OUT/time-$case.txt" | sed 's/.*: /peak RSS KiB: /')" \
    "$(grep 'Elapsed' "$OUT/time-$case.txt" | sed 's/.*: /wall /')"
done
