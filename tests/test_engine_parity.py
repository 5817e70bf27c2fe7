"""The engine trains exactly like plain PyTorch (torch.optim.AdamW on one device)."""

from __future__ import annotations


import pytest
import torch

import offload
from engine_reference import assert_matches, batches, mlp, no_decay_groups, reference_run, tiny_llama, train_with_engine

transformers = pytest.importorskip("transformers", reason="the Llama parity tests need transformers")

STEPS = 30
LR = 3e-3
WEIGHT_DECAY = 0.05


def engine_run(kind, model, data, config, *, max_grad_norm, decay_groups, **engine_kw):
    groups = no_decay_groups(model) if decay_groups else None
    return train_with_engine(kind, model, data, config, lr=LR, weight_decay=WEIGHT_DECAY,
                             max_grad_norm=max_grad_norm, param_groups=groups, **engine_kw)


@pytest.mark.parametrize("kind", ["llama", "mlp"])
@pytest.mark.parametrize("optimizer", ["cpu", "nvme"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_matches_torch_adamw(kind, optimizer, dtype, max_grad_norm, tmp_path):
    make = tiny_llama if kind == "llama" else mlp
    data = batches(kind, STEPS, micro=2)
    torch_dtype = offload.Config(dtype=dtype).torch_dtype
    ref_losses, ref_state = reference_run(kind, make(), data, torch_dtype, lr=LR, weight_decay=WEIGHT_DECAY,
                                          max_grad_norm=max_grad_norm, decay_groups=True)
    config = offload.Config(device="cpu", dtype=dtype, optimizer=optimizer, nvme_dir=tmp_path)
    losses, state, stats = engine_run(kind, make(), data, config, max_grad_norm=max_grad_norm, decay_groups=True)
    # fp32: the same arithmetic up to rounding. bf16: the same casts, but a master weight one fp32 bit away
    # from torch's can round to the neighbouring bf16 value, and training amplifies that; the bit-exact check
    # of the bf16 plumbing is test_bf16_is_bit_exact_with_the_same_kernel.
    if dtype == "fp32":
        assert_matches(losses, state, ref_losses, ref_state, rtol=1e-5)
    else:
        assert_matches(losses, state, ref_losses, ref_state, rtol=2e-3, weight_atol=1e-2)
    if optimizer == "nvme":
        assert stats.optimizer_groups_on_host == 0 and stats.nvme_bytes_read > 0
        # fp32 on the CPU: the weights are the master, so a step reads only the moments (Note [master in
        # memory]) and writes all three parts; bf16 reads and writes master, m and v
        parts_read = 2 if dtype == "fp32" else 3
        assert 3 * stats.nvme_bytes_read == parts_read * stats.nvme_bytes_written
    else:
        assert stats.optimizer_groups_on_nvme == 0 and stats.nvme_bytes_read == 0


def test_single_micro_batch_and_uniform_weight_decay(tmp_path):
    data = batches("llama", 10, micro=1)
    ref_losses, ref_state = reference_run("llama", tiny_llama(), data, torch.float32, lr=LR,
                                          weight_decay=WEIGHT_DECAY, max_grad_norm=None, decay_groups=False)
    losses, state, _ = engine_run("llama", tiny_llama(), data, offload.Config(device="cpu", dtype="fp32"),
                                  max_grad_norm=None, decay_groups=False)
    assert_matches(losses, state, ref_losses, ref_state, rtol=1e-5)


def test_part_of_the_state_in_ram_when_the_budget_allows(tmp_path):
    """optimizer='nvme' with a host_memory_limit: the groups that fit stay in RAM, the rest go to NVMe, and
    training is the same."""
    data = batches("llama", 8, micro=2)
    ref_losses, ref_state = reference_run("llama", tiny_llama(layers=4), data, torch.float32, lr=LR,
                                          weight_decay=WEIGHT_DECAY, max_grad_norm=1.0, decay_groups=True)
    model = tiny_llama(layers=4)
    numel = sum(p.numel() for p in model.parameters())
    config = offload.Config(device="cpu", dtype="fp32", optimizer="nvme", nvme_dir=tmp_path,
                            host_memory_limit=numel * 16)
    losses, state, stats = engine_run("llama", model, data, config, max_grad_norm=1.0, decay_groups=True)
    assert stats.optimizer_groups_on_host > 0 and stats.optimizer_groups_on_nvme > 0
    assert stats.host_bytes_peak <= numel * 16
    assert_matches(losses, state, ref_losses, ref_state, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "mlp"])
@pytest.mark.parametrize("optimizer", ["cpu", "nvme"])
def test_bf16_is_bit_exact_with_the_same_kernel(kind, optimizer, tmp_path):
    """With the same Adam arithmetic (offload.CPUAdam in the reference), the bf16 engine run is bit for bit the
    reference that keeps fp32 masters, casts them to bf16 for the forward and sums bf16 gradients in fp32."""
    make = tiny_llama if kind == "llama" else mlp
    data = batches(kind, 12, micro=2)
    ref_losses, ref_state = reference_run(kind, make(), data, torch.bfloat16, lr=LR, weight_decay=WEIGHT_DECAY,
                                          max_grad_norm=None, decay_groups=True, optimizer_cls=offload.CPUAdam)
    config = offload.Config(device="cpu", dtype="bf16", optimizer=optimizer, nvme_dir=tmp_path)
    losses, state, _ = engine_run(kind, make(), data, config, max_grad_norm=None, decay_groups=True)
    assert losses == ref_losses
    for key, ref in ref_state.items():
        assert torch.equal(state[key], ref), key
