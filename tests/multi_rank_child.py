"""Child processes of the multi-rank tests: each runs one rank of an engine over gloo on the CPU.

``run(rank, world, port, job, out_dir)`` initialises the default process group, does ``job`` (a dict saying
what to train and how) and writes what the parent compares to ``out_dir/rank{rank}.pt``.
"""

from __future__ import annotations

import ctypes
import os

import psutil
import torch
import torch.distributed as dist

import offload
from engine_reference import loss_of, tiny_llama
from peak_rss import own_peak_rss


def global_batches(steps: int, rows: int, seed: int = 1) -> list[dict]:
    """One batch of ``rows`` sequences per step: the global batch every rank takes its share of."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 96, (rows, 12), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def build_model(job: dict) -> torch.nn.Module:
    """The model of ``job``: a tied tiny Llama; with ``unused``, layer 0 also holds a Linear that forward never
    calls (its group never completes in backward: the ranks must agree on which parameters got gradients);
    with ``frozen``, all but the q and v projections are frozen."""
    model = tiny_llama(layers=job.get("layers", 4), tied=True, hidden=job.get("hidden", 32))
    if job.get("unused"):
        model.model.layers[0].unused = torch.nn.Linear(model.config.hidden_size, 8)
    if job.get("frozen"):  # only the attention's q and v projections train (frozen groups: Note [frozen groups])
        for name, param in model.named_parameters():
            param.requires_grad_("q_proj" in name or "v_proj" in name)
    return model


def step_batches(job: dict) -> list[list[dict]]:
    """Per step, ``micro`` global batches of ``rows`` sequences (gradients accumulate over them)."""
    micro = job.get("micro", 1)
    flat = global_batches(job["steps"] * micro, job["rows"])
    return [flat[i * micro:(i + 1) * micro] for i in range(job["steps"])]


def share(batch: dict, rank: int, world: int) -> dict:
    rows = batch["input_ids"].shape[0] // world
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}


def run(rank: int, world: int, port: int, job: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    on_cuda = job["config"].get("device", "cpu").startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if on_cuda else "gloo", rank=rank, world_size=world)
    try:
        result = _train(rank, world, job)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _settled_rss() -> int:
    """RSS once glibc has returned the free memory it keeps in its heaps (freed temporaries of the build, such
    as the model's original parameters, would otherwise count or not depending on where they were allocated)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def _train(rank: int, world: int, job: dict) -> dict:
    model = offload.init_empty(lambda: build_model(job)) if job.get("meta") else build_model(job)
    config = offload.Config(**job["config"])
    losses = []
    # Host memory the engine adds: its peak RSS over the RSS with the model built (ru_maxrss is in KiB)
    result: dict = {"rss_before": _settled_rss()}
    engine_kw = dict(job.get("engine", {}))
    if job.get("own_group"):  # a process group passed in, not the default one
        engine_kw["process_group"] = dist.new_group(ranks=list(range(world)))
    with offload.Engine(model, config, **engine_kw) as engine:
        result["rss_state"] = _settled_rss()  # built and filled, before any training
        if job.get("load"):
            try:
                engine.load(job["load"])
            except offload.CheckpointError as e:
                if not job.get("expect_load_error"):
                    raise
                result["load_error"] = str(e)
                return result
        if job.get("pretrained"):
            offload.load_pretrained(engine, job["pretrained"])
        for micro_batches in step_batches(job)[job.get("skip", 0):]:
            total = 0.0
            for k, batch in enumerate(micro_batches):
                loss = loss_of("llama", engine, share(batch, rank, world))
                if job.get("backward_step") and k == len(micro_batches) - 1:
                    engine.backward_step(loss)
                else:
                    engine.backward(loss)
                total += loss.item() / len(micro_batches)
            if not job.get("backward_step"):
                engine.step()
            mean = torch.tensor(total, dtype=torch.float64, device=engine.device)
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        result["state"] = engine.state_dict()
        result["stats"] = engine.stats()
        if job.get("save"):
            engine.save(job["save"], extra={"rank_count": world})
    result["losses"] = losses
    result["peak_rss"] = own_peak_rss()  # (Note [a child's peak RSS], peak_rss.py)
    return result
