#!/usr/bin/env bash
# Checkpoint layouts. An SD 1.x single file (LDM names) extracted to kohya and
# merged back through core/ldm-names (see below). And core/name-map
# model_layouts: a PEFT adapter saved from
# GPT2LMHeadModel (base_model.model.transformer.h.N...) merged into a GPT-2
# checkpoint as the hub ships it (bare GPT2Model names h.N..., wte, wpe; F32;
# Conv1D weights [in, out]; attn.bias buffers). The adapter is the real
# gradience_tiny_lora of ../shared/fixtures (r 8, alpha 16, c_attn / c_proj of
# h.0-h.5); the base is built here from its shapes (DistilGPT2-sized: 6 layers,
# hidden 768; a small vocabulary and n_inner keep it at 60 MB).
# Checked against numpy float64: every merged weight is base + 2 (B A)^T
# computed in F32 (within 1e-6 of |W0| + |s| |B| |A|, as e2e-merge checks
# F32), every other tensor bit-identical, names the base's own.
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
W="$E2E_TMP/w"
mkdir -p "$W"

# --- an SD 1.x single-file checkpoint (LDM names): extract --format kohya names its UNet
# modules by their diffusers names as sd-scripts does, and merge resolves those names back
# into the same file (one table, core/ldm-names, both ways); the deltas are rank 2, so
# merging the rank-2 extraction back gives the tuned model to F32 rounding
SRC="$SRC" "$PY" - "$W/sd1" <<'PY'
import os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import write
out = sys.argv[1]
os.makedirs(out + "/base", exist_ok=True); os.makedirs(out + "/tuned", exist_ok=True)
rng = np.random.default_rng(3)
shapes = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (16, 16),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (16, 16),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (16, 8, 3, 3),
    "model.diffusion_model.middle_block.1.proj_out.weight": (16, 16),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (16, 16, 3, 3),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (24, 24),
}
base, tuned = {}, {}
for k, sh in shapes.items():
    w = (rng.standard_normal(sh) * 0.1).astype(np.float32)
    rows, cols = sh[0], int(np.prod(sh[1:]))
    d = (rng.standard_normal((rows, 2)) @ rng.standard_normal((2, cols)) * 0.01).reshape(sh)
    base[k], tuned[k] = w, (w + d).astype(np.float32)
base["model.diffusion_model.input_blocks.1.1.proj_in.bias"] = np.zeros(16, np.float32)
tuned["model.diffusion_model.input_blocks.1.1.proj_in.bias"] = np.zeros(16, np.float32)
write(out + "/base/model.safetensors", base)
write(out + "/tuned/model.safetensors", tuned)
PY
expect_exit 0 "$LORA" extract --base "$W/sd1/base/model.safetensors" --tuned "$W/sd1/tuned/model.safetensors" \
  --format kohya --rank 2 --out "$W/sd1/lora.safetensors"
got=$(SRC="$SRC" "$PY" - "$W/sd1/lora.safetensors" <<'PY'
import os, sys
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read
t, meta = read(sys.argv[1])
print(" ".join(sorted(k[:-len(".lora_down.weight")] for k in t if k.endswith(".lora_down.weight"))))
PY
)
expect_eq "SD 1.x kohya names" "$got" "lora_te_text_model_encoder_layers_0_self_attn_q_proj lora_unet_down_blocks_0_attentions_0_proj_in lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q lora_unet_down_blocks_0_resnets_0_conv1 lora_unet_mid_block_attentions_0_proj_out lora_unet_up_blocks_0_upsamplers_0_conv"
expect_exit 0 "$LORA" merge --base "$W/sd1/base/model.safetensors" --adapter "$W/sd1/lora.safetensors" \
  --out "$W/sd1/merged.safetensors"
M="$W/sd1/merged.safetensors"
[ -d "$M" ] && M="$M/model.safetensors"
got=$(SRC="$SRC" "$PY" - "$W/sd1/tuned/model.safetensors" "$M" <<'PY'
import os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read
tuned, _ = read(sys.argv[1]); merged, _ = read(sys.argv[2])
bad = [k for k in tuned if sorted(merged) != sorted(tuned) or np.abs(merged[k][3] - tuned[k][3]).max() > 1e-6]
print("ok" if not bad else "differ: " + ", ".join(bad))
PY
)
expect_eq "SD 1.x kohya merged back into the LDM file" "$got" "ok"

# --- GPT-2 as the hub ships it
FX=$SRC/../shared/fixtures/gradience_tiny_lora
if [ ! -f "$FX/adapter_model.safetensors" ]; then
  echo "SKIP: $FX is absent (../shared/fixtures): the hub-layout GPT-2 merge is not run"
  finish
fi
B="$W/gpt2-hub"

"$PY" "$SRC/tests/e2e/make_inputs.py" gpt2-hub "$B" 6 || fail "building the hub-layout GPT-2 base"

# merge: names mapped through the bare-GPT2Model layout, the output keeps the base's names
expect_exit 0 "$LORA" merge --base "$B" --adapter "$FX" --out "$W/merged"
got=$(SRC="$SRC" "$PY" - "$B/model.safetensors" "$FX/adapter_model.safetensors" "$W/merged/model.safetensors" <<'PY'
import os, sys
import numpy as np
sys.path.insert(0, os.path.join(os.environ["SRC"], "tests/e2e"))
from safetensors_np import read
base, _ = read(sys.argv[1]); lora, _ = read(sys.argv[2]); out, _ = read(sys.argv[3])
bad = []
if sorted(out) != sorted(base): bad.append("names differ: %s" % sorted(set(out) ^ set(base))[:4])
changed = 0
for name, (dt, shape, raw, v) in base.items():
    o = out[name]
    mod = name[:-len(".weight")] if name.endswith(".weight") else None
    a = lora.get("base_model.model.transformer.%s.lora_A.weight" % mod) if mod else None
    if a is None:
        if o[2] != raw: bad.append("%s changed" % name)
        continue
    b = lora["base_model.model.transformer.%s.lora_B.weight" % mod]
    want = v + 2.0 * (b[3] @ a[3]).T  # Conv1D: W is [in, out], dW = s (B A)^T
    mag = np.abs(v) + 2.0 * (np.abs(b[3]) @ np.abs(a[3])).T
    err = (np.abs(o[3] - want) / np.maximum(mag, 1e-30)).max()  # F32 merge: within 1e-6 of |W0| + |s||B||A|
    if err > 1e-6: bad.append("%s: %.3g relative error" % (name, err))
    changed += 1
print("ok" if not bad and changed == 12 else "%d changed; %s" % (changed, "; ".join(bad[:4])))
PY
)
expect_eq "hub GPT-2 merge against numpy" "$got" "ok"
# verify finds the merge equivalent (weight and layer levels through the same layout)
expect_exit 0 "$LORA" verify --base "$B" --adapter "$FX" --merged "$W/merged"
expect_stdout_contains "equivalent"

# the same names under a base that lacks layer 5: no layout fits every target, the hint
# names the closest one instead of asking whether the adapter belongs to the base
"$PY" "$SRC/tests/e2e/make_inputs.py" gpt2-hub "$W/gpt2-5" 5 || fail "building the 5-layer base"
expect_exit 3 "$LORA" merge --base "$W/gpt2-5" --adapter "$FX" --out "$W/m5"
expect_one_line_error
expect_stderr_contains "does not fit $W/gpt2-5: 12 problems, first base_model.model.transformer.h.0.attn.c_attn.lora_A.weight: the base has no tensor transformer.h.0.attn.c_attn.weight (the names differ from the base's by a prefix: 10 of 12 names are found as a bare GPT2Model checkpoint (no transformer. prefix), 0 as they are; none of the known layouts fits them all)"
if [ -e "$W/m5" ]; then fail "output left behind"; else pass; fi
finish
