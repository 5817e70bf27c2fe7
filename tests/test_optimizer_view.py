"""engine.optimizer: a torch.optim.Optimizer view whose lr schedulers drive the engine exactly as they drive
torch.optim.AdamW, and whose state_dict moves to and from torch.optim.AdamW."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import offload
from engine_reference import batches, loss_of, mlp, no_decay_groups, tiny_llama

STEPS = 8
LR = 3e-3


def lambda_warmup(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3) * (0.9 ** s))


def one_cycle(optimizer):  # also cycles beta1 (betas in the groups)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=STEPS)


def warmup_then_cosine(optimizer):
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.2, total_iters=3),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS - 3)], milestones=[3])


def torch_groups(model):
    """The engine's groups for param_groups=no_decay_groups(model), as torch.optim.AdamW takes them."""
    flat = no_decay_groups(model)[0]["params"]
    listed = {id(p) for p in flat}
    return [{"params": flat, "weight_decay": 0.0}, {"params": [p for p in model.parameters() if id(p) not in listed]}]


SCHEDULERS = {"lambda": lambda_warmup, "one_cycle": one_cycle, "sequential": warmup_then_cosine}


def torch_run(kind, model, data, make_scheduler):
    """The reference: torch.optim.AdamW with the scheduler, fp32, one device."""
    optimizer = torch.optim.AdamW(torch_groups(model), lr=LR, weight_decay=0.05)
    scheduler = make_scheduler(optimizer)
    losses = []
    for step in data:
        total = 0.0
        for batch in step:
            loss = loss_of(kind, model, batch) / len(step)
            loss.backward()
            total += loss.item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def engine_run(kind, model, data, config, make_scheduler, backward_step=False):
    with offload.Engine(model, config, lr=LR, weight_decay=0.05, param_groups=no_decay_groups(model)) as engine:
        optimizer = engine.optimizer
        scheduler = make_scheduler(optimizer)
        losses = []
        for step in data:
            total = 0.0
            for i, batch in enumerate(step):
                loss = loss_of(kind, engine, batch) / len(step)
                total += loss.item()
                if backward_step and i == len(step) - 1:
                    engine.backward_step(loss)  # the updates run during this backward
                else:
                    engine.backward(loss)
            if not backward_step:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(total)
        return losses, engine.state_dict(), engine


def assert_same_run(losses, state, ref_losses, ref_state):
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_a_scheduler_on_engine_optimizer_trains_like_torch_adamw_on_nvme(scheduler, tmp_path):
    """The acceptance: parameters and optimizer state on NVMe (each update overlaps the next forward), fp32."""
    pytest.importorskip("transformers", reason="the Llama model needs transformers")
    data = batches("llama", STEPS, micro=2)
    ref_losses, ref_state = torch_run("llama", tiny_llama(), data, SCHEDULERS[scheduler])
    config = offload.Config(device="cpu", dtype="fp32", params="nvme", optimizer="nvme", nvme_dir=tmp_path)
    losses, state, _ = engine_run("llama", tiny_llama(), data, config, SCHEDULERS[scheduler])
    assert_same_run(losses, state, ref_losses, ref_state)


@pytest.mark.parametrize("params", ["device", "cpu"])
def test_the_lr_in_force_at_backward_step_is_the_steps(params, tmp_path):
    """backward_step starts updates during backward: they use the values the scheduler set before it."""
    data = batches("mlp", STEPS, micro=2)
    ref_losses, ref_state = torch_run("mlp", mlp(), data, one_cycle)
    config = offload.Config(device="cpu", dtype="fp32", params=params)
    losses, state, engine = engine_run("mlp", mlp(), data, config, one_cycle, backward_step=True)
    assert engine.stats().steps_during_backward == STEPS
    assert_same_run(losses, state, ref_losses, ref_state)


def test_param_groups_are_the_engines_and_a_scheduler_sees_torch_defaults():
    model = mlp()
    with offload.Engine(model, offload.Config(device="cpu", dtype="fp32"), lr=0.01, betas=(0.8, 0.9),
                        param_groups=no_decay_groups(model)) as engine:
        optimizer = engine.optimizer
        assert isinstance(optimizer, torch.optim.Optimizer) and optimizer is engine.optimizer
        assert len(optimizer.param_groups) == 2  # the engine's dicts themselves
        assert all(a is b for a, b in zip(optimizer.param_groups, engine.param_groups))
        assert optimizer.defaults == {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-8, "weight_decay": 0.0}
        listed = [p for group in optimizer.param_groups for p in group["params"]]
        assert sorted(map(id, listed)) == sorted(id(p) for p in model.parameters())
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        assert [g["initial_lr"] for g in optimizer.param_groups] == [0.01, 0.01]
        engine.lr = 0.02  # the engine's own setter writes the same dicts
        assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.02]
        with pytest.raises(RuntimeError, match="fixed when it is built; pass param_groups"):
            optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
        assert "EngineOptimizer(offload.Engine: [" in repr(optimizer)


def test_a_scheduler_stepped_after_engine_step_does_not_warn():
    with offload.Engine(mlp(), offload.Config(device="cpu", dtype="fp32")) as engine:
        scheduler = torch.optim.lr_scheduler.LinearLR(engine.optimizer, total_iters=4)
        batch = batches("mlp", 1, micro=1)[0][0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns "lr_scheduler.step() before optimizer.step()"
            engine.backward(loss_of("mlp", engine, batch))
            engine.step()
            scheduler.step()


def test_a_bad_value_set_by_hand_is_refused_at_step_with_the_group_named():
    with offload.Engine(mlp(), offload.Config(device="cpu", dtype="fp32")) as engine:
        batch = batches("mlp", 1, micro=1)[0][0]
        engine.backward(loss_of("mlp", engine, batch))
        engine.optimizer.param_groups[0]["lr"] = float("nan")
        with pytest.raises(ValueError, match=r"engine.optimizer.param_groups\[0\]: Invalid learning rate: nan"):
            engine.optimizer.step()
        engine.optimizer.param_groups[0]["lr"] = torch.tensor(1e-3)  # torch allows a tensor lr: so do we
        assert engine.optimizer.step() is None and engine.optimizer.last_step.step == 1  # gradients were kept


def test_zero_grad_drops_what_backward_accumulated_since_the_last_step():
    data = batches("mlp", 2, micro=1)
    model, ref_model = mlp(), mlp()
    with offload.Engine(model, offload.Config(device="cpu", dtype="fp32"), lr=LR) as engine, \
            offload.Engine(ref_model, offload.Config(device="cpu", dtype="fp32"), lr=LR) as ref:
        engine.backward(loss_of("mlp", engine, data[0][0]) * 1e3)
        engine.optimizer.zero_grad()  # forgets that gradient
        for e in (engine, ref):
            e.backward(loss_of("mlp", e, data[1][0]))
            e.optimizer.step()
            e.optimizer.zero_grad()  # after a step: nothing to drop
        assert all(torch.equal(a, b) for a, b in zip(engine.state_dict().values(), ref.state_dict().values()))
        with pytest.raises(RuntimeError, match="no parameter received a gradient"):
            engine.optimizer.step()


def test_a_closure_runs_before_the_step_with_gradients_on():
    with offload.Engine(mlp(), offload.Config(device="cpu", dtype="fp32")) as engine:
        batch = batches("mlp", 1, micro=1)[0][0]

        def closure():
            loss = loss_of("mlp", engine, batch)
            engine.backward(loss)
            return loss

        with torch.no_grad():
            loss = engine.optimizer.step(closure)
        assert loss.requires_grad and engine.optimizer.last_step.step == 1


def _trained(model, engine_or_opt, data, step):
    for batch in data:
        loss = loss_of("mlp", engine_or_opt if step is None else model, batch[0])
        if step is None:
            engine_or_opt.backward(loss)
            engine_or_opt.optimizer.step()
        else:
            loss.backward()
            step.step()
            step.zero_grad()


@pytest.mark.parametrize("optimizer", ["cpu", "nvme"])
def test_state_dict_moves_between_the_engine_and_torch_adamw_both_ways(optimizer, tmp_path):
    data = batches("mlp", 6, micro=1)
    config = offload.Config(device="cpu", dtype="fp32", optimizer=optimizer, nvme_dir=tmp_path)
    ref_model = mlp()
    ref_opt = torch.optim.AdamW(torch_groups(ref_model), lr=LR, weight_decay=0.05)
    _trained(ref_model, None, data[:3], ref_opt)
    # torch -> engine: an engine over the torch-trained weights with its optimizer state goes on like torch
    model = copy.deepcopy(ref_model)
    with offload.Engine(model, config, lr=LR, weight_decay=0.05, param_groups=no_decay_groups(model)) as engine:
        engine.optimizer.load_state_dict(ref_opt.state_dict())
        assert engine.training_state().step == 3
        _trained(model, engine, data[3:], None)
        _trained(ref_model, None, data[3:], ref_opt)
        for key, value in ref_model.state_dict().items():
            torch.testing.assert_close(engine.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
        # engine -> torch: the same moments and steps, in a state dict torch loads
        mine, theirs = engine.optimizer.state_dict(), ref_opt.state_dict()
        assert mine["state"].keys() == theirs["state"].keys()
        for index, entry in theirs["state"].items():
            assert mine["state"][index]["step"].item() == entry["step"].item() == 6
            for key in ("exp_avg", "exp_avg_sq"):
                assert mine["state"][index][key].shape == entry[key].shape
                torch.testing.assert_close(mine["state"][index][key], entry[key], rtol=1e-5, atol=1e-9)
        torch.optim.AdamW(torch_groups(ref_model), lr=LR).load_state_dict(mine)


def test_load_state_dict_checks_everything_before_changing_anything():
    model = mlp()
    with offload.Engine(model, offload.Config(device="cpu", dtype="fp32"), lr=LR) as engine:
        _trained(model, engine, batches("mlp", 2, micro=1), None)
        good = engine.optimizer.state_dict()
        before = engine.state_dict()

        def bad(edit):
            sd = copy.deepcopy(good)
            edit(sd)
            return sd

        cases = [
            (bad(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0]))), "has 2 param_groups"),
            (bad(lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(3))),
             r"state\[0\] \(0.weight\).exp_avg: expected a floating-point tensor of 1536"),
            (bad(lambda sd: sd["state"][0].__setitem__("step", torch.tensor(0.5))), "step must be a whole number"),
            (bad(lambda sd: sd["param_groups"][0].__setitem__("amsgrad", True)), "amsgrad=True is not supported"),
            (bad(lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0)), "Invalid learning rate: -1.0"),
            (bad(lambda sd: sd["state"].__setitem__(99, sd["state"][0])), "state.99. belongs to no parameter"),
            (bad(lambda sd: sd["param_groups"][0]["params"].__setitem__(1, 0)), "lists parameter 0 a second time"),
            ({"state": {}}, "expected a dict with 'state' and 'param_groups'"),
        ]
        for sd, match in cases:
            with pytest.raises(ValueError, match=match):
                engine.optimizer.load_state_dict(sd)
        after = engine.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert engine.optimizer.state_dict()["state"][0]["step"].item() == 2


def test_engine_save_keeps_what_a_scheduler_put_in_the_groups(tmp_path):
    """torch's resume order (build the optimizer and the scheduler, load the optimizer's state, then the
    scheduler's) continues the straight run: engine.load restores lr and the scheduler's keys (initial_lr)."""
    data = batches("mlp", 6, micro=1)
    lrs = {}
    for run in ("straight", "resumed"):
        model = mlp()
        with offload.Engine(model, offload.Config(device="cpu", dtype="fp32"), lr=LR) as engine:
            scheduler = lambda_warmup(engine.optimizer)
            lrs[run] = []
            for i, step in enumerate(data):
                if run == "resumed" and i == 3:
                    engine.save(tmp_path / "ckpt")
                    saved_scheduler = scheduler.state_dict()
                    engine.close()
                    model = mlp(seed=5)  # other weights and another lr: the checkpoint brings them back
                    engine = offload.Engine(model, offload.Config(device="cpu", dtype="fp32"), lr=123.0)
                    scheduler = lambda_warmup(engine.optimizer)
                    engine.load(tmp_path / "ckpt")
                    assert engine.param_groups[0]["initial_lr"] == LR
                    scheduler.load_state_dict(saved_scheduler)
                lrs[run].append(engine.lr)
                engine.backward(loss_of("mlp", engine, step[0]))
                engine.optimizer.step()
                scheduler.step()
            final = engine.state_dict()
            engine.close()
        lrs[run + "_final"] = final
    assert lrs["straight"] == lrs["resumed"]
    assert all(torch.equal(lrs["straight_final"][k], lrs["resumed_final"][k]) for k in lrs["straight_final"])


def test_zero_grad_right_after_a_step_does_not_wait_for_the_overlapped_update(tmp_path):
    config = offload.Config(device="cpu", dtype="fp32", params="nvme", optimizer="nvme", nvme_dir=tmp_path)
    data = batches("mlp", 2, micro=1)
    with offload.Engine(mlp(), config, lr=LR) as engine:
        for step in data:
            engine.backward(loss_of("mlp", engine, step[0]))
            engine.optimizer.step()
            engine.optimizer.zero_grad()
            assert engine.optimizer.last_step.overlapped
            assert engine._parts.inflight is not None  # (still running: zero_grad had nothing to drop)


def test_several_ranks_point_to_engine_save():
    from offload.engine import optimizer_state

    class FakeRanks:
        many = True

    state = type("S", (), {"ranks": FakeRanks()})()
    with pytest.raises(RuntimeError, match=r"use engine.save\(path\) / engine.load\(path\)"):
        optimizer_state.state_dict(state)


def test_a_plain_module_parameter_listed_in_groups_keeps_its_order():
    """state_dict() indexes parameters through param_groups in order, as torch does."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    groups = [{"params": [model[1].weight, model[0].bias], "lr": 0.1}]
    with offload.Engine(model, offload.Config(device="cpu", dtype="fp32"), param_groups=groups) as engine:
        engine.backward(engine(torch.randn(3, 4)).sum())
        engine.optimizer.step()
        sd = engine.optimizer.state_dict()
        assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
        assert sd["state"][0]["exp_avg"].shape == (2, 4) and sd["state"][1]["exp_avg"].shape == (4,)
