"""Child processes of the multi-rank tests: each runs one rank of an engine over gloo on the CPU.

``run(rank, world, port, job, out_dir)`` initialises the default process group, does ``job`` (a dict saying
what to train and how) and writes what the parent compares to ``out_dir/rank{rank}.pt``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import offload
from engine_reference import loss_of, tiny_llama


def global_batches(steps: int, rows: int, seed: int = 1) -> list[dict]:
    """One batch of ``rows`` sequences per step: the global batch every rank takes its share of."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 96, (rows, 12), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def share(batch: dict, rank: int, world: int) -> dict:
    rows = batch["input_ids"].shape[0] // world
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}


def run(rank: int, world: int, port: int, job: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _train(rank, world, job)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _train(rank: int, world: int, job: dict) -> dict:
    model = tiny_llama(layers=job.get("layers", 4), tied=True)
    config = offload.Config(**job["config"])
    losses = []
    result: dict = {}
    with offload.Engine(model, config, **job.get("engine", {})) as engine:
        if job.get("load"):
            engine.load(job["load"])
        for batch in global_batches(job["steps"], job["rows"])[job.get("skip", 0):]:
            loss = loss_of("llama", engine, share(batch, rank, world))
            if job.get("backward_step"):
                engine.backward_step(loss)
            else:
                engine.backward(loss)
                engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        result["state"] = engine.state_dict()
        result["stats"] = engine.stats()
        if job.get("save"):
            engine.save(job["save"], extra={"rank_count": world})
    result["losses"] = losses
    return result
