"""Several ranks (gloo, CPU, two spawned processes): ZeRO-3 partitioning of the offloaded state.

Every run is compared with one process training the same model with torch.optim.AdamW on the whole global
batch: each rank takes half of every batch, and the engine's mean over ranks must give the same training.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import multi_rank_child
from engine_reference import assert_matches, reference_run, tiny_llama

pytest.importorskip("transformers", reason="the multi-rank tests build a small Llama")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this torch build", allow_module_level=True)

WORLD = 2
LR = 3e-3
WEIGHT_DECAY = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(job: dict, out_dir) -> list[dict]:
    """Runs ``job`` on WORLD spawned ranks; every rank's result."""
    mp.spawn(multi_rank_child.run, args=(WORLD, _free_port(), job, str(out_dir)), nprocs=WORLD)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def reference(steps: int, rows: int, max_grad_norm: float | None = 1.0):
    data = [[batch] for batch in multi_rank_child.global_batches(steps, rows)]
    return reference_run("llama", tiny_llama(layers=4, tied=True), data, torch.float32, lr=LR,
                         weight_decay=WEIGHT_DECAY, max_grad_norm=max_grad_norm, decay_groups=False)


@pytest.mark.parametrize("params", ["cpu", "nvme"])
@pytest.mark.parametrize("optimizer", ["cpu", "nvme"])
def test_two_ranks_match_one_process_on_the_global_batch(params, optimizer, tmp_path):
    steps, rows = 20, 4
    ref_losses, ref_state = reference(steps, rows)
    job = {"steps": steps, "rows": rows,
           "config": dict(device="cpu", dtype="fp32", params=params, optimizer=optimizer,
                          nvme_dir=str(tmp_path / "nvme"), prefetch_layers=1),
           "engine": dict(lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=1.0)}
    results = run_ranks(job, tmp_path)
    for rank, result in enumerate(results):
        assert_matches(result["losses"], result["state"], ref_losses, ref_state, rtol=1e-5)
        stats = result["stats"]
        assert (stats.rank, stats.world_size) == (rank, WORLD)
        if "nvme" in (params, optimizer):
            assert stats.nvme_bytes_read > 0 and stats.nvme_bytes_written > 0


def test_save_with_two_ranks_export_resume_and_load_anywhere(tmp_path):
    """Two ranks save at step 6; the checkpoint exports to a plain model with the same logits, resumes on two
    ranks exactly (10 steps in all match the reference), and loads into a single-process engine."""
    from safetensors.torch import load_file

    import offload

    steps, rows = 10, 4
    ref_losses, ref_state = reference(steps, rows)
    ckpt = tmp_path / "ckpt"
    config = dict(device="cpu", dtype="fp32", params="cpu", optimizer="nvme", nvme_dir=str(tmp_path / "nvme"),
                  prefetch_layers=1)
    engine_kw = dict(lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=1.0)
    first = run_ranks({"steps": 6, "rows": rows, "config": config, "engine": engine_kw, "save": str(ckpt)},
                      tmp_path)
    saved_state = first[0]["state"]
    assert sorted(p.name for p in next(ckpt.glob("v-*")).glob("master*")) == \
        ["master.rank0.safetensors", "master.rank1.safetensors"]

    # export: one full state dict; a plain model loaded from it gives the logits of the trained weights
    exported = offload.export(ckpt, tmp_path / "export")
    plain, trained = tiny_llama(layers=4), tiny_llama(layers=4)
    plain.load_state_dict(load_file(exported), strict=False)
    trained.load_state_dict(saved_state)
    ids = multi_rank_child.global_batches(1, 2, seed=7)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)

    # resume on two ranks: steps 7..10 continue the run exactly
    resumed = run_ranks({"steps": steps, "skip": 6, "rows": rows, "config": config, "engine": engine_kw,
                         "load": str(ckpt)}, tmp_path)
    for result in resumed:
        assert_matches(first[0]["losses"] + result["losses"], result["state"], ref_losses, ref_state, rtol=1e-5)

    # one process loads the two ranks' shards (re-partitioned: it owns every element)
    single = offload.Config(**{**config, "nvme_dir": str(tmp_path / "nvme1")})
    with offload.Engine(tiny_llama(layers=4), single, **engine_kw) as engine:
        engine.load(ckpt)
        for key, value in engine.state_dict().items():
            torch.testing.assert_close(value, saved_state[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
