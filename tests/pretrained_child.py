"""For tests/test_meta_init.py: init_empty + load_pretrained + 2 steps under a small host budget; prints the peak
RSS above the process's RSS before the model existed (torch and transformers imported)."""

from __future__ import annotations

import json
import math
import sys

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import offload
from peak_rss import own_peak_rss

config_dir, checkpoint, swap, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = AutoConfig.from_pretrained(config_dir)
with torch.device("meta"):
    AutoModelForCausalLM.from_config(config)  # the model code is imported before the start is measured
start = psutil.Process().memory_info().rss
model = offload.init_empty(lambda: AutoModelForCausalLM.from_config(config))
cfg = offload.Config(device="cpu", dtype="bf16", params="nvme", optimizer="nvme", nvme_dir=swap,
                     host_memory_limit=limit, prefetch_layers=1)
losses = []
with offload.Engine(model, cfg, lr=1e-4) as engine:
    offload.load_pretrained(engine, checkpoint)
    ids = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    gradients_on_nvme = engine.stats().gradients_on_nvme
peak = own_peak_rss()  # (Note [a child's peak RSS], peak_rss.py)
assert all(math.isfinite(x) for x in losses)
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "start": start, "peak": peak,
                  "peak_above_start": peak - start, "losses": losses, "gradients_on_nvme": gradients_on_nvme}))
