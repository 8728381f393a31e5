#!/usr/bin/env bash
# Benchmark of `lora extract` against PyTorch (Debian python3-torch, CPU):
# torch.linalg.svd (mergekit, sd-scripts) and torch.svd_lowrank, on one
# Llama-shaped layer (hidden 2048, intermediate 5632, 16 heads, 4 KV heads;
# q/k/v/o/gate/up/down) whose BF16 deltas have a decaying spectrum; rank 32.
# Whole processes are timed (wall clock, and user+sys CPU). Not a test.
# usage: bench/extract/run.sh [LORA_BIN]   (default: build-extract/lora, else build/lora)
# Targets: lora <= 0.05x full-SVD time and <= 0.3x svd_lowrank time, error
# within 1% of the optimal rank-32 error.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/../.." && pwd)
LORA=${1:-}
if [ -z "$LORA" ]; then
  for c in "$SRC/build-extract/lora" "$SRC/build/lora"; do [ -x "$c" ] && LORA=$c && break; done
fi
[ -x "$LORA" ] || { echo "build lora first (cmake --build build --target lora)"; exit 1; }
PY=/usr/bin/python3
OUT=$SRC/bench/out/extract
R=32
mkdir -p "$OUT"
if [ ! -f "$OUT/tuned/model.safetensors" ]; then
  echo "generating the layer in $OUT ..."
  "$PY" "$SRC/bench/extract/make-layer.py" "$OUT"
fi
cat "$OUT/base/model.safetensors" "$OUT/tuned/model.safetensors" >/dev/null  # page cache, for everyone alike

# timed NAME CMD...: wall seconds and user+sys CPU seconds of the whole process
timed() {
  local name=$1
  shift
  /usr/bin/time -f "%e %U %S" -o "$OUT/time-$name" "$@" >"$OUT/log-$name" 2>&1 || { cat "$OUT/log-$name"; exit 1; }
  read -r wall user sys <"$OUT/time-$name"
  printf -v "wall_$name" '%s' "$wall"
  printf -v "cpu_$name" '%s' "$(echo "$user + $sys" | bc)"
}

rm -rf "$OUT/lora" "$OUT/torch-svd" "$OUT/torch-lowrank"
timed lora "$LORA" extract --base "$OUT/base" --tuned "$OUT/tuned" --out "$OUT/lora" --rank $R --quiet
timed svd "$PY" "$SRC/bench/extract/torch-extract.py" svd "$OUT/base" "$OUT/tuned" "$OUT/torch-svd" $R
timed lowrank "$PY" "$SRC/bench/extract/torch-extract.py" lowrank "$OUT/base" "$OUT/tuned" "$OUT/torch-lowrank" $R

echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); rank $R, 7 modules, 45.1M delta elements"
printf "%-42s %8s s wall %8s s cpu\n" "lora extract (randomized, l=42, 2 power it.)" "$wall_lora" "$cpu_lora"
printf "%-42s %8s s wall %8s s cpu\n" "torch.linalg.svd (mergekit / sd-scripts)" "$wall_svd" "$cpu_svd"
printf "%-42s %8s s wall %8s s cpu\n" "torch.svd_lowrank (q=42, niter=2)" "$wall_lowrank" "$cpu_lowrank"
ratio() { echo "scale=4; $1 / $2" | bc; }
echo "lora / full SVD:    $(ratio "$wall_lora" "$wall_svd")x wall, $(ratio "$cpu_lora" "$cpu_svd")x cpu (target <= 0.05x)"
echo "lora / svd_lowrank: $(ratio "$wall_lora" "$wall_lowrank")x wall, $(ratio "$cpu_lora" "$cpu_lowrank")x cpu (target <= 0.3x)"
"$PY" "$SRC/bench/extract/errors.py" "$OUT/base" "$OUT/tuned" "$OUT/torch-svd" $R \
  "lora extract=$OUT/lora" "torch.linalg.svd=$OUT/torch-svd" "torch.svd_lowrank=$OUT/torch-lowrank"
