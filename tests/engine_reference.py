"""Plain-PyTorch reference runs for the engine tests: the same model trained with torch.optim.AdamW.

For bf16/fp16 the reference keeps fp32 master weights and casts at the points the engine does: the compute
copy of the model gets ``master.to(dtype)`` before every step's forward, its low-precision gradients are
summed in fp32 over micro-batches, clipped with ``clip_grad_norm_`` and applied to the master by AdamW.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import offload

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:  # the Llama tests skip; the MLP tests still run
    LlamaConfig = LlamaForCausalLM = None


def tiny_llama(seed: int = 0, layers: int = 2, tied: bool = True, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, attn_implementation="eager")
    return LlamaForCausalLM(config)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 10))


def batches(kind: str, steps: int, micro: int, seed: int = 1) -> list[list[dict]]:
    """``steps`` lists of ``micro`` batches (dicts of model inputs and targets), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(micro):
            if kind == "llama":
                ids = torch.randint(0, 96, (2, 12), generator=gen)
                step.append({"input_ids": ids, "labels": ids})
            else:
                step.append({"x": torch.randn(8, 24, generator=gen), "y": torch.randint(0, 10, (8,), generator=gen)})
        out.append(step)
    return out


def loss_of(kind: str, model_or_engine, batch: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    if kind == "llama":
        return model_or_engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    x = batch["x"] if dtype is None else batch["x"].to(dtype)
    out = model_or_engine(x).float()
    return nn.functional.cross_entropy(out, batch["y"].to(out.device))


def no_decay_groups(model: nn.Module) -> list[dict]:
    """Torch-style groups: no weight decay on norms and biases."""
    flat = [p for n, p in model.named_parameters() if p.ndim < 2 or "norm" in n]
    return [{"params": flat, "weight_decay": 0.0}]


def reference_run(kind: str, model: nn.Module, data: list[list[dict]], dtype: torch.dtype, *, lr: float,
                  weight_decay: float, max_grad_norm: float | None,
                  decay_groups: bool, optimizer_cls: type = torch.optim.AdamW
                  ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses (mean over micro-batches, per step) and the final fp32 state_dict of the AdamW run
    (``optimizer_cls``: torch's, or offload.CPUAdam to isolate the engine's plumbing from the kernel)."""
    master = model
    compute = master
    if dtype != torch.float32:  # like the engine (and FSDP2's param_dtype): parameters cast, buffers kept
        compute = copy.deepcopy(master)
        for param in compute.parameters():
            param.data = param.data.to(dtype)
    params = list(master.parameters())
    if decay_groups:
        flat = {id(p) for p in no_decay_groups(master)[0]["params"]}
        groups = [{"params": [p for p in params if id(p) in flat], "weight_decay": 0.0},
                  {"params": [p for p in params if id(p) not in flat]}]
    else:
        groups = [{"params": params}]
    opt = optimizer_cls(groups, lr=lr, weight_decay=weight_decay)
    losses = []
    for step in data:
        if compute is not master:
            with torch.no_grad():
                for c, m in zip(compute.parameters(), master.parameters()):
                    c.copy_(m)
        step_loss = 0.0
        for batch in step:
            loss = loss_of(kind, compute, batch, dtype)
            loss.backward()
            step_loss += loss.item() / len(step)
            if compute is not master:
                for c, m in zip(compute.parameters(), master.parameters()):
                    if c.grad is not None:
                        g = c.grad.float()
                        m.grad = g if m.grad is None else m.grad + g
                        c.grad = None
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return losses, {k: v.detach().float().clone() for k, v in master.state_dict().items()}


def train_with_engine(kind: str, model: nn.Module, data: list[list[dict]], config, **engine_kw
                      ) -> tuple[list[float], dict[str, torch.Tensor], "offload.EngineStats"]:
    """Losses (as reference_run), the final state_dict and the stats of the same run through offload.Engine."""
    losses = []
    with offload.Engine(model, config, **engine_kw) as engine:
        for step in data:
            step_loss = 0.0
            for batch in step:
                loss = loss_of(kind, engine, batch)
                engine.backward(loss)
                step_loss += loss.item() / len(step)
            info = engine.step()
            assert not info.skipped
            losses.append(step_loss)
        assert info.step == len(data)
        assert all(p.device.type == engine.device.type for p in engine.model.parameters())
        return losses, engine.state_dict(), engine.stats()


def assert_matches(losses, state, ref_losses, ref_state, rtol, weight_atol=None):
    assert len(losses) == len(ref_losses)
    for step, (ours, ref) in enumerate(zip(losses, ref_losses)):
        assert ours == pytest.approx(ref, rel=rtol), f"loss differs at step {step + 1}"
    assert state.keys() == ref_state.keys()
    for key, ref in ref_state.items():
        atol = rtol if weight_atol is None else weight_atol
        torch.testing.assert_close(state[key], ref, rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")
