#!/usr/bin/env bash
# diffusers LoRA files (pytorch_lora_weights.safetensors): the real
# attention-processor file of ../shared/fixtures/diffusers_sd15_lora inspected
# and merged into a UNet-shaped base built from its shapes, a synthetic
# unet. / text_encoder. file merged into one component's file; every merged
# tensor equals W0 + B A (scale 1, as diffusers loads these files) computed
# in float64 by numpy and rounded once; untouched tensors bit-identical;
# verify equivalent. Also: cloneofsimo files are listed and named.
LORA=$1
SRC=$2
. "$SRC/tests/e2e/lib.sh"
W="$E2E_TMP/w"
mkdir -p "$W"
FX="$SRC/../shared/fixtures"

# make_case ADAPTER OUT_DIR MAP: writes OUT_DIR/base.safetensors (BF16: every
# module the adapter names, mapped to its base path by MAP, plus two untouched
# tensors) and OUT_DIR/expected.safetensors (W0 + up @ down in float64,
# rounded once to BF16), for modules whose base path is not "skip".
make_case() {
  "$PY" - "$1" "$2" "$SRC/tests/e2e" <<'EOF'
import sys
sys.path.insert(0, sys.argv[3])
import numpy as np, safetensors_np
from safetensors_np import bf16_bits
t, _ = safetensors_np.read(sys.argv[1])
rng = np.random.default_rng(7)
def base_path(k):
    # diffusers' conversion (utils/state_dict_utils.py), written out independently
    k = k.replace(".processor.", ".")
    for a, b in [("_lora.down.weight", ".down"), ("_lora.up.weight", ".up"), (".lora.down.weight", ".down"),
                 (".lora.up.weight", ".up"), (".lora_A.weight", ".down"), (".lora_B.weight", ".up")]:
        if k.endswith(a):
            k = k[: -len(a)] + b
    if k.startswith("text_encoder."):
        return None, None
    k = k.removeprefix("unet.")
    k = k.replace(".to_out.down", ".to_out.0.down").replace(".to_out.up", ".to_out.0.up")
    mod, part = k.rsplit(".", 1)
    return mod, part
mods = {}
for k, v in t.items():
    mod, part = base_path(k)
    if mod is not None:
        mods.setdefault(mod, {})[part] = v[3]
base, expected = {}, {}
def bf16(x):
    return ("BF16", list(x.shape), bf16_bits(x).tobytes())
for mod, p in sorted(mods.items()):
    down, up = p["down"], p["up"]
    shape = [up.shape[0], *down.shape[1:]]
    w0 = bf16_bits(rng.standard_normal(shape) * 0.5)
    w0 = (w0.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    base[mod + ".weight"] = bf16(w0)
    dw = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)
    expected[mod + ".weight"] = bf16(w0 + dw)
for extra in ["time_embedding.linear_2.weight", "time_embedding.linear_1.bias"]:
    x = rng.standard_normal([4, 3]) * 0.5
    base[extra] = expected[extra] = bf16(x)
safetensors_np.write(sys.argv[2] + "/base.safetensors", base)
safetensors_np.write(sys.argv[2] + "/expected.safetensors", expected)
print(len(mods))
EOF
}


same_tensors() {
  "$PY" -c '
import sys
sys.path.insert(0, sys.argv[3])
import safetensors_np
got, _ = safetensors_np.read(sys.argv[1])
want, _ = safetensors_np.read(sys.argv[2])
bad = [k for k in want if k not in got or got[k][:3] != want[k][:3]]
print(("extra tensors, " if set(got) - set(want) else "") + "%d differ" % len(bad), *bad[:3])
' "$1" "$2" "$SRC/tests/e2e"
}

# --- a synthetic file: unet. lora_A/B, an older .lora.down conv, a text encoder module
"$PY" -c '
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np, safetensors_np
rng = np.random.default_rng(3)
f = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)
safetensors_np.write(sys.argv[1], {
    "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": f(2, 6),
    "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": f(8, 2),
    "unet.conv_in.lora.down.weight": f(3, 4, 3, 3),
    "unet.conv_in.lora.up.weight": f(8, 3, 1, 1),
})
te = dict(safetensors_np.read(sys.argv[1])[0])
safetensors_np.write(sys.argv[1].replace(".safetensors", "-te.safetensors"), {**{k: v[3].astype(np.float32) for k, v in te.items()},
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": f(2, 6),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": f(6, 2),
})' "$W/synthetic.safetensors" "$SRC/tests/e2e"
mkdir -p "$W/syn"
n=$(make_case "$W/synthetic.safetensors" "$W/syn")
expect_eq "synthetic unet modules" "$n" 2
expect_exit 0 "$LORA" inspect "$W/synthetic-te.safetensors"
expect_stdout_contains "(diffusers LoRA, 3 modules)"
# a text encoder module has no base tensor in a UNet file: refused by name
# (with --skip-unmatched it would be skipped and listed: e2e-diffusers-folder.sh)
expect_exit 3 "$LORA" merge --base "$W/syn/base.safetensors" --adapter "$W/synthetic-te.safetensors" --out "$W/syn-merged"
expect_stderr_contains "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
expect_nothing_left syn-merged
expect_exit 0 "$LORA" merge --base "$W/syn/base.safetensors" --adapter "$W/synthetic.safetensors" --out "$W/syn-merged"
expect_eq "synthetic merged = float64 reference rounded once" "$(same_tensors "$W/syn-merged/base.safetensors" "$W/syn/expected.safetensors")" "0 differ"

# resize, combine and convert have no diffusers writer yet: refused by name
expect_exit 3 "$LORA" resize --adapter "$W/synthetic.safetensors" --rank 1 --out "$W/resized"
expect_stderr_contains "resize does not take a diffusers LoRA file yet"
expect_nothing_left resized
expect_exit 3 "$LORA" convert "$W/synthetic.safetensors" --to kohya --out "$W/converted.safetensors"
expect_stderr_contains "convert does not take a diffusers LoRA file yet"

# --- the real attention-processor file
A="$FX/diffusers_sd15_lora/pytorch_lora_weights.safetensors"
if [ -f "$A" ]; then
  expect_exit 0 "$LORA" inspect "$A"
  expect_stdout_contains "(diffusers LoRA, 128 modules)"
  expect_stdout_contains "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
  # the folder is the adapter too
  expect_exit 0 "$LORA" inspect "$FX/diffusers_sd15_lora" --json
  expect_json 'j["adapter_kind"]' "diffusers LoRA"
  expect_json 'len(j["modules"])' 128
  mkdir -p "$W/fx"
  n=$(make_case "$A" "$W/fx")
  expect_eq "fixture modules" "$n" 128
  expect_exit 0 "$LORA" merge --base "$W/fx/base.safetensors" --adapter "$FX/diffusers_sd15_lora" --out "$W/fx-merged"
  expect_eq "fixture merged = float64 reference rounded once" "$(same_tensors "$W/fx-merged/base.safetensors" "$W/fx/expected.safetensors")" "0 differ"
  expect_exit 0 "$LORA" verify --base "$W/fx/base.safetensors" --adapter "$A" --merged "$W/fx-merged/base.safetensors"
  expect_stdout_contains "equivalent"
else
  echo "fixture absent, skipped: $A"
fi

# --- cloneofsimo files: listed with every tensor, the kind named, not merged
for f in lora_disney analog_svd_rank4; do
  C="$FX/cloneofsimo_lora/$f.safetensors"
  [ -f "$C" ] || { echo "fixture absent, skipped: $C"; continue; }
  expect_exit 0 "$LORA" inspect "$C" --json
  expect_json 'j["kind"]' other_adapter
  expect_json '"cloneofsimo" in j["adapter_kind"]' true
  expect_json 'len(j["tensors"]) == j["files"][0]["tensors"] > 0' true
done

finish
