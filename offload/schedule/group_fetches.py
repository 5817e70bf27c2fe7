"""GroupFetches: the offloaded groups' device buffers, and the reads and copies that fill them from their homes.

Owned by :class:`~offload.schedule.offloaded_params.OffloadedParams`, which decides when a group is fetched or
released and keeps its residency (Note [the life of a group], residency.py); this object only moves bytes, and
every failure gives the group's device memory back before it raises, so the owner only has to say the group
is home again.

On the CPU device a group's device buffer is a mapping of its own that gives its pages back to the OS on
release (so ``device_memory_limit`` is real memory); a fetch from NVMe reads straight into it, and a fill from
a host home is a synchronous copy (Note [CPU device pages] in ``device_storage``). On CUDA the host buffers are
pinned and a fill is an asynchronous copy on the fetch stream (Note [fetch stream] in ``device_copy``): the
group is FETCHING until its use makes the compute stream wait for the copy (``finish``), so a prefetch overlaps
the kernels of the groups before it.
"""

from __future__ import annotations

import torch

from offload.layout.flat_group import FlatGroup
from offload.schedule.device_copy import HostToDevice
from offload.schedule.device_storage import GroupStorage
from offload.schedule.guarded_parameter import guard, unguard
from offload.schedule.weight_homes import WeightHomes
from offload.storage.host_pool import HostBuffer, HostPool
from offload.storage.io_engine import IoHandle
from offload.storage.swap_store import SwapStore
from offload.timeline import Timeline


class GroupFetches:
    def __init__(self, groups: list[FlatGroup], device: torch.device, dtype: torch.dtype, pool: HostPool,
                 swap: SwapStore | None, homes: WeightHomes, fetch_slots: int, timeline: Timeline) -> None:
        """No device buffers yet (``bind``). ``fetch_slots``: NVMe reads that may be in flight at once (with
        homes on NVMe; none otherwise)."""
        self.groups = groups
        self.device = device
        self.dtype = dtype
        self.pool = pool
        self.swap = swap
        self._homes = homes
        self._timeline = timeline
        self._h2d = HostToDevice(device)
        self._storage: list[GroupStorage] = []
        self.weight_device: list[torch.Tensor] = []  # each group's ``_storage[g].tensor``
        # Whether a group's device buffer holds every rank's shard: a fill writes this rank's shard, and only
        # the owner's ``ensure_resident`` (on the training thread, in the model's order of use) gathers the rest.
        self.gathered = [True] * len(groups)
        self.nvme_bytes_read = 0  # weights read from NVMe since the start
        # A fetch slot is one NVMe read of weights in flight. On CUDA it is a pinned staging buffer that the
        # read fills and the copy to the device empties; on the CPU device the read lands in the group's own
        # buffer (Note [CPU device pages]), so a slot is only a token that bounds the reads in flight.
        self.reads_into_device = device.type == "cpu"
        nslots = fetch_slots if homes.home == "nvme" else 0
        largest = max(g.shard_numel for g in groups) * homes.element_size  # staging holds a home: a shard
        self.fetch_slots: list[HostBuffer] = [] if self.reads_into_device else [
            pool.allocate(largest, f"fetch staging {i}") for i in range(nslots)]
        self._free_fetch_slots = list(range(nslots))
        self._reads_in_flight: dict[int, tuple[int, IoHandle]] = {}  # group -> (its fetch slot, its NVMe read)
        self._read_issued_at: dict[int, float] = {}  # group -> when its NVMe read was issued (for the timeline)
        # CUDA: the copy that last read each fetch slot; the slot takes a new NVMe read only once it is done.
        self._slot_last_copy: list[torch.cuda.Event | None] = [None] * nslots
        self._copies_in_flight: dict[int, torch.cuda.Event] = {}  # group -> its copy to the device, not waited for

    @property
    def asynchronous(self) -> bool:
        """Whether copies to the device run on a stream of their own (CUDA)."""
        return self._h2d.asynchronous

    def bind(self) -> None:
        """Points each parameter at its view of its group's device buffer, then gives every buffer's memory
        back (one group's worth of memory at a time)."""
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

    def unbind(self) -> None:
        """The parameters become plain ``nn.Parameter`` again (their data stays the device buffers' views)."""
        for group in self.groups:
            for slot in group.slots:
                unguard(slot.param)

    def storage_address(self, g: int) -> int:
        """Address of group g's device storage (on CUDA 0 while released; on the CPU the same for the run)."""
        return self._storage[g].address

    def start_copy(self, g: int) -> bool:
        """Fills group g's device buffer from its host home: True when the copy is complete (CPU device), False
        while it runs (CUDA; ``finish`` orders the compute stream after it)."""
        with self._timeline.span("fetch", f"copy {self.groups[g].name or '<root>'}"):
            copied = self._fill(g, self._homes.weight_home_host[g])
        if copied is None:
            return True
        self._copies_in_flight[g] = copied
        return False

    def start_read(self, g: int, reserve: int) -> bool:
        """Issues the NVMe read of group g's home if a fetch slot is free beyond the last ``reserve``; False
        (nothing started) if none is."""
        if len(self._free_fetch_slots) <= reserve:
            return False
        self._homes.wait_written(g)  # the read must see the weights of the last step
        slot = self._free_fetch_slots.pop(0)  # the longest free: its copy has most likely finished
        if self._slot_last_copy[slot] is not None:  # the slot's last copy to the device must have read it
            self._slot_last_copy[slot].synchronize()
            self._slot_last_copy[slot] = None
        if self.reads_into_device:  # straight into the device buffer (Note [CPU device pages])
            group = self.groups[g]
            self._claim(g)
            target = self.weight_device[g][group.lo:group.hi].view(torch.uint8)
        else:
            target = self.fetch_slots[slot].tensor[:self._homes.nbytes(g)]
        try:
            self._reads_in_flight[g] = (slot, self.swap.read(self._homes.weight_home_nvme[g], 0, target))
        except BaseException:
            self._free_fetch_slots.insert(0, slot)
            self._storage[g].give_back()
            raise
        self.nvme_bytes_read += self._homes.nbytes(g)
        self._read_issued_at[g] = self._timeline.now()
        return True

    def finish(self, g: int) -> None:
        """Group g's read and copy are done as far as the compute stream is concerned: blocks for the read,
        not for a CUDA copy (the compute stream waits for it). A failure raises with the memory given back."""
        copied = self._copies_in_flight.pop(g) if g in self._copies_in_flight else self._copy_read(g)
        try:
            self._h2d.wait_ready(copied)
        except BaseException:
            self._storage[g].give_back()
            raise

    def copy_ended_read(self, g: int) -> None:
        """CUDA: starts the copy to the device of group g, whose NVMe read has ended (``ended_reads``), so that
        it runs under the kernels queued next. A failure raises with the memory given back."""
        self._copies_in_flight[g] = self._copy_read(g)

    def _copy_read(self, g: int) -> torch.cuda.Event | None:
        """Waits for group g's NVMe read and copies the slot to the device (asynchronously on CUDA: the
        event); the slot is free again afterwards. A failed read or copy gives the device memory back and
        raises."""
        slot, handle = self._reads_in_flight.pop(g)
        try:
            self.swap.wait(handle)
        except OSError:
            # The file is intact (only the read failed): the group stays home and a later use may retry.
            self._free_fetch_slots.append(slot)
            self._read_issued_at.pop(g, None)
            self._storage[g].give_back()
            raise
        name = self.groups[g].name or "<root>"
        self._timeline.add("nvme read", f"weights {name}", self._read_issued_at.pop(g), self._timeline.now())
        if self.reads_into_device:  # the read filled the device buffer itself
            self._free_fetch_slots.append(slot)
            return None
        try:
            with self._timeline.span("fetch", f"copy {name}"):
                copied = self._fill(g, self.fetch_slots[slot].tensor[:self._homes.nbytes(g)].view(self.dtype))
        except BaseException:  # e.g. the device is out of memory (_fill gave the memory back): the slot is free
            self._free_fetch_slots.append(slot)
            raise
        self._slot_last_copy[slot] = copied
        self._free_fetch_slots.append(slot)
        return copied

    def ended_reads(self) -> list[int]:
        """The groups whose NVMe read has ended and whose copy has not started (never blocks on the disk)."""
        return [g for g, (_, handle) in self._reads_in_flight.items() if self.swap.poll(handle)]

    def reading(self) -> list[int]:
        """The groups whose NVMe read is in flight."""
        return list(self._reads_in_flight)

    def has_free_slot(self) -> bool:
        return bool(self._free_fetch_slots)

    def drop(self, g: int) -> None:
        """Gives group g's device memory back (waits for a read in flight first: its slot must not be reused
        early)."""
        if g in self._reads_in_flight:
            slot, handle = self._reads_in_flight.pop(g)
            try:
                self.swap.wait(handle)
            except OSError:
                pass  # a prefetch nobody uses: its failure does not matter, the group stays home
            self._free_fetch_slots.append(slot)
        else:  # resident, or (CUDA) a prefetch nobody used whose copy may still run: the allocator reuses
            # the block only after the copy has run (Note [fetch stream], 3)
            self._copies_in_flight.pop(g, None)
        self._storage[g].give_back()

    def drain(self) -> None:
        """Blocks until no copy to the device still reads a host buffer."""
        self._h2d.drain()

    def close(self) -> None:
        """Frees the fetch slots (nothing may be in flight: the owner has finished or dropped every fetch, and
        drained the copies)."""
        for buffer in self.fetch_slots:
            self.pool.release(buffer)
        self.fetch_slots.clear()

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
        self.gathered[g] = not self.groups[g].sharded
