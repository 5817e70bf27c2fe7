"""WeightHomes: where each offloaded group's compute-dtype weights live between uses, and how new ones get there.

Owned by :class:`~offload.schedule.offloaded_params.OffloadedParams`. A group's home is a host buffer
(``params="cpu"``), a region of a swap file (``params="nvme"``), or the fp32 master itself (a host tensor, or
the master part of its state file), in the group's flat layout (this rank's shard). The native kernel writes
the new low-precision weights straight into a host home, or into a write-back slot whose bytes then go to the
group's swap file (``write_back.py``); fp32 weights are copied from the master chunk by chunk; a home that is
the master needs nothing. ``load_weights`` is the same path for a checkpoint being loaded. Nothing here knows
whether a group is on the device: the owner checks that before it calls (Note [the life of a group],
residency.py).

Note [weights in the state file]: with fp32 weights the compute copy is the master itself. When the optimizer
state is on NVMe too (``weights_in_state``), a second file of the same values would cost one more write of
all weights per step, so a group's home is then the master part of its state: the first ``numel`` fp32 values
of its state file (NVMe) or of its state buffer (a group whose state the host budget kept in RAM). No
write-back slots exist; the optimizer's own state writes put the new weights home, and a fetch of the group
waits until they are complete (``GroupUpdate.written``), not merely until its Adam pass ended.
"""

from __future__ import annotations

from typing import Callable

import torch

from offload.layout.flat_group import FlatGroup, shard_spans
from offload.schedule.write_back import WRITEBACK_SLOTS, WriteBack

LOAD_PIECE_BYTES = 16 << 20  # the largest write-back slot a frozen group needs (see WeightHomes.__init__)
from offload.storage.host_pool import HostBuffer, HostPool
from offload.storage.swap_store import SwapFile, SwapStore

AfterUpdate = Callable[[torch.Tensor, int, bool], None]  # (master chunk, its start, last chunk?)


class WeightHomes:
    def __init__(self, groups: list[FlatGroup], home: str, dtype: torch.dtype, pool: HostPool,
                 swap: SwapStore | None, weights_in_state: bool) -> None:
        """No homes yet (``add`` makes each group's). ``home``: "cpu" or "nvme". ``weights_in_state``: every
        group's home will be the master (no write-back slots)."""
        self.groups = groups
        self.home = home
        self.dtype = dtype
        self.pool = pool
        self.swap = swap
        self.element_size = torch.empty((), dtype=dtype).element_size()
        self.weights_in_state = weights_in_state
        self.weight_home_host: list[torch.Tensor | None] = []  # the home in host memory, or None (on NVMe)
        self.weight_home_nvme: list[SwapFile | None] = []      # the swap file the home is in, or None (in RAM)
        self._home_is_master: list[bool] = []                  # the home is the group's fp32 master itself
        self._home_buffers: list[HostBuffer] = []              # the pool's buffers behind the host homes
        # A slot holds the new weights of a trainable group's home (a shard) for its update. Homes filled outside
        # a step (from values, a checkpoint) are written through a slot piece by piece, so a frozen group, which
        # is never updated, needs no slot of its size: at most LOAD_PIECE_BYTES.
        trainable = max((g.shard_numel for g in groups if not g.frozen), default=0) * self.element_size
        frozen = max((g.shard_numel for g in groups if g.frozen), default=0) * self.element_size
        self._slot_bytes = max(trainable, min(frozen, LOAD_PIECE_BYTES))
        # (with weights in the state files, only frozen groups have homes of their own to write)
        writes_homes = home == "nvme" and (not weights_in_state or frozen > 0)
        self._write_back = WriteBack(pool, swap, self._slot_bytes, WRITEBACK_SLOTS if writes_homes else 0)
        # group -> the write-back slot its new weights are being written into (from kernel_output, or the
        # first chunk of load_weights, to the write of the last chunk)
        self._writeback_slot_of: dict[int, int] = {}

    @property
    def io_failure(self) -> OSError | None:
        """A failed write-back: the group's file is stale, nothing may go on."""
        return self._write_back.io_failure

    @property
    def nvme_bytes_written(self) -> int:
        """Weights written back to NVMe since the start."""
        return self._write_back.nvme_bytes_written

    @property
    def writeback_slots(self) -> list[HostBuffer]:
        return self._write_back.slots

    def nbytes(self, g: int) -> int:
        """Bytes of group g's home (this rank's shard; the whole group with one rank)."""
        return self.groups[g].shard_numel * self.element_size

    def add(self, group: FlatGroup, master: torch.Tensor | None, alias: torch.Tensor | None,
            alias_file: SwapFile | None = None) -> None:
        """Group ``group``'s home (as ``OffloadedParams.add``)."""
        if self.weights_in_state and alias is None and alias_file is None and not group.frozen:
            raise ValueError("offload: with weights in the optimizer state every group needs its master as home")
        self._home_is_master.append(alias is not None or alias_file is not None)
        self.weight_home_nvme.append(alias_file)
        if alias is not None:
            self.weight_home_host.append(alias)
        elif alias_file is not None:
            self.weight_home_host.append(None)
        elif self.home == "cpu":
            buffer = self.pool.allocate(self.nbytes(group.index), f"weights {group.name or '<root>'}")
            self._home_buffers.append(buffer)
            self.weight_home_host.append(buffer.view(self.dtype))
            if master is not None:  # (a new pool buffer is zero already)
                self.weight_home_host[-1].copy_(master[group.lo:group.hi])
        else:
            self.weight_home_host.append(None)
            swap = self.swap.create(f"weights {group.index}", self.nbytes(group.index))
            self.weight_home_nvme[-1] = swap
            if master is not None:  # (a new swap file reads as zeros)
                self._write_pieces(group.index, master[group.lo:group.hi], 0)

    def on_nvme(self, g: int) -> bool:
        """Whether group g's home is a swap file (else a host buffer)."""
        return self.weight_home_nvme[g] is not None

    def is_state_file(self, g: int) -> bool:
        """Whether group g's home is the master part of its optimizer state file."""
        return self._home_is_master[g] and self.on_nvme(g)

    def wait_written(self, g: int) -> None:
        """Returns once the last write-back of group g is complete (a read must see the weights of the last
        step); raises ``io_failure`` if a write failed."""
        self._write_back.wait_group(g)

    def kernel_output(self, g: int) -> torch.Tensor | None:
        """Where the Adam kernel writes group g's new low-precision weights (None for fp32; see ``writer``).
        Update thread; the owner has checked that g's device copy may go stale."""
        if not self.on_nvme(g):
            return None if self.dtype == torch.float32 else self.weight_home_host[g]
        if self._home_is_master[g]:  # the state writes carry the new weights home
            return None
        slot = self._writeback_slot_of[g] = self._write_back.take_slot()
        staging = self._write_back.staging(slot, self.nbytes(g), self.dtype)
        return None if self.dtype == torch.float32 else staging

    def writer(self, g: int, covered: list[tuple[int, int]]) -> AfterUpdate | None:
        """What moves group g's new weights home, chunk by chunk, once its fp32 master is final (None when the
        kernel did, or the home is the master). ``covered``: the element ranges the kernel updates (and writes
        to the kernel output). Called on the update thread."""
        if self._home_is_master[g]:  # the home is the master itself, in RAM or in the state file
            return None
        if not self.on_nvme(g):
            if self.dtype != torch.float32:
                return None
            home = self.weight_home_host[g]
            return lambda master, start, last: home[start:start + master.numel()].copy_(master)
        pieces = shard_spans(self.groups[g], [(s.offset, s.end) for s in self.groups[g].slots])
        stale = [(lo, hi) for lo, hi in pieces if not any(c_lo <= lo and hi <= c_hi for c_lo, c_hi in covered)]

        def write_home(master: torch.Tensor, start: int, last: bool) -> None:
            slot = self._writeback_slot_of[g]  # taken by kernel_output(g) just before this group's first chunk
            staging = self._write_back.staging(slot, self.nbytes(g), self.dtype)
            end = start + master.numel()
            if self.dtype == torch.float32:
                staging[start:end].copy_(master)
            else:
                # The kernel wrote the updated parameters only; the slot still holds another group's bytes
                # where a parameter got no gradient this step. Those weights are unchanged: take them from
                # the master (which rounds to exactly the weights they had).
                for lo, hi in stale:
                    lo, hi = max(lo, start), min(hi, end)
                    if lo < hi:
                        staging[lo:hi].copy_(master[lo - start:hi - start])
            if not last:
                return
            del self._writeback_slot_of[g]
            self._write_back.issue(g, slot, self.weight_home_nvme[g], staging)

        return write_home

    def load_weights(self, g: int, master: torch.Tensor, start: int, last: bool) -> None:
        """Replaces group g's weights at home with elements [start, start + len) of its fp32 ``master``, chunk
        by chunk in order (``start`` a multiple of 2048 elements, as the optimizer's chunks are); an NVMe home is
        written as each chunk arrives, and the write is complete when this returns. No copy to the device may
        still read the home. (``last``: the caller's last chunk; nothing waits for it.)"""
        end = start + master.numel()
        if self._home_is_master[g]:  # the caller has written the master, which is the home
            return
        if not self.on_nvme(g):
            self.weight_home_host[g][start:end].copy_(master)
            return
        if start == 0:
            self._write_back.wait_group(g)  # an older write of this group must not land after the new one
        self._write_pieces(g, master, start)

    def _write_pieces(self, g: int, values: torch.Tensor, start: int) -> None:
        """Writes ``values`` (any dtype; converted) as elements [start, start + len) of group g's NVMe home,
        through one write-back slot, a slot's worth at a time, each write complete before the next. Offsets
        stay 4 KiB aligned: ``start`` and the slot's size are multiples of 2048 elements."""
        slot = self._write_back.take_slot()
        piece = self._slot_bytes // self.element_size
        for a in range(0, values.numel(), piece):
            b = min(a + piece, values.numel())
            staging = self._write_back.staging(slot, (b - a) * self.element_size, self.dtype)
            staging.copy_(values[a:b])
            self._write_back.write_now(self.weight_home_nvme[g], staging, (start + a) * self.element_size)

    def close(self) -> None:
        """Waits for the writes in flight, then frees the write-back slots and the host homes of the pool."""
        self._write_back.close()
        for buffer in self._home_buffers:
            self.pool.release(buffer)
        self._home_buffers.clear()
