"""Engine behaviour beyond parity: fp16 overflow, frozen and tied parameters, groups, errors, lifetime."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from torch import nn

import offload
from engine_reference import batches, loss_of, mlp, tiny_llama
from offload.optim.state_store import split_state

CPU32 = offload.Config(device="cpu", dtype="fp32")


def train_step(engine, kind, step_batches, scale_loss=1.0):
    for batch in step_batches:
        engine.backward(loss_of(kind, engine, batch) * scale_loss)
    return engine.step()


def moments(engine):
    return [split_state(s.state_host.view(torch.float32), s.group.numel)[1:] for s in engine.store.states]


@pytest.mark.parametrize("optimizer", ["cpu", "nvme"])
def test_fp16_overflow_skips_exactly_that_step(optimizer, tmp_path):
    data = batches("mlp", 5, micro=1)
    config = offload.Config(device="cpu", dtype="fp16", optimizer=optimizer, nvme_dir=tmp_path)
    with offload.Engine(mlp(), config, lr=1e-3) as engine:
        for step in data[:2]:
            assert not train_step(engine, "mlp", step).skipped
        before = engine.state_dict()
        before_moments = [(m.clone(), v.clone()) for m, v in moments(engine)] if optimizer == "cpu" else None
        weights_device = [w.clone() for w in engine.weights.weight_device]
        scale = engine.training_state().scaler.scale
        info = train_step(engine, "mlp", data[2], scale_loss=1e30)  # overflows fp16 gradients
        assert info.skipped and info.step == 2 and info.loss_scale == scale / 2
        assert info.nvme_bytes_read == info.nvme_bytes_written == 0
        after = engine.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(torch.equal(a, b) for a, b in zip(weights_device, engine.weights.weight_device))
        if before_moments is not None:
            for (m0, v0), (m1, v1) in zip(before_moments, moments(engine)):
                assert torch.equal(m0, m1) and torch.equal(v0, v1)
        info = train_step(engine, "mlp", data[3])
        assert not info.skipped and info.step == 3 and info.loss_scale == scale / 2


def test_dynamic_loss_scale_grows_after_good_steps():
    scaler = offload.optim.loss_scale.LossScaler("dynamic", enabled=True, growth_interval=3)
    for _ in range(3):
        scaler.update(False)
    assert scaler.scale == 2.0**17
    scaler.update(True)
    assert scaler.scale == 2.0**16
    assert offload.optim.loss_scale.LossScaler("dynamic", enabled=False).scale == 1.0


def test_skip_nonfinite_in_bf16():
    with offload.Engine(mlp(), offload.Config(device="cpu", dtype="bf16"), skip_nonfinite=True) as engine:
        before = engine.state_dict()
        info = train_step(engine, "mlp", batches("mlp", 1, 1)[0], scale_loss=float("nan"))
        assert info.skipped and info.step == 0
        assert all(torch.equal(before[k], v) for k, v in engine.state_dict().items())


def test_frozen_parameters_get_no_state_and_stay_unchanged():
    model = tiny_llama()
    for name, param in model.named_parameters():
        if "mlp" in name:
            param.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with offload.Engine(model, CPU32) as engine:
        assert sum(s.numel for g in engine.groups for s in g.slots) == trainable
        for step in batches("llama", 3, 1):
            train_step(engine, "llama", step)
        state = engine.state_dict()
        for name, value in frozen.items():
            assert torch.equal(state[name], value), name
            assert dict(model.named_parameters())[name].grad is None


def test_tied_embeddings_are_one_parameter_with_both_keys():
    model = tiny_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with offload.Engine(model, CPU32) as engine:
        names = [s.name for g in engine.groups for s in g.slots]
        assert names.count("model.embed_tokens.weight") == 1 and "lm_head.weight" not in names
        train_step(engine, "llama", batches("llama", 1, 1)[0])
        assert model.lm_head.weight is model.model.embed_tokens.weight
        state = engine.state_dict()
        assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])


def test_groups_follow_blocks():
    with offload.Engine(tiny_llama(layers=3), CPU32) as engine:
        assert [g.name for g in engine.groups] == ["model.embed_tokens", "model.layers.0", "model.layers.1",
                                                   "model.layers.2", "model.norm"]


def test_a_parameter_without_gradient_is_left_alone_like_torch():
    """torch's AdamW skips a parameter whose grad is None: no decay, no moment update, no step count."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Linear(8, 8)
            self.head_a = nn.Linear(8, 2)
            self.head_b = nn.Linear(8, 2)

        def forward(self, x, use_b=False):
            return (self.head_b if use_b else self.head_a)(self.body(x))

    ref, model = TwoHeads(), TwoHeads()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    with offload.Engine(model, CPU32, lr=1e-2, weight_decay=0.1) as engine:
        for use_b in (False, False, True, False, True):
            x = torch.randn(4, 8, generator=gen)
            engine.backward(engine(x, use_b=use_b).square().mean())
            engine.step()
            ref(x, use_b=use_b).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(engine.state_dict()[key], value, rtol=1e-6, atol=1e-6)


def test_lr_setter_takes_effect_on_the_next_step():
    data = batches("mlp", 4, 1)
    ref = mlp()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    with offload.Engine(mlp(), CPU32, lr=1e-3) as engine:
        for i, step in enumerate(data):
            lr = 1e-3 * (i + 1)
            engine.lr = lr
            for group in opt.param_groups:
                group["lr"] = lr
            train_step(engine, "mlp", step)
            loss_of("mlp", ref, step[0]).backward()
            opt.step()
            opt.zero_grad()
        assert engine.lr == pytest.approx(4e-3)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(engine.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_state_dict_is_owned_by_the_caller_and_survives_close(tmp_path):
    engine = offload.Engine(mlp(), offload.Config(device="cpu", dtype="bf16", optimizer="nvme", nvme_dir=tmp_path))
    train_step(engine, "mlp", batches("mlp", 1, 1)[0])
    state = engine.state_dict()
    again = engine.state_dict()
    assert len({t.untyped_storage().data_ptr() for t in state.values()}) == len(state)
    engine.close()
    engine.close()  # idempotent
    assert not any(p.name.startswith("offload-swap-") for p in tmp_path.iterdir())
    assert all(torch.equal(state[k], again[k]) and state[k].dtype == torch.float32 for k in state)
    with pytest.raises(RuntimeError, match="closed"):
        engine.step()


def test_step_without_backward_is_an_error():
    with offload.Engine(mlp(), CPU32) as engine:
        with pytest.raises(RuntimeError, match="backward"):
            engine.step()


def test_inputs_are_cast_to_the_compute_dtype():
    with offload.Engine(mlp(), offload.Config(device="cpu", dtype="bf16")) as engine:
        out = engine(torch.randn(2, 24))
        assert out.dtype == torch.bfloat16
        assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())


def test_stats_report_placement_and_bytes(tmp_path):
    model = mlp()
    numel = sum(p.numel() for p in model.parameters())
    config = offload.Config(device="cpu", dtype="bf16", optimizer="nvme", nvme_dir=tmp_path)
    with offload.Engine(model, config) as engine:
        info = train_step(engine, "mlp", batches("mlp", 1, 1)[0])
        stats = engine.stats()
        padded = sum(g.numel for g in engine.groups)
        assert numel <= padded
        assert info.nvme_bytes_read == info.nvme_bytes_written == 12 * padded
        assert stats.device_param_bytes == 2 * padded
        assert info.grad_bytes_to_host == 2 * numel
        assert stats.host_bytes_in_use >= 4 * padded  # the fp32 gradient accumulators


def test_host_budget_too_small_fails_at_construction():
    with pytest.raises(offload.MemoryBudgetError, match="host_memory_limit"):
        offload.Engine(mlp(), offload.Config(device="cpu", host_memory_limit="16KiB"))


def test_nvme_dir_that_cannot_be_created_fails_at_construction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = offload.Config(device="cpu", optimizer="nvme", nvme_dir=blocker / "swap")
    with pytest.raises(OSError) as info:
        offload.Engine(mlp(), config)
    assert info.value.errno == errno.ENOTDIR and str(blocker) in str(info.value)


def test_nvme_dir_too_small_fails_at_construction(tiny_tmpfs):
    config = offload.Config(device="cpu", optimizer="nvme", nvme_dir=tiny_tmpfs)
    with pytest.raises(OSError) as info:
        offload.Engine(nn.Linear(1024, 256), config)
    assert info.value.errno == errno.ENOSPC and "free" in str(info.value)
    assert os.listdir(tiny_tmpfs) == []


def test_a_disk_too_small_for_the_run_names_the_runs_whole_need(tiny_tmpfs):
    # every file would fit on its own (six groups of 64x64 weights: 48 KiB of state each), all of them do not
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(6)])
    free = os.statvfs(tiny_tmpfs).f_bavail * os.statvfs(tiny_tmpfs).f_frsize
    (tiny_tmpfs / "filler").write_bytes(b"\0" * (free - 200 * 1024))
    config = offload.Config(device="cpu", dtype="bf16", params="nvme", optimizer="nvme", nvme_dir=tiny_tmpfs)
    with pytest.raises(OSError) as info:
        offload.Engine(model, config)
    assert info.value.errno == errno.ENOSPC
    assert "the run needs 336.00 KiB of swap files" in str(info.value)  # 6 x (48 KiB state + 8 KiB weights)
    assert "(optimizer state 288.00 KiB, weights 48.00 KiB)" in str(info.value)
    assert sorted(os.listdir(tiny_tmpfs)) == ["filler"]  # nothing was created


@pytest.mark.parametrize("groups, match", [
    ([{"params": [], "weight_decya": 0.0}], "did you mean 'weight_decay'"),
    ([{"weight_decay": 0.0}], "'params' list"),
    ([{"params": [torch.zeros(3)]}], "not a trainable parameter"),
    ([{"params": ["0.weight"]}, {"params": ["0.weight"]}], "more than one group"),
    ([{"params": ["0.bias"], "lr": -1.0}], "learning rate"),
    ([{"params": ["0.bias"], "betas": (0.9,)}], "betas"),
])
def test_bad_param_groups(groups, match):
    with pytest.raises(offload.ConfigError, match=match):
        offload.Engine(mlp(), CPU32, param_groups=groups)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"loss_scale": "static"}, "loss_scale"),
    ({"lr": float("nan")}, "learning rate"),
])
def test_bad_engine_arguments(kwargs, match):
    with pytest.raises(offload.ConfigError, match=match):
        offload.Engine(mlp(), CPU32, **kwargs)


def test_models_without_trainable_parameters_are_refused():
    frozen = mlp().requires_grad_(False)
    with pytest.raises(offload.ConfigError, match="no trainable parameters"):
        offload.Engine(frozen, CPU32)


def test_param_groups_by_name_match_torch():
    data = batches("mlp", 5, 1)
    ref = mlp()
    opt = torch.optim.AdamW([{"params": [ref[0].weight], "lr": 1e-2, "weight_decay": 0.5},
                             {"params": [p for p in ref.parameters() if p is not ref[0].weight]}],
                            lr=1e-3, weight_decay=0.0)
    with offload.Engine(mlp(), CPU32, lr=1e-3,
                        param_groups=[{"params": ["0.weight"], "lr": 1e-2, "weight_decay": 0.5}]) as engine:
        for step in data:
            train_step(engine, "mlp", step)
            loss_of("mlp", ref, step[0]).backward()
            opt.step()
            opt.zero_grad()
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(engine.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_failed_construction_leaves_the_model_as_it_was():
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    before = [(p, p.data_ptr(), p.data.clone()) for p in model.parameters()]
    numel = sum(p.numel() for p in model.parameters())
    # room for the gradient accumulators and about two groups' state: fails while placing the third
    config = offload.Config(device="cpu", dtype="bf16", host_memory_limit=4 * numel + 2 * 12 * 64 * 65 + 65536)
    with pytest.raises(offload.MemoryBudgetError, match="optimizer state"):
        offload.Engine(model, config)
    for param, address, values in before:
        assert param.data_ptr() == address and param.dtype == torch.float32 and torch.equal(param.data, values)
        assert not param._post_accumulate_grad_hooks
    with offload.Engine(model, CPU32) as engine:  # and the model can be wrapped afterwards
        engine.backward(engine(torch.randn(2, 64)).square().mean())
        assert not engine.step().skipped


def test_a_failed_step_stops_the_engine(tmp_path):
    from offload import _C

    config = offload.Config(device="cpu", dtype="fp32", optimizer="nvme", nvme_dir=tmp_path)
    with offload.Engine(mlp(), config) as engine:
        data = batches("mlp", 2, 1)
        train_step(engine, "mlp", data[0])
        for batch in data[1]:
            engine.backward(loss_of("mlp", engine, batch))
        _C.inject_io_fault("eio", 3)
        try:
            with pytest.raises(OSError):
                engine.step()
        finally:
            _C.inject_io_fault("none")
        for call in (engine.step, lambda: engine(torch.randn(2, 24)), engine.state_dict):
            with pytest.raises(RuntimeError, match="failed part-way"):
                call()
    assert not any(p.name.startswith("offload-swap-") for p in tmp_path.iterdir())


def test_one_open_engine_per_model_and_dropped_engines_let_go():
    import gc

    model = mlp()
    engine = offload.Engine(model, CPU32)
    with pytest.raises(offload.ConfigError, match="already wrapped"):
        offload.Engine(model, CPU32)
    del engine
    gc.collect()
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    with offload.Engine(model, CPU32) as engine:
        assert not train_step(engine, "mlp", batches("mlp", 1, 1)[0]).skipped


def test_a_wrapper_around_a_backbone_is_looked_through():
    backbone = nn.Sequential(nn.Embedding(16, 8), nn.ModuleList([nn.Linear(8, 8) for _ in range(3)]))
    model = nn.Sequential(backbone, nn.Linear(8, 2))
    from offload.layout import partition_model

    names = [g.name for g in partition_model(model).groups]
    assert names == ["0.0", "0.1.0", "0.1.1", "0.1.2", "1"]


def test_a_gradient_left_from_before_is_not_added_into_the_first_step():
    ref, model = mlp(), mlp()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    step = batches("mlp", 1, 1)[0]
    with offload.Engine(model, CPU32, lr=1e-3) as engine:
        train_step(engine, "mlp", step)
        loss_of("mlp", ref, step[0]).backward()
        opt.step()
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(engine.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_device_memory_limit_is_enforced():
    with pytest.raises(offload.MemoryBudgetError, match="device_memory_limit"):
        offload.Engine(mlp(), offload.Config(device="cpu", device_memory_limit=1024))


def test_empty_and_frozen_parameters_in_groups_are_fine():
    model = mlp()
    model.register_parameter("empty", nn.Parameter(torch.zeros(0)))
    model[0].bias.requires_grad_(False)
    with offload.Engine(model, CPU32, param_groups=[{"params": [model[0].bias], "lr": 0.1}]) as engine:
        assert not train_step(engine, "mlp", batches("mlp", 1, 1)[0]).skipped
