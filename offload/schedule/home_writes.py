"""HomeWrites: where the optimizer writes a group's new weights, and how they reach the group's home.

Part of :class:`~offload.schedule.offloaded_params.OffloadedParams` (a base class). The native kernel writes
the new low-precision weights straight into a host home, or into a write-back slot whose bytes then go to the
group's swap file (``write_back.py``); fp32 weights are copied from the master chunk by chunk; a home in the
state file needs nothing (Note [weights in the state file], offloaded_params.py); a kept group's device buffer
is refreshed too (Note [kept through the update], update_handoff.py). ``load_weights`` is the same path for a
checkpoint being loaded.
"""

from __future__ import annotations

from typing import Callable

import torch

from offload.layout.flat_group import shard_spans
from offload.schedule.residency import Residency


class HomeWrites:
    """The optimizer side of :class:`OffloadedParams` (its ``__init__`` sets what these methods read)."""

    def kernel_output(self, g: int) -> torch.Tensor | None:
        """Where the Adam kernel writes group g's new low-precision weights (None for fp32; see after_update).
        Every group is released before a step (the scheduler's invariant), so no device copy goes stale, but
        the kept ones, whose device buffers the update refreshes (Note [kept through the update])."""
        if self.residency[g] is not Residency.RELEASED and g not in self._kept and g not in self._lent:
            raise RuntimeError(f"offload: group {g} is on the device during the optimizer step")
        if not self.on_nvme(g):
            return None if self.dtype == torch.float32 else self.weight_home_host[g]
        if self._aliased[g]:  # the state writes carry the new weights home
            return None
        slot = self._slot_of[g] = self._write_back.take_slot()
        staging = self._write_back.staging(slot, self.home_nbytes(g), self.dtype)
        return None if self.dtype == torch.float32 else staging

    def after_update(self, g: int, master_is_staged: bool,
                     covered: list[tuple[int, int]]) -> Callable[[torch.Tensor, int, bool], None] | None:
        """What moves group g's new weights home, chunk by chunk (``master`` chunk, its start, last chunk?),
        once its fp32 master is final (None when the kernel did). ``covered``: the element ranges the kernel
        updates (and writes to the kernel output). A kept group's device buffer is refreshed too."""
        home = self._home_writer(g, covered)
        fresh = self._fresh[g]
        if g in self._lent and not self._returned[g].is_set():  # this update runs on the device buffer itself
            # (lend_master has just lent it: nothing to copy)
            return lambda master, start, last: fresh.set() if last else None
        if g not in self._kept:
            return home
        device, name = self.weight_device[g], self.groups[g].name or "<root>"

        def refresh(master: torch.Tensor, start: int, last: bool) -> None:
            if home is not None:
                home(master, start, last)
            with self.timeline.span("fetch", f"refresh {name}"):
                device[start:start + master.numel()].copy_(master)  # (unsharded: shard = group)
            if last:
                fresh.set()

        return refresh

    def _home_writer(self, g: int,
                     covered: list[tuple[int, int]]) -> Callable[[torch.Tensor, int, bool], None] | None:
        if self._aliased[g]:  # the home is the master itself, in RAM or in the state file
            return None
        if not self.on_nvme(g):
            if self.dtype != torch.float32:
                return None
            home = self.weight_home_host[g]
            return lambda master, start, last: home[start:start + master.numel()].copy_(master)
        pieces = shard_spans(self.groups[g], [(s.offset, s.end) for s in self.groups[g].slots])
        stale = [(p, q) for p, q in pieces if not any(a <= p and q <= b for a, b in covered)]

        def write_home(master: torch.Tensor, start: int, last: bool) -> None:
            slot = self._slot_of[g]  # taken by kernel_output(g) just before this group's first chunk
            staging = self._write_back.staging(slot, self.home_nbytes(g), self.dtype)
            end = start + master.numel()
            if self.dtype == torch.float32:
                staging[start:end].copy_(master)
            else:
                # The kernel wrote the updated parameters only; the slot still holds another group's bytes
                # where a parameter got no gradient this step. Those weights are unchanged: take them from
                # the master (which rounds to exactly the weights they had).
                for a, b in stale:
                    a, b = max(a, start), min(b, end)
                    if a < b:
                        staging[a:b].copy_(master[a - start:b - start])
            if not last:
                return
            del self._slot_of[g]
            self._write_back.issue(g, slot, self.weight_home_nvme[g], staging)

        return write_home

    def load_weights(self, g: int, master: torch.Tensor, start: int, last: bool) -> None:
        """Replaces group g's weights at home with elements [start, start + len) of its fp32 ``master`` (a
        checkpoint being loaded), chunk by chunk in order; an NVMe home is written when the last chunk arrives
        and the write is complete when this returns. The group must be released, and no copy to the device may
        still read its home (``drain_copies``)."""
        if self.residency[g] is not Residency.RELEASED:
            raise RuntimeError(f"offload: group {g} is on the device while its weights are replaced")
        end = start + master.numel()
        if self._aliased[g]:  # the caller has written the master, which is the home
            return
        if not self.on_nvme(g):
            self.weight_home_host[g][start:end].copy_(master)
            return
        if start == 0:
            self._write_back.wait_group(g)  # an older write of this group must not land after the new one
            self._slot_of[g] = self._write_back.take_slot()
        staging = self._write_back.staging(self._slot_of[g], self.home_nbytes(g), self.dtype)
        staging[start:end].copy_(master)
        if last:
            del self._slot_of[g]
            self._write_back.write_now(self.weight_home_nvme[g], staging)
