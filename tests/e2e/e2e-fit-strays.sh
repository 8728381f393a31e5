#!/usr/bin/env bash
# --skip-unmatched with a base layout (core/name-map choose_layout most_found):
# the layout is the one under which the most of the adapter's names are
# found, and only the true strays are skipped. Three cases: a PEFT adapter in
# LlamaForCausalLM names (with an lm_head module) plus one stray module, into
# a bare LlamaModel checkpoint; a diffusers Flux LoRA plus one stray, into a
# diffusers FluxTransformer2DModel file; a diffusers SD 1.5 LoRA (unet. and
# text_encoder. modules) into the UNet's own file, whose text_encoder.
# modules belong to another component. Merged values against numpy float64
# (expect_plain.py + check_fused.py, or make_pipelines.py's expectation):
# BF16 byte for byte, every other tensor bit-identical; the skipped list
# asserted; verify --skip-unmatched equivalent. Without the flag each is
# refused as before (exit 3, one line, nothing written).
LORA=$1
SRC=$2
export SRC
. "$SRC/tests/e2e/lib.sh"
TD="$SRC/testdata"
W="$E2E_TMP/w"
mkdir -p "$W"

# check_case NAME BASE_FILE MERGED_FILE NPZ N: check_fused.py says "ok N merged"
check_case() {
  local got
  got=$("$PY" "$SRC/tests/e2e/check_fused.py" "$2" "$3" "$4" 2>&1)
  expect_eq "$1: merged tensors" "$got" "ok $5 merged"
}

# --- 1. bare LlamaModel base (tiny-llama without "model."; lm_head kept), adapter in LlamaForCausalLM names
# (lora-tiny-llama's 14 modules + lm_head) and a stray on layer 9 (the model has 2)
"$PY" - "$TD" "$W" <<'PY' || fail "make bare-llama"
import json, os, shutil, sys
import numpy as np
sys.path.insert(0, os.environ["SRC"] + "/tests/e2e")
from safetensors_np import read, write
td, w = sys.argv[1:3]
t, _ = read(td + "/tiny-llama/model.safetensors")
os.makedirs(w + "/bare", exist_ok=True)
write(w + "/bare/model.safetensors", {(k[6:] if k.startswith("model.") else k): v[:3] for k, v in t.items()})
shutil.copy(td + "/tiny-llama/config.json", w + "/bare")
a, _ = read(td + "/lora-tiny-llama/adapter_model.safetensors")
rng = np.random.default_rng(11)
V, H = t["lm_head.weight"][1]
x = {k: v[:3] for k, v in a.items()}
x["base_model.model.lm_head.lora_A.weight"] = (rng.standard_normal((4, H)) * 0.1).astype(np.float32)
x["base_model.model.lm_head.lora_B.weight"] = (rng.standard_normal((V, 4)) * 0.1).astype(np.float32)
x["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = (rng.standard_normal((4, H)) * 0.1).astype(np.float32)
x["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = (rng.standard_normal((H, 4)) * 0.1).astype(np.float32)
os.makedirs(w + "/stray", exist_ok=True)
write(w + "/stray/adapter_model.safetensors", x)
c = json.load(open(td + "/lora-tiny-llama/adapter_config.json"))
c["target_modules"] = c["target_modules"] + ["lm_head"]
json.dump(c, open(w + "/stray/adapter_config.json", "w"))
PY
got=$("$PY" "$SRC/tests/e2e/expect_plain.py" "$W/bare/model.safetensors" "$W/stray/adapter_model.safetensors" \
  "$W/expect-bare.npz" 2 "model.=" | tr '\n' ' ')
expect_eq "bare: the expectation's strays" "$got" "stray model.layers.9.self_attn.q_proj n 15 "
# without the flag: refused as before, naming the closest layout
expect_exit 3 "$LORA" merge --base "$W/bare" --adapter "$W/stray" --out "$W/r-bare"
expect_one_line_error
expect_stderr_contains "15 of 16 names are found as a"
expect_nothing_left r-bare
expect_exit 0 "$LORA" merge --base "$W/bare" --adapter "$W/stray" --out "$W/r-bare" --skip-unmatched --json
expect_json "(j['modules'], j['tensors']['merged'])" "[15,15]"
expect_json "[m['module'] for m in j['skipped_modules']]" '["model.layers.9.self_attn.q_proj"]'
check_case bare "$W/bare/model.safetensors" "$W/r-bare/model.safetensors" "$W/expect-bare.npz" 15
expect_exit 0 "$LORA" verify --base "$W/bare" --adapter "$W/stray" --merged "$W/r-bare" --skip-unmatched --json
expect_json "j['equivalent']" "true"
expect_json "j['layers_checked']" "15"
expect_json "j['layers_failed']" "0"

# --- 2. diffusers Flux LoRA + a stray (transformer_blocks.7: the model has fewer) into a diffusers
# FluxTransformer2DModel file
"$PY" "$SRC/tests/e2e/make_fused.py" "$W/fused" BF16 || fail "make_fused.py"
"$PY" - "$W/fused/flux-diffusers/pytorch_lora_weights.safetensors" "$W/fd-stray" <<'PY' || fail "make fd-stray"
import os, sys
import numpy as np
sys.path.insert(0, os.environ["SRC"] + "/tests/e2e")
from safetensors_np import read, write
t, _ = read(sys.argv[1])
x = {k: v[:3] for k, v in t.items()}
a = t["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"][3]
b = t["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"][3]
rng = np.random.default_rng(12)
x["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = rng.standard_normal(a.shape).astype(np.float32)
x["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = rng.standard_normal(b.shape).astype(np.float32)
os.makedirs(sys.argv[2], exist_ok=True)
write(sys.argv[2] + "/pytorch_lora_weights.safetensors", x)
PY
DIT="$W/fused/flux-dit.safetensors"
got=$("$PY" "$SRC/tests/e2e/expect_plain.py" "$DIT" "$W/fd-stray/pytorch_lora_weights.safetensors" \
  "$W/expect-fd.npz" 1 "transformer.=" | tr '\n' ' ')
N_FD=${got##*n }
N_FD=${N_FD% }
expect_eq "flux: the expectation's strays" "${got%% n *}" "stray transformer.transformer_blocks.7.attn.to_q"
expect_exit 3 "$LORA" merge --base "$DIT" --adapter "$W/fd-stray" --out "$W/r-fd.safetensors"
expect_one_line_error
expect_nothing_left r-fd.safetensors
expect_exit 0 "$LORA" merge --base "$DIT" --adapter "$W/fd-stray" --out "$W/r-fd.safetensors" --skip-unmatched --json
expect_json "[m['module'] for m in j['skipped_modules']]" '["transformer.transformer_blocks.7.attn.to_q"]'
check_case flux "$DIT" "$W/r-fd.safetensors" "$W/expect-fd.npz" "$N_FD"
expect_exit 0 "$LORA" verify --base "$DIT" --adapter "$W/fd-stray" --merged "$W/r-fd.safetensors" --skip-unmatched --json
expect_json "j['equivalent']" "true"
expect_json "j['layers_checked']" "$N_FD"

# --- 3. a diffusers SD 1.5 LoRA (unet. and text_encoder. modules) into the UNet's own file: its
# text_encoder. modules belong to another component
"$PY" "$SRC/tests/e2e/make_pipelines.py" "$W/pipe" >/dev/null || fail "make_pipelines.py"
UNET="$W/pipe/sd15/unet/diffusion_pytorch_model.safetensors"
DL="$W/pipe/diffusers-lora"
expect_exit 3 "$LORA" merge --base "$UNET" --adapter "$DL" --out "$W/r-unet.safetensors"
expect_one_line_error
expect_stderr_contains "(the adapter's text_encoder. modules belong to another component; merge into the pipeline folder, or pass --skip-unmatched)"
expect_nothing_left r-unet.safetensors
expect_exit 0 "$LORA" merge --base "$UNET" --adapter "$DL" --out "$W/r-unet.safetensors" --skip-unmatched --json
want=$("$PY" - "$DL/pytorch_lora_weights.safetensors" <<'PY'
import json, os, sys
sys.path.insert(0, os.environ["SRC"] + "/tests/e2e")
from safetensors_np import read
t, _ = read(sys.argv[1])
print(json.dumps(sorted(k[:-len(".lora_A.weight")] for k in t if k.startswith("text_encoder.") and k.endswith(".lora_A.weight")), separators=(",", ":")))
PY
)
expect_json "[m['module'] for m in j['skipped_modules']]" "$want"
# every tensor as make_pipelines.py's float64 expectation for the UNet, byte for byte
got=$("$PY" - "$W/r-unet.safetensors" "$W/pipe/expect/diffusers/unet.safetensors" <<'PY'
import os, sys
sys.path.insert(0, os.environ["SRC"] + "/tests/e2e")
from safetensors_np import read
a, _ = read(sys.argv[1]); b, _ = read(sys.argv[2])
bad = [k for k in b if k not in a or a[k][:3] != b[k][:3]] + [k for k in a if k not in b]
print("ok %d" % len(b) if not bad else "differ: " + ", ".join(bad[:3]))
PY
)
expect_eq "unet: every tensor as expected" "${got%% *}" "ok"
expect_exit 0 "$LORA" verify --base "$UNET" --adapter "$DL" --merged "$W/r-unet.safetensors" --skip-unmatched --json
expect_json "j['equivalent']" "true"

finish
