"""engine.backward_step(loss): the same training as backward(); step(), with updates overlapping backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import offload
from engine_reference import batches, loss_of, mlp, tiny_llama

pytest.importorskip("transformers", reason="the backward_step tests build a small Llama")


def _train(config, make, kind, data, fused: bool, **engine_kw):
    losses, infos = [], []
    with offload.Engine(make(), config, lr=3e-3, weight_decay=0.05, **engine_kw) as engine:
        for step in data:
            for batch in step[:-1]:
                engine.backward(loss_of(kind, engine, batch))
            loss = loss_of(kind, engine, step[-1])
            infos.append(engine.backward_step(loss) if fused else (engine.backward(loss), engine.step())[1])
            losses.append(loss.item())
        return losses, engine.state_dict(), infos, engine.stats().steps_during_backward


@pytest.mark.parametrize("params,dtype,optimizer", [("device", "fp32", "cpu"), ("device", "bf16", "cpu"),
                                                    ("cpu", "fp32", "cpu"), ("cpu", "bf16", "cpu"),
                                                    ("nvme", "bf16", "cpu"), ("device", "fp32", "nvme"),
                                                    ("device", "bf16", "nvme"), ("nvme", "bf16", "nvme"),
                                                    ("nvme", "fp32", "nvme")])
def test_backward_step_is_bit_exact_with_backward_then_step(params, dtype, optimizer, tmp_path):
    data = batches("llama", 6, micro=1)
    make = lambda: tiny_llama(layers=4)  # noqa: E731
    config = offload.Config(device="cpu", dtype=dtype, params=params, optimizer=optimizer, nvme_dir=tmp_path,
                            prefetch_layers=1)
    ref_losses, ref_state, ref_infos, _ = _train(config, make, "llama", data, fused=False)
    losses, state, infos, eager = _train(config, make, "llama", data, fused=True)
    assert eager == len(data)  # the updates really ran during backward
    assert losses == ref_losses
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    assert [i.step for i in infos] == [i.step for i in ref_infos]
    assert [i.grad_norm for i in infos] == pytest.approx([i.grad_norm for i in ref_infos], rel=1e-6)


@pytest.mark.parametrize("engine_kw,config_kw", [({"max_grad_norm": 1.0}, {}), ({}, {"dtype": "fp16"})])
def test_backward_step_falls_back_when_updates_depend_on_each_other(engine_kw, config_kw, tmp_path):
    data = batches("mlp", 4, micro=1)
    config = offload.Config(**{"device": "cpu", "dtype": "fp32", "nvme_dir": tmp_path, **config_kw})
    ref_losses, ref_state, _, _ = _train(config, mlp, "mlp", data, fused=False, **engine_kw)
    losses, state, _, eager = _train(config, mlp, "mlp", data, fused=True, **engine_kw)
    assert eager == 0
    assert losses == ref_losses
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


@pytest.mark.parametrize("params,dtype", [("device", "fp32"), ("cpu", "bf16"), ("nvme", "bf16")])
def test_backward_step_after_accumulated_micro_batches_overlaps_the_last_backward(params, dtype, tmp_path):
    data = batches("llama", 4, micro=3)
    make = lambda: tiny_llama(layers=4)  # noqa: E731
    config = offload.Config(device="cpu", dtype=dtype, params=params, nvme_dir=tmp_path, prefetch_layers=1)
    ref_losses, ref_state, ref_infos, _ = _train(config, make, "llama", data, fused=False)
    losses, state, infos, eager = _train(config, make, "llama", data, fused=True)
    assert eager == len(data)  # the last micro-batch's backward ran the updates
    assert [i.grad_norm for i in infos] == pytest.approx([i.grad_norm for i in ref_infos], rel=1e-6)
    assert losses == ref_losses
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


class _HalfUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.unused = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return x @ self.weight


@pytest.mark.parametrize("params", ["device", "cpu"])
def test_a_group_without_gradient_is_left_alone_and_a_partial_one_updated_after_backward(params):
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return nn.ModuleDict({"body": _HalfUsed(), "head_a": nn.Linear(8, 2), "head_b": nn.Linear(8, 2)})

    x = torch.randn(4, 8)
    config = offload.Config(device="cpu", dtype="fp32", params=params)
    results = []
    for fused in (False, True):
        with offload.Engine(make(), config, lr=1e-2) as engine:
            for _ in range(3):
                model = engine.model
                # head_b gets no gradient; body's ``unused`` never does, so body's group is never complete
                # during backward and is updated after it (its weight only)
                loss = model["head_a"](model["body"](x)).square().mean()
                engine.backward_step(loss) if fused else (engine.backward(loss), engine.step())
            results.append(engine.state_dict())
            assert engine.stats().steps_during_backward == (3 if fused else 0)
    plain, fused = results
    assert all(torch.equal(plain[k], fused[k]) for k in plain)
    assert torch.equal(fused["head_b.weight"], make()["head_b"].weight.detach())
    assert torch.equal(fused["body.unused"], make()["body"].unused.detach())
    assert not torch.equal(fused["body.weight"], make()["body"].weight.detach())


def test_backward_step_reads_each_groups_state_before_its_gradients_come(tmp_path, monkeypatch):
    """From the second backward_step on, every NVMe group's update finds its first chunks already read (Note
    [state read-ahead]), and the state is still read once per step (m and v only: fp32 on the CPU, the master
    is the device weights, Note [master in memory]); that the results do not change is the test above
    (optimizer="nvme" rows)."""
    from offload.optim.group_stepper import GroupStepper

    taken = []
    take = GroupStepper._take_preload

    def counting(self, nvme, counters):
        reads = take(self, nvme, counters)
        if nvme:
            taken.append(bool(reads))
        return reads

    monkeypatch.setattr(GroupStepper, "_take_preload", counting)
    config = offload.Config(device="cpu", dtype="fp32", optimizer="nvme", nvme_dir=tmp_path)
    with offload.Engine(tiny_llama(layers=4), config, lr=1e-3) as engine:
        state_bytes = sum(8 * s.group.numel for s in engine.store.states)
        for i, step in enumerate(batches("llama", 3, micro=1)):
            taken.clear()
            info = engine.backward_step(loss_of("llama", engine, step[0]))
            assert len(taken) == len(engine.groups) and all(taken) == (i > 0), (i, taken)
            assert info.nvme_bytes_read == state_bytes


def test_state_read_ahead_gives_way_to_checkpoints_and_state_dict(tmp_path):
    """Between backward_steps the next step's first state is already being read into the staging slots; a
    save, a state_dict or a load in between drops it first, and training goes on exactly as without them."""
    data = batches("llama", 4, micro=1)

    def train(interrupt: bool):
        config = offload.Config(device="cpu", dtype="fp32", optimizer="nvme", nvme_dir=tmp_path / str(interrupt))
        with offload.Engine(tiny_llama(layers=4), config, lr=1e-3) as engine:
            for i, step in enumerate(data):
                engine.backward_step(loss_of("llama", engine, step[0]))
                if interrupt and i == 1:
                    engine.save(tmp_path / "ckpt")
                    before = engine.state_dict()
                    engine.load(tmp_path / "ckpt")
                    assert all(torch.equal(before[k], v) for k, v in engine.state_dict().items())
            return engine.state_dict()

    plain, interrupted = train(False), train(True)
    assert all(torch.equal(plain[k], interrupted[k]) for k in plain)


@pytest.mark.parametrize("where", ["step", "backward_step"])
def test_an_interrupted_step_fails_the_engine_and_close_neither_hangs_nor_loses_weights(where, tmp_path,
                                                                                        monkeypatch):
    """Ctrl-C at the worst moment: after the groups were announced as being updated but before any update
    ran. The engine refuses to go on, and close() returns (no fetch waits for an update that never comes)
    with the model holding the weights of the last completed step."""
    import threading

    from offload.optim.background_step import BackgroundStep
    from offload.optim.update_queue import UpdateQueue

    config = offload.Config(device="cpu", dtype="fp32", params="nvme", optimizer="nvme", nvme_dir=tmp_path,
                            prefetch_layers=1)
    data = batches("llama", 2, micro=1)
    engine = offload.Engine(tiny_llama(layers=4), config, lr=3e-3)
    engine.backward(loss_of("llama", engine, data[0][0]))
    engine.step()
    before = {k: v.clone() for k, v in engine.state_dict().items()}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "step":
        monkeypatch.setattr(BackgroundStep, "start", interrupt)
        engine.backward(loss_of("llama", engine, data[1][0]))
        with pytest.raises(KeyboardInterrupt):
            engine.step()
    else:
        monkeypatch.setattr(UpdateQueue, "submit", interrupt)
        with pytest.raises(KeyboardInterrupt):
            engine.backward_step(loss_of("llama", engine, data[1][0]))
    if where == "step":
        with pytest.raises(RuntimeError, match="interrupted"):
            engine.backward(loss_of("llama", engine, data[1][0]))
    closing = threading.Thread(target=engine.close)
    closing.start()
    closing.join(60)
    assert not closing.is_alive(), "close() hangs"
    for key, value in engine.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
