"""A real training run for tests/test_estimate.py: builds an `offload train` preset in RAM, trains 3 steps on the
CPU device with the given placement, and prints one JSON line: the RSS when torch and the model code were
imported (the estimate's starting point), the peak RSS, the engine's host buffers and the swap files' size."""

from __future__ import annotations

import argparse
import importlib
import json
import os

import psutil
import torch

import offload
from offload.cli.model_source import resolve_model
from peak_rss import own_peak_rss

importlib.import_module("transformers.models.llama.modeling_llama")  # the model code, as the estimate has it

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="small")
ap.add_argument("--params", required=True)
ap.add_argument("--optimizer", required=True)
ap.add_argument("--batch", type=int, required=True)
ap.add_argument("--seq-len", type=int, required=True)
ap.add_argument("--dir", required=True)
ap.add_argument("--host-memory-limit", type=int, default=None)
ap.add_argument("--activation-checkpointing", action="store_true")
a = ap.parse_args()

base = psutil.Process().memory_info().rss
model = resolve_model(a.model, a.seq_len).builder(0)()
if a.activation_checkpointing:
    from offload.cli.train_setup import enable_activation_checkpointing

    enable_activation_checkpointing(model, a.model)
config = offload.Config(device="cpu", dtype="bf16", params=a.params, optimizer=a.optimizer, nvme_dir=a.dir,
                        prefetch_layers=2, host_memory_limit=a.host_memory_limit)
with offload.Engine(model, config, lr=1e-4, max_grad_norm=1.0) as engine:
    disk = 0
    if engine.swap is not None:
        for entry in os.scandir(engine.swap.run_dir):
            if entry.name.endswith(".swap"):
                disk += entry.stat().st_blocks * 512
    ids = torch.randint(0, 256, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
        engine.step()
    engine.synchronize()
    stats = engine.stats()
print(json.dumps({"base": base, "peak": own_peak_rss(),  # (Note [a child's peak RSS])
                  "pool_peak": stats.host_bytes_peak, "disk": disk, "gradients_on_nvme": stats.gradients_on_nvme,
                  "state_groups_in_ram": stats.optimizer_groups_on_host}))
