"""The engine on a CUDA device: side-stream gradient copies, pinned staging, weight uploads (skips without CUDA)."""

from __future__ import annotations

import pytest
import torch

import offload
from engine_reference import batches, loss_of, mlp, reference_run, tiny_llama, train_with_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(kind, make, config, data, max_grad_norm):
    losses, state, stats = train_with_engine(kind, make(), data, config, lr=3e-3, weight_decay=0.05,
                                             max_grad_norm=max_grad_norm)
    assert stats.host_bytes_peak > 0
    return losses, state


@pytest.mark.parametrize("optimizer", ["cpu", "nvme"])
@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_fp32_on_cuda_matches_torch(kind, optimizer, tmp_path):
    pytest.importorskip("transformers")
    make = tiny_llama if kind == "llama" else mlp
    data = batches(kind, 10, micro=2)
    ref_model = make().cuda()
    ref_data = [[{k: v.cuda() for k, v in b.items()} for b in step] for step in data]
    ref_losses, ref_state = reference_run(kind, ref_model, ref_data, torch.float32, lr=3e-3, weight_decay=0.05,
                                          max_grad_norm=1.0, decay_groups=False)
    config = offload.Config(device="cuda", dtype="fp32", optimizer=optimizer, nvme_dir=tmp_path)
    losses, state = _run(kind, make, config, data, 1.0)
    # cuBLAS and the CPU reduce in different orders; the trajectories agree closely, not bit for bit.
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    for key, ref in ref_state.items():
        torch.testing.assert_close(state[key], ref.cpu(), rtol=1e-3, atol=1e-4)


def test_bf16_on_cuda_trains_and_keeps_weights_in_sync(tmp_path):
    config = offload.Config(device="cuda", dtype="bf16", optimizer="nvme", nvme_dir=tmp_path)
    data = batches("mlp", 20, micro=2)
    losses, state = _run("mlp", mlp, config, data, None)
    assert losses[-1] < losses[0]
    with offload.Engine(mlp(), config) as engine:
        for step in data[:3]:
            for batch in step:
                engine.backward(loss_of("mlp", engine, batch))
            engine.step()
        masters = engine.state_dict()
        for name, param in engine.model.named_parameters():
            # the device weights are the masters rounded to bf16, uploaded after the step
            assert torch.equal(param.detach().cpu(), masters[name].to(torch.bfloat16)), name


def test_a_parameter_without_gradient_keeps_its_device_weights():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"body": torch.nn.Linear(8, 8), "head_a": torch.nn.Linear(8, 2),
                                 "head_b": torch.nn.Linear(8, 2)})
    with offload.Engine(model, offload.Config(device="cuda", dtype="bf16")) as engine:
        head_b = model["head_b"].weight.detach().clone()
        x = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
        engine.backward(model["head_a"](model["body"](x)).float().square().mean())
        engine.step()
        torch.cuda.synchronize()
        assert torch.equal(model["head_b"].weight.detach(), head_b)
