"""OffloadedParams: compute-dtype weights that live in host RAM or on NVMe and visit the device when needed.

Each group has a home for its weights in the compute dtype (``weight_homes.py``: a host buffer, a region of a
swap file, or the fp32 master itself, Note [weights in the state file]). Its device buffer (``weight_device``)
keeps one tensor object for the whole run, the parameters are views into it, and only its storage comes and
goes: ``release`` gives the memory back and ``start_fetch`` claims it and fills it (``group_fetches.py``).
Tensors that autograd saved in forward are such views too, so they see the weights again once the backward
fetch has refilled the storage (the scheduler guarantees that it has before the backward of that group runs).

The optimizer writes each group's new weights to its home (``weight_homes.py``). A fetch of a group first
waits for that group's write-back, and nothing else, so writes overlap the next forward. Around the updates a
group may stay on the device, kept or lent to its update (``update_handoff.py``).

This object owns those three parts and each group's ``Residency`` (Note [the life of a group], residency.py):
it alone decides when a group is fetched or released, and accounts its bytes against ``device_memory_limit``.

With several ranks (Note [rank shards], flat_group.py) a home, its staging and its write-back hold this rank's
shard of the group; a fetch fills that part of the device buffer, and the group's first use after it gathers
the other ranks' parts (``ensure_resident``, the only place that issues the collective).

Frozen parameters are offloaded in groups of their own (Note [frozen groups], flat_group.py).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from offload.errors import MemoryBudgetError
from offload.layout.flat_group import FlatGroup
from offload.schedule.group_fetches import GroupFetches
from offload.schedule.residency import KEPT_STATES, LENT_STATES, ON_DEVICE, RELEASED, Residency, ResidencyTable
from offload.schedule.update_handoff import UpdateHandoff
from offload.schedule.weight_homes import AfterUpdate, WeightHomes
from offload.storage.host_pool import HostBuffer, HostPool
from offload.storage.swap_store import SwapFile, SwapStore
from offload.timeline import NO_TIMELINE, Timeline

# kernel_output: the states in which an update may rewrite a group's weights (its device copy, if any, is kept
# or lent, so the update refreshes it or runs on it)
_MAY_BE_UPDATED = RELEASED | KEPT_STATES | LENT_STATES


class OffloadedParams:
    def __init__(self, groups: list[FlatGroup], home: str, dtype: torch.dtype, pool: HostPool,
                 swap: SwapStore | None, device_limit: int | None, fetch_slots: int,
                 timeline: Timeline = NO_TIMELINE, device: torch.device = torch.device("cpu"),
                 weights_in_state: bool = False,
                 gather: Callable[[torch.Tensor, torch.Tensor], None] | None = None, lend_limit: int = 0) -> None:
        """``home``: "cpu" or "nvme". ``fetch_slots``: host staging buffers for NVMe reads in flight (the
        current group plus the prefetched ones). ``weights_in_state``: every group's home will be the master
        part of its optimizer state (Note [weights in the state file]; fp32 only), so no write-back slots.
        ``gather(full, shard)``: with several ranks, the all-gather that fills a group's device buffer from
        every rank's shard once this rank's is in place (Note [rank shards]). ``lend_limit``: how many groups
        that no forward keeps may stay lent to their update at once (Note [lent to the update])."""
        if weights_in_state and dtype != torch.float32:
            raise ValueError("offload: weights can live in the optimizer state only in fp32")
        if gather is None and any(g.sharded for g in groups):
            raise ValueError("offload: sharded groups need the all-gather that completes their fetch")
        self.groups = groups
        self.device = torch.device(device)
        self.dtype = dtype
        self.pool = pool
        self.swap = swap
        self.device_limit = device_limit
        self.timeline = timeline
        self.element_size = torch.empty((), dtype=dtype).element_size()
        names = [g.name for g in groups]
        self.residency = ResidencyTable(names)  # Note [the life of a group]
        self._handoff = UpdateHandoff(self.residency, names, lend_limit, timeline)
        self._homes = WeightHomes(groups, home, dtype, pool, swap, weights_in_state)
        self._fetches = GroupFetches(groups, self.device, dtype, pool, swap, self._homes,
                                     fetch_slots, timeline)
        self.weight_device = self._fetches.weight_device  # each group's device buffer (empty while released)
        self.home = home
        self.weights_in_state = weights_in_state
        # the host buffers that stage NVMe reads and write-backs (the lists their owners empty at close)
        self._fetch_slots: list[HostBuffer] = self._fetches.fetch_slots
        self._writeback_slots: list[HostBuffer] = self._homes.writeback_slots
        self._gather = gather
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.fetch_wait_s = 0.0        # compute blocked on fetches (and on the overlapped step's updates)

    @property
    def io_failure(self) -> OSError | None:
        """A failed write-back: the group's file is stale, nothing may go on."""
        return self._homes.io_failure

    @property
    def nvme_bytes_written(self) -> int:
        """Weights written back to NVMe since the start."""
        return self._homes.nvme_bytes_written

    @property
    def nvme_bytes_read(self) -> int:
        """Weights fetched from NVMe since the start."""
        return self._fetches.nvme_bytes_read

    def nbytes(self, g: int) -> int:
        """Bytes of group g on the device (the whole group)."""
        return self.groups[g].numel * self.element_size

    def home_nbytes(self, g: int) -> int:
        """Bytes of group g's home (this rank's shard; the whole group with one rank)."""
        return self._homes.nbytes(g)

    def add(self, group: FlatGroup, master: torch.Tensor | None, alias: torch.Tensor | None,
            alias_file: SwapFile | None = None) -> None:
        """Group ``group``'s home, filled from ``master`` (fp32 flat; None: zeros, filled later with
        ``load_weights``). ``alias``: an fp32 host tensor to use as the home itself (the master in RAM, for
        fp32 weights), or None. ``alias_file``: a swap file whose first ``numel`` fp32 values are the home
        (the group's optimizer state on NVMe, Note [weights in the state file]), or None."""
        self._homes.add(group, master, alias, alias_file)

    def home_is_state_file(self, g: int) -> bool:
        """Whether group g's weights are read from its optimizer state file (Note [weights in the state file]):
        then a fetch of g after an update must wait for the state writes, ``GroupUpdate.written``."""
        return self._homes.is_state_file(g)

    def bind_parameters(self) -> None:
        """Points each parameter at its view of its group's device buffer, then releases every buffer's storage
        (one group's worth of memory at a time)."""
        self._fetches.bind()

    # ---- fetch and release (Note [the life of a group]; around the updates: update_handoff.py) ----------------

    def start_fetch(self, g: int, wait_for_update: bool = False, reserve: int = 0, force: bool = False) -> bool:
        """Starts bringing group g to the device if there is room now; False (and nothing started) otherwise,
        also while an overlapped step has not updated g yet, unless ``wait_for_update``. A prefetch passes
        ``reserve``: it may not take the last ``reserve`` staging slots. ``force`` ignores the device limit.
        From host RAM the copy is done here; from NVMe the read is only issued."""
        if self.residency[g] not in RELEASED:
            return True
        self.release_returned()
        if not self._handoff.wait_for_home(g, wait_for_update):
            return False
        if self.io_failure is not None:
            raise RuntimeError(f"offload: writing weights back to NVMe failed ({self.io_failure}); the weights "
                               "cannot be fetched")
        if not force and not self.has_room(self.nbytes(g)):
            return False
        if self._homes.on_nvme(g):
            if not self._fetches.start_read(g, reserve):
                return False
            self._account(g, +1)
            self.residency.move(g, Residency.FETCHING)
            return True
        self._account(g, +1)
        try:
            complete = self._fetches.start_copy(g)
        except BaseException:  # e.g. the device is out of memory: the group stays home
            self._account(g, -1)
            raise
        self.residency.move(g, Residency.RESIDENT if complete else Residency.FETCHING)
        return True

    def ensure_resident(self, g: int) -> None:
        """Blocks until group g's weights are on the device. Raises MemoryBudgetError if it does not fit
        ``device_memory_limit`` next to the groups resident now. Time spent here for a group that was not
        resident yet, or whose refresh by the update was still running, is added to ``fetch_wait_s``."""
        if self.residency[g] in KEPT_STATES or self.residency[g] in LENT_STATES:
            self.fetch_wait_s += self._handoff.begin_use(g)
        if self.residency[g] in ON_DEVICE and self._fetches.gathered[g]:
            return
        start = time.perf_counter()
        try:
            if self.residency[g] not in ON_DEVICE:
                self.advance()
                self._make_resident(g)
            if not self._fetches.gathered[g]:  # several ranks: the other shards (Note [collective order], ranks.py)
                group, weights = self.groups[g], self.weight_device[g]
                with self.timeline.span("fetch", f"all-gather {group.name or '<root>'}"):
                    self._gather(weights, weights[group.lo:group.hi])
                self._fetches.gathered[g] = True
        finally:
            self.fetch_wait_s += time.perf_counter() - start

    def _make_resident(self, g: int) -> None:
        while self.residency[g] in RELEASED and self.residency.count(Residency.LENT) and \
                not self.start_fetch(g, wait_for_update=True):
            # no room: the lent groups nobody uses go home as soon as their writes are complete
            self._handoff.wait_until_a_loan_returns()
            self.release_returned()
        if self.residency[g] in RELEASED and not self.start_fetch(g, wait_for_update=True):
            if self._homes.on_nvme(g) and not self._fetches.has_free_slot():
                raise RuntimeError("offload: every fetch staging slot is in use; this is a scheduler bug")
            raise MemoryBudgetError(f"fetching parameter group {self.groups[g].name or '<root>'!r} "
                                    f"({self.nbytes(g)} bytes) next to {self.resident_bytes} resident bytes",
                                    self.nbytes(g), max(0, self.device_limit - self.resident_bytes),
                                    "device_memory_limit")
        if self.residency[g] is Residency.FETCHING:  # a read from NVMe, or (CUDA) a copy to the device
            self._fetch_step(self._fetches.finish, g)
            self.residency.move(g, Residency.RESIDENT)

    def advance(self) -> None:
        """CUDA: starts the device copy of every prefetched group whose NVMe read has ended, so that the copy
        runs under the kernels queued next instead of after them. Never blocks on the disk."""
        if not self._fetches.asynchronous:
            return
        for g in self._fetches.ended_reads():
            try:
                self._fetch_step(self._fetches.copy_ended_read, g)
            except (OSError, RuntimeError):
                pass  # the group went back home (read failed, or no device memory); its use fetches it again

    def _fetch_step(self, step: Callable[[int], None], g: int) -> None:
        """``step(g)`` of fetching group g; if it fails (its memory given back), g is home again."""
        try:
            step(g)
        except BaseException:
            self._account(g, -1)
            self.residency.move(g, self._handoff.state_at_home(g))
            raise

    def release(self, g: int) -> None:
        """Frees group g's device storage (waits for a read in flight first: its slot must not be reused
        early; and for what an update still does with a kept or lent buffer)."""
        if self.residency[g] in RELEASED:
            return
        self._handoff.wait_until_free(g)  # (Note [kept through the update], [lent to the update])
        self._fetches.drop(g)
        self._account(g, -1)
        self.residency.move(g, self._handoff.state_at_home(g))

    def release_after_use(self, g: int) -> None:
        """A use of group g is over and none follows soon: ``release``, except for a lent group whose state
        writes still read its buffer (Note [lent to the update]): that one goes home once they are complete
        (``release_returned``), so that the training thread does not wait for the disk here."""
        if not self._handoff.lent_after_use(g):
            self.release(g)

    def release_all(self, keep_kept: bool = False) -> None:
        """Releases every group (with ``keep_kept``, all but the kept ones, and the lent ones whose writes are
        not complete yet, which ``release_returned`` sends home later: Note [kept through the update], [lent to
        the update])."""
        for g in range(len(self.groups)):
            if not (keep_kept and (self.residency[g] in KEPT_STATES or self._handoff.lent_with_writes_running(g))):
                self.release(g)

    def resident_groups(self) -> list[int]:
        """The groups with device memory now (fetching, or holding their weights)."""
        return [g for g in range(len(self.groups)) if self.residency[g] not in RELEASED]

    def storage_address(self, g: int) -> int:
        """Address of group g's device storage (on CUDA 0 while released; on the CPU the same for the run)."""
        return self._fetches.storage_address(g)

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would still fit the device limit next to the groups resident now."""
        return self.device_limit is None or self.resident_bytes + nbytes <= self.device_limit

    def _account(self, g: int, sign: int) -> None:
        self.resident_bytes += sign * self.nbytes(g)
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    # ---- handing groups to and from the updates (update_handoff.py) -------------------------------------------

    def expect_update(self, groups: list[int], drain: bool = True) -> None:
        """An overlapped step is about to update ``groups``: fetches of them wait until ``mark_updated``.
        With ``drain``, every copy still reading a host home finishes first (the kernel rewrites the homes).
        An update during backward passes False: its group's last copy was consumed by the group's backward
        kernels, which the update waits for through the gradient copies' events, and a prefetch of the group
        that nobody used is discarded (its result is never read)."""
        if drain:
            self._fetches.drain()
        self._handoff.expect_update(groups)

    def mark_updated(self, g: int) -> None:
        """Group g's new weights are home (for a home in the state file: its writes are complete, so a lent
        device buffer is no longer read by them either). Update thread."""
        self._handoff.mark_updated(g)

    def settle_updates(self) -> None:
        """No update is running or will run (the caller has joined the step): fetches stop waiting for updates
        that were announced but never happened (a step interrupted before it started)."""
        self._handoff.settle()

    def abort_updates(self, reason: str) -> None:
        """The overlapped step failed: nobody may wait for its updates any longer. (Its transfers are waited
        for before the failure is reported, so no write still reads a lent buffer.)"""
        self._handoff.abort(reason)

    def can_lend(self, g: int) -> bool:
        """Whether group g's device buffer can be its update's master (Note [lent to the update])."""
        return self._fetches.reads_into_device and self.home_is_state_file(g) and not self.groups[g].sharded

    def lend_to_updates(self, on: bool) -> None:
        """Whether each group's update follows as soon as backward is done with it (``backward_step``), so
        that its device buffer may be lent to the update (Note [lent to the update]). Turning it off withdraws
        the offers no update took."""
        self._handoff.lend_to_updates(on)

    def lend_master(self, g: int) -> torch.Tensor | None:
        """Group g's device buffer, for its update about to be built to use as its master, or None (then the
        update reads the master from the state file). Training thread."""
        return self.weight_device[g] if self._handoff.lend(g) else None

    def release_returned(self) -> None:
        """Sends home the lent groups nobody has used whose update's writes are complete."""
        for g in self._handoff.returned_loans():
            self.release(g)

    def set_keep_candidates(self, groups: list[int], reserve_bytes: int) -> None:
        """The groups the next forward uses first, which backward may keep on the device (Note [kept through
        the update]); ``reserve_bytes``: room that must stay free next to them for the next use. A group still
        kept from the last backward was not used by the forward since (a use ends the keep): it goes home now,
        rather than stay on the device for a forward that may never use it."""
        for g in self.residency.groups_in(*KEPT_STATES):
            self.release(g)
        self._handoff.set_keep_candidates(  # (a frozen group has no update to be kept through)
            [g for g in groups if self._fetches.reads_into_device and not self.groups[g].sharded
             and not self.groups[g].frozen], reserve_bytes)

    def release_or_keep(self, g: int) -> None:
        """Backward gave every parameter of group g its gradient: keeps g on the device if it is a candidate
        and the device limit leaves room for the next use next to it, or if its update is to take its buffer
        (Note [lent to the update]); else releases it."""
        self.release_returned()
        self._handoff.end_loan_if_returned(g)  # (lent in an earlier step and used since: long complete)
        if not (self._fetches.gathered[g] and self.has_room(self._handoff.keep_reserve)
                and self._handoff.keep_or_offer(g, self.can_lend(g))):
            self.release(g)

    def kept(self) -> set[int]:
        """The groups kept on the device for the next forward now."""
        return set(self.residency.groups_in(*KEPT_STATES))

    # ---- the optimizer side (the new weights' way home: weight_homes.py) --------------------------------------

    def kernel_output(self, g: int) -> torch.Tensor | None:
        """Where the Adam kernel writes group g's new low-precision weights (None for fp32; see after_update).
        Every group is released before a step (the scheduler's invariant), so no device copy goes stale, but
        the kept and lent ones, whose device buffers the update refreshes or runs on."""
        if self.residency[g] not in _MAY_BE_UPDATED:
            raise RuntimeError(f"offload: group {g} is on the device during the optimizer step")
        return self._homes.kernel_output(g)

    def after_update(self, g: int, master_is_staged: bool, covered: list[tuple[int, int]]) -> AfterUpdate | None:
        """What moves group g's new weights home, chunk by chunk (``master`` chunk, its start, last chunk?),
        once its fp32 master is final (None when the kernel did). ``covered``: the element ranges the kernel
        updates (and writes to the kernel output). A kept group's device buffer is refreshed too."""
        return self._handoff.after_update(g, self._homes.writer(g, covered), self.weight_device[g])

    def load_weights(self, g: int, master: torch.Tensor, start: int, last: bool) -> None:
        """Replaces group g's weights at home with elements [start, start + len) of its fp32 ``master`` (a
        checkpoint being loaded), chunk by chunk in order; an NVMe home is written when the last chunk arrives
        and the write is complete when this returns. The group must be released, and no copy to the device may
        still read its home (``drain_copies``)."""
        if self.residency[g] not in RELEASED:
            raise RuntimeError(f"offload: group {g} is on the device while its weights are replaced")
        self._homes.load_weights(g, master, start, last)

    def drain_copies(self) -> None:
        """Blocks until no copy to the device still reads a host buffer (before homes are rewritten)."""
        self._fetches.drain()

    def materialize(self) -> None:
        """Brings every group to the device, ignoring the limit, for good: the model works on its own again
        (used when the engine closes)."""
        for g in range(len(self.groups)):
            if self.residency[g] in RELEASED:
                self.start_fetch(g, wait_for_update=True, force=True)
            self.ensure_resident(g)
        self.unguard_parameters()

    def copy_to_host(self) -> list[list[torch.Tensor]]:
        """The current weights of every parameter (per group, per slot) in CPU tensors of their own, one group
        at a time (``group_copy``; when the engine closes and the model does not fit the device)."""
        flats = [self.group_copy(g) for g in range(len(self.groups))]  # (the slots are views of them)
        return [[group.view(flat, slot) for slot in group.slots] for group, flat in zip(self.groups, flats)]

    def group_copy(self, g: int) -> torch.Tensor:
        """Group g's current weights (the whole group, flat) in a new CPU tensor, brought through the device
        within ``device_memory_limit``; g is left as resident as it was. Collective with several ranks."""
        resident_before = self.residency[g] not in RELEASED
        self.ensure_resident(g)
        # always a new tensor: on the CPU device the storage is given back below
        flat = self.weight_device[g].to("cpu", copy=True)
        if not resident_before:
            self.release(g)
        return flat

    def unguard_parameters(self) -> None:
        """The parameters become plain ``nn.Parameter`` again (the engine lets go of them)."""
        self._fetches.unbind()

    def close(self) -> None:
        """Finishes the reads in flight and frees the host buffers (homes, fetch and write-back slots)."""
        try:
            for g in self._fetches.reading():
                if self.residency[g] is Residency.FETCHING:
                    self.ensure_resident(g)
        finally:
            self._fetches.drain()  # the copies read host buffers that are freed below, whatever happened above
        self._homes.close()
        self._fetches.close()
