#!/usr/bin/env bash
# Every command at the size people merge: a Llama-3-8B-shaped BF16 model (16 GB,
# 4 shards) with a rank-16 F32 adapter on all seven projections of every layer.
# Times `lora merge` against `cp -r` of the same folder from a cold and a warm
# page cache, then verify, extract (--rank 16, base against the merge) and
# forward (16 tokens, adapter applied unmerged): wall, user, system, peak
# anonymous memory, load average; medians. Not part of the test suite; needs
# root (drop_caches) and ~50 GB free under bench/out/scale.
# Usage: bench/scale/run.sh [PATH-TO-LORA]
#   env RUNS=2 (per command), ONLY="merge verify extract forward" (steps),
#   CACHES="cold warm" (page cache states of the merge step),
#   TIMEOUT=1800 (seconds per run), LAYERS=32 (fewer: a smaller model).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
LORA=$(realpath "${1:-$SRC/build/lora}")
RUNS=${RUNS:-2}
ONLY=${ONLY:-merge verify extract forward}
CACHES=${CACHES:-cold warm}
TIMEOUT=${TIMEOUT:-1800}
LAYERS=${LAYERS:-32}
OUT=$SRC/bench/out/scale
[ -x "$LORA" ] || { echo "no lora executable at $LORA (pass its path)" >&2; exit 2; }
mkdir -p "$OUT"

# 1. inputs, generated once (bench/scale/make-model.cpp: a PRNG per tensor)
g++ -O2 -std=c++20 -o "$OUT/make-model" "$HERE/make-model.cpp"
MODEL=$OUT/model-$LAYERS
"$OUT/make-model" "$MODEL" "$LAYERS"
BASE=$MODEL/base
ADAPTER=$MODEL/adapter
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
export LOG_DIR=$OUT
echo "lora: $LORA; $(du -sh "$BASE" | cut -f1) base; $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB;" \
  "$RUNS runs per command, interleaved; load average at the start of each run"
m() { "$HERE/measure.py" "$@" | tee -a "$RESULTS"; }
MERGED=$OUT/merged

# 2. merge against cp -r, cold then warm (the merged model stays for the next steps)
if [[ " $ONLY " == *" merge "* ]]; then
  for cache in $CACHES; do
    [ "$cache" = warm ] && cache="warm:$BASE"
    m "$cache" "$RUNS" "$TIMEOUT" \
      "cp -r|$OUT/cp|cp -r '$BASE' '$OUT/cp'" \
      "merge|$MERGED|'$LORA' merge --base '$BASE' --adapter '$ADAPTER' --out '$MERGED' --quiet" >/dev/null
  done
  rm -rf "$OUT/cp"
fi
[ -d "$MERGED" ] || "$LORA" merge --base "$BASE" --adapter "$ADAPTER" --out "$MERGED" --quiet

# 3. verify, extract, forward; cold page cache
TOKENS=$(seq -s, 1000 1000 16000)
[[ " $ONLY " == *" verify "* ]] &&
  m cold "$RUNS" "$TIMEOUT" "verify|-|'$LORA' verify --base '$BASE' --adapter '$ADAPTER' --merged '$MERGED' --json" >/dev/null
[[ " $ONLY " == *" extract "* ]] &&
  m cold "$RUNS" "$TIMEOUT" \
    "extract|$OUT/extracted|'$LORA' extract --base '$BASE' --tuned '$MERGED' --out '$OUT/extracted' --rank 16 --json" >/dev/null
[[ " $ONLY " == *" forward "* ]] &&
  m cold "$RUNS" "$TIMEOUT" \
    "forward|-|'$LORA' forward --model '$BASE' --adapter '$ADAPTER' --tokens $TOKENS --out '$OUT/logits.safetensors'" >/dev/null

# 4. the table and the ratios
/usr/bin/python3 "$HERE/report.py" "$RESULTS" "$OUT" "$BASE" "$MERGED"
