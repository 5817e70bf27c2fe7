"""How the engine's forward treats its inputs."""

from __future__ import annotations

from typing import Any

import torch


def cast_inputs(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Floating-point tensors to the compute dtype, every tensor to the device, through lists, tuples, dicts."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    if isinstance(value, (list, tuple)):
        cast = [cast_inputs(v, device, dtype) for v in value]
        return type(value)(cast) if not hasattr(value, "_fields") else type(value)(*cast)
    if isinstance(value, dict):
        return {k: cast_inputs(v, device, dtype) for k, v in value.items()}
    return value
