# End-to-end tests of what no input, path or signal may do to a user's data
# (issue 18): every command refuses an --out that is, holds or lies inside an
# input; merge copies only the base folder's own plain files (modes and holes
# kept, links out of the model skipped, the Hugging Face cache layout
# followed); FIFOs are refused without blocking; an input that shrinks while
# it is read is exit 4, never SIGBUS; temp outputs of a killed run are named
# or removed by --force; a signal always ends in 130 with nothing left; a
# failed write names --out, not the temp file. Every refusal asserts the exit
# code, the one line on stderr and that nothing moved on disk.
# Usage: bash tests/e2e/e2e-safety.sh PATH-TO-LORA SOURCE-DIR
set -u
LORA=${1:?usage: e2e-safety.sh PATH-TO-LORA SOURCE-DIR}
SRC=${2:?usage: e2e-safety.sh PATH-TO-LORA SOURCE-DIR}
if [ ! -x /usr/bin/python3 ] || ! /usr/bin/python3 -c 'import numpy' 2>/dev/null; then
  echo "SKIP: /usr/bin/python3 with numpy is needed to build the inputs"
  exit 77
fi
. "$SRC/tests/e2e/lib.sh"
TD=$SRC/testdata
W=$E2E_TMP/work
mkdir -p "$W"

# tree_sum DIR: one line per file under DIR (path, mode, size, md5), to
# compare before and after a command
tree_sum() {
  (cd "$1" && find . -type f -printf '%p %m %s ' -exec md5sum {} \; | sort)
}

# expect_untouched WHAT BEFORE: the folder $W is as it was (tree_sum BEFORE)
expect_untouched() {
  local now
  now=$(tree_sum "$W")
  if [ "$now" = "$2" ]; then pass; else fail "$1: files under $W changed: $(diff <(echo "$2") <(echo "$now") | head -5)"; fi
}

# refused CODE TEXT CMD...: exit CODE, one line holding TEXT, nothing under $W changed
refused() {
  local code=$1 text=$2 before
  shift 2
  before=$(tree_sum "$W")
  expect_exit "$code" "$@"
  expect_stderr_contains "$text"
  expect_one_line_error
  expect_untouched "$*" "$before"
}

cp -r "$TD/tiny-llama" "$W/base"
cp -r "$TD/lora-tiny-llama" "$W/lora"
cp -r "$TD/lora-tiny-llama-dora" "$W/lora2"
"$LORA" merge --base "$W/base" --adapter "$W/lora" --out "$W/tuned" --quiet || fail "setup merge"

# ---------------------------------------------------------------- --out over an input
cd "$W" || exit 1
refused 2 "--out base/model.safetensors lies inside the model base" \
  "$LORA" forward --model base --tokens 1,2,3 --out base/model.safetensors
refused 2 "lies inside the adapter lora" \
  "$LORA" forward --model base --adapter lora --tokens 1,2,3 --out lora/logits.safetensors
refused 2 "--out tuned would replace the tuned model tuned" \
  "$LORA" extract --base base --tuned tuned --rank 2 --out tuned --force
refused 2 "--out . would replace the base model base" \
  "$LORA" extract --base base --tuned tuned --rank 2 --out . --force
refused 2 "--out tuned/adapter lies inside the tuned model tuned" \
  "$LORA" extract --base base --tuned tuned --rank 2 --out tuned/adapter --force
refused 2 "--out lora would replace the adapter lora" "$LORA" resize --adapter lora --rank 2 --out lora --force
refused 2 "--out lora/small lies inside the adapter lora" "$LORA" resize --adapter lora --rank 2 --out lora/small --force
refused 2 "would replace the adapter lora2" \
  "$LORA" combine --adapter lora --adapter lora2 --out lora2 --force
refused 2 "--out lora/adapter_model.safetensors lies inside the adapter lora" \
  "$LORA" convert lora --to kohya --out lora/adapter_model.safetensors --force
refused 2 "lies inside the base model base" "$LORA" merge --base base --adapter lora --out base/merged --force
# symlinks are resolved: a link to an input is that input
ln -s lora lora-link
refused 2 "--out lora-link would replace the adapter lora" "$LORA" resize --adapter lora --rank 2 --out lora-link --force
rm lora-link
cd - >/dev/null || exit 1

# ---------------------------------------------------------------- --out over a file an input reads through a link
# (review item 1): a model folder whose weights are a symlink into --out, a
# pipeline whose component weights are, an adapter folder whose file is;
# refused for every command that writes, the linked file byte-identical
mkdir -p "$W/hf-link" "$W/outside2" "$W/pipe-link/unet" "$W/ad-link"
cp "$TD/tiny-llama/model.safetensors" "$W/outside2/w.safetensors"
cp "$TD/tiny-llama/config.json" "$W/hf-link/"
ln -s "$W/outside2/w.safetensors" "$W/hf-link/model.safetensors"
echo '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}' >"$W/pipe-link/model_index.json"
echo '{"_class_name": "UNet2DConditionModel"}' >"$W/pipe-link/unet/config.json"
ln -s "$W/outside2/w.safetensors" "$W/pipe-link/unet/diffusion_pytorch_model.safetensors"
cp "$TD/lora-tiny-llama/adapter_config.json" "$W/ad-link/"
cp "$TD/lora-tiny-llama/adapter_model.safetensors" "$W/outside2/a.safetensors"
ln -s "$W/outside2/a.safetensors" "$W/ad-link/adapter_model.safetensors"
w_sum=$(md5sum <"$W/outside2/w.safetensors")
a_sum=$(md5sum <"$W/outside2/a.safetensors")
link_msg="--out $W/outside2 would replace $W/hf-link/model.safetensors (a symlink to $W/outside2/w.safetensors), read from the base model $W/hf-link"
refused 2 "$link_msg" "$LORA" merge --base "$W/hf-link" --adapter "$TD/lora-tiny-llama" --out "$W/outside2" --force
refused 2 "would replace $W/pipe-link/unet/diffusion_pytorch_model.safetensors (a symlink to $W/outside2/w.safetensors), read from the base model $W/pipe-link" \
  "$LORA" merge --base "$W/pipe-link" --adapter "$TD/lora-tiny-llama" --out "$W/outside2" --force
refused 2 "(a symlink to $W/outside2/a.safetensors), read from the adapter $W/ad-link" \
  "$LORA" merge --base "$W/base" --adapter "$W/ad-link" --out "$W/outside2" --force
refused 2 "read from the base model $W/hf-link" \
  "$LORA" extract --base "$W/hf-link" --tuned "$W/tuned" --rank 2 --out "$W/outside2" --force
refused 2 "read from the adapter $W/ad-link" "$LORA" resize --adapter "$W/ad-link" --rank 2 --out "$W/outside2" --force
refused 2 "read from the adapter $W/ad-link" "$LORA" combine --adapter "$W/ad-link" --adapter "$W/lora" --out "$W/outside2" --force
refused 2 "read from the adapter $W/ad-link" "$LORA" convert "$W/ad-link" --to kohya --out "$W/outside2/a.safetensors" --force
refused 2 "read from the model $W/hf-link" "$LORA" forward --model "$W/hf-link" --tokens 1,2,3 --out "$W/outside2/w.safetensors"
expect_eq "the linked weights are still there, byte-identical" "$(md5sum <"$W/outside2/w.safetensors")" "$w_sum"
expect_eq "the linked adapter is still there, byte-identical" "$(md5sum <"$W/outside2/a.safetensors")" "$a_sum"
# the same base with --out anywhere else merges
expect_exit 0 "$LORA" merge --base "$W/hf-link" --adapter "$TD/lora-tiny-llama" --out "$W/hf-link-merged" --quiet
rm -rf "${W:?}/hf-link-merged"

# ---------------------------------------------------------------- the base folder's other files
mkdir -p "$W/outside"
echo "not the model's" >"$W/outside/secret"
B=$W/extras
cp -r "$TD/tiny-llama" "$B"
ln -s "$W/outside/secret" "$B/secret-link"
ln -s /proc/self/status "$B/proc-link"
ln -s config.json "$B/config-alias.json"
echo private >"$B/private.txt"
chmod 600 "$B/private.txt"
truncate -s 1G "$B/sparse.dat"
printf 'tail' >>"$B/sparse.dat"
mkfifo "$B/fifo"
mkdir "$B/original"
expect_exit 0 "$LORA" merge --base "$B" --adapter "$TD/lora-tiny-llama" --out "$W/extras-out" --quiet
expect_exit 0 "$LORA" merge --base "$B" --adapter "$TD/lora-tiny-llama" --out "$W/extras-out2"
expect_stderr_contains "not copied from the base folder: fifo (not a regular file), original (a folder), proc-link (a symlink out of the model folder), secret-link (a symlink out of the model folder)"
got=$(cd "$W/extras-out2" && ls | tr '\n' ' ')
expect_eq "files of the merged folder" "$got" "config-alias.json config.json generation_config.json model.safetensors private.txt sparse.dat "
expect_eq "mode of a 0600 file" "$(stat -c %a "$W/extras-out2/private.txt")" 600
expect_eq "size of the sparse file" "$(stat -c %s "$W/extras-out2/sparse.dat")" "$(stat -c %s "$B/sparse.dat")"
blocks=$(stat -c %b "$W/extras-out2/sparse.dat")
if [ "$blocks" -lt 1024 ]; then pass; else fail "the sparse file's holes were filled: $blocks blocks"; fi
expect_eq "content of the sparse file" "$(tail -c 4 "$W/extras-out2/sparse.dat")" tail
expect_eq "a link inside the model is copied" "$(cmp "$W/extras-out2/config-alias.json" "$B/config.json" && echo same)" same
rm -rf "$B" "$W/extras-out" "$W/extras-out2"

# the Hugging Face cache layout: every file a link to ../../blobs/<sha>
R=$W/hub/models--org--tiny
mkdir -p "$R/blobs" "$R/snapshots/abc123" "$R/refs"
for f in config.json generation_config.json model.safetensors; do
  sha=$(sha256sum "$TD/tiny-llama/$f" | cut -c1-40)
  cp "$TD/tiny-llama/$f" "$R/blobs/$sha"
  ln -s "../../blobs/$sha" "$R/snapshots/abc123/$f"
done
echo abc123 >"$R/refs/main"
expect_exit 0 "$LORA" merge --base "$R/snapshots/abc123" --adapter "$TD/lora-tiny-llama" --out "$W/hub-out" --quiet
got=$(cd "$W/hub-out" && find . -type f | sort | tr '\n' ' ')
expect_eq "files merged from the cache layout" "$got" "./config.json ./generation_config.json ./model.safetensors "
expect_eq "config.json from the cache" "$(cmp "$W/hub-out/config.json" "$TD/tiny-llama/config.json" && echo same)" same
expect_exit 0 "$LORA" merge --base "$W/base" --adapter "$TD/lora-tiny-llama" --out "$W/plain-out" --quiet
expect_eq "the same merge as from a plain folder" \
  "$(cmp "$W/hub-out/model.safetensors" "$W/plain-out/model.safetensors" && echo same)" same
rm -rf "$W/hub" "$W/hub-out" "$W/plain-out"

# ---------------------------------------------------------------- FIFOs are refused at once
F=$W/fifo-model
cp -r "$TD/tiny-llama" "$F"
rm "$F/config.json"
mkfifo "$F/config.json"
refused 4 "fifo-model/config.json: is a FIFO, not a regular file" \
  timeout 20 "$LORA" forward --model "$F" --tokens 1,2 --out "$W/logits.safetensors"
refused 4 "fifo-model/config.json: is a FIFO, not a regular file" \
  timeout 20 "$LORA" verify --base "$F" --adapter "$TD/lora-tiny-llama" --merged "$W/tuned"
rm "$F/model.safetensors"
mkfifo "$F/model.safetensors"
refused 4 "fifo-model/model.safetensors: is a FIFO, not a regular file" timeout 20 "$LORA" inspect "$F"
refused 4 "fifo-model/model.safetensors: is a FIFO, not a regular file" \
  timeout 20 "$LORA" merge --base "$F" --adapter "$TD/lora-tiny-llama" --out "$W/fifo-out"
FA=$W/fifo-adapter
cp -r "$TD/lora-tiny-llama" "$FA"
rm "$FA/adapter_config.json"
mkfifo "$FA/adapter_config.json"
refused 4 "fifo-adapter/adapter_config.json: is a FIFO, not a regular file" timeout 20 "$LORA" inspect "$FA"
refused 4 "fifo-adapter/adapter_config.json: is a FIFO, not a regular file" \
  timeout 20 "$LORA" merge --base "$W/base" --adapter "$FA" --out "$W/fifo-out" --dry-run
refused 4 "fifo-adapter/adapter_config.json: is a FIFO, not a regular file" \
  timeout 20 "$LORA" resize --adapter "$FA" --rank 2 --out "$W/fifo-out"
rm -rf "$F" "$FA"

# ---------------------------------------------------------------- inputs that shrink
# A model big enough that a command is still reading it when the file is cut
# to its header: 4 layers of hidden 512, F32 (44 MiB), a rank-64 adapter on
# every projection (7 MiB), their merge.
S=$W/shrink
mkdir -p "$S"
E2E_LIB="$SRC/tests/e2e" "$PY" - "$S" <<'EOF'
import json, os, sys
import numpy as np
sys.path.insert(0, os.environ["E2E_LIB"])
from safetensors_np import write as save
d = sys.argv[1]
rng = np.random.default_rng(18)
hid, inter, layers, vocab, r = 512, 1024, 4, 1024, 64
os.makedirs(d + "/base"); os.makedirs(d + "/lora")
shapes = {"self_attn.q_proj": (hid, hid), "self_attn.k_proj": (hid, hid), "self_attn.v_proj": (hid, hid),
          "self_attn.o_proj": (hid, hid), "mlp.gate_proj": (inter, hid), "mlp.up_proj": (inter, hid),
          "mlp.down_proj": (hid, inter)}
t, a = {}, {}
f = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float32)
t["model.embed_tokens.weight"] = f(vocab, hid)
t["lm_head.weight"] = f(vocab, hid)
t["model.norm.weight"] = np.ones(hid, np.float32)
for i in range(layers):
    for n in ("input_layernorm", "post_attention_layernorm"):
        t[f"model.layers.{i}.{n}.weight"] = np.ones(hid, np.float32)
    for n, (o, k) in shapes.items():
        t[f"model.layers.{i}.{n}.weight"] = f(o, k)
        p = f"base_model.model.model.layers.{i}.{n}"
        a[p + ".lora_A.weight"] = f(r, k)
        a[p + ".lora_B.weight"] = f(o, r)
save(d + "/base/model.safetensors", t)
json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hid,
           "intermediate_size": inter, "num_attention_heads": 8, "num_key_value_heads": 8,
           "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "max_position_embeddings": 256, "tie_word_embeddings": False}, open(d + "/base/config.json", "w"))
save(d + "/lora/adapter_model.safetensors", a)
json.dump({"peft_type": "LORA", "r": r, "lora_alpha": r,
           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
          open(d + "/lora/adapter_config.json", "w"))
EOF
"$LORA" merge --base "$S/base" --adapter "$S/lora" --out "$S/merged" --quiet || fail "setup: merge of the shrink model"
TOKENS=$(seq -s, 1 64)

# shrink_case NAME FILE CMD...: FILE is cut to its header while CMD runs.
# Whatever the timing, CMD ends in 0 (it had read everything) or in 4 naming
# FILE, never by a signal, and leaves nothing beside its --out ($S/out-NAME).
# Tried up to 5 times; at least one run must have seen the file shrink.
shrink_case() {
  local name=$1 file=$2 try header saw=0 ok=1
  shift 2
  cp "$file" "$S/pristine"
  for try in 1 2 3 4 5; do
    cp "$S/pristine" "$file"
    header=$("$PY" -c 'import struct,sys; print(8 + struct.unpack("<Q", open(sys.argv[1],"rb").read(8))[0])' "$file")
    LAST_CMD="$* (with $file cut to $header bytes while it runs)"
    "$PY" "$SRC/tests/e2e/shrink_while_running.py" "$file" "$header" "$OUT_FILE" "$ERR_FILE" -- "$@"
    CODE=$?
    ERR=$(cat "$ERR_FILE")
    left=$(cd "$S" && ls -d "out-$name".tmp-* 2>/dev/null)
    [ -z "$left" ] || { fail "$name: left behind: $left"; ok=0; }
    if [ "$CODE" = 4 ]; then
      [[ "$ERR" == *"$file: file shrank while being read"* ]] || { fail "$name: message: $ERR"; ok=0; }
      [ "$(wc -l <"$ERR_FILE")" = 1 ] || { fail "$name: more than one line: $ERR"; ok=0; }
      [ ! -e "$S/out-$name" ] || { fail "$name: an output was written from a shrunk input"; ok=0; }
      saw=1
      break
    elif [ "$CODE" != 0 ]; then
      fail "$name: exit $CODE (expected 4, or 0 when the file was read before it shrank): $ERR"
      ok=0
      break
    fi
    rm -rf "$S/out-$name"
  done
  [ "$saw" = 1 ] || { fail "$name: in 5 runs the command never read the file after it shrank"; ok=0; }
  [ "$ok" = 1 ] && pass
  cp "$S/pristine" "$file"
  rm -rf "$S/out-$name"
}
shrink_case merge "$S/lora/adapter_model.safetensors" \
  "$LORA" merge --base "$S/base" --adapter "$S/lora" --out "$S/out-merge" --threads 1 --quiet
shrink_case merge-base "$S/base/model.safetensors" \
  "$LORA" merge --base "$S/base" --adapter "$S/lora" --out "$S/out-merge-base" --threads 1 --quiet
shrink_case forward "$S/base/model.safetensors" \
  "$LORA" forward --model "$S/base" --adapter "$S/lora" --tokens "$TOKENS" --out "$S/out-forward" --threads 1
shrink_case verify "$S/merged/model.safetensors" \
  "$LORA" verify --base "$S/base" --adapter "$S/lora" --merged "$S/merged" --threads 1
shrink_case extract "$S/merged/model.safetensors" \
  "$LORA" extract --base "$S/base" --tuned "$S/merged" --rank 8 --out "$S/out-extract" --threads 1
rm -rf "$S"

# ---------------------------------------------------------------- temp outputs of a killed run
mkdir "$W/left.tmp-Ab12Cd"
echo partial >"$W/left.tmp-Ab12Cd/model.safetensors"
refused 2 "$W/left.tmp-Ab12Cd was left by an interrupted run: remove it, or --force removes it" \
  "$LORA" merge --base "$W/base" --adapter "$TD/lora-tiny-llama" --out "$W/left"
refused 2 "left.tmp-Ab12Cd was left by an interrupted run" \
  "$LORA" resize --adapter "$TD/lora-tiny-llama" --rank 2 --out "$W/left"
expect_exit 0 "$LORA" merge --base "$W/base" --adapter "$TD/lora-tiny-llama" --out "$W/left" --force --quiet
expect_eq "--force removed the old temp folder" "$(ls -d "$W"/left.tmp-* 2>/dev/null)" ""
rm -rf "$W/left"
# one that a running lora holds (flock) is never removed
mkdir "$W/busy.tmp-Zz99Yy"
flock -x "$W/busy.tmp-Zz99Yy" sleep 30 &
holder=$!
for i in $(seq 100); do flock -n -x "$W/busy.tmp-Zz99Yy" true 2>/dev/null || break; sleep 0.05; done
refused 2 "another lora run is writing" \
  "$LORA" merge --base "$W/base" --adapter "$TD/lora-tiny-llama" --out "$W/busy" --force
kill "$holder" 2>/dev/null
wait "$holder" 2>/dev/null
rm -rf "$W/busy.tmp-Zz99Yy"

# ---------------------------------------------------------------- signals
# a merge slow enough to be caught mid-way (as in e2e-merge.sh)
"$PY" "$SRC/tests/e2e/make_inputs.py" slow-merge "$W/slow-base" "$W/slow-lora"
# signal_merge OUT SIGNALS...: starts the slow merge into $W/OUT, sends the
# signals one right after the other once its temp folder exists
signal_merge() {
  local out=$1 s i
  shift
  LAST_CMD="lora merge (slow) sent $*"
  "$LORA" merge --base "$W/slow-base" --adapter "$W/slow-lora" --out "$W/$out" --threads 1 --quiet \
    >"$OUT_FILE" 2>"$ERR_FILE" &
  local pid=$!
  for i in $(seq 1000); do
    compgen -G "$W/$out.tmp-*" >/dev/null && break
    sleep 0.01
  done
  for s in "$@"; do
    kill "-$s" "$pid" 2>/dev/null
    sleep 0.2  # standard signals do not queue: the second must come after the first was handled
  done
  wait "$pid"
  CODE=$?
  ERR=$(cat "$ERR_FILE")
}
# a double Ctrl-C used to kill at once and leave <out>.tmp-* behind
signal_merge twice INT INT
expect_eq "exit code after two SIGINTs" "$CODE" 130
expect_stderr_contains "lora merge: error: interrupted by SIGINT; nothing was left behind"
expect_one_line_error
expect_nothing_left twice
signal_merge hup HUP
expect_eq "exit code after SIGHUP" "$CODE" 130
expect_stderr_contains "interrupted by SIGHUP"
expect_nothing_left hup

# ---------------------------------------------------------------- verify's memory
# verify reads row blocks: its peak RSS stays far below the size of the
# tensor it checks (it was 8x a 512 MiB embedding, 12x for DoRA). A 64 MiB
# F32 embedding [16384, 1024] with a rank-8 embedding LoRA, merged, verified.
V=$W/verify-memory
mkdir -p "$V/base" "$V/lora"
E2E_LIB="$SRC/tests/e2e" "$PY" - "$V" <<'EOF'
import json, os, sys
import numpy as np
sys.path.insert(0, os.environ["E2E_LIB"])
from safetensors_np import write as save
d = sys.argv[1]
rng = np.random.default_rng(7)
vocab, hid, r = 16384, 1024, 8
save(d + "/base/model.safetensors", {"model.embed_tokens.weight": rng.standard_normal((vocab, hid), dtype=np.float32)})
json.dump({"model_type": "no_forward_pass", "hidden_size": hid, "vocab_size": vocab}, open(d + "/base/config.json", "w"))
json.dump({"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["embed_tokens"]},
          open(d + "/lora/adapter_config.json", "w"))
p = "base_model.model.model.embed_tokens."
save(d + "/lora/adapter_model.safetensors",
     {p + "lora_embedding_A": rng.standard_normal((r, vocab), dtype=np.float32),
      p + "lora_embedding_B": rng.standard_normal((hid, r), dtype=np.float32) * np.float32(0.01)})
EOF
"$LORA" merge --base "$V/base" --adapter "$V/lora" --out "$V/merged" --quiet || fail "setup: merge of the verify-memory model"
# peak RSS of the child, in KiB (getrusage of the waited-for process)
peak_kib=$("$PY" -c '
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if rc == 0 else "exit %d" % rc)
' "$LORA" verify --base "$V/base" --adapter "$V/lora" --merged "$V/merged" --threads 1)
# under AddressSanitizer (shadow memory, quarantine) twice the tensor: the
# whole-tensor copies it replaced took 8x
limit_kib=32768
ldd "$LORA" 2>/dev/null | grep -q libasan && limit_kib=131072
if [[ "$peak_kib" =~ ^[0-9]+$ ]] && [ "$peak_kib" -lt "$limit_kib" ]; then pass
else fail "verify of a 64 MiB embedding: peak RSS $peak_kib KiB (want < $limit_kib KiB)"; fi
rm -rf "$V"

# ---------------------------------------------------------------- failed writes name --out
expect_exit 4 bash -c "trap '' XFSZ; ulimit -f 8; exec \"\$0\" resize --adapter \"\$1\" --rank 2 --out \"\$2\"" \
  "$LORA" "$TD/lora-tiny-llama" "$W/full"
expect_stderr_contains "$W/full/adapter_model.safetensors: "
expect_stderr_contains "File too large"
if [[ "$ERR" == *".tmp-"* ]]; then fail "the message names a temp file: $ERR"; else pass; fi
expect_one_line_error
expect_nothing_left full
expect_exit 4 bash -c "trap '' XFSZ; ulimit -f 100; exec \"\$0\" merge --base \"\$1\" --adapter \"\$2\" --out \"\$3\"" \
  "$LORA" "$TD/tiny-llama" "$TD/lora-tiny-llama" "$W/full"
expect_stderr_contains "$W/full/model.safetensors: "
expect_nothing_left full

finish
