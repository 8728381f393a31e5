#!/usr/bin/env bash
# lora forward on testdata: logits file shape, adapter effect, --top-k, refusals.
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
TD="$SRC/testdata"
T=1,17,42,255,0,128,7,99,3,200,64,5

expect_exit 0 "$LORA" forward --model "$TD/tiny-llama" --tokens $T --out "$E2E_TMP/base.safetensors" --top-k 3 --threads 1
expect_stdout_contains "wrote logits [12, 256]"
expect_stdout_contains "position 11 (token 5):"
expect_exit 0 "$LORA" forward --model "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama" --tokens $T --out "$E2E_TMP/lora.safetensors"
# the logits match PyTorch's (tests/reference) and the adapter moves them
got=$("$PY" - "$E2E_TMP" "$SRC" <<'PY'
import sys; sys.path.insert(0, sys.argv[2] + "/tests/e2e")
import numpy as np
from safetensors_np import read
def tensors(path): return {k: v[3] for k, v in read(path)[0].items()}
ref = tensors(sys.argv[2] + "/tests/reference/llama-logits.safetensors")
b = tensors(sys.argv[1] + "/base.safetensors")["logits"]
l = tensors(sys.argv[1] + "/lora.safetensors")["logits"]
ok = np.abs(b - ref["tiny-llama"]).max() < 1e-4 and np.abs(l - ref["tiny-llama+lora-tiny-llama"]).max() < 1e-4 \
     and np.abs(l - b).max() > 1e-2 and list(b.shape) == [12, 256]
print("ok" if ok else "mismatch")
PY
)
expect_eq "logits vs PyTorch" "$got" ok

# refusals: one line, exit code, nothing written
expect_exit 2 "$LORA" forward --model "$TD/tiny-llama" --tokens 1,x --out "$E2E_TMP/bad.safetensors"
expect_stderr_contains "--tokens 1,x"
expect_exit 2 "$LORA" forward --model "$TD/tiny-llama" --tokens 1,256 --out "$E2E_TMP/bad.safetensors"
expect_stderr_contains "token id 256 is outside the vocabulary"
expect_one_line_error
expect_exit 3 "$LORA" forward --model "$TD/tiny-unet" --tokens 1 --out "$E2E_TMP/bad.safetensors"
expect_stderr_contains "model_type"
expect_exit 3 "$LORA" forward --model "$TD/tiny-llama" --adapter "$TD/lora-tiny-llama-mismatch" --tokens 1 --out "$E2E_TMP/bad.safetensors"
expect_one_line_error
mkdir -p "$E2E_TMP/scaled"
cp "$TD/tiny-llama/model.safetensors" "$E2E_TMP/scaled/"
sed 's/"rms_norm_eps"/"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rms_norm_eps"/' "$TD/tiny-llama/config.json" >"$E2E_TMP/scaled/config.json"
expect_exit 3 "$LORA" forward --model "$E2E_TMP/scaled" --tokens 1 --out "$E2E_TMP/bad.safetensors"
expect_stderr_contains "rope_scaling"
if ls "$E2E_TMP"/bad.safetensors* >/dev/null 2>&1; then fail "a refused run left output behind"; else pass; fi
finish
