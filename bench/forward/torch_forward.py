#!/usr/bin/python3
"""PyTorch f32 forward of MODEL over TOKENS (plain-torch Llama, the same code as
tests/reference/llama_reference.py); prints the best forward time in seconds
(weights loaded beforehand) and writes the logits to OUT for a cross-check."""
import os, sys, time
import numpy as np
import torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../tests/reference"))
from llama_reference import load_model, forward, write_safetensors

model, tokens, out, runs = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
torch.set_grad_enabled(False)
cfg, w = load_model(model)
best = float("inf")
for _ in range(runs):
    t0 = time.perf_counter()
    logits = forward(cfg, w, tokens)
    best = min(best, time.perf_counter() - t0)
write_safetensors(out, {"logits": logits.numpy()})
print("%.4f" % best)
