"""LossScaler: the fp16 loss scale, static or dynamic (halved on overflow, doubled after a run of good steps)."""

from __future__ import annotations

import math

from offload.errors import ConfigError


class LossScaler:
    """``mode="dynamic"`` starts at 2**16 and, like ``torch.amp.GradScaler``, halves the scale when a step
    overflows and doubles it after ``growth_interval`` steps in a row without overflow. A number is a static
    scale. ``enabled=False`` (bf16 and fp32 training) keeps the scale at 1."""

    def __init__(self, mode: str | float, *, enabled: bool, init_scale: float = 2.0**16,
                 growth_interval: int = 2000, backoff: float = 0.5, growth: float = 2.0) -> None:
        self.dynamic = enabled and mode == "dynamic"
        if mode == "dynamic":
            scale = init_scale
        elif isinstance(mode, (int, float)) and not isinstance(mode, bool) and math.isfinite(mode) and mode > 0:
            scale = float(mode)
        else:
            raise ConfigError(f"loss_scale: expected 'dynamic' or a positive number; got {mode!r}")
        self.scale = scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.backoff = backoff
        self.growth = growth
        self._good_steps = 0

    def update(self, overflow: bool) -> None:
        """Adjusts the scale after a step (a no-op for a static scale)."""
        if not self.dynamic:
            return
        if overflow:
            self.scale = max(self.scale * self.backoff, 1.0)
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps == self.growth_interval:
            self.scale *= self.growth
            self._good_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "good_steps": self._good_steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self._good_steps = int(state["good_steps"])
