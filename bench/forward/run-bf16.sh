#!/usr/bin/env bash
# Memory of `lora forward` on a 1.7 GB BF16 Llama-shaped model (make_bf16_model.py):
# wall time and peak RSS (/usr/bin/time -v), and the peak anonymous memory
# (RssAnon from /proc/PID/status, sampled every 20 ms).
# Not part of the test suite.  Usage: bench/forward/run-bf16.sh [PATH-TO-LORA]  (env THREADS=2)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
LORA=${1:-$SRC/build/lora}
THREADS=${THREADS:-2}
OUT=$SRC/bench/out/forward-bf16
[ -x "$LORA" ] || { echo "no lora executable at $LORA (pass its path)" >&2; exit 2; }
/usr/bin/python3 "$HERE/make_bf16_model.py" "$OUT/model"
cat "$OUT/model/model.safetensors" >/dev/null  # page cache warm: measure the command, not the disk
/usr/bin/time -v "$LORA" forward --model "$OUT/model" --tokens 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16 \
  --out "$OUT/logits.safetensors" --threads "$THREADS" >/dev/null 2>"$OUT/time.txt" &
TPID=$!
peak=0
sleep 0.05
PID=$(pgrep -P "$TPID" | head -1 || true)
while [ -n "$PID" ] && [ -r "/proc/$PID/status" ]; do
  a=$(awk '/^RssAnon/ {print $2}' "/proc/$PID/status" 2>/dev/null || echo 0)
  [ -n "$a" ] && [ "$a" -gt "$peak" ] && peak=$a
  sleep 0.02
done
wait "$TPID"
grep -E "Elapsed|Maximum resident" "$OUT/time.txt"
echo "peak RssAnon (sampled): $((peak / 1024)) MiB"
echo "model file: $(( $(stat -c %s "$OUT/model/model.safetensors") / 1048576 )) MiB"
