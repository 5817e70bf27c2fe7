"""The step counters of one optimizer param group, kept in one tensor."""

from __future__ import annotations

from typing import Any

import torch


class StepBank:
    """``state["step"]`` of the parameters of one param group, as 0-dim views into one float32 tensor.

    Note [step bank]: torch's optimizer state keeps one ``step`` tensor per parameter, and incrementing 1,000 of
    them costs ~1.5 ms a step, as much as the update of a 100k-element tensor. With the counters as views into
    one tensor, one ``add_`` advances the whole group and one ``tolist()`` reads it, while the state keeps
    torch's layout (``CPUAdam.state_dict()`` hands out clones, so no two saved tensors share memory). A slot is
    handed out when a parameter is first bound and identified by its view, not by the parameter's position in
    the group, so reordering ``group["params"]`` changes nothing. A full bank is replaced by a larger one; the
    old views keep their counts, and each parameter moves over when it is next bound.
    """

    def __init__(self, capacity: int) -> None:
        self.values = torch.zeros(max(capacity, 1), dtype=torch.float32)
        self.used = 0

    @property
    def full(self) -> bool:
        return self.used == self.values.numel()

    def holds(self, step: Any) -> bool:
        """True if ``step`` is one of this bank's views."""
        return isinstance(step, torch.Tensor) and step._base is self.values

    def bind(self, state: dict[str, Any], value: float) -> tuple[int, torch.Tensor]:
        """Gives ``state`` the next free slot, holding ``value``; returns the slot and its view. Not when full."""
        slot = self.used
        self.used += 1
        view = self.values[slot]
        view.fill_(value)
        state["step"] = view
        return slot, view

    def read(self) -> list[float]:
        return self.values.tolist()

    def advance(self, views: list[torch.Tensor]) -> None:
        """Adds 1 to the counters behind ``views`` (views of this bank, each at most once)."""
        if len(views) == self.used:  # every slot in use stepped: one add over the whole bank
            self.values.add_(1.0)
        else:
            torch._foreach_add_(views, 1.0)
