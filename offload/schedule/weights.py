"""Weights: what the engine asks of a model's compute-dtype weights, wherever they live.

Two implementations satisfy it: ``DeviceWeights`` (every group resident on the compute device for the whole
run, ``params="device"``) and ``OffloadedParams`` (groups at home in host RAM or on NVMe, fetched to the
device ahead of each use by the ``FetchScheduler``). The engine's construction, its optimizer updates,
checkpoint loading and export talk to this interface only; what exists for one placement alone (fetching,
lending a group to its update, uploads on a CUDA side stream) stays behind it, or is reached through the
offloaded implementation where the engine knows it built one (``EngineParts.offloaded``).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from offload.layout.flat_group import FlatGroup

# (master chunk, its start in this rank's shard, last chunk?): moves a group's new weights where they live once
# its fp32 master is final.
AfterUpdate = Callable[[torch.Tensor, int, bool], None]


class Weights(Protocol):
    groups: list[FlatGroup]

    def bind_parameters(self) -> None:
        """Points every trainable parameter's data at its group's weights (once, when the engine attaches)."""

    def load_weights(self, g: int, master: torch.Tensor, start: int, last: bool) -> None:
        """Sets group g's weights from a chunk of its fp32 master outside a step (initialisation, loading)."""

    def can_lend(self, g: int) -> bool:
        """Whether group g's update may run on the fp32 weights in memory (Note [master in memory])."""

    def lend_master(self, g: int) -> torch.Tensor | None:
        """The fp32 master group g's update runs on in place, or None (it reads the master from its state)."""

    def kernel_output(self, g: int) -> torch.Tensor | None:
        """Where the Adam kernel writes group g's low-precision weights, or None."""

    def after_update(self, g: int, master_is_staged: bool,
                     covered: list[tuple[int, int]]) -> AfterUpdate | None:
        """The callback that moves group g's new weights where they live, or None when the kernel did."""

    def release_all(self) -> None:
        """No group on the device any more (its copy would go stale while the homes are rewritten)."""

    def drain_copies(self) -> None:
        """Waits for every copy that still reads a group's home."""

    @property
    def io_failure(self) -> OSError | None:
        """The error of a failed write of new weights to NVMe, or None."""

    @property
    def resident_bytes(self) -> int:
        """Bytes of trainable weights on the device now."""

    @property
    def peak_resident_bytes(self) -> int:
        """The most bytes of trainable weights the device held at once."""

    def close(self) -> None:
        """Waits for copies in flight and frees the host buffers."""
