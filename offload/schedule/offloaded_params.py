"""OffloadedParams: compute-dtype weights that live in host RAM or on NVMe and visit the device when needed.

Each group has a home for its weights in the compute dtype: a host buffer (``params="cpu"``) or a region of a
swap file (``params="nvme"``), in the group's flat layout. Its device buffer (``weight_device``) keeps one
tensor object for the whole run, the parameters are views into it, and only its storage comes and goes:
``release`` resizes the storage to zero bytes and ``fetch`` resizes it back and copies the weights in. Tensors
that autograd saved in forward are such views too, so they see the weights again once the backward fetch has
refilled the storage (the scheduler guarantees that it has before the backward of that group runs).

The optimizer writes each group's new weights to its home: the native kernel writes them straight into the
host home, or into a write-back slot that is then written to the group's swap file (``write_back``). A fetch
of a group first waits for that group's write-back, and nothing else, so writes overlap the next forward.

Note [weights in the state file]: with fp32 weights the compute copy is the master itself. When the optimizer
state is on NVMe too (``weights_in_state``), a second file of the same values would cost one more write of
all weights per step, so a group's home is then the master part of its state: the first ``numel`` fp32 values
of its state file (NVMe) or of its state buffer (a group whose state the host budget kept in RAM). No
write-back slots exist; the optimizer's own state writes put the new weights home, and a fetch of the group
waits until they are complete (``GroupUpdate.written``), not merely until its Adam pass ended.

With several ranks (Note [rank shards], flat_group.py) a home, its staging and its write-back hold this rank's
shard of the group; a fetch fills that part of the device buffer, and the group's first use after it gathers
the other ranks' parts (``ensure_resident``, the only place that issues the collective).

On the CPU device the device buffer is a mapping of its own that gives its pages back to the OS on release and
is accounted against ``device_memory_limit``; a fetch from NVMe reads straight into it, and a fill from a host
home is a synchronous copy (Note [CPU device pages] in ``device_storage``). On CUDA the host buffers are
pinned and a fill is an asynchronous copy on the fetch stream (Note [fetch stream] in ``device_copy``): the
group is FETCHING until its use makes the compute stream wait for the copy, so a prefetch overlaps the
kernels of the groups before it.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from offload.errors import MemoryBudgetError
from offload.layout.flat_group import FlatGroup
from offload.schedule.device_copy import HostToDevice
from offload.schedule.device_storage import GroupStorage
from offload.schedule.guarded_parameter import guard, unguard
from offload.schedule.home_writes import HomeWrites
from offload.schedule.residency import Residency, ResidencyTable
from offload.schedule.update_handoff import UpdateHandoff
from offload.schedule.write_back import WRITEBACK_SLOTS, WriteBack
from offload.storage.host_pool import HostBuffer, HostPool
from offload.storage.io_engine import IoHandle
from offload.storage.swap_store import SwapFile, SwapStore
from offload.timeline import NO_TIMELINE, Timeline


class OffloadedParams(UpdateHandoff, HomeWrites):
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
        self.groups = groups
        self.device = torch.device(device)
        self._h2d = HostToDevice(self.device)
        self._copying: dict[int, torch.cuda.Event] = {}  # group -> its host -> device copy, not yet waited for
        self.home = home
        self.dtype = dtype
        self.pool = pool
        self.swap = swap
        self.device_limit = device_limit
        self.element_size = torch.empty((), dtype=dtype).element_size()
        self.residency = ResidencyTable(len(groups))
        if gather is None and any(g.sharded for g in groups):
            raise ValueError("offload: sharded groups need the all-gather that completes their fetch")
        self._gather = gather
        # Whether a resident group's device buffer holds every rank's shard: a fill writes this rank's shard,
        # and only ``ensure_resident`` (on the training thread, in the model's order of use) gathers the rest.
        self._gathered = [True] * len(groups)
        self.timeline = timeline
        self._issued: dict[int, float] = {}  # group -> when its NVMe read was issued (for the timeline)
        self._storage: list[GroupStorage] = []
        self.weight_device: list[torch.Tensor] = []  # each group's ``_storage[g].tensor``
        self.weight_home_host: list[torch.Tensor | None] = []
        self.weight_home_nvme: list[SwapFile | None] = []
        self._home_buffers: list[HostBuffer] = []
        self._aliased: list[bool] = []
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.nvme_bytes_read = 0       # weights fetched from NVMe since the start (written: ``nvme_bytes_written``)
        self.fetch_wait_s = 0.0        # compute blocked on fetches (and on the overlapped step's updates)
        largest = max(g.shard_numel for g in groups) * self.element_size  # staging holds a home: a shard
        nslots = fetch_slots if home == "nvme" else 0
        # A fetch slot is one NVMe read of weights in flight. On CUDA it is a pinned staging buffer that the
        # read fills and the copy to the device empties; on the CPU device the read lands in the group's own
        # buffer (Note [CPU device pages]), so a slot is only a token that bounds the reads in flight.
        self._direct = self.device.type == "cpu"
        self._fetch_slots = [] if self._direct else [pool.allocate(largest, f"fetch staging {i}")
                                                     for i in range(nslots)]
        self._free_fetch_slots = list(range(nslots))
        self._fetch: dict[int, tuple[int, IoHandle]] = {}  # group -> (fetch slot, read in flight)
        # CUDA: the copy that last read each fetch slot; the slot takes a new NVMe read only once it is done.
        self._slot_copied: list[torch.cuda.Event | None] = [None] * nslots
        self.weights_in_state = weights_in_state
        self._write_back = WriteBack(pool, swap, largest,
                                     WRITEBACK_SLOTS if home == "nvme" and not weights_in_state else 0)
        self._slot_of: dict[int, int] = {}                  # group -> write-back slot its kernel output uses
        self._init_handoff(len(groups), lend_limit)

    @property
    def io_failure(self) -> OSError | None:
        """A failed write-back: the group's file is stale, nothing may go on."""
        return self._write_back.io_failure

    @property
    def nvme_bytes_written(self) -> int:
        """Weights written back to NVMe since the start."""
        return self._write_back.nvme_bytes_written

    @property
    def _writeback_slots(self) -> list[HostBuffer]:
        return self._write_back.slots

    def nbytes(self, g: int) -> int:
        """Bytes of group g on the device (the whole group)."""
        return self.groups[g].numel * self.element_size

    def home_nbytes(self, g: int) -> int:
        """Bytes of group g's home (this rank's shard; the whole group with one rank)."""
        return self.groups[g].shard_numel * self.element_size

    # ---- set-up ----------------------------------------------------------------------------------------------

    def add(self, group: FlatGroup, master: torch.Tensor | None, alias: torch.Tensor | None,
            alias_file: SwapFile | None = None) -> None:
        """Group ``group``'s home, filled from ``master`` (fp32 flat; None: zeros, filled later with
        ``load_weights``). ``alias``: an fp32 host tensor to use as the home itself (the master in RAM, for
        fp32 weights), or None. ``alias_file``: a swap file whose first ``numel`` fp32 values are the home
        (the group's optimizer state on NVMe, Note [weights in the state file]), or None."""
        if self.weights_in_state and alias is None and alias_file is None:
            raise ValueError("offload: with weights in the optimizer state every group needs its master as home")
        self._aliased.append(alias is not None or alias_file is not None)
        self.weight_home_nvme.append(alias_file)
        if alias is not None:
            self.weight_home_host.append(alias)
        elif alias_file is not None:
            self.weight_home_host.append(None)
        elif self.home == "cpu":
            buffer = self.pool.allocate(self.home_nbytes(group.index), f"weights {group.name or '<root>'}")
            self._home_buffers.append(buffer)
            self.weight_home_host.append(buffer.view(self.dtype))
            if master is not None:  # (a new pool buffer is zero already)
                self.weight_home_host[-1].copy_(master[group.lo:group.hi])
        else:
            self.weight_home_host.append(None)
            swap = self.swap.create(f"weights {group.index}", self.home_nbytes(group.index))
            if master is not None:  # (a new swap file reads as zeros)
                staging = self._write_back.staging(0, self.home_nbytes(group.index), self.dtype)
                staging.copy_(master[group.lo:group.hi])
                self.swap.wait(self.swap.write(swap, 0, staging))
            self.weight_home_nvme[-1] = swap

    def on_nvme(self, g: int) -> bool:
        """Whether group g's home is a swap file (else a host buffer)."""
        return self.weight_home_nvme[g] is not None

    def home_is_state_file(self, g: int) -> bool:
        """Whether group g's weights are read from its optimizer state file (Note [weights in the state file]):
        then a fetch of g after an update must wait for the state writes, ``GroupUpdate.written``."""
        return self._aliased[g] and self.on_nvme(g)

    def bind_parameters(self) -> None:
        """Points each parameter at its view of its group's device buffer, then releases every buffer's storage
        (one group's worth of memory at a time)."""
        for group in self.groups:
            storage = GroupStorage(self.device, self.dtype, group.numel)  # given back (empty) from the start
            # torch makes a view only of a storage that holds it (bounds-checked against the storage's size),
            # so on CUDA the storage takes its full size while the parameters' views are made; the views stay
            # valid across later resizes of the same storage, which is how fetch and release work.
            storage.claim()
            for slot in group.slots:
                slot.param.data = group.view(storage.tensor, slot)
                guard(slot.param, storage, slot.name)  # reads outside a use raise (Note [guarded reads])
            storage.give_back()
            self._storage.append(storage)
            self.weight_device.append(storage.tensor)

    # ---- residency (around the optimizer's updates: update_handoff.py) ---------------------------------------

    def start_fetch(self, g: int, wait_for_update: bool = False, reserve: int = 0, force: bool = False) -> bool:
        """Starts bringing group g to the device if there is room now; False (and nothing started) otherwise,
        also while an overlapped step has not updated g yet, unless ``wait_for_update``. A prefetch passes
        ``reserve``: it may not take the last ``reserve`` staging slots. ``force`` ignores the device limit.
        From host RAM the copy is done here; from NVMe the read is only issued."""
        if self.residency[g] is not Residency.RELEASED:
            return True
        self.reap()
        if not self._updated[g].is_set():
            if not wait_for_update:
                return False
            with self.timeline.span("fetch", f"wait for update {self.groups[g].name or '<root>'}"):
                self._updated[g].wait()
        if self._step_failure is not None:
            raise RuntimeError(f"offload: {self._step_failure}; the weights cannot be fetched")
        if self.io_failure is not None:
            raise RuntimeError(f"offload: writing weights back to NVMe failed ({self.io_failure}); the weights "
                               "cannot be fetched")
        if not force and not self.has_room(self.nbytes(g)):
            return False
        if self.on_nvme(g):
            if len(self._free_fetch_slots) <= reserve:
                return False
            self._write_back.wait_group(g)  # the read must see the weights of the last step
            slot = self._free_fetch_slots.pop(0)  # the longest free: its copy has most likely finished
            if self._slot_copied[slot] is not None:  # the slot's last copy to the device must have read it
                self._slot_copied[slot].synchronize()
                self._slot_copied[slot] = None
            if self._direct:  # straight into the device buffer (Note [CPU device pages])
                group = self.groups[g]
                self._claim(g)
                target = self.weight_device[g][group.lo:group.hi].view(torch.uint8)
            else:
                target = self._fetch_slots[slot].tensor[:self.home_nbytes(g)]
            try:
                self._fetch[g] = (slot, self.swap.read(self.weight_home_nvme[g], 0, target))
            except BaseException:
                self._free_fetch_slots.insert(0, slot)
                self._storage[g].give_back()
                raise
            self.nvme_bytes_read += self.home_nbytes(g)
            self._issued[g] = self.timeline.now()
            self._account(g, +1)
            self.residency.move(g, Residency.FETCHING)
            return True
        self._account(g, +1)
        try:
            with self.timeline.span("fetch", f"copy {self.groups[g].name or '<root>'}"):
                copied = self._fill(g, self.weight_home_host[g])
        except BaseException:  # e.g. the device is out of memory: the group stays home
            self._account(g, -1)
            raise
        if copied is None:
            self.residency.move(g, Residency.RESIDENT)
        else:
            self._copying[g] = copied
            self.residency.move(g, Residency.FETCHING)
        return True

    def ensure_resident(self, g: int) -> None:
        """Blocks until group g's weights are on the device. Raises MemoryBudgetError if it does not fit
        ``device_memory_limit`` next to the groups resident now. Time spent here for a group that was not
        resident yet, or whose refresh by the update was still running, is added to ``fetch_wait_s``."""
        if g in self._kept or g in self._lent:
            if not self._fresh[g].is_set():  # its update is refreshing (or, lent, updating) the device buffer
                start = time.perf_counter()
                with self.timeline.span("fetch", f"wait for refresh {self.groups[g].name or '<root>'}"):
                    self._fresh[g].wait()
                self.fetch_wait_s += time.perf_counter() - start
            if self._step_failure is not None:
                raise RuntimeError(f"offload: {self._step_failure}; the weights cannot be fetched")
            self._kept.discard(g)  # used: an ordinary resident group from now on
            self._reapable.discard(g)  # (lent: its release still waits for the writes that read it)
            self._settle_lent(g)
        if self.residency[g] is Residency.RESIDENT and self._gathered[g]:
            return
        start = time.perf_counter()
        try:
            if self.residency[g] is not Residency.RESIDENT:
                self.advance()
                self._make_resident(g)
            if not self._gathered[g]:  # several ranks: the other shards (Note [collective order], ranks.py)
                group, weights = self.groups[g], self.weight_device[g]
                with self.timeline.span("fetch", f"all-gather {group.name or '<root>'}"):
                    self._gather(weights, weights[group.lo:group.hi])
                self._gathered[g] = True
        finally:
            self.fetch_wait_s += time.perf_counter() - start

    def _make_resident(self, g: int) -> None:
        while self.residency[g] is Residency.RELEASED and self._reapable and \
                not self.start_fetch(g, wait_for_update=True):
            # no room: the lent groups nobody uses go home as soon as their writes are complete
            with self.timeline.span("fetch", "wait for lent weights"):
                self._returned[min(self._reapable)].wait()
            self.reap()
        if self.residency[g] is Residency.RELEASED and not self.start_fetch(g, wait_for_update=True):
            if self.on_nvme(g) and not self._free_fetch_slots:
                raise RuntimeError("offload: every fetch staging slot is in use; this is a scheduler bug")
            raise MemoryBudgetError(f"fetching parameter group {self.groups[g].name or '<root>'!r} "
                                    f"({self.nbytes(g)} bytes) next to {self.resident_bytes} resident bytes",
                                    self.nbytes(g), max(0, self.device_limit - self.resident_bytes),
                                    "device_memory_limit")
        if self.residency[g] is Residency.FETCHING:  # a read from NVMe, or (CUDA) a copy to the device
            self._h2d.wait_ready(self._copying.pop(g) if g in self._copying else self._copy_read(g))
            self.residency.move(g, Residency.RESIDENT)

    def _copy_read(self, g: int) -> torch.cuda.Event | None:
        """Waits for group g's NVMe read and copies the slot to the device (asynchronously on CUDA: the
        event); the slot is free again afterwards. A failed read leaves the group RELEASED and raises."""
        slot, handle = self._fetch.pop(g)
        try:
            self.swap.wait(handle)
        except OSError:
            # The file is intact (only the read failed): the group stays home and a later use may retry.
            self._free_fetch_slots.append(slot)
            self._issued.pop(g, None)
            self._storage[g].give_back()
            self._account(g, -1)
            self.residency.move(g, Residency.RELEASED)
            raise
        name = self.groups[g].name or "<root>"
        self.timeline.add("nvme read", f"weights {name}", self._issued.pop(g), self.timeline.now())
        if self._direct:  # the read filled the device buffer itself
            self._free_fetch_slots.append(slot)
            return None
        try:
            with self.timeline.span("fetch", f"copy {name}"):
                copied = self._fill(g, self._fetch_slots[slot].tensor[:self.home_nbytes(g)].view(self.dtype))
        except BaseException:  # e.g. the device is out of memory: the group stays home, the slot is free
            self._free_fetch_slots.append(slot)
            self._account(g, -1)
            self.residency.move(g, Residency.RELEASED)
            raise
        self._slot_copied[slot] = copied
        self._free_fetch_slots.append(slot)
        return copied

    def advance(self) -> None:
        """CUDA: starts the device copy of every prefetched group whose NVMe read has ended, so that the copy
        runs under the kernels queued next instead of after them. Never blocks on the disk."""
        if not self._h2d.asynchronous:
            return
        for g in [g for g, (_, handle) in self._fetch.items() if self.swap.poll(handle)]:
            try:
                self._copying[g] = self._copy_read(g)
            except (OSError, RuntimeError):
                pass  # the group went back home (read failed, or no device memory); its use fetches it again

    def release(self, g: int) -> None:
        """Frees group g's device storage (waits for a read in flight first: its slot must not be reused
        early)."""
        state = self.residency[g]
        if state is Residency.RELEASED:
            return
        if g in self._kept:  # a refresh in flight may still write the buffer (Note [kept through the update])
            self._fresh[g].wait()
            self._kept.discard(g)
        if g in self._lent:  # the state writes may still read it (Note [lent to the update])
            self._returned[g].wait()
            self._lent.discard(g)
            self._reapable.discard(g)
        self._lendable.discard(g)
        if g in self._fetch:
            slot, handle = self._fetch.pop(g)
            try:
                self.swap.wait(handle)
            except OSError:
                pass  # a prefetch nobody uses: its failure does not matter, the group stays home
            self._free_fetch_slots.append(slot)
        else:  # resident, or (CUDA) a prefetch nobody used whose copy may still run: the allocator reuses
            # the block only after the copy has run (Note [fetch stream], 3)
            self._copying.pop(g, None)
        self._storage[g].give_back()
        self._account(g, -1)
        self.residency.move(g, Residency.RELEASED)

    def release_after_use(self, g: int) -> None:
        """A use of group g is over and none follows soon: ``release``, except for a lent group whose state
        writes still read its buffer (Note [lent to the update]): that one goes home once they are complete
        (``reap``), so that the training thread does not wait for the disk here."""
        if g in self._lent and not self._returned[g].is_set():
            self._reapable.add(g)
            return
        self.release(g)

    def storage_address(self, g: int) -> int:
        """Address of group g's device storage (on CUDA 0 while released; on the CPU fixed for the run)."""
        return self._storage[g].address

    def materialize(self) -> None:
        """Brings every group to the device, ignoring the limit, for good: the model works on its own again
        (used when the engine closes)."""
        for g in range(len(self.groups)):
            if self.residency[g] is Residency.RELEASED:
                self.start_fetch(g, wait_for_update=True, force=True)
            self.ensure_resident(g)
        self.unguard_parameters()

    def copy_to_host(self) -> list[list[torch.Tensor]]:
        """The current weights of every parameter (per group, per slot) in CPU tensors of their own, brought
        through the device one group at a time within ``device_memory_limit`` (used when the engine closes and
        the whole model does not fit the device)."""
        copies = []
        for g, group in enumerate(self.groups):
            resident_before = self.residency[g] is not Residency.RELEASED
            self.ensure_resident(g)
            # one copy per group, always a new one (on the CPU device the storage is freed below); the slots are
            # views of it
            flat = self.weight_device[g].to("cpu", copy=True)
            copies.append([group.view(flat, slot) for slot in group.slots])
            if not resident_before:
                self.release(g)
        return copies

    def unguard_parameters(self) -> None:
        """The parameters become plain ``nn.Parameter`` again (the engine lets go of them)."""
        for group in self.groups:
            for slot in group.slots:
                unguard(slot.param)

    def release_all(self, keep_kept: bool = False) -> None:
        """Releases every group (with ``keep_kept``, all but the kept ones, and the lent ones whose writes are
        not complete yet, which ``reap`` sends home later: Note [kept through the update], [lent to the
        update])."""
        for g in range(len(self.groups)):
            if not (keep_kept and (g in self._kept or (g in self._reapable and not self._returned[g].is_set()))):
                self.release(g)

    def resident_groups(self) -> list[int]:
        return [g for g in range(len(self.groups)) if self.residency[g] is not Residency.RELEASED]

    def _fill(self, g: int, source: torch.Tensor) -> torch.cuda.Event | None:
        """Allocates group g's device storage and copies ``source`` into it; the copy's event on CUDA. If
        that fails (e.g. no device memory), the storage is released again before the error goes on."""
        weights, group = self.weight_device[g], self.groups[g]
        try:
            self._claim(g)
            return self._h2d.copy(weights[group.lo:group.hi], source)
        except BaseException:
            self._storage[g].give_back()
            raise

    def _claim(self, g: int) -> None:
        """Group g's device memory, about to receive this rank's shard (the other ranks' still to gather)."""
        self._storage[g].claim()
        self._gathered[g] = not self.groups[g].sharded

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would still fit the device limit next to the groups resident now."""
        return self.device_limit is None or self.resident_bytes + nbytes <= self.device_limit

    def _account(self, g: int, sign: int) -> None:
        self.resident_bytes += sign * self.nbytes(g)
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    # ---- optimizer side (the new weights' way home: home_writes.py) -----------------------------------------

    def drain_copies(self) -> None:
        """Blocks until no copy to the device still reads a host buffer (before the homes are rewritten
        outside a step, e.g. by a checkpoint load)."""
        self._h2d.drain()

    def close(self) -> None:
        try:
            for g in list(self._fetch):
                if self.residency[g] is Residency.FETCHING:
                    self.ensure_resident(g)
        finally:
            self._h2d.drain()  # the copies read host buffers that are freed below, whatever happened above
        self._write_back.close()
        for buffer in self._home_buffers + self._fetch_slots:
            self.pool.release(buffer)
        self._home_buffers.clear()
        self._fetch_slots.clear()
