"""offload estimate --lora-r: a LoRA run's needs (the base frozen and offloaded, the adapters trained) against peft's
own parameter counts and a real engine's host buffers and swap files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft", reason="LoRA needs peft (pip install 'offload[lora]')")

from offload.estimate import estimate, shape_from_count, shape_from_model, with_lora  # noqa: E402
from offload.layout.flat_group import GROUP_ALIGN_ELEMENTS  # noqa: E402


def _llama(hidden: int, layers: int, intermediate: int, heads: int, vocab: int, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, tie_word_embeddings=tie)


def _peft_builder(config, r: int, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def build():
        torch.manual_seed(0)
        return get_peft_model(AutoModelForCausalLM.from_config(config),
                              LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"))
    return build


def _counts(model) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters() if not p.requires_grad))


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["gate_proj", "down_proj", "lm_head"]])
def test_a_counted_llama_with_lora_has_the_trainable_and_frozen_parameters_of_the_peft_model(targets):
    """The shape assumed for '100M' with an adapter, against peft on that Llama built on the meta device."""
    shape = shape_from_count(100_000_000)
    lora = with_lora(shape, 16, targets)
    config = _llama(shape.hidden, shape.layers, shape.intermediate, shape.heads, shape.vocab)
    with torch.device("meta"):
        model = _peft_builder(config, 16, targets)()
    trainable, frozen = _counts(model)
    assert (lora.numel, lora.frozen_numel, lora.frozen_grouped_numel) == (trainable, frozen, frozen)
    assert lora.frozen_group_numels == shape.group_numels
    with pytest.raises(ValueError, match="'qkv' is not a linear layer of the assumed Llama"):
        with_lora(shape, 16, ["qkv"])


def test_a_lora_model_shape_counts_the_adapters_and_the_frozen_blocks():
    build = _peft_builder(_llama(128, 4, 344, 4, 256), 8, "all-linear")
    with torch.device("meta"):
        model = build()
        shape = shape_from_model(model, "x")
    trainable, frozen = _counts(model)
    assert trainable <= shape.numel <= trainable + GROUP_ALIGN_ELEMENTS * len(shape.group_numels)
    assert shape.frozen_numel == shape.frozen_grouped_numel == frozen
    assert len(shape.group_numels) == 4 and shape.use_width == 2  # a block's adapters and its frozen base


@pytest.mark.parametrize("params,optimizer,dtype", [("cpu", "cpu", "bf16"), ("cpu", "nvme", "fp32"),
                                                    ("nvme", "nvme", "bf16"), ("nvme", "nvme", "fp32"),
                                                    ("device", "cpu", "bf16")])
def test_lora_host_buffers_and_swap_files_are_those_of_a_real_engine(params, optimizer, dtype, tmp_path):
    import offload

    # (blocks of 12.6M parameters: a frozen block is larger than the pieces its home is written in)
    build = _peft_builder(_llama(1024, 2, 2752, 8, 256, tie=True), 8, "all-linear")
    with torch.device("meta"):
        shape = shape_from_model(build(), "x")
    expected = estimate(shape, params, optimizer, dtype=dtype, base_rss=0, batch=2, seq_len=64)
    config = offload.Config(device="cpu", dtype=dtype, params=params, optimizer=optimizer, nvme_dir=str(tmp_path))
    with offload.Engine(offload.init_empty(build), config, lr=1e-3) as engine:
        disk = 0
        if engine.swap is not None:
            disk = sum(e.stat().st_blocks * 512 for e in os.scandir(engine.swap.run_dir) if e.name.endswith(".swap"))
        ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        engine.synchronize()
        stats = engine.stats()
    assert expected.host_pool_bytes == stats.host_bytes_peak
    assert expected.disk_bytes == disk
    assert stats.device_param_bytes_peak <= expected.device_bytes  # (the fetch slots' room: a bound)
    element = 2 if dtype == "bf16" else 4
    if params == "nvme":  # the base is read in forward and again in backward, and never written
        base_reads = 2 * element * shape.frozen_numel
        assert expected.nvme_read_per_step - base_reads == estimate(
            shape, "cpu", optimizer, dtype=dtype, base_rss=0).nvme_read_per_step + 2 * element * shape.numel
    if params == "cpu":
        assert expected.parts["frozen weight homes"] >= element * shape.frozen_numel


def test_the_estimate_command_takes_lora_flags():
    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "offload", "estimate", *flags], capture_output=True, text=True,
                              timeout=300)

    done = run("--model", "7B", "--lora-r", "16", "--ram", "24GiB", "--disk", "500GiB", "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    lora = with_lora(shape_from_count(7_000_000_000), 16, "all-linear")
    assert record["params"] == lora.numel
    nvme = next(p for p in record["placements"] if p["placement"] == "params=nvme optimizer=nvme")
    assert nvme["nvme_written_per_step"] < nvme["nvme_read_per_step"] / 20  # the base is only read
    table = run("--model", "7B", "--lora-r", "16", "--lora-targets", "q_proj,v_proj", "--ram", "24GiB")
    assert table.returncode == 0 and "(a LoRA adapter of rank 16; 6738.4M frozen)" in table.stdout
    bad = run("--model", "7B", "--lora-r", "16", "--lora-targets", "qkv")
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "offload estimate: error: --lora-targets: 'qkv' is not a linear layer of the assumed Llama (q_proj, k_proj, "
        "v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head)")
    bad = run("--model", "7B", "--lora-targets", "q_proj")
    assert bad.returncode == 1 and "--lora-targets: needs --lora-r" in bad.stderr
