"""Parameter offload (params="cpu" | "nvme"): the same training as plain torch, within the device budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import offload
from engine_reference import assert_matches, batches, loss_of, reference_run, tiny_llama, train_with_engine

pytest.importorskip("transformers", reason="the parameter-offload tests build a small Llama")

LR = 3e-3
WEIGHT_DECAY = 0.05


def llama(checkpointing: bool = False):
    model = tiny_llama(layers=8, tied=True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return model


def param_bytes(model, dtype_bytes: int) -> int:
    return sum(p.numel() for p in model.parameters()) * dtype_bytes


def max_group_bytes(model, dtype_bytes: int) -> int:
    from offload.layout.partition import partition_model

    return max(sum(p.numel() for p in g.params) for g in partition_model(model).groups) * dtype_bytes


@pytest.mark.parametrize("params", ["cpu", "nvme"])
@pytest.mark.parametrize("optimizer", ["cpu", "nvme"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_matches_torch_adamw_within_a_quarter_of_the_model(params, optimizer, checkpointing, tmp_path):
    # (20 steps: from about step 23 on, this small model at lr 3e-3 amplifies the last-bit differences between
    # the native Adam and torch's AdamW (which a device-resident engine shows as well) past 1e-5)
    data = batches("llama", 20, micro=2)
    ref_losses, ref_state = reference_run("llama", llama(checkpointing), data, torch.float32, lr=LR,
                                          weight_decay=WEIGHT_DECAY, max_grad_norm=1.0, decay_groups=False)
    model = llama(checkpointing)
    limit = param_bytes(model, 4) // 4
    config = offload.Config(device="cpu", dtype="fp32", params=params, optimizer=optimizer, nvme_dir=tmp_path,
                            device_memory_limit=limit, prefetch_layers=1)
    losses, state, stats = train_with_engine("llama", model, data, config, lr=LR, weight_decay=WEIGHT_DECAY,
                                             max_grad_norm=1.0)
    assert_matches(losses, state, ref_losses, ref_state, rtol=1e-5)
    assert 0 < stats.device_param_bytes_peak <= limit
    # between steps every group is home, but those kept for the next forward (Note [kept through the update]):
    # at most the prefetch window, the next forward's first prefetch_layers + 1 = 2 groups
    assert stats.device_param_bytes <= 2 * max_group_bytes(model, 4)


@pytest.mark.parametrize("params", ["cpu", "nvme"])
def test_bf16_offload_is_bit_exact_with_device_resident_training(params, tmp_path):
    data = batches("llama", 8, micro=1)
    resident = offload.Config(device="cpu", dtype="bf16")
    offloaded = offload.Config(device="cpu", dtype="bf16", params=params, nvme_dir=tmp_path, prefetch_layers=2)
    ref_losses, ref_state, _ = train_with_engine("llama", llama(), data, resident, lr=LR)
    losses, state, _ = train_with_engine("llama", llama(), data, offloaded, lr=LR)
    assert losses == ref_losses
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


@pytest.mark.parametrize("params", ["cpu", "nvme"])
def test_generate_and_no_grad_evaluation(params, tmp_path):
    plain = llama()
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(3))
    expected = plain.generate(prompt, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        expected_loss = plain(input_ids=prompt, labels=prompt).loss
    config = offload.Config(device="cpu", dtype="fp32", params=params, nvme_dir=tmp_path,
                            device_memory_limit=param_bytes(plain, 4) // 3)
    with offload.Engine(llama(), config) as engine:
        tokens = engine.model.generate(prompt, max_new_tokens=8, do_sample=False)
        with torch.no_grad():
            loss = engine(input_ids=prompt, labels=prompt).loss
        assert torch.equal(tokens, expected)
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
        assert engine.stats().device_param_bytes == 0


class _Layers(torch.nn.Module):
    """Four layers the forward runs in the order it is given (some may be left out)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(4)])

    def forward(self, x, order):
        for i in order:
            x = torch.tanh(self.layers[i](x))
        return x


def test_a_changed_execution_order_is_handled(tmp_path, caplog):
    ref = _Layers()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    config = offload.Config(device="cpu", dtype="fp32", params="nvme", nvme_dir=tmp_path, prefetch_layers=2)
    gen = torch.Generator().manual_seed(0)
    with offload.Engine(_Layers(), config, lr=1e-2) as engine:
        for order in ([0, 1, 2, 3], [0, 1, 2, 3], [3, 1, 0, 2], [3, 1, 0, 2], [0, 1, 2, 3]):
            x = torch.randn(4, 16, generator=gen)
            engine.backward(engine(x, order).square().mean())
            engine.step()
            ref(x, order).square().mean().backward()
            opt.step()
            opt.zero_grad()
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(engine.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    assert "different order" in caplog.text


def test_a_group_larger_than_the_device_limit_fails_at_construction(tmp_path):
    model = llama()
    with pytest.raises(offload.MemoryBudgetError, match="device_memory_limit"):
        offload.Engine(model, offload.Config(device="cpu", params="cpu", device_memory_limit=4096))


def test_reentrant_checkpointing(tmp_path):
    data = batches("llama", 5, micro=1)
    ref_losses, _ = reference_run("llama", llama(), data, torch.float32, lr=LR, weight_decay=0.0,
                                  max_grad_norm=None, decay_groups=False)
    model = tiny_llama(layers=8)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    config = offload.Config(device="cpu", dtype="fp32", params="cpu", device_memory_limit=param_bytes(model, 4) // 4,
                            prefetch_layers=1)
    losses, _, stats = train_with_engine("llama", model, data, config, lr=LR)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert stats.device_param_bytes_peak <= param_bytes(model, 4) // 4


def test_timeline_records_every_kind_of_work(tmp_path):
    import json

    timeline = offload.Timeline()
    config = offload.Config(device="cpu", dtype="bf16", params="nvme", optimizer="nvme", nvme_dir=tmp_path)
    with offload.Engine(llama(), config, timeline=timeline) as engine:
        for step in batches("llama", 2, 1):
            engine.backward(loss_of("llama", engine, step[0]))
            engine.step()
    timeline.save(tmp_path / "trace.json")
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["cat"] for e in spans} == {"compute", "fetch", "gradients", "adam", "nvme read", "nvme write", "step"}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert sum(e["cat"] == "step" for e in spans) == 2


def test_overlapped_step_reports_and_fails_cleanly(tmp_path):
    from offload import _C

    config = offload.Config(device="cpu", dtype="bf16", params="nvme", optimizer="nvme", nvme_dir=tmp_path)
    data = batches("llama", 3, 1)
    with offload.Engine(llama(), config) as engine:
        engine.backward(loss_of("llama", engine, data[0][0]))
        info = engine.step()
        assert info.overlapped and info.nvme_bytes_read > 0
        engine.backward(loss_of("llama", engine, data[1][0]))  # waits for the step it overlapped
        assert engine.stats().optimizer_adam_s > 0
        _C.inject_io_fault("eio", 2)
        try:
            engine.step()  # launched; the background update hits the fault
            with pytest.raises((OSError, RuntimeError)):
                engine.backward(loss_of("llama", engine, data[2][0]))
        finally:
            _C.inject_io_fault("none")
        with pytest.raises(RuntimeError, match="failed part-way"):
            engine.step()
    assert not any(p.name.startswith("offload-swap-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("params", ["cpu", "nvme"])
def test_a_layer_without_gradient_keeps_its_weights(params, tmp_path):
    """bf16 weights of a group that gets no gradient in a step are written home unchanged."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 16, generator=gen) for _ in range(4)]
    results = []
    for config in (offload.Config(device="cpu", dtype="bf16"),
                   offload.Config(device="cpu", dtype="bf16", params=params, nvme_dir=tmp_path)):
        outs = []
        with offload.Engine(_Layers(), config, lr=1e-2) as engine:
            for x, skip in zip(xs, (2, 1, 3, 0)):
                order = [i for i in range(4) if i != skip]
                engine.backward(engine(x, order).float().square().mean())
                engine.step()
                with torch.no_grad():
                    outs.append(engine(xs[0], range(4)))
        results.append(outs)
    assert all(torch.equal(a, b) for a, b in zip(*results))


class _Blocks(torch.nn.Module):
    """Parameters on the root used before the blocks, blocks under a ModuleList, a dataclass output."""

    def __init__(self, reentrant_segments: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.in_scale = torch.nn.Parameter(torch.ones(16) * 1.5)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(4)])
        self.positions = _Positions()
        self.reentrant_segments = reentrant_segments

    def forward(self, x):
        x = x * self.in_scale + self.positions(x.shape[0]).sum()
        if self.reentrant_segments:
            return torch.utils.checkpoint.checkpoint_sequential(
                torch.nn.Sequential(*[torch.nn.Sequential(layer, torch.nn.Tanh()) for layer in self.layers]),
                self.reentrant_segments, x, use_reentrant=True)
        for layer in self.layers:
            x = torch.tanh(layer(x).value)
        return x


class _Positions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(8, 16) * 0.1)

    def forward(self, n):
        return self.table[:n]  # a view of the weights themselves


@dataclasses.dataclass
class _Out:
    value: torch.Tensor


def _wrap_outputs(model):
    for layer in model.layers:
        layer.forward = (lambda f: (lambda x: _Out(f(x))))(layer.forward)
    return model


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("reentrant_segments", [0, 2])
def test_nested_groups_views_dataclasses_and_reentrant_segments(prefetch, reentrant_segments, tmp_path):
    def make():
        model = _Blocks(reentrant_segments)
        return model if reentrant_segments else _wrap_outputs(model)

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 16, generator=gen) for _ in range(3)]
    runs = []
    for config in (offload.Config(device="cpu", dtype="fp32"),
                   offload.Config(device="cpu", dtype="fp32", params="nvme", nvme_dir=tmp_path,
                                  prefetch_layers=prefetch)):
        with offload.Engine(make(), config, lr=1e-2) as engine:
            for x in xs:
                engine.backward(engine(x).square().mean())
                engine.step()
            runs.append(engine.state_dict())
    for key, value in runs[0].items():
        assert torch.equal(runs[1][key], value), key


def test_the_model_works_after_close_and_frozen_bytes_count_against_the_limit(tmp_path):
    model = llama()
    model.model.norm.weight.requires_grad_(False)
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    group = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
    limit = 4 * (3 * group + 2048 * 8)
    config = offload.Config(device="cpu", dtype="fp32", params="nvme", nvme_dir=tmp_path, device_memory_limit=limit)
    with offload.Engine(model, config) as engine:
        engine.backward(engine(input_ids=prompt, labels=prompt).loss)
        engine.step()
        with torch.no_grad():
            during = engine(input_ids=prompt).logits
        assert engine.stats().device_param_bytes_peak <= limit
    with torch.no_grad():
        after = model(input_ids=prompt).logits
    assert torch.equal(after, during)


@pytest.mark.parametrize("params", ["cpu", "nvme"])
def test_weights_that_do_not_fit_the_device_at_close_come_back_in_host_memory(params, tmp_path, monkeypatch):
    """close(): when bringing the whole model to the device runs out of device memory (a 7B under a 12 GiB
    budget did), the weights come back in host memory, one group at a time, instead of becoming meta tensors."""
    from offload.schedule.offloaded_params import OffloadedParams

    materialize = OffloadedParams.materialize

    def device_full(self):  # fetches half the groups, then the device is full
        for g in range(len(self.groups) // 2):
            self.start_fetch(g, wait_for_update=True, force=True)
            self.ensure_resident(g)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    model = llama()
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    config = offload.Config(device="cpu", dtype="fp32", params=params, nvme_dir=tmp_path,
                            device_memory_limit=param_bytes(model, 4) // 3)
    with offload.Engine(model, config, lr=LR) as engine:
        engine.backward(engine(input_ids=prompt, labels=prompt).loss)
        engine.step()
        with torch.no_grad():
            during = engine(input_ids=prompt).logits
        monkeypatch.setattr(OffloadedParams, "materialize", device_full)
    monkeypatch.setattr(OffloadedParams, "materialize", materialize)
    assert all(p.device.type == "cpu" and type(p) is torch.nn.Parameter for p in model.parameters())
    with torch.no_grad():
        after = model(input_ids=prompt).logits
    assert torch.equal(after, during)


@pytest.mark.parametrize("params", ["device", "nvme"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_state_moves_in_chunks_with_the_same_result(params, dtype, tmp_path, monkeypatch):
    """NVMe state larger than a chunk goes through staging piece by piece; the result does not change."""
    from offload.optim import state_store

    data = batches("llama", 4, micro=1)
    runs = []
    for chunk in (state_store.CHUNK_ELEMENTS, 2048):
        monkeypatch.setattr(state_store, "CHUNK_ELEMENTS", chunk)
        config = offload.Config(device="cpu", dtype=dtype, params=params, optimizer="nvme",
                                nvme_dir=tmp_path / str(chunk))
        losses, state, stats = train_with_engine("llama", llama(), data, config, lr=LR, max_grad_norm=1.0)
        runs.append((losses, state, stats))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert runs[0][2].nvme_bytes_read == runs[1][2].nvme_bytes_read
    assert runs[1][2].host_bytes_peak < runs[0][2].host_bytes_peak  # smaller staging buffers


@pytest.mark.parametrize("params", ["device", "nvme"])
def test_gradients_on_nvme_when_the_host_budget_is_below_them(params, tmp_path, monkeypatch):
    """A host budget smaller than the gradient accumulators: they live on NVMe too, and training is the same."""
    from offload.optim import state_store

    monkeypatch.setattr(state_store, "CHUNK_ELEMENTS", 1024)  # small staging, so that the tiny budget holds it
    data = batches("llama", 6, micro=2)
    ref_losses, ref_state = reference_run("llama", llama(), data, torch.float32, lr=LR, weight_decay=WEIGHT_DECAY,
                                          max_grad_norm=1.0, decay_groups=False)
    model = llama()
    numel = sum(p.numel() for p in model.parameters())
    limit = 4 * numel - 4096  # less than the fp32 gradients alone
    config = offload.Config(device="cpu", dtype="fp32", params=params, optimizer="nvme", nvme_dir=tmp_path,
                            host_memory_limit=limit, prefetch_layers=0)
    losses, state, stats = train_with_engine("llama", model, data, config, lr=LR, weight_decay=WEIGHT_DECAY,
                                             max_grad_norm=1.0)
    assert_matches(losses, state, ref_losses, ref_state, rtol=1e-5)
    assert stats.host_bytes_peak <= limit and stats.optimizer_groups_on_host == 0 and stats.gradients_on_nvme


def test_step_after_a_forward_that_raised(tmp_path):
    """A bad batch whose forward raises part-way leaves groups on the device; the next step still works."""
    data = batches("llama", 2, 1)
    results = []
    for params in ("device", "nvme"):
        config = offload.Config(device="cpu", dtype="fp32", params=params, nvme_dir=tmp_path / params)
        with offload.Engine(llama(), config) as engine:
            engine.backward(loss_of("llama", engine, data[0][0]))
            with pytest.raises(IndexError):
                engine(input_ids=torch.full((1, 4), 10_000))  # out of the vocabulary: the embedding raises
            engine.step()
            engine.backward(loss_of("llama", engine, data[1][0]))
            engine.step()
            results.append(engine.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_gradients_on_nvme_move_once_per_micro_batch(tmp_path, monkeypatch):
    from offload.optim import state_store

    monkeypatch.setattr(state_store, "CHUNK_ELEMENTS", 1024)
    model = llama()
    numel = sum(p.numel() for p in model.parameters())
    config = offload.Config(device="cpu", dtype="fp32", optimizer="nvme", nvme_dir=tmp_path,
                            host_memory_limit=4 * numel - 4096)
    with offload.Engine(model, config) as engine:
        swap = engine._parts.grad_swap
        padded = sum(g.numel for g in engine.groups) * 4
        for i, batch in enumerate(batches("llama", 1, micro=3)[0]):
            engine.backward(loss_of("llama", engine, batch))
            # each micro-batch writes every accumulator once and (after the first) reads it back once
            assert swap.bytes_written == (i + 1) * padded and swap.bytes_read == i * padded
        engine.step()


def test_a_failed_weight_write_back_stops_the_engine(tmp_path):
    from offload import _C

    config = offload.Config(device="cpu", dtype="bf16", params="nvme", optimizer="cpu", nvme_dir=tmp_path)
    data = batches("llama", 2, 1)
    with offload.Engine(llama(), config) as engine:
        engine.backward(loss_of("llama", engine, data[0][0]))
        _C.inject_io_fault("eio", 1)  # the first group's write-back; the step waits for it to reuse its slot
        try:
            engine.step()
            with pytest.raises((OSError, RuntimeError)):
                engine.state_dict()  # joins the step, which failed
        finally:
            _C.inject_io_fault("none")
        with pytest.raises(RuntimeError, match="failed"):
            engine.backward(loss_of("llama", engine, data[1][0]))


def test_a_failed_read_of_weights_leaves_the_engine_usable(tmp_path):
    from offload import _C

    config = offload.Config(device="cpu", dtype="fp32", params="nvme", nvme_dir=tmp_path)
    reference = offload.Config(device="cpu", dtype="fp32")
    data = batches("llama", 2, 1)
    states = []
    for cfg, inject in ((reference, False), (config, True)):
        with offload.Engine(llama(), cfg) as engine:
            if inject:
                _C.inject_io_fault("eio", 1)  # the first fetch of the first forward
                try:
                    with pytest.raises(OSError):
                        engine(input_ids=data[0][0]["input_ids"])
                finally:
                    _C.inject_io_fault("none")
            for step in data:
                engine.backward(loss_of("llama", engine, step[0]))
                engine.step()
            states.append(engine.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("fused", [False, True])
def test_fp32_weights_are_read_from_the_optimizer_state(fused, tmp_path, monkeypatch):
    """fp32 with params and optimizer on NVMe: a group's weights are the master part of its optimizer state
    (Note [weights in the state file]), in its state file, or in RAM for the groups the host budget keeps there.
    No weights file and no write-back: a step writes the state only. With ``backward_step`` the next forward's
    fetches wait for the state writes of the update that overlapped backward. Training matches torch."""
    import time

    from offload.optim.group_stepper import GroupStepper
    from offload.optim.state_store import StatePlacement

    transfer = GroupStepper._transfer

    def late_writes(self, op, *args):  # a fetch that did not wait for the state writes would read old weights
        if op == "write":
            time.sleep(0.02)
        return transfer(self, op, *args)

    monkeypatch.setattr(GroupStepper, "_transfer", late_writes)
    data = batches("llama", 6, micro=1)
    ref_losses, ref_state = reference_run("llama", tiny_llama(layers=4), data, torch.float32, lr=LR,
                                          weight_decay=WEIGHT_DECAY, max_grad_norm=None, decay_groups=False)
    model = tiny_llama(layers=4)
    numel = sum(p.numel() for p in model.parameters())
    config = offload.Config(device="cpu", dtype="fp32", params="nvme", optimizer="nvme", nvme_dir=tmp_path,
                            host_memory_limit=numel * 17, prefetch_layers=1)  # 2 of the 6 groups' state in RAM
    losses = []
    with offload.Engine(model, config, lr=LR, weight_decay=WEIGHT_DECAY) as engine:
        weights = engine.weights
        assert weights.weights_in_state and not weights._writeback_slots
        on_nvme = [s.placement is StatePlacement.NVME for s in engine.store.states]
        assert [weights.home_is_state_file(g) for g in range(len(on_nvme))] == on_nvme
        for step in data:
            loss = loss_of("llama", engine, step[0])
            if fused:
                assert not engine.backward_step(loss).skipped
            else:
                engine.backward(loss)
                engine.step()
            losses.append(loss.item())
        engine.synchronize()
        stats = engine.stats()
        state = engine.state_dict()
        state_bytes = sum(12 * s.group.numel for s in engine.store.states if s.placement is StatePlacement.NVME)
    assert stats.optimizer_groups_on_host > 0 and stats.optimizer_groups_on_nvme > 0
    assert stats.nvme_bytes_written == len(data) * state_bytes
    assert_matches(losses, state, ref_losses, ref_state, rtol=1e-5)


@pytest.mark.parametrize("params", ["cpu", "nvme"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("overlap", ["backward_step", "step"])
def test_the_next_forwards_first_groups_stay_through_their_update(params, dtype, overlap, tmp_path, monkeypatch):
    """Note [kept through the update]: the groups the next forward uses first stay on the (CPU) device from
    backward through their update, which refreshes their device buffers; the forward then reads nothing of
    them from NVMe and waits for no write. Slow writes make a forward that skipped the refresh, or read its
    home too early, see stale weights. Training matches the same engine with nothing kept."""
    import time

    from offload.optim.group_stepper import GroupStepper
    from offload.schedule.offloaded_params import OffloadedParams

    transfer = GroupStepper._transfer

    def late_writes(self, op, *args):
        if op == "write":
            time.sleep(0.01)
        return transfer(self, op, *args)

    monkeypatch.setattr(GroupStepper, "_transfer", late_writes)
    data = batches("llama", 5, micro=1)

    def run(keep: bool):
        with monkeypatch.context() as patch:
            if not keep:  # the same engine, with no candidates: every group goes home after backward
                patch.setattr(OffloadedParams, "set_keep_candidates", lambda self, groups, reserve: None)
            return train()

    def train():
        config = offload.Config(device="cpu", dtype=dtype, params=params, optimizer="nvme", nvme_dir=tmp_path,
                                prefetch_layers=1)
        losses, kept, fetched = [], [], []
        with offload.Engine(tiny_llama(layers=4), config, lr=LR, weight_decay=WEIGHT_DECAY) as engine:
            weights = engine.weights
            for step in data:
                before = weights.nvme_bytes_read
                loss = loss_of("llama", engine, step[0])
                fetched.append(weights.nvme_bytes_read - before)
                losses.append(loss.item())
                if overlap == "backward_step":
                    engine.backward_step(loss)
                else:
                    engine.backward(loss)
                    engine.step()
                kept.append(weights.kept())
            first = engine._parts.scheduler.forward_order()[:2]
            state = engine.state_dict()
        return losses, state, kept, fetched, first

    losses, state, kept, fetched, first = run(keep=True)
    ref_losses, ref_state, ref_kept, ref_fetched, _ = run(keep=False)
    assert all(k == set(first) for k in kept) and not any(ref_kept)
    assert losses == ref_losses and all(torch.equal(state[k], ref_state[k]) for k in state)
    if params == "nvme":  # the kept groups' bytes are not read again by the forwards after the first
        assert all(f < r for f, r in zip(fetched[1:], ref_fetched[1:]))


@pytest.mark.parametrize("limit", [None, "tight"])
def test_fp32_updates_during_backward_run_on_the_fetched_weights(limit, tmp_path, monkeypatch):
    """Note [lent to the update]: fp32, params and optimizer on NVMe, ``backward_step``: a group's device
    buffer, still holding the master it was read from, is its update's master; the update reads only the
    moments from NVMe. Slow reads and writes make a forward that used a lent buffer before its Adam pass, a
    release before the writes that read it, or a master written from anywhere else show up as different
    losses or weights. The result is bit-equal to the same engine lending nothing, and matches torch."""
    import time

    from offload.optim.group_stepper import GroupStepper
    from offload.schedule.offloaded_params import OffloadedParams

    transfer = GroupStepper._transfer

    def slow(self, op, *args, **kw):
        time.sleep(0.01)
        return transfer(self, op, *args, **kw)

    monkeypatch.setattr(GroupStepper, "_transfer", slow)
    data = batches("llama", 5, micro=1)
    ref_losses, ref_state = reference_run("llama", tiny_llama(layers=4), data, torch.float32, lr=LR,
                                          weight_decay=WEIGHT_DECAY, max_grad_norm=None, decay_groups=False)
    cap = None if limit is None else 3 * max_group_bytes(tiny_llama(layers=4), 4)  # a use, a prefetch, one more

    def run(lend: bool):
        with monkeypatch.context() as patch:
            if not lend:
                patch.setattr(OffloadedParams, "lend_to_updates", lambda self, on: None)
            config = offload.Config(device="cpu", dtype="fp32", params="nvme", optimizer="nvme",
                                    nvme_dir=tmp_path, prefetch_layers=1, device_memory_limit=cap)
            losses, lent = [], 0
            with offload.Engine(tiny_llama(layers=4), config, lr=LR, weight_decay=WEIGHT_DECAY) as engine:
                lend_master = engine.weights.lend_master

                def counted(g):
                    nonlocal lent
                    master = lend_master(g)
                    lent += master is not None
                    return master

                patch.setattr(engine.weights, "lend_master", counted)
                for step in data:
                    loss = loss_of("llama", engine, step[0])
                    losses.append(loss.item())
                    engine.backward_step(loss)
                engine.synchronize()
                stats, state = engine.stats(), engine.state_dict()
                smallest = min(s.group.numel for s in engine.store.states)
            return losses, state, stats, lent, smallest

    losses, state, stats, lent, smallest = run(lend=True)
    base_losses, base_state, base_stats, base_lent, _ = run(lend=False)
    assert base_lent == 0 and lent >= 2 * len(data)  # at least the kept groups each step
    assert losses == base_losses and all(torch.equal(state[k], base_state[k]) for k in state)
    assert_matches(losses, state, ref_losses, ref_state, rtol=1e-5)
    # every lent update reads its master from nowhere: at least 4 bytes per element of each lent group less
    assert base_stats.nvme_bytes_read - stats.nvme_bytes_read >= lent * 4 * smallest
    assert stats.nvme_bytes_written == base_stats.nvme_bytes_written
    if cap is not None:
        assert 0 < stats.device_param_bytes_peak <= cap


def test_a_lent_group_is_used_only_after_its_adam_pass_and_released_only_after_its_writes(tmp_path):
    """Note [lent to the update], the two waits, driven directly: a use of a lent group waits for the update's
    Adam pass (``after_update`` of its last chunk), and its release for the state writes (``mark_updated``).
    In training the update order makes the first wait rare (the forward needs the groups updated last)."""
    import threading
    import time

    config = offload.Config(device="cpu", dtype="fp32", params="nvme", optimizer="nvme", nvme_dir=tmp_path,
                            prefetch_layers=1)
    with offload.Engine(tiny_llama(layers=4), config, lr=LR) as engine:
        weights = engine.weights
        g = len(weights.groups) // 2
        assert weights.can_lend(g)
        weights.release_all()
        weights.ensure_resident(g)
        weights.lend_to_updates(True)
        weights.release_or_keep(g)  # backward is done with it; its update will take it
        master = weights.lend_master(g)
        weights.lend_to_updates(False)
        assert master is not None and master.data_ptr() == weights.weight_device[g].data_ptr()

        def wait_in_thread(call):
            thread = threading.Thread(target=call)
            thread.start()
            time.sleep(0.2)
            return thread

        use = wait_in_thread(lambda: weights.ensure_resident(g))
        assert use.is_alive()  # the Adam pass has not ended
        weights.after_update(g, True, [])(master, 0, True)
        use.join(5)
        assert not use.is_alive()
        release = wait_in_thread(lambda: weights.release(g))
        assert release.is_alive()  # the writes have not completed
        weights.mark_updated(g)
        release.join(5)
        assert not release.is_alive() and weights.resident_groups() == []


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_forwards_last_groups_stay_for_the_backward(dtype, tmp_path, monkeypatch):
    """Note [kept into backward]: in a training forward that follows the trace, the groups of its last
    ``prefetch + 1`` uses stay on the device for the backward that begins with them, so a step reads them once
    instead of twice; a forward without gradients keeps nothing. Training is bit-equal to the same engine
    without it."""
    from offload.schedule.fetch_scheduler import FetchScheduler

    data = batches("llama", 4, micro=1)

    def run(keep: bool):
        with monkeypatch.context() as patch:
            if not keep:
                patch.setattr(FetchScheduler, "_keep_for_backward", lambda self, g: False)
            config = offload.Config(device="cpu", dtype=dtype, params="nvme", optimizer="nvme",
                                    nvme_dir=tmp_path, prefetch_layers=1)
            losses, backward_reads = [], []
            with offload.Engine(tiny_llama(layers=4), config, lr=LR, weight_decay=WEIGHT_DECAY) as engine:
                weights = engine.weights
                for step in data:
                    # the last update done first: a lent group whose state writes are still running stays
                    # resident until they complete (Note [lent to the update]), however slow the disk
                    engine.synchronize()
                    loss = loss_of("llama", engine, step[0])
                    resident_after_forward = set(weights.resident_groups())
                    before = weights.nvme_bytes_read
                    engine.backward_step(loss)
                    backward_reads.append(weights.nvme_bytes_read - before)
                    losses.append(loss.item())
                last = {g for use in engine._parts.scheduler.trace[-2:] for g in use}
                with torch.no_grad():
                    loss_of("llama", engine, data[0][0])
                # a group lent to the last update whose state writes were still running when the forward ended
                # goes home once they complete (Note [lent to the update]), not at its use: wait for them
                engine.synchronize()
                after_no_grad = set(weights.resident_groups())
                state = engine.state_dict()
            return losses, state, backward_reads, resident_after_forward, last, after_no_grad

    losses, state, reads, resident, last, after_no_grad = run(keep=True)
    base_losses, base_state, base_reads, base_resident, _, _ = run(keep=False)
    assert last <= resident and last - base_resident  # (a group whose use spans the forward is resident anyway)
    assert not (last - base_resident) & after_no_grad
    assert losses == base_losses and all(torch.equal(state[k], base_state[k]) for k in state)
    # the first backward follows the tracing forward, which keeps nothing; every later one reads less
    assert reads[0] == base_reads[0] and all(r < b for r, b in zip(reads[1:], base_reads[1:]))


@pytest.mark.parametrize("tied", [False, True])
def test_lending_mixed_with_plain_steps_changes_nothing(tied, tmp_path, monkeypatch):
    """A group lent in one ``backward_step`` and used since is no longer lent: when a plain ``backward();
    step()`` follows (as ``backward_step`` itself does once micro-batches accumulate), its update reads the
    master from the file and refreshes the kept device buffer. Bit-equal to the same engine lending nothing."""
    from offload.schedule.offloaded_params import OffloadedParams

    data = batches("llama", 6, micro=1)

    def run(lend: bool):
        with monkeypatch.context() as patch:
            if not lend:
                patch.setattr(OffloadedParams, "lend_to_updates", lambda self, on: None)
            config = offload.Config(device="cpu", dtype="fp32", params="nvme", optimizer="nvme",
                                    nvme_dir=tmp_path, prefetch_layers=1)
            losses = []
            with offload.Engine(tiny_llama(layers=4, tied=tied), config, lr=LR) as engine:
                for i, step in enumerate(data):
                    loss = loss_of("llama", engine, step[0])
                    losses.append(loss.item())
                    if i % 2 == 0:
                        engine.backward_step(loss)
                    else:
                        engine.backward(loss)
                        engine.step()
                state = engine.state_dict()
            return losses, state

    losses, state = run(lend=True)
    base_losses, base_state = run(lend=False)
    assert losses == base_losses and all(torch.equal(state[k], base_state[k]) for k in state)


def test_a_failed_state_write_leaves_no_transfer_behind(tmp_path, monkeypatch):
    """A state write that fails while a run waits for its last writes: every other write of the run (whose
    part 0 may read a lent master, freed once the step has failed) is waited for before the error goes on."""
    from offload.optim import state_store
    from offload.optim.group_stepper import GroupStepper
    from offload.storage.swap_store import SwapStore

    monkeypatch.setattr(state_store, "CHUNK_ELEMENTS", 2048)  # several chunks per group
    issued, waited = set(), set()
    write, wait = SwapStore.write, SwapStore.wait

    def tracked_write(self, swap, offset, buffer):
        handle = write(self, swap, offset, buffer)
        issued.add(handle.id)
        return handle

    def tracked_wait(self, handle):
        waited.add(handle.id)
        return wait(self, handle)

    monkeypatch.setattr(SwapStore, "write", tracked_write)
    monkeypatch.setattr(SwapStore, "wait", tracked_wait)
    config = offload.Config(device="cpu", dtype="fp32", optimizer="nvme", nvme_dir=tmp_path)  # master in memory
    with offload.Engine(tiny_llama(layers=2), config, lr=1e-3) as engine:
        engine.backward_step(loss_of("llama", engine, batches("llama", 1, micro=1)[0][0]))
        step_wait, failed = GroupStepper._wait, []

        def failing_wait(self, handle, counters):
            step_wait(self, handle, counters)
            if not failed and handle.op == "write":  # the first write waited for, after the loop's passes
                failed.append(handle.id)
                raise OSError(5, "injected: a state write failed")

        monkeypatch.setattr(GroupStepper, "_wait", failing_wait)
        issued.clear()
        with pytest.raises(OSError, match="injected"):
            engine.backward_step(loss_of("llama", engine, batches("llama", 1, micro=1)[0][0]))
        assert failed and issued <= waited  # nothing the failed step wrote is left in flight
