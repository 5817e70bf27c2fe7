"""HostPool: page-aligned host buffers allocated against one byte budget, reused by exact size."""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from offload.errors import MemoryBudgetError

log = logging.getLogger("offload")

PAGE = 4096  # buffer alignment: O_DIRECT and DMA both want whole, aligned pages
_HUGE_PAGE = 2 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python's mmap lacks the name


@dataclass(frozen=True)
class HostBuffer:
    """One buffer of the pool. ``tensor`` is a uint8 CPU tensor of exactly ``nbytes`` bytes, starting on a page
    boundary; ``view(dtype)`` reinterprets it. Valid until released to the pool: using it afterwards races with
    whoever gets the memory next."""

    name: str
    nbytes: int
    tensor: torch.Tensor
    pinned: bool

    @property
    def address(self) -> int:
        return self.tensor.data_ptr()

    def view(self, dtype: torch.dtype) -> torch.Tensor:
        return self.tensor.view(dtype)


@dataclass(frozen=True)
class HostPoolStats:
    limit: int | None    # the budget in bytes (None: unbounded)
    in_use: int          # bytes handed out and not released
    cached: int          # bytes released and kept for reuse
    peak: int            # highest in_use + cached so far


class _Mapping:
    """One anonymous mapping behind a buffer. The mmap object owns the memory; tensors made from it keep it
    alive (torch.frombuffer holds a reference), so memory is unmapped only when nothing can reach it."""

    def __init__(self, mapped_bytes: int, pin: bool) -> None:
        self.map = mmap.mmap(-1, mapped_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if mapped_bytes >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
            # Advised before the pages exist, so the faults below map 2 MiB pages directly (fewer TLB misses in
            # Adam's long sequential passes); advised after populating, 4 KiB pages would stay until khugepaged
            # got round to them, stealing CPU from the first steps.
            self.map.madvise(mmap.MADV_HUGEPAGE)
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)
        _populate(self.map, self.tensor)  # the budget is real now: fail here, not in the OOM killer later
        self.pinned = False
        if pin:
            _cuda_host_register(self.tensor)
            self.pinned = True

    def unpin(self) -> None:
        if self.pinned:
            _cuda_host_unregister(self.tensor)
            self.pinned = False


# Note [faulting in with several threads]: faulting in a buffer is the kernel zeroing its pages, which one thread
# does at ~3 GB/s (an H200 host, bench/results/gpu-scale-h200-2026-12-04): a 7B model's ~100 GB of state took
# ~35 s of its start-up. Slices of one mapping are independent, so large buffers are populated by several
# threads, each with one MADV_POPULATE_WRITE over its slice. The call goes through ctypes (which releases the
# GIL during a foreign call), not mmap.madvise (which holds it). Slices are whole multiples of 2 MiB from the
# mapping's start; where that start is not 2 MiB aligned, two threads may meet in one huge page, which the kernel
# faults in once.
_POPULATE_SLICE = 256 << 20
_POPULATE_THREADS = max(1, min(8, len(os.sched_getaffinity(0))))
_populate_executor: ThreadPoolExecutor | None = None
_populate_executor_lock = threading.Lock()
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int


def _madvise_populate(address: int, nbytes: int) -> int:
    """0, or the errno of MADV_POPULATE_WRITE over [address, address + nbytes)."""
    return 0 if _libc.madvise(address, nbytes, _MADV_POPULATE_WRITE) == 0 else ctypes.get_errno()


def _populate_slices(address: int, nbytes: int) -> list[int]:
    slices = [(start, min(_POPULATE_SLICE, nbytes - start)) for start in range(0, nbytes, _POPULATE_SLICE)]
    if len(slices) == 1 or _POPULATE_THREADS == 1:
        return [_madvise_populate(address, nbytes)]
    global _populate_executor
    with _populate_executor_lock:
        if _populate_executor is None:
            _populate_executor = ThreadPoolExecutor(_POPULATE_THREADS, thread_name_prefix="offload-populate")
        executor = _populate_executor
    return list(executor.map(lambda piece: _madvise_populate(address + piece[0], piece[1]), slices))


def _populate(mapping: mmap.mmap, tensor: torch.Tensor) -> None:
    errors = _populate_slices(tensor.data_ptr(), len(mapping))
    if errno.ENOMEM in errors:
        raise MemoryBudgetError(f"faulting in {len(mapping)} bytes of host memory (the machine is out of "
                                "memory)", len(mapping), 0, "host_memory_limit")
    if errno.EINVAL in errors:  # a kernel without MADV_POPULATE_WRITE (before 5.14): touch one byte per page
        tensor[::PAGE].zero_()
    elif any(errors):
        code = next(e for e in errors if e)
        raise OSError(code, f"offload: faulting in {len(mapping)} bytes of host memory: {os.strerror(code)}")


def _cuda_host_register(tensor: torch.Tensor) -> None:
    # Page-locks the exact mapping (no power-of-two rounding, unlike torch's pinned-memory caching allocator).
    # cudaHostRegisterPortable (1): pinned for every CUDA context, not only the current device's.
    err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 1)
    if int(err) != 0:
        raise MemoryBudgetError(f"page-locking {tensor.numel()} bytes (cudaHostRegister error {int(err)})",
                                tensor.numel(), 0, "host_memory_limit (or the memlock ulimit)")


def _cuda_host_unregister(tensor: torch.Tensor) -> None:
    err = torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
    if int(err) != 0:
        log.warning("cudaHostUnregister failed with error %d; the pages stay locked until exit", int(err))


class HostPool:
    """Host buffers for offloaded state, allocated against ``limit_bytes`` (None: no limit).

    Each buffer is its own page-aligned anonymous mapping, faulted in when allocated (so that an over-committed
    budget fails here, with a clear error, not later in the OOM killer), advised for transparent huge pages
    when large, and page-locked when ``pin`` (default: when CUDA is available). Released buffers are kept and
    handed out again for a request of the same size; when a request does not fit, kept buffers are unmapped
    first, and only then does :class:`MemoryBudgetError` say how much was needed and how much is left.
    Thread-safe.
    """

    def __init__(self, limit_bytes: int | None = None, *, pin: bool | None = None) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"HostPool: limit_bytes must be >= 0 or None; got {limit_bytes}")
        self._limit = limit_bytes
        self._pin = torch.cuda.is_available() if pin is None else pin
        self._lock = threading.Lock()
        self._in_use: dict[int, tuple[HostBuffer, _Mapping]] = {}  # id(buffer) -> buffer, its mapping
        self._free: dict[int, list[_Mapping]] = {}                  # mapped size -> kept mappings
        self._in_use_bytes = 0
        self._cached_bytes = 0
        self._peak = 0

    @staticmethod
    def mapped_size(nbytes: int) -> int:
        """Bytes of budget a buffer of ``nbytes`` takes: whole pages."""
        return max(PAGE, -(-nbytes // PAGE) * PAGE)

    def allocate(self, nbytes: int, name: str) -> HostBuffer:
        """A buffer of exactly ``nbytes`` (> 0) bytes, page-aligned. Raises MemoryBudgetError if it does not fit."""
        if nbytes <= 0:
            raise ValueError(f"HostPool.allocate({name!r}): nbytes must be > 0; got {nbytes}")
        size = self.mapped_size(nbytes)
        with self._lock:
            kept = self._free.get(size)
            if kept:
                mapping = kept.pop()
                self._cached_bytes -= size
            else:
                self._make_room(size, name)
                mapping = _Mapping(size, self._pin)
            buffer = HostBuffer(name=name, nbytes=nbytes, tensor=mapping.tensor[:nbytes], pinned=mapping.pinned)
            self._in_use[id(buffer)] = (buffer, mapping)
            self._in_use_bytes += size
            self._peak = max(self._peak, self._in_use_bytes + self._cached_bytes)
            return buffer

    def release(self, buffer: HostBuffer) -> None:
        """Takes a buffer back for reuse. The caller must not use it (or views of it) afterwards."""
        with self._lock:
            entry = self._in_use.pop(id(buffer), None)
            if entry is None or entry[0] is not buffer:
                raise ValueError(f"HostPool.release: buffer {buffer.name!r} is not in use in this pool")
            mapping = entry[1]
            size = mapping.tensor.numel()
            self._in_use_bytes -= size
            self._free.setdefault(size, []).append(mapping)
            self._cached_bytes += size

    def trim(self) -> int:
        """Unmaps every kept buffer; returns the bytes given back."""
        with self._lock:
            return self._drop_kept(None)

    def stats(self) -> HostPoolStats:
        with self._lock:
            return HostPoolStats(self._limit, self._in_use_bytes, self._cached_bytes, self._peak)

    def close(self) -> None:
        """Releases everything. Buffers still in use are dropped from the pool (their memory goes back to the
        system once no tensor refers to it)."""
        with self._lock:
            self._drop_kept(None)
            for _, mapping in self._in_use.values():
                mapping.unpin()
            self._in_use.clear()
            self._in_use_bytes = 0

    def _make_room(self, size: int, name: str) -> None:
        if self._limit is None:
            return
        if self._in_use_bytes + self._cached_bytes + size > self._limit:
            self._drop_kept(self._in_use_bytes + self._cached_bytes + size - self._limit)
        available = self._limit - self._in_use_bytes - self._cached_bytes
        if size > available:
            raise MemoryBudgetError(f"host buffer {name!r} ({size} bytes)", size, max(available, 0),
                                    "host_memory_limit")

    def _drop_kept(self, at_least: int | None) -> int:
        """Unmaps kept buffers, largest first, until ``at_least`` bytes are freed (None: all)."""
        freed = 0
        for size in sorted(self._free, reverse=True):
            kept = self._free[size]
            while kept and (at_least is None or freed < at_least):
                kept.pop().unpin()
                self._cached_bytes -= size
                freed += size
            if not kept:
                del self._free[size]
        return freed
