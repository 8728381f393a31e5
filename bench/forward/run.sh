#!/usr/bin/env bash
# Forward benchmark: `lora forward` (whole command: open, convert, compute,
# write) against PyTorch's f32 forward of the same weights, both as a whole
# process and compute only (weights already loaded), 128 tokens, ~100M-parameter Llama-shaped F32 model.
# With build/bench-forward (cmake -DLORA_BENCH=ON) beside LORA, also the compute
# alone: lora's tokens/s and GFLOP/s, and the GFLOP/s of cblas_sgemm on the same products.
# Not part of the test suite.  Usage: bench/forward/run.sh [PATH-TO-LORA]  (env RUNS=3, THREADS=2)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
LORA=${1:-$SRC/build/lora}
RUNS=${RUNS:-3}
THREADS=${THREADS:-2}
PY=/usr/bin/python3
OUT=$SRC/bench/out/forward
[ -x "$LORA" ] || { echo "no lora executable at $LORA (pass its path)" >&2; exit 2; }
"$PY" "$HERE/make_model.py" "$OUT/model"
TOKENS=$("$PY" -c "import random; r=random.Random(0); print(','.join(str(r.randrange(32000)) for _ in range(128)))")

best=""
for _ in $(seq "$RUNS"); do
  t0=$(date +%s.%N)
  "$LORA" forward --model "$OUT/model" --tokens "$TOKENS" --out "$OUT/lora-logits.safetensors" --threads "$THREADS" >/dev/null
  t=$(echo "$(date +%s.%N) - $t0" | bc -l)
  if [ -z "$best" ] || [ "$(echo "$t < $best" | bc -l)" = 1 ]; then best=$t; fi
done
pt=$(THREADS=$THREADS "$PY" "$HERE/torch_forward.py" "$OUT/model" "$TOKENS" "$OUT/torch-logits.safetensors" "$RUNS")
# the same whole-process measure for PyTorch: start, load, one forward, write
ptw=""
for _ in $(seq "$RUNS"); do
  t0=$(date +%s.%N)
  THREADS=$THREADS "$PY" "$HERE/torch_forward.py" "$OUT/model" "$TOKENS" "$OUT/torch-logits.safetensors" 1 >/dev/null
  t=$(echo "$(date +%s.%N) - $t0" | bc -l)
  if [ -z "$ptw" ] || [ "$(echo "$t < $ptw" | bc -l)" = 1 ]; then ptw=$t; fi
done
diff=$("$PY" -c "
import sys; sys.path.insert(0, '$SRC/tests/reference')
from llama_reference import read_safetensors
a = read_safetensors('$OUT/lora-logits.safetensors')['logits']; b = read_safetensors('$OUT/torch-logits.safetensors')['logits']
print('%.3g (max |logit| %.3g)' % (float((a - b).abs().max()), float(b.abs().max())))")
"$PY" -c "
lora, pt, ptw = $best, $pt, $ptw
print('forward 128 tokens, ~100M params F32, $THREADS threads, best of $RUNS')
print('lora forward (whole command): %.3f s  %.1f tokens/s' % (lora, 128 / lora))
print('pytorch (whole process: start, load, forward, write): %.3f s  %.1f tokens/s' % (ptw, 128 / ptw))
print('pytorch forward (compute only, weights loaded): %.3f s  %.1f tokens/s' % (pt, 128 / pt))
print('ratio lora/pytorch tokens/s, whole process vs whole process: %.2f' % (ptw / lora))
print('ratio lora (whole command) / pytorch (compute only) tokens/s: %.2f' % (pt / lora))"
echo "max |lora - pytorch| logits: $diff"
pt_tps=$("$PY" -c "print('%.1f' % (128 / $pt))")
BENCH=$(dirname "$LORA")/bench-forward
if [ -x "$BENCH" ]; then
  "$BENCH" "$OUT/model" 128 "$RUNS" "$THREADS" | tee "$OUT/bench-forward.txt"
  lora_tps=$(awk '/^forward \(compute/ {print $(NF-3)}' "$OUT/bench-forward.txt")
  "$PY" -c "print('compute only: lora %s tokens/s, pytorch %s tokens/s, ratio lora/pytorch %.2f' % ('$lora_tps', '$pt_tps', float('$lora_tps') / float('$pt_tps')))"
else
  echo "(no $BENCH: configure with -DLORA_BENCH=ON for the compute-only and sgemm figures)"
fi
