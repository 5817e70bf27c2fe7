"""Frozen parameters follow ``params=`` (Note [frozen groups]): LoRA with the base streamed from host RAM or NVMe.

The reference is plain PyTorch: the same (PEFT) model trained with torch.optim.AdamW over its trainable
parameters on one device."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import offload
from engine_reference import assert_matches, batches, loss_of, reference_run, tiny_llama

pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="LoRA parity needs peft (pip install 'offload[lora]')")

LR = 1e-2
STEPS = 4


def lora_llama(seed: int = 0, tied: bool = False, targets=("q_proj", "v_proj", "down_proj"), save=None):
    base = tiny_llama(seed, layers=4, tied=tied, hidden=64)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0,
                             init_lora_weights=False, modules_to_save=save)  # (B random: every step moves)
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(base, config)


def frozen_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def config_for(params: str, tmp_path, limit: int, **kw) -> offload.Config:
    return offload.Config(device="cpu", dtype="fp32", params=params, optimizer="nvme" if params == "nvme" else "cpu",
                          nvme_dir=tmp_path / "swap", device_memory_limit=limit, prefetch_layers=1, **kw)


def train(engine, data) -> list[float]:
    losses = []
    for step in data:
        loss = loss_of("llama", engine, step[0])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("params", ["cpu", "nvme"])
def test_lora_with_the_base_offloaded_equals_torch_adamw(params, tied, tmp_path):
    """The acceptance parity: base on params=cpu|nvme with device_memory_limit a third of the frozen bytes."""
    model = lora_llama(tied=tied)
    reference = copy.deepcopy(model)
    data = batches("llama", STEPS, micro=1)
    ref_losses, ref_state = reference_run("llama", reference, data, torch.float32, lr=LR, weight_decay=0.0,
                                          max_grad_norm=None, decay_groups=False)
    limit = frozen_bytes(model) // 3
    with offload.Engine(model, config_for(params, tmp_path, limit), lr=LR) as engine:
        assert engine.frozen_groups and all(g.frozen for g in engine.frozen_groups)
        losses = train(engine, data)
        state, stats = engine.state_dict(), engine.stats()
        adapters = engine.state_dict(trainable_only=True)
    assert_matches(losses, state, ref_losses, ref_state, rtol=1e-5, weight_atol=1e-5)
    assert stats.device_param_bytes_peak <= limit
    assert set(adapters) == {k for k, p in reference.named_parameters() if p.requires_grad}
    assert all(torch.equal(adapters[k], state[k]) for k in adapters)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_lora_with_activation_checkpointing(reentrant, tmp_path):
    """Recomputed uses release their frozen groups too (Note [frozen release in backward])."""
    model = lora_llama(targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads() if reentrant else None  # (reentrant checkpoints need an input with grad)
    model.train()
    reference = copy.deepcopy(model)
    data = batches("llama", 3, micro=1)
    ref_losses, ref_state = reference_run("llama", reference, data, torch.float32, lr=LR, weight_decay=0.0,
                                          max_grad_norm=1.0, decay_groups=False)
    limit = frozen_bytes(model) // 3
    with offload.Engine(model, config_for("nvme", tmp_path, limit), lr=LR, max_grad_norm=1.0) as engine:
        losses = train(engine, data)
        state, stats = engine.state_dict(), engine.stats()
    assert_matches(losses, state, ref_losses, ref_state, rtol=1e-5, weight_atol=1e-5)
    assert stats.device_param_bytes_peak <= limit


def test_modules_to_save_and_a_frozen_block_in_bf16(tmp_path):
    """modules_to_save (a trainable copy of the head next to its frozen original), bf16 compute: the run
    matches the same engine with the base on the device."""
    def run(params: str):
        model = lora_llama(save=["lm_head"])
        config = offload.Config(device="cpu", dtype="bf16", params=params, optimizer="cpu",
                                nvme_dir=tmp_path / params)
        with offload.Engine(model, config, lr=LR) as engine:
            return train(engine, batches("llama", 3, micro=1)), engine.state_dict()

    losses, state = run("nvme")
    ref_losses, ref_state = run("device")
    assert losses == ref_losses
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


def test_the_frozen_base_costs_only_reads(tmp_path):
    """No write-back, no gradient, no optimizer state for the base: per step, NVMe writes are the adapters'
    state only, and the base is read in forward and backward."""
    model = lora_llama()
    base = frozen_bytes(model)
    with offload.Engine(model, config_for("nvme", tmp_path, base // 3), lr=LR) as engine:
        train(engine, batches("llama", 1, micro=1))
        before = engine.stats()
        train(engine, batches("llama", 2, micro=1, seed=5))
        after = engine.stats()
        trainable = sum(g.numel for g in engine.groups) * 4
    written = after.nvme_bytes_written - before.nvme_bytes_written
    read = after.nvme_bytes_read - before.nvme_bytes_read
    assert written <= 2 * 3 * trainable  # master, m, v of the adapters; nothing of the base
    assert read >= 2 * base  # each step reads the base at least once (forward; backward again what it released)


def test_a_lora_checkpoint_holds_the_adapters_and_resumes_exactly(tmp_path):
    data = batches("llama", 6, micro=1)
    config = config_for("nvme", tmp_path, None)
    with offload.Engine(lora_llama(), config, lr=LR) as engine:
        straight = train(engine, data)
        straight_state = engine.state_dict()
    with offload.Engine(lora_llama(), config, lr=LR) as engine:
        train(engine, data[:3])
        engine.save(tmp_path / "ckpt")
        base = frozen_bytes(engine.model)
    size = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    assert size < base / 2
    with offload.Engine(lora_llama(), config, lr=LR) as engine:  # the same base, fresh adapters
        engine.load(tmp_path / "ckpt")
        resumed = train(engine, data[3:])
        resumed_state = engine.state_dict()
    assert resumed == straight[3:]
    assert all(torch.equal(resumed_state[k], straight_state[k]) for k in straight_state)


def test_a_checkpoint_is_refused_on_a_different_base(tmp_path):
    config = config_for("cpu", tmp_path, None)
    with offload.Engine(lora_llama(seed=0), config, lr=LR) as engine:
        engine.save(tmp_path / "ckpt")
    for params in ("cpu", "device"):  # (the fingerprint is the same whatever the placement)
        with offload.Engine(lora_llama(seed=3), config_for(params, tmp_path, None), lr=LR) as engine:
            with pytest.raises(offload.CheckpointError, match="different frozen base: 'base_model.model"):
                engine.load(tmp_path / "ckpt")
    with offload.Engine(lora_llama(seed=0), config_for("device", tmp_path, None), lr=LR) as engine:
        engine.load(tmp_path / "ckpt")  # the same base on the device: accepted
    with pytest.raises(offload.CheckpointError, match="only their fingerprint; export from an engine"):
        offload.export(tmp_path / "ckpt", tmp_path / "exported")


def test_a_peft_model_on_the_meta_device_loads_its_base_checkpoint(tmp_path, monkeypatch):
    """init_empty + get_peft_model, base weights streamed in by load_pretrained (Note [peft names]): the base
    lands in the frozen groups on NVMe, the adapters keep their initial values. The replay hands each value on
    as soon as it is final, although the adapters are initialised after the whole base."""
    from offload.layout.meta_init import Materializer

    base = tiny_llama(seed=7, layers=4, hidden=64, tied=False)
    base.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = offload.init_empty(lambda: peft.get_peft_model(tiny_llama(seed=0, layers=4, hidden=64, tied=False), lora))
    held, value = [0], Materializer.value

    def tracked(self, t):
        out = value(self, t)  # (the values final but not handed on yet, and this one)
        held[0] = max(held[0], sum(v.untyped_storage().nbytes() for v in self._final.values()) +
                      (0 if out is None else out.untyped_storage().nbytes()))
        return out

    monkeypatch.setattr(Materializer, "value", tracked)
    with offload.Engine(model, config_for("nvme", tmp_path, None), lr=LR) as engine:
        assert 0 < held[0] < frozen_bytes(engine.model) / 3  # (about a block's values at most)
        offload.load_pretrained(engine, tmp_path / "base")
        state = engine.state_dict()
        losses = train(engine, batches("llama", 1, micro=1) * 3)  # (one batch: its loss falls)
    expected = base.state_dict()
    for key, value in state.items():
        if "lora_B" in key:
            assert torch.count_nonzero(value) == 0  # (peft's default init)
        elif "lora_A" in key:
            assert torch.isfinite(value).all() and torch.count_nonzero(value) > 0
        else:
            plain = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(value, expected[plain].float()), key
    assert losses[-1] < losses[0]


def test_a_peft_model_built_from_its_base_checkpoint_has_the_adapters_peft_gives_it(tmp_path):
    """Engine(init_empty(get_peft_model(...)), pretrained=base): the base is read into the frozen groups on NVMe
    and the replay makes only the adapters, drawing nothing for the base, so they come out exactly as peft
    makes them on a model from ``from_pretrained`` (Note [values provided elsewhere])."""
    from transformers import AutoModelForCausalLM

    tiny_llama(seed=7, layers=4, hidden=64, tied=False).save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = offload.init_empty(lambda: peft.get_peft_model(tiny_llama(seed=0, layers=4, hidden=64, tied=False), lora))
    with offload.Engine(model, config_for("nvme", tmp_path, frozen_bytes(model) // 3), lr=LR,
                        pretrained=tmp_path / "base") as engine:
        assert len(engine.frozen_groups) > 1
        state = engine.state_dict()
    torch.manual_seed(0)  # (the seed the build starts from)
    expected = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
                                   lora).state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert any("lora_A" in k and torch.count_nonzero(v) > 0 for k, v in state.items())


def test_gathered_reads_and_edits_frozen_weights(tmp_path):
    model = lora_llama()
    layer = model.base_model.model.model.layers[1]
    with offload.Engine(model, config_for("nvme", tmp_path, frozen_bytes(model) // 3), lr=LR) as engine:
        before = engine.state_dict()
        key = "base_model.model.model.layers.1.mlp.gate_proj.weight"
        with engine.gathered(layer):
            torch.testing.assert_close(layer.mlp.gate_proj.weight.detach(), before[key], rtol=0, atol=0)
        with engine.gathered(layer, writable=True):
            with torch.no_grad():
                layer.mlp.gate_proj.weight.mul_(2)
        after = engine.state_dict()
    assert torch.equal(after[key], 2 * before[key])
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != key)


def test_offloaded_frozen_weights_go_back_into_the_model_at_close(tmp_path):
    model = lora_llama()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with offload.Engine(model, config_for("nvme", tmp_path, None), lr=LR):
        pass
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert os.listdir(tmp_path / "swap") == []


def test_no_step_keeps_its_graph_alive(tmp_path, monkeypatch):
    """The hooks that release frozen groups in backward hold nothing of the graph: once a step is done, the
    hooks put on its activations are freed by reference counting alone. (torch's register_multi_grad_hook
    keeps each tensor's grad_fn in the hook it puts on that tensor, a cycle through C++ that no collection
    breaks: every step's graph, saved activations included, stayed alive, and RSS grew step by step.)"""
    import gc
    import weakref

    hooks = []
    register = torch.Tensor.register_hook

    def tracked(tensor, hook):
        if tensor.grad_fn is not None:  # (on an activation, not on a parameter)
            hooks.append(weakref.ref(hook))
        return register(tensor, hook)

    monkeypatch.setattr(torch.Tensor, "register_hook", tracked)
    model = lora_llama()
    gc.disable()
    try:
        with offload.Engine(model, config_for("nvme", tmp_path, frozen_bytes(model) // 3), lr=LR) as engine:
            train(engine, batches("llama", 3, micro=1))
            assert hooks and all(ref() is None for ref in hooks)
    finally:
        gc.enable()
