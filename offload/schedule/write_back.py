"""WriteBack: the host slots through which new weights go to their swap files, and the writes in flight.

The optimizer's kernel writes a group's new low-precision weights into a slot (``take_slot``); once the
group's last chunk is done the slot is written to the group's swap file (``issue``). Two slots: the write of
group j runs while the kernel fills the slot of group j+1. A slot is handed out again only once its previous
write is complete, and a fetch of a group first waits for that group's write (``wait_group``), so a read
never sees older weights than the last step wrote.

Thread use: the update thread takes slots and issues writes, the training thread waits for groups' writes
before fetching them; ``_lock`` guards the bookkeeping both touch. A write is waited for by whichever comes
first, the next fetch of its group or the next use of its slot (possibly on different threads): the first one
waits on the I/O engine, anyone else on the write's event, set once that wait has returned (both kept by
handle id; an id in neither is complete). A failed write is kept in ``io_failure``: the group's file then
holds neither the old nor the new weights, and every later wait raises it.
"""

from __future__ import annotations

import threading

import torch

from offload.storage.host_pool import HostBuffer, HostPool
from offload.storage.io_engine import IoHandle
from offload.storage.swap_store import SwapFile, SwapStore

WRITEBACK_SLOTS = 2  # new weights of group j are written to NVMe while the kernel fills the slot for j+1


class WriteBack:
    def __init__(self, pool: HostPool, swap: SwapStore | None, slot_bytes: int, nslots: int) -> None:
        self.pool = pool
        self.swap = swap
        self.slots: list[HostBuffer] = [pool.allocate(slot_bytes, f"write-back staging {i}") for i in range(nslots)]
        self.nvme_bytes_written = 0
        self.io_failure: OSError | None = None
        self._group_write: dict[int, IoHandle] = {}  # group -> its weights' write in flight
        self._slot_write: list[IoHandle | None] = [None] * nslots
        self._next_slot = 0
        self._unwaited: dict[int, IoHandle] = {}
        self._write_done: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def staging(self, slot: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``nbytes`` of slot ``slot`` as ``dtype``."""
        return self.slots[slot].tensor[:nbytes].view(dtype)

    def take_slot(self) -> int:
        """The next slot in turn, once its previous write is complete (it is about to be refilled)."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % len(self.slots)
        if self._slot_write[slot] is not None:
            self._wait(self._slot_write[slot])
            self._slot_write[slot] = None
        return slot

    def issue(self, g: int, slot: int, file: SwapFile, staging: torch.Tensor) -> None:
        """Starts writing ``staging`` (a view of ``slot``) as group g's weights to ``file``."""
        handle = self.swap.write(file, 0, staging)
        with self._lock:
            self.nvme_bytes_written += staging.numel() * staging.element_size()
            self._group_write[g] = handle
            self._slot_write[slot] = handle
            self._unwaited[handle.id] = handle
            self._write_done[handle.id] = threading.Event()

    def write_now(self, file: SwapFile, staging: torch.Tensor, offset: int = 0) -> None:
        """Writes ``staging`` to ``file`` at byte ``offset`` and waits for it (a checkpoint load, outside any
        step)."""
        handle = self.swap.write(file, offset, staging)
        try:
            self.swap.wait(handle)
        except OSError as e:
            self.io_failure = e  # the group's file is now neither old nor new weights
            raise
        self.nvme_bytes_written += staging.numel() * staging.element_size()

    def wait_group(self, g: int) -> None:
        """Returns once group g's last write is complete (raises ``io_failure`` if any write failed)."""
        with self._lock:
            handle = self._group_write.pop(g, None)
        if handle is not None:
            self._wait(handle)

    def _wait(self, handle: IoHandle) -> None:
        """Returns once the write is complete, whoever else is waiting for it."""
        with self._lock:
            mine = self._unwaited.pop(handle.id, None) is not None
            done = self._write_done.get(handle.id)
        if done is None:
            return
        if mine:  # exactly one thread waits on the I/O engine for a handle
            try:
                self.swap.wait(handle)
            except OSError as e:
                self.io_failure = e  # every other waiter, and every later fetch, raises it too
                raise
            finally:
                with self._lock:
                    self._write_done.pop(handle.id, None)
                done.set()
        else:
            done.wait()
        if self.io_failure is not None:
            raise self.io_failure

    def close(self) -> None:
        """Waits for every write still in flight (a failure stays in ``io_failure``), then frees the slots."""
        with self._lock:
            pending = list(self._unwaited.values())
        for handle in pending:
            try:
                self._wait(handle)
            except OSError:
                pass  # recorded in io_failure and reported when it happened; closing must still finish
        self._group_write.clear()
        for buffer in self.slots:
            self.pool.release(buffer)
        self.slots.clear()
