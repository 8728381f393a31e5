"""Checks a merged diffusers pipeline folder against its base and the
expected tensors (numpy only; tests/e2e/e2e-diffusers-folder.sh).

python3 check_pipeline.py BASE OUT EXPECT_DIR

Prints "ok" or the problems: the output's file list must equal the base's;
every file other than weights and indexes byte-identical to the base's; each
component's tensors in the same files as the base's, every tensor equal in
dtype, shape and bytes to EXPECT_DIR/<component>.safetensors; each index's
weight_map equal to the base's and its total_size the sum of tensor bytes.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_np  # noqa: E402

base, out, expect = sys.argv[1:4]


def files(root):
    got = []
    for d, _, fs in os.walk(root):
        got += [os.path.relpath(os.path.join(d, f), root) for f in fs]
    return sorted(got)


problems = []
bf, of = files(base), files(out)
if bf != of:
    problems.append("file lists differ: only in base %s, only in output %s" % (sorted(set(bf) - set(of)), sorted(set(of) - set(bf))))
for rel in bf:
    if rel.endswith(".safetensors") or rel.endswith(".index.json") or rel not in of:
        continue
    if open(os.path.join(base, rel), "rb").read() != open(os.path.join(out, rel), "rb").read():
        problems.append("%s is not byte-identical" % rel)

n_tensors = 0
for e in sorted(os.listdir(expect)):
    comp = e[: -len(".safetensors")]
    want, _ = safetensors_np.read(os.path.join(expect, e))
    where_base, where_out, got = {}, {}, {}
    for rel in bf:
        if rel.startswith(comp + "/") and rel.endswith(".safetensors"):
            for k in safetensors_np.read(os.path.join(base, rel))[0]:
                where_base[k] = rel
    for rel in of:
        if rel.startswith(comp + "/") and rel.endswith(".safetensors"):
            t, meta = safetensors_np.read(os.path.join(out, rel))
            if not meta or "lora.tool" not in meta:
                problems.append("%s has no lora.tool metadata" % rel)
            for k, v in t.items():
                where_out[k] = rel
                got[k] = v
    if where_base != where_out:
        problems.append("%s: tensors are not in the base's files" % comp)
    for k, v in want.items():
        n_tensors += 1
        if k not in got:
            problems.append("%s: %s missing" % (comp, k))
        elif got[k][:3] != v[:3]:
            diff = abs(got[k][3] - v[3]).max() if got[k][1] == v[1] else "shape"
            problems.append("%s: %s differs (%s %s, want %s; max |diff| %s)" % (comp, k, got[k][0], got[k][1], v[0], diff))
    for k in set(got) - set(want):
        problems.append("%s: unexpected tensor %s" % (comp, k))
    for rel in bf:
        if rel.startswith(comp + "/") and rel.endswith(".safetensors.index.json"):
            bi = json.load(open(os.path.join(base, rel)))
            oi = json.load(open(os.path.join(out, rel)))
            if bi["weight_map"] != oi["weight_map"]:
                problems.append("%s: weight_map differs from the base's" % rel)
            total = sum(len(v[2]) for v in got.values())
            if oi["metadata"]["total_size"] != total:
                problems.append("%s: total_size %s, tensors hold %s" % (rel, oi["metadata"]["total_size"], total))
print("ok %d tensors" % n_tensors if not problems else "\n".join(problems[:10]))
