"""Residency: where a group's compute-dtype weights are, as one explicit state per group."""

from __future__ import annotations

import enum


class Residency(enum.Enum):
    RELEASED = "released"  # no device copy: the weights exist only at home (host RAM or NVMe)
    FETCHING = "fetching"  # a read from NVMe (into a host staging slot; on the CPU device into the device
                           # buffer itself), or (CUDA) the copy to the device, is in flight; nothing has
                           # waited for it yet
    RESIDENT = "resident"  # the device buffer holds the current weights


_ALLOWED = {
    Residency.RELEASED: {Residency.FETCHING, Residency.RESIDENT},
    Residency.FETCHING: {Residency.RESIDENT, Residency.RELEASED},
    Residency.RESIDENT: {Residency.RELEASED},
}


class ResidencyTable:
    """The residency of every group; the only place it changes. An illegal transition is a bug and raises."""

    def __init__(self, ngroups: int) -> None:
        self._state = [Residency.RELEASED] * ngroups

    def __getitem__(self, g: int) -> Residency:
        return self._state[g]

    def move(self, g: int, new: Residency) -> None:
        old = self._state[g]
        if new not in _ALLOWED[old]:
            raise RuntimeError(f"offload: group {g} cannot go from {old.value} to {new.value}")
        self._state[g] = new

    def groups_in(self, state: Residency) -> list[int]:
        return [g for g, s in enumerate(self._state) if s is state]
