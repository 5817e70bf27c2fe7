"""bench/gpu_scale.py, the 7B-on-one-GPU benchmark, in its CPU dry-run form: the shared loss equals transformers'
own, the batches are a function of the seed and index, the parameter count is the model's, and a run of a small
model writes a record whose losses fall and a report that carries the fields the GPU run is judged by."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the scale benchmark builds a Llama")
BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import gpu_scale  # noqa: E402
import gpu_scale_torch  # noqa: E402
from scale_model import TokenBatches, causal_lm_loss, count_params, llama_config  # noqa: E402

SMALL = ["--device", "cpu", "--hidden", "64", "--layers", "2", "--intermediate", "172", "--heads", "4",
         "--vocab", "300", "--seq", "64", "--micro-batch", "2", "--accum", "2", "--device-limit", "1MiB"]


def test_the_chunked_loss_is_transformers_loss():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(64, 2, 172, 4, 300, 64))
    ids = TokenBatches(3, 64).get(0)
    out = model(input_ids=ids, labels=ids)
    ours = causal_lm_loss(out.logits, ids, chunk_tokens=50)  # chunks that do not divide the tokens
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-6)
    ours.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_batches_depend_on_seed_and_index_only_and_the_count_is_the_models():
    from transformers import LlamaForCausalLM

    a, b = TokenBatches(2, 32), TokenBatches(2, 32)
    assert torch.equal(a.get(5), b.get(5)) and not torch.equal(a.get(5), a.get(6))
    assert a.get(0).shape == (2, 32) and int(a.get(0).max()) < 256
    config = llama_config(64, 3, 172, 4, 300, 64)
    assert count_params(config) == sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def test_a_dry_run_trains_and_reports(tmp_path):
    rc = gpu_scale.main(["run", *SMALL, "--steps", "4", "--lr", "3e-3", "--lr-warmup", "2",
                         "--host-memory-limit", "none", "--out", str(tmp_path)])
    assert rc == 0
    record = json.loads((tmp_path / "run-24GiB.json").read_text())
    assert record["status"] == "ok" and len(record["losses"]) == 5
    assert record["loss_last"] < record["loss_first"]
    assert record["tokens_per_step"] == 2 * 64 * 2 and record["tokens_per_s"] > 0
    assert record["mfu"] == pytest.approx(6 * record["params"] * record["tokens_per_s"] / 1e12
                                          / record["matmul_tflops"])
    # plain torch on the same job: the trajectory the report holds offload's against
    assert gpu_scale_torch.main([*SMALL, "--steps", "4", "--lr", "3e-3", "--lr-warmup", "2",
                                 "--out", str(tmp_path)]) == 0
    records = [str(tmp_path / "run-24GiB.json"), str(tmp_path / "torch-reference.json")]
    assert gpu_scale.main(["report", *records, "--out", str(tmp_path / "r")]) == 0
    [summary] = (tmp_path / "r").glob("gpu-scale-*.json")
    report = json.loads(summary.read_text())
    assert {"gpu", "params", "tokens_per_s", "mfu", "vs_deepspeed"} <= report.keys()
    assert report["vs_deepspeed"] is None  # no DeepSpeed record given
    assert report["loss_vs_torch"]["24GiB"] < 1e-3  # fp32 master + bf16 compute against fp32 + autocast


def test_an_unwritable_output_directory_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        gpu_scale.main(["run", *SMALL, "--out", str(blocker / "out")])
    assert exit_info.value.code == 2
    assert f"--out: cannot write to {blocker / 'out'}" in capsys.readouterr().err


def test_a_bad_flag_is_refused():
    with pytest.raises(SystemExit):
        gpu_scale.main(["run", *SMALL, "--accum", "0", "--out", "/nonexistent"])


def test_the_deepspeed_ratio_pairs_runs_of_the_same_model_budget_and_tokens():
    def rec(runner, label, params, tokens_per_s, status="ok", budget=24 << 30):
        return {"runner": runner, "label": label, "params": params, "budget_bytes": budget,
                "tokens_per_step": 65536, "tokens_per_s": tokens_per_s, "status": status}

    ours = [rec("offload", "7B", 6.7e9, 8800), rec("offload", "3B", 3.5e9, 17000), rec("offload", "3B-12", 3.5e9, 9e3,
                                                                                      budget=12 << 30)]
    peers = [rec("deepspeed-zero3", "7B", 6.7e9, 0, status="did not finish (killed)"),
             rec("deepspeed-zero3", "3B", 3.5e9, 11000), rec("deepspeed-zero3", "3B-12", 3.5e9, 1000, budget=12 << 30)]
    pair = gpu_scale._deepspeed_pair(ours, peers)
    # the killed 7B run pairs with nothing; of the 3.5B pairs (each within one budget), DeepSpeed's best run's
    assert pair["params"] == 3.5e9 and pair["offload"] == "3B" and pair["budget_bytes"] == 24 << 30
    assert pair["ratio"] == pytest.approx(17000 / 11000)
    assert gpu_scale._deepspeed_pair(ours[:1], peers) is None


def test_a_lora_dry_run_streams_a_base_four_times_the_device_limit(tmp_path):
    """--lora-r: the base frozen and streamed (Note [frozen groups]) under a device limit a quarter of its
    bf16 bytes; only the adapters train, and the model FLOPs count 4 per parameter and token."""
    pytest.importorskip("peft", reason="the LoRA dry run needs peft (pip install 'offload[lora]')")
    small = [x if x != "2" or i != SMALL.index("--layers") + 1 else "4" for i, x in enumerate(SMALL)]
    small[small.index("--device-limit") + 1] = "115KiB"
    rc = gpu_scale.main(["run", *small, "--lora-r", "4", "--steps", "4", "--lr", "3e-3", "--host-memory-limit",
                         "none", "--out", str(tmp_path)])
    assert rc == 0
    record = json.loads((tmp_path / "run-24GiB-lora4.json").read_text())
    assert record["status"] == "ok" and record["lora_r"] == 4 and record["loss_last"] < record["loss_first"]
    assert 2 * record["params"] >= 4 * 115 * 1024  # the bf16 base is at least 4x the device limit
    assert 0 < record["trainable_params"] < record["params"] / 10
    assert record["mfu"] == pytest.approx(4 * record["params"] * record["tokens_per_s"] / 1e12
                                          / record["matmul_tflops"])
