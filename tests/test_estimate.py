"""offload estimate: the predicted peak RSS, host buffers and disk use against real runs, and the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload.estimate import PLACEMENTS, estimate, parse_count, recommend, shape_from_count, shape_from_model

pytest.importorskip("transformers", reason="the estimate tests build offload train's presets")

CHILD = Path(__file__).with_name("estimate_child.py")
BATCH, SEQ = 4, 256


def _model_file(tmp_path) -> str:
    """A narrow, deep Llama (25M parameters in 34 groups): its gradients outweigh the optimizer's staging, so
    a host budget can send them to NVMe."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=32,
                num_attention_heads=4, tie_word_embeddings=True).save_pretrained(tmp_path / "model")
    return str(tmp_path / "model" / "config.json")


def _shape(spec: str):
    from offload.cli.model_source import resolve_model

    build = resolve_model(spec, SEQ).builder(0)
    with torch.device("meta"):
        return shape_from_model(build(), spec)


@pytest.mark.parametrize("params,optimizer,gradients", [("device", "cpu", "host"), ("cpu", "cpu", "host"),
                                                        ("cpu", "nvme", "host"), ("nvme", "nvme", "host"),
                                                        ("nvme", "nvme", "nvme")])
def test_estimate_within_15_percent_of_a_real_run(params, optimizer, gradients, tmp_path):
    spec = _model_file(tmp_path)
    shape = _shape(spec)
    kw = dict(batch=BATCH, seq_len=SEQ)
    expected = estimate(shape, params, optimizer, gradients, base_rss=0, **kw)
    cmd = [sys.executable, str(CHILD), "--model", spec, "--params", params, "--optimizer", optimizer,
           "--batch", str(BATCH), "--seq-len", str(SEQ), "--dir", str(tmp_path)]
    if gradients == "nvme":  # a host budget below the gradient accumulators sends them to NVMe
        cmd += ["--host-memory-limit", str(expected.host_pool_bytes * 6 // 5)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["gradients_on_nvme"] == (gradients == "nvme")
    predicted = estimate(shape, params, optimizer, gradients, base_rss=measured["base"], **kw)
    assert predicted.host_peak_bytes == pytest.approx(measured["peak"], rel=0.15)
    assert predicted.host_pool_bytes == pytest.approx(measured["pool_peak"], rel=0.01)
    assert predicted.disk_bytes == pytest.approx(measured["disk"], rel=0.01, abs=1)


def test_activation_checkpointing_saves_what_the_estimate_says(tmp_path):
    """The same run with and without activation checkpointing: the measured peak falls by at least half of what
    the estimate says checkpointing saves (the activations of every layer but one; 497 MiB on this model), and
    the estimate of the checkpointed run is within 25% of its peak (the CPU allocator's slack around the
    recompute weighs on so small a total: docs/limits.md)."""
    spec = _model_file(tmp_path)
    shape = _shape(spec)
    peaks, predicted = {}, {}
    for checkpointing in (False, True):
        cmd = [sys.executable, str(CHILD), "--model", spec, "--params", "nvme", "--optimizer", "nvme", "--batch",
               str(BATCH), "--seq-len", str(SEQ), "--dir", str(tmp_path)]
        run = subprocess.run(cmd + (["--activation-checkpointing"] if checkpointing else []), capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        measured = json.loads(run.stdout.strip().splitlines()[-1])
        peaks[checkpointing] = measured["peak"]
        predicted[checkpointing] = estimate(shape, "nvme", "nvme", "host", batch=BATCH, seq_len=SEQ,
                                            base_rss=measured["base"],
                                            activation_checkpointing=checkpointing).host_peak_bytes
    saving = predicted[False] - predicted[True]
    assert saving > 400 * 2**20
    assert peaks[False] - peaks[True] > saving / 2, (peaks, predicted)
    assert predicted[True] == pytest.approx(peaks[True], rel=0.25)


@pytest.mark.parametrize("params", ["cpu", "nvme"])
def test_a_host_budget_keeps_the_state_the_engine_keeps_in_ram(params, tmp_path):
    """optimizer="nvme" with a host_memory_limit that holds part of the state: the same groups stay in RAM as
    in a real engine, and the host buffers and swap files follow."""
    spec = _model_file(tmp_path)
    shape = _shape(spec)
    none = estimate(shape, params, "nvme", batch=BATCH, seq_len=SEQ, base_rss=0)
    state = 12 * shape.numel
    limit = none.host_pool_bytes + 2 * state // 5  # room for about 40% of the state, less the staging
    expected = estimate(shape, params, "nvme", batch=BATCH, seq_len=SEQ, base_rss=0, host_memory_limit=limit)
    assert 0 < expected.state_groups_in_ram < len(shape.group_numels)
    assert expected.nvme_read_per_step < none.nvme_read_per_step and expected.disk_bytes < none.disk_bytes
    assert none.host_pool_bytes < expected.host_pool_bytes <= limit
    run = subprocess.run([sys.executable, str(CHILD), "--model", spec, "--params", params, "--optimizer", "nvme",
                          "--batch", str(BATCH), "--seq-len", str(SEQ), "--dir", str(tmp_path),
                          "--host-memory-limit", str(limit)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["state_groups_in_ram"] == expected.state_groups_in_ram
    assert expected.host_pool_bytes == pytest.approx(measured["pool_peak"], rel=0.01)
    assert expected.disk_bytes == pytest.approx(measured["disk"], rel=0.01, abs=1)
    everything = estimate(shape, params, "nvme", batch=BATCH, seq_len=SEQ, base_rss=0, host_memory_limit=1 << 50)
    assert everything.state_groups_in_ram == len(shape.group_numels) and "optimizer staging" not in everything.parts
    # no state files left: what remains is the weights' (params on NVMe), as with the state in RAM from the start
    assert everything.disk_bytes == estimate(shape, params, "cpu", batch=BATCH, seq_len=SEQ, base_rss=0).disk_bytes
    assert everything.nvme_read_per_step == (0 if params == "cpu" else 2 * 2 * shape.numel)


def test_fp32_state_on_nvme_reads_only_the_moments_on_the_cpu_device():
    shape = shape_from_count(100_000_000)
    fp32 = estimate(shape, "device", "nvme", dtype="fp32", base_rss=0)
    assert (fp32.nvme_read_per_step, fp32.nvme_written_per_step) == (8 * shape.numel, 12 * shape.numel)
    bf16 = estimate(shape, "device", "nvme", dtype="bf16", base_rss=0)
    assert bf16.nvme_read_per_step == 12 * shape.numel  # (the bf16 weights are not the master)
    gpu = estimate(shape, "device", "nvme", dtype="fp32", device="cuda", base_rss=0)
    assert gpu.nvme_read_per_step == 12 * shape.numel  # (the master would have to come back from the GPU)


def test_parameter_counts_and_assumed_shapes():
    assert parse_count("350M") == 350_000_000 and parse_count("7b") == 7_000_000_000
    assert parse_count("1.3e9") == 1_300_000_000 and parse_count("small") is None
    for count in (125e6, 1.3e9, 7e9, 70e9):
        shape = shape_from_count(int(count))
        assert shape.numel == pytest.approx(count, rel=0.1)
        assert not shape.exact_groups
    # a nominal size is the standard model of that name: Llama-2-7B has 32 layers, 13B 40
    assert shape_from_count(parse_count("7B")).layers == 32 and shape_from_count(parse_count("13B")).layers == 40


def test_with_ranks_each_rank_needs_its_share():
    """--ranks N: host buffers, swap files and NVMe traffic of one rank's shard; the device side is per
    process, plus the gradient reduction's buffers (tests/test_multi_rank.py checks it against real ranks)."""
    shape = shape_from_count(1_000_000_000)
    for p, o, g in PLACEMENTS:
        one = estimate(shape, p, o, g, base_rss=0, device="cuda")
        four = estimate(shape, p, o, g, base_rss=0, device="cuda", ranks=4)
        assert four.nvme_read_per_step == pytest.approx(one.nvme_read_per_step / 4, rel=0.01)
        assert four.disk_bytes == pytest.approx(one.disk_bytes / 4, rel=0.01)
        per_process = ("pinned weights for upload", "gradient staging ring")  # (whole groups / one process)
        assert four.host_pool_bytes - sum(four.parts.get(k, 0) for k in per_process) < \
            (one.host_pool_bytes - sum(one.parts.get(k, 0) for k in per_process)) / 2
        assert four.device_bytes > one.device_bytes  # (+ the reduction buffers)


def test_recommendation_is_the_fastest_placement_that_fits():
    shape = shape_from_count(1_000_000_000)
    estimates = [estimate(shape, p, o, g, base_rss=0) for p, o, g in PLACEMENTS]
    assert recommend(estimates, ram=1 << 50, gpu=None, disk=1 << 50).placement == "params=device optimizer=cpu"
    tight = recommend(estimates, ram=estimates[-1].host_peak_bytes, gpu=None, disk=1 << 50)
    assert tight.placement == "params=nvme optimizer=nvme gradients=nvme"
    assert recommend(estimates, ram=1 << 20, gpu=None, disk=1 << 50) is None
    assert recommend(estimates, ram=1 << 50, gpu=None, disk=0).optimizer == "cpu"
    # a host_memory_limit below the state in RAM rules out optimizer="cpu" (the engine would refuse it)
    limit = 6 << 30  # the gradient accumulators (4 GB), the staging, and some state
    limited = [estimate(shape, p, o, g, base_rss=0, host_memory_limit=limit) for p, o, g in PLACEMENTS]
    best = recommend(limited, ram=1 << 50, gpu=None, disk=1 << 50, host_limit=limit)
    assert best.placement == "params=device optimizer=nvme" and 0 < best.state_groups_in_ram
    assert best.host_pool_bytes <= limit


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "offload", "estimate", *args], capture_output=True, text=True,
                          timeout=300)


def test_the_command_prints_a_table_json_and_a_disk_time_floor_from_a_tune_file(tmp_path):
    out = _cli("--model", "small", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "recommended: params=device optimizer=cpu" in out.stdout
    assert "offload tune" in out.stdout  # says how to get the disk-time floor
    tuned = tmp_path / "offload.toml"
    tuned.write_text("# offload tune, 2026-11-26, /nvme: write_gbs=2.000 read_gbs=4.000\n[io]\nblock_size = 4194304\n")
    out = _cli("--model", "small", "--device", "cpu", "--config", str(tuned), "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["tuned_gbs"] == [2.0, 4.0]
    nvme = next(p for p in record["placements"] if p["placement"] == "params=nvme optimizer=nvme")
    assert nvme["disk_floor_s"] == pytest.approx(nvme["nvme_read_per_step"] / 4e9 + nvme["nvme_written_per_step"] / 2e9)
    assert next(p for p in record["placements"] if p["optimizer"] == "cpu")["disk_floor_s"] is None


def test_a_model_directory_is_estimated_as_its_config(tmp_path):
    """--model takes what offload train takes: a saved Hugging Face model directory has its config's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    by_dir = _cli("--model", str(tmp_path / "model"), "--device", "cpu", "--json")
    by_config = _cli("--model", str(tmp_path / "model" / "config.json"), "--device", "cpu", "--json")
    assert by_dir.returncode == 0 and by_config.returncode == 0, by_dir.stderr + by_config.stderr
    params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    estimated = json.loads(by_dir.stdout)["params"]  # the engine's flat groups: each padded to whole pages
    assert estimated == json.loads(by_config.stdout)["params"] and params <= estimated < params * 1.1


def test_the_command_plans_for_a_host_budget():
    out = _cli("--model", "medium", "--device", "cpu", "--host-memory-limit", "3GiB", "--disk", "100GiB", "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    by = {p["placement"]: p for p in record["placements"]}
    # the state alone (3.6 GB) is over the limit: the state on NVMe, as much of it in RAM as the limit leaves
    assert record["recommended"] == "params=device optimizer=nvme"
    best = by["params=device optimizer=nvme"]
    assert 0 < best["state_groups_in_ram"] < 26 and best["host_pool_bytes"] <= 3 << 30
    out = _cli("--model", "small", "--device", "cpu", "--host-memory-limit", "lots")
    assert out.returncode == 1 and "--host-memory-limit" in out.stderr and out.stderr.count("\n") == 1


def test_errors_are_one_line():
    out = _cli("--model", "nope")
    assert out.returncode == 1
    assert out.stderr.strip() == ("offload estimate: error: --model: 'nope' is neither a preset (tiny, small, medium, "
                                  "large), a config file, a model directory, nor a hub id in the local Hugging Face "
                                  "cache")
    out = _cli("--model", "7B", "--ram", "lots")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "--ram" in out.stderr
    out = _cli("--model", "7B", "--ranks", "0")
    assert out.returncode == 1 and out.stderr.strip() == "offload estimate: error: --ranks: must be >= 1; got 0"
    out = _cli("--model", "7B", "--ram", "1GiB", "--disk", "1GiB")
    assert out.returncode == 1 and "none fits" in out.stdout
