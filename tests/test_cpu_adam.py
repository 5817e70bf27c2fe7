"""offload.CPUAdam against plain torch.optim.AdamW / Adam: trajectories, param groups, schedulers, state_dict."""

import copy
import io

import pytest
import torch

import offload
from adam_reference import HYPER, make_state, torch_adam_step
from offload import _C


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 64), torch.nn.GELU(),
        torch.nn.Linear(64, 8),
    )


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 32, generator=gen), torch.randn(64, 8, generator=gen)) for _ in range(n)]


def train(model, opt, data, scheduler=None, drop_grad_of=None):
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if drop_grad_of is not None and step % 3 == 0:
            drop_grad_of.grad = None  # this parameter sits out every third step
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return loss.item()


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def assert_close_trajectory(ours, ref):
    a, b = flat(ours), flat(ref)
    # The acceptance bound of the foundation issue: norm-relative <= 1e-6 and max abs <= 1e-5 after 100 steps.
    assert ((a - b).norm() / b.norm()).item() <= 1e-6
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_over_100_steps(weight_decay):
    model, ref = small_model(), small_model()
    data = batches(100)
    train(model, offload.CPUAdam(model.parameters(), lr=1e-3, weight_decay=weight_decay), data)
    train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=weight_decay), data)
    assert_close_trajectory(model, ref)
    assert not torch.equal(flat(model), flat(small_model()))  # it did train


def test_adam_l2_mode_matches_torch_adam():
    model, ref = small_model(), small_model()
    data = batches(100)
    train(model, offload.CPUAdam(model.parameters(), lr=1e-3, weight_decay=0.05, adamw=False), data)
    train(ref, torch.optim.Adam(ref.parameters(), lr=1e-3, weight_decay=0.05), data)
    assert_close_trajectory(model, ref)


def test_maximize_matches_torch():
    model, ref = small_model(), small_model()
    data = batches(30)
    train(model, offload.CPUAdam(model.parameters(), lr=1e-4, maximize=True), data)
    train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-4, maximize=True), data)
    assert_close_trajectory(model, ref)


def test_param_groups_with_own_hyper_parameters_and_skipped_params():
    model, ref = small_model(), small_model()

    def groups(m):
        decay = [p for n, p in m.named_parameters() if p.ndim == 2]
        no_decay = [p for n, p in m.named_parameters() if p.ndim < 2]
        return [dict(params=decay, weight_decay=0.1, lr=2e-3), dict(params=no_decay, weight_decay=0.0, betas=(0.8, 0.99))]

    data = batches(60)
    train(model, offload.CPUAdam(groups(model), lr=1e-3), data, drop_grad_of=model[0].bias)
    train(ref, torch.optim.AdamW(groups(ref), lr=1e-3), data, drop_grad_of=ref[0].bias)
    assert_close_trajectory(model, ref)


def test_lr_scheduler_drives_the_learning_rate():
    model, ref = small_model(), small_model()
    data = batches(50)
    opt = offload.CPUAdam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=50)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=1e-2, total_steps=50)
    train(model, opt, data, sched)
    train(ref, ref_opt, data, ref_sched)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert_close_trajectory(model, ref)


@pytest.mark.parametrize("adamw, weight_decay, scale", [(True, 0.01, 0.25), (False, 0.1, 0.3)])
def test_grad_scale_equals_scaled_gradients(adamw, weight_decay, scale):
    # The kernel scales each gradient first, so in L2 mode too this is exactly "scale the grads, then step".
    a, b = small_model(), small_model()
    x, y = batches(1)[0]
    opt_a, opt_b = (offload.CPUAdam(m.parameters(), lr=1e-2, adamw=adamw, weight_decay=weight_decay) for m in (a, b))
    for _ in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        for p in b.parameters():
            p.grad.mul_(scale)
        opt_a.step(grad_scale=scale)
        opt_b.step()
    assert torch.equal(flat(a), flat(b))


def test_state_dict_round_trip_resumes_bit_exact():
    data = batches(20)
    straight = small_model()
    train(straight, offload.CPUAdam(straight.parameters(), lr=1e-3), data)

    resumed = small_model()
    opt = offload.CPUAdam(resumed.parameters(), lr=1e-3)
    train(resumed, opt, data[:10])
    buf = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    fresh = small_model(seed=5)
    fresh.load_state_dict(saved["model"])
    opt2 = offload.CPUAdam(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(saved["opt"])
    train(fresh, opt2, data[10:])
    assert torch.equal(flat(fresh), flat(straight))


def test_state_dict_has_torch_adamw_layout_both_ways():
    data = batches(20)
    ours, ref = small_model(), small_model()
    opt = offload.CPUAdam(ours.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    train(ours, opt, data[:10])
    train(ref, ref_opt, data[:10])
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][0]["step"].item() == 10.0
    assert sd["state"][0]["exp_avg"].shape == ref_opt.state_dict()["state"][0]["exp_avg"].shape

    # torch -> ours and ours -> torch: both continue where the other stopped.
    ours2, ref2 = copy.deepcopy(ref), copy.deepcopy(ours)
    opt2 = offload.CPUAdam(ours2.parameters(), lr=1e-3)
    opt2.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # load_state_dict shares tensors, as torch does
    ref_opt2 = torch.optim.AdamW(ref2.parameters(), lr=1e-3)
    ref_opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(ours2, opt2, data[10:])
    train(ref, ref_opt, data[10:])
    assert_close_trajectory(ours2, ref)
    train(ref2, ref_opt2, data[10:])
    train(ours, opt, data[10:])
    assert_close_trajectory(ours, ref2)


def test_torch_adam_checkpoint_keeps_l2_weight_decay_both_ways():
    data = batches(20)
    ours, ref = small_model(), small_model()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3, weight_decay=0.05)
    train(ref, ref_opt, data[:10])
    ours.load_state_dict(ref.state_dict())
    opt = offload.CPUAdam(ours.parameters(), lr=1e-3, weight_decay=0.05)  # AdamW by default ...
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))               # ... but the checkpoint says L2
    assert opt.param_groups[0]["decoupled_weight_decay"] is False
    back = torch.optim.Adam(small_model().parameters())  # (torch's AdamW always forces decoupled decay)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert back.param_groups[0]["decoupled_weight_decay"] is False
    adamw_sd = offload.CPUAdam(small_model().parameters()).state_dict()
    back.load_state_dict(adamw_sd)
    assert back.param_groups[0]["decoupled_weight_decay"] is True
    train(ours, opt, data[10:])
    train(ref, ref_opt, data[10:])
    assert_close_trajectory(ours, ref)


def test_adam_mode_defaults_to_torch_adams_weight_decay():
    assert offload.CPUAdam(small_model().parameters(), adamw=False).param_groups[0]["weight_decay"] == 0.0
    assert offload.CPUAdam(small_model().parameters()).param_groups[0]["weight_decay"] == 0.01


def test_saved_step_counters_do_not_share_memory():
    model = small_model()
    opt = offload.CPUAdam(model.parameters())
    train(model, opt, batches(2))
    steps = [entry["step"] for entry in opt.state_dict()["state"].values()]
    assert len({t.untyped_storage().data_ptr() for t in steps}) == len(steps)
    assert all(t.item() == 2.0 for t in steps)


def test_failed_step_changes_nothing():
    model = small_model()
    opt = offload.CPUAdam(model.parameters(), lr=1e-2)
    train(model, opt, batches(2))
    x, y = batches(1, seed=9)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    before = flat(model).clone()
    steps = [opt.state[p]["step"].item() for p in model.parameters()]

    last_weight = list(model.parameters())[6]
    good_grad = last_weight.grad
    last_weight.grad = torch.zeros(last_weight.shape[::-1]).t()  # right shape, not contiguous: found late
    with pytest.raises(ValueError, match=r"\['params'\]\[6\]: the gradient is not contiguous"):
        opt.step()
    last_weight.grad = good_grad
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]: Invalid learning rate: -1.0"):
        opt.step()
    assert torch.equal(flat(model), before)
    assert [opt.state[p]["step"].item() for p in model.parameters()] == steps


def test_swapped_state_storage_is_followed():
    # Replacing the storage behind a state tensor (as moving state into a pinned or flat buffer does) keeps the
    # tensor object: the optimizer must write to the new memory, never the freed one.
    ours, ref = small_model(), small_model()
    data = batches(10)
    opt, ref_opt = offload.CPUAdam(ours.parameters(), lr=1e-3), torch.optim.AdamW(ref.parameters(), lr=1e-3)
    train(ours, opt, data[:5])
    train(ref, ref_opt, data[:5])
    for p in ours.parameters():
        for name in ("exp_avg", "exp_avg_sq"):
            opt.state[p][name].data = opt.state[p][name].clone()
    train(ours, opt, data[5:])
    train(ref, ref_opt, data[5:])
    assert_close_trajectory(ours, ref)


def test_params_appended_or_reordered_keep_their_step_counts():
    ours, ref = small_model(), small_model()
    extra = torch.nn.Parameter(torch.randn(64))
    ref_extra = torch.nn.Parameter(extra.detach().clone())
    opt = offload.CPUAdam(list(ours.parameters())[:4], lr=1e-3)
    ref_opt = torch.optim.AdamW(list(ref.parameters())[:4], lr=1e-3)
    data = batches(12)

    def run(model, o, extra_param, part):
        for x, y in part:
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y) + (extra_param ** 2).sum() * 1e-3
            loss.backward()
            o.step()

    run(ours, opt, extra, data[:4])
    run(ref, ref_opt, ref_extra, data[:4])
    for o, m, e in ((opt, ours, extra), (ref_opt, ref, ref_extra)):  # grow the group in place, as users do
        o.param_groups[0]["params"].extend(list(m.parameters())[4:] + [e])
    run(ours, opt, extra, data[4:8])
    run(ref, ref_opt, ref_extra, data[4:8])
    opt.param_groups[0]["params"].reverse()  # order in the group is not identity
    ref_opt.param_groups[0]["params"].reverse()
    run(ours, opt, extra, data[8:])
    run(ref, ref_opt, ref_extra, data[8:])
    assert_close_trajectory(ours, ref)
    assert torch.allclose(extra, ref_extra, rtol=0, atol=1e-6)
    assert opt.state[list(ours.parameters())[0]]["step"].item() == 12.0
    assert opt.state[extra]["step"].item() == 8.0


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="this torch has no Tensor.grad_dtype")
def test_low_precision_gradients_through_cpu_adam():
    ours, ref = small_model(), small_model()
    for p in ours.parameters():
        p.grad_dtype = torch.bfloat16
    data = batches(30)
    opt, ref_opt = offload.CPUAdam(ours.parameters(), lr=1e-3), torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for x, y in data:
        for m, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        assert all(p.grad.dtype == torch.bfloat16 for p in ours.parameters())
        for p, q in zip(ours.parameters(), ref.parameters()):
            q.grad = p.grad.float()  # the reference reads the same bf16 values, upcast
        opt.step()
        ref_opt.step()
    assert_close_trajectory(ours, ref)


def test_kernel_with_bf16_and_fp16_grads_tracks_torch_over_100_steps():
    # Gradients in low precision (as the engine streams them from the device); the reference reads the same
    # values upcast to fp32.
    for grad_dtype in (torch.bfloat16, torch.float16):
        p, _, m, v = make_state(10_007)
        rp, rm, rv = p.clone(), m.clone(), v.clone()
        gen = torch.Generator().manual_seed(3)
        for step in range(1, 101):
            g = (torch.randn(p.numel(), generator=gen) * 0.1).to(grad_dtype)
            _C.adam_step(p, g, m, v, step=step, **HYPER)
            torch_adam_step(rp, g, rm, rv, step=step, **HYPER)
        assert ((p - rp).norm() / rp.norm()).item() <= 1e-6
        assert (p - rp).abs().max().item() <= 1e-5


def test_invalid_hyper_parameters_raise_like_torch():
    params = small_model().parameters
    for kwargs, message in (
        (dict(lr=-1.0), "Invalid learning rate"),
        (dict(eps=-1.0), "Invalid epsilon value"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
        (dict(weight_decay=-0.1), "Invalid weight_decay value"),
        (dict(amsgrad=True), "does not support amsgrad=True"),
    ):
        with pytest.raises(ValueError, match=message):
            offload.CPUAdam(params(), **kwargs)
        if "amsgrad" not in kwargs:
            with pytest.raises(ValueError, match=message):
                torch.optim.AdamW(params(), **kwargs)


def test_rejects_tensors_it_cannot_update_in_place():
    w = torch.nn.Parameter(torch.randn(8, 4).t())  # non-contiguous parameter
    w.grad = torch.zeros_like(w)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is not contiguous"):
        offload.CPUAdam([w]).step()

    h = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    h.grad = torch.zeros_like(h)
    with pytest.raises(ValueError, match="is torch.float64; CPUAdam keeps fp32"):
        offload.CPUAdam([h]).step()

    s = torch.nn.Parameter(torch.randn(8, 4))
    s.grad = torch.zeros(8, 4).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        offload.CPUAdam([s]).step()

    g = torch.nn.Parameter(torch.randn(4, 8))
    g.grad = torch.zeros(8, 4).t()  # right shape, not contiguous
    before = g.detach().clone()
    with pytest.raises(ValueError, match="the gradient is not contiguous"):
        offload.CPUAdam([g]).step()
    assert torch.equal(g.detach(), before)


def test_rejects_loaded_state_of_the_wrong_shape():
    model = small_model()
    opt = offload.CPUAdam(model.parameters())
    train(model, opt, batches(1))
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(3)
    opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="state 'exp_avg' must be contiguous with the parameter's shape"):
        train(model, opt, batches(1))
