"""Several ranks (gloo, CPU, two spawned processes): ZeRO-3 partitioning of the offloaded state.

Every run is compared with one process training the same model with torch.optim.AdamW on the whole global
batch: each rank takes half of every batch, and the engine's mean over ranks must give the same training.
"""

from __future__ import annotations

import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import multi_rank_child
import offload
import offload.layout.flat_group
import offload.layout.partition
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


def run_ranks(job: dict, out_dir, world: int = WORLD) -> list[dict]:
    """Runs ``job`` on ``world`` spawned ranks; every rank's result."""
    mp.spawn(multi_rank_child.run, args=(world, _free_port(), job, str(out_dir)), nprocs=world)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def reference(steps: int, rows: int, max_grad_norm: float | None = 1.0, **job):
    """torch.optim.AdamW in this process on the whole global batches of the job."""
    job = {"steps": steps, "rows": rows, **job}
    return reference_run("llama", multi_rank_child.build_model(job), multi_rank_child.step_batches(job),
                         torch.float32, lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=max_grad_norm,
                         decay_groups=False)


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


@pytest.mark.parametrize("params, optimizer, variant", [
    ("nvme", "cpu", {"micro": 2, "unused": True}),
    ("cpu", "nvme", {"meta": True, "backward_step": True}),
    ("nvme", "nvme", {"backward_step": True, "micro": 2, "own_group": True}),
    ("nvme", "nvme", {"frozen": True, "micro": 2, "meta": True}),
])
def test_two_ranks_accumulation_unused_parameters_meta_init_and_backward_step(params, optimizer, variant,
                                                                               tmp_path):
    """Micro-batches accumulate into the shards; a group that never completes (a parameter without gradient)
    is reduced when backward ends and that parameter is left alone; a model built on the meta device is
    materialised shard by shard; backward_step updates each shard as its group's reduction lands; a process
    group passed to the engine is used instead of the default one; frozen parameters are offloaded in shards
    too and gathered on fetch."""
    steps, rows = 8, 4
    clip = None if variant.get("backward_step") else 1.0
    ref_losses, ref_state = reference(steps, rows, max_grad_norm=clip, **variant)
    job = {"steps": steps, "rows": rows, **variant,
           "config": dict(device="cpu", dtype="fp32", params=params, optimizer=optimizer,
                          nvme_dir=str(tmp_path / "nvme"), prefetch_layers=2),
           "engine": dict(lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=clip)}
    for result in run_ranks(job, tmp_path):
        assert_matches(result["losses"], result["state"], ref_losses, ref_state, rtol=1e-5)
    if variant.get("unused"):  # untouched, as torch leaves a parameter that never had a gradient
        initial = multi_rank_child.build_model(job).state_dict()
        for key in ("model.layers.0.unused.weight", "model.layers.0.unused.bias"):
            torch.testing.assert_close(result["state"][key], initial[key], rtol=0, atol=0)


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

    # a corrupt shard: every rank refuses the checkpoint, naming the file (each checksums half of the files)
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    victim = next(broken.glob("v-*")) / "exp_avg.rank1.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    refused = run_ranks({"steps": 0, "rows": rows, "config": config, "engine": engine_kw, "load": str(broken),
                         "expect_load_error": True}, tmp_path)
    for result in refused:
        assert "exp_avg.rank1.safetensors: checksum mismatch" in result["load_error"]

    # one process loads the two ranks' shards (re-partitioned: it owns every element), and its own
    # single-file checkpoint of them resumes on two ranks just the same
    single = offload.Config(**{**config, "nvme_dir": str(tmp_path / "nvme1")})
    with offload.Engine(tiny_llama(layers=4), single, **engine_kw) as engine:
        engine.load(ckpt)
        for key, value in engine.state_dict().items():
            torch.testing.assert_close(value, saved_state[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
        engine.save(tmp_path / "ckpt1")
    again = run_ranks({"steps": steps, "skip": 6, "rows": rows, "config": config, "engine": engine_kw,
                       "load": str(tmp_path / "ckpt1")}, tmp_path)
    for result, before in zip(again, resumed):
        assert result["losses"] == before["losses"]
        for key, value in result["state"].items():
            torch.testing.assert_close(value, before["state"][key], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_parameters_on_the_device_with_two_ranks(dtype, tmp_path):
    """params="device": every rank keeps the whole model on its device and updates its shard of the state;
    the step gathers the new weights. fp32 matches the reference; bf16 matches a one-process engine."""
    steps, rows = 8, 4
    job = {"steps": steps, "rows": rows, "backward_step": True,
           "config": dict(device="cpu", dtype=dtype, params="device", optimizer="cpu"),
           "engine": dict(lr=LR, weight_decay=WEIGHT_DECAY)}
    results = run_ranks(job, tmp_path)
    if dtype == "fp32":
        ref_losses, ref_state = reference(steps, rows, max_grad_norm=None)
        rtol = 1e-5
    else:  # the same engine in one process on the whole batch: bf16 forward/backward on half the rows
        # differs in rounding only
        import offload

        ref_losses, ref_state = [], None
        with offload.Engine(tiny_llama(layers=4), offload.Config(**job["config"]), **job["engine"]) as engine:
            for batch in multi_rank_child.global_batches(steps, rows):
                loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
                engine.backward_step(loss)
                ref_losses.append(loss.item())
            ref_state = engine.state_dict()
        rtol = 2e-2
    for result in results:
        assert_matches(result["losses"], result["state"], ref_losses, ref_state, rtol=rtol)


def test_each_rank_holds_half_of_the_state(tmp_path):
    """Each of two ranks holds half of one process's state: its host buffers (gradients, master, m, v) are
    half, up to the padding of each group to whole pages per rank, and so is the RSS the engine's state adds
    once built (measured in the same kind of spawned process, one rank alone), up to a fixed overhead. What
    training adds on top (on the CPU device: the groups fetched to the "device", autograd's gradients and
    activations, the gradient reduction's group buffers) is per process and does not shrink with ranks."""
    config = dict(device="cpu", dtype="fp32", params="cpu", optimizer="cpu")
    job = {"steps": 2, "rows": 4, "hidden": 512, "layers": 8, "config": config, "engine": dict(lr=LR)}
    (single,) = run_ranks(job, tmp_path / "one", world=1) if (tmp_path / "one").mkdir() is None else None
    results = run_ranks(job, tmp_path)
    model = tiny_llama(layers=8, hidden=512)
    # one rank's shards: 4 B gradient + 12 B master, m, v per element (fp32 weights are the master), every
    # group padded for two ranks, halved; plus the pool's page rounding of each buffer
    groups = [offload.layout.flat_group.build_flat_group(i, spec, {id(p): 0 for p in spec.params}, 0, WORLD)
              for i, spec in enumerate(offload.layout.partition.partition_model(model).groups)]
    per_rank = sum(16 * g.shard_numel for g in groups) + 4 * len(groups) * 4096
    fixed = 2 * 4 * max(g.numel for g in groups) + 16 * 2**20  # (the fill's fp32 copy of a group)
    state_rss_single = single["rss_state"] - single["rss_before"]
    assert single["stats"].host_bytes_peak > 300e6  # (the model is large enough for the halves to show)
    for result in results:
        stats = result["stats"]
        assert stats.host_bytes_peak <= per_rank
        assert stats.host_bytes_peak <= 0.51 * single["stats"].host_bytes_peak
        state_rss = result["rss_state"] - result["rss_before"]
        assert state_rss <= 0.5 * state_rss_single + fixed, \
            f"state RSS {state_rss / 2**20:.0f} MiB on a rank vs {state_rss_single / 2**20:.0f} MiB alone"
        assert result["peak_rss"] < single["peak_rss"]
    # offload estimate --ranks 2 predicts each rank's host buffers
    from offload.estimate import estimate, shape_from_model

    predicted = estimate(shape_from_model(model, "test"), "cpu", "cpu", dtype="fp32", device="cpu", ranks=WORLD)
    for result in results:
        assert predicted.host_pool_bytes == pytest.approx(result["stats"].host_bytes_peak, rel=0.01)
    alone = estimate(shape_from_model(model, "test"), "cpu", "cpu", dtype="fp32", device="cpu")
    assert alone.host_pool_bytes == pytest.approx(single["stats"].host_bytes_peak, rel=0.01)


def test_two_ranks_load_pretrained_weights_into_their_shards(tmp_path):
    """load_pretrained streams a Hugging Face checkpoint into each rank's shards (NVMe params and state)."""
    source = tiny_llama(seed=5, layers=4)
    source.save_pretrained(tmp_path / "hf")
    job = {"steps": 0, "rows": 4, "pretrained": str(tmp_path / "hf"),
           "config": dict(device="cpu", dtype="fp32", params="nvme", optimizer="nvme",
                          nvme_dir=str(tmp_path / "nvme")),
           "engine": dict(lr=LR)}
    expected = source.state_dict()
    for result in run_ranks(job, tmp_path):
        for key, value in result["state"].items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL, one rank per GPU)")
@pytest.mark.parametrize("params", ["device", "cpu"])
def test_two_gpus_with_nccl_match_one_process(params, tmp_path):
    steps, rows = 6, 4
    ref_losses, ref_state = reference(steps, rows)
    job = {"steps": steps, "rows": rows,
           "config": dict(device="cuda", dtype="fp32", params=params, optimizer="cpu", prefetch_layers=1),
           "engine": dict(lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=1.0)}
    for result in run_ranks(job, tmp_path):
        # (cuBLAS on the GPU and the CPU reference round differently)
        assert_matches(result["losses"], result["state"], ref_losses, ref_state, rtol=1e-3, weight_atol=1e-4)
