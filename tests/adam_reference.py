"""A plain-torch Adam/AdamW step with the kernel's signature, used as the reference in the kernel tests."""

from __future__ import annotations

import torch

from offload import _C

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def torch_adam_step(p, g, m, v, *, step, lr, beta1, beta2, eps, weight_decay, adamw=True, bias_correction=True,
                    grad_scale=1.0):
    """torch.optim.AdamW / Adam (single-tensor algorithm) on fp32 tensors, in place, with the same tensor
    operations torch uses (so the roundings are the same). ``g`` may be bf16/fp16."""
    g = g.float() * grad_scale
    if adamw:
        p.mul_(1 - lr * weight_decay)
    else:
        g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1**step if bias_correction else 1.0
    bc2 = 1 - beta2**step if bias_correction else 1.0
    denom = (v.sqrt() / bc2**0.5).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)


def make_state(n: int, grad_dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen)
    g = (torch.randn(n, generator=gen) * 0.1).to(grad_dtype)
    m = torch.randn(n, generator=gen) * 0.01
    v = torch.rand(n, generator=gen) * 1e-3
    return p, g, m, v


def kernel_step(p, g, m, v, lowp=None, **hyper):
    _C.adam_step(p, g, m, v, lowp, **hyper)
