#!/usr/bin/env bash
# Checkpoint layouts (core/name-map model_layouts): a PEFT adapter saved from
# GPT2LMHeadModel (base_model.model.transformer.h.N...) merged into a GPT-2
# checkpoint as the hub ships it (bare GPT2Model names h.N..., wte, wpe; F32;
# Conv1D weights [in, out]; attn.bias buffers). The adapter is the real
# gradience_tiny_lora of ../shared/fixtures (r 8, alpha 16, c_attn / c_proj of
# h.0-h.5); the base is built here from its shapes (DistilGPT2-sized: 6 layers,
# hidden 768; a small vocabulary and n_inner keep it at 60 MB).
# Checked against numpy float64: every merged weight is base + 2 (B A)^T
# computed in F32 (within 1e-6 of |W0| + |s| |B| |A|, as e2e-merge checks F32), every other tensor bit-identical, names the base's own.
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
FX=$SRC/../shared/fixtures/gradience_tiny_lora
if [ ! -f "$FX/adapter_model.safetensors" ]; then
  echo "SKIP: $FX is absent (../shared/fixtures): the hub-layout GPT-2 merge is not run"
  exit 77
fi
W="$E2E_TMP/w"
mkdir -p "$W"
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
