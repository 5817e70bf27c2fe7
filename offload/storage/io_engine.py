"""IoEngine: asynchronous reads and writes of host buffers to files, checked, with separate issue and wait."""

from __future__ import annotations

import fcntl
import os
from typing import NamedTuple

import torch

from offload import _C
from offload.config import IOConfig

DIRECT_ALIGNMENT = 4096  # O_DIRECT: buffer address, file offset and length all multiples of this


_URING: bool | None = None  # whether io_uring works here, found out once per process


def resolve_backend(backend: str) -> str:
    """``"io_uring"`` or ``"threads"`` for an ``IOConfig.backend`` value (``"auto"``: io_uring if available)."""
    global _URING
    if backend != "auto":
        return backend
    if _URING is None:
        _URING = bool(_C.uring_available())
    return "io_uring" if _URING else "threads"


class IoHandle(NamedTuple):
    """One submitted transfer. Holds the buffer, so that it stays alive until the transfer is waited for."""

    id: int
    op: str  # "read" | "write"
    path: str
    offset: int
    nbytes: int
    buffer: torch.Tensor


class IoEngine:
    """Reads and writes between host buffers and open files, ``config.in_flight`` (threads x queue_depth)
    transfers at a time, in blocks of ``config.block_size`` bytes, on one io_uring or one worker thread per
    transfer (``config.backend``; ``self.backend`` says which).

    ``read``/``write`` return at once with an :class:`IoHandle`; ``wait(handle)`` blocks (without the GIL)
    until that transfer is complete and raises ``OSError(errno, message, path)`` if any part of it failed
    (the message names the operation, the size and the file offset). Short transfers and EINTR are retried
    inside. For a file opened with O_DIRECT, buffer address, offset and length must be multiples of 4096; a
    request that is not is rejected before anything is queued.
    """

    def __init__(self, config: IOConfig | None = None) -> None:
        self.config = config or IOConfig()
        in_flight = self.config.in_flight
        self.backend = resolve_backend(self.config.backend)
        if self.backend == "io_uring":  # in_flight blocks on the ring, one completion thread
            try:
                self._engine = _C.UringIoEngine(self.config.block_size, in_flight)
            except RuntimeError as e:
                raise RuntimeError(f"offload: io.backend='io_uring': the kernel refused it ({e}); use 'threads' "
                                   "or 'auto'") from None
        else:  # one worker per transfer in flight; as many blocks may wait in the queue behind them
            self._engine = _C.IoEngine(in_flight, self.config.block_size, in_flight)

    def read(self, fd: int, offset: int, buffer: torch.Tensor, path: str) -> IoHandle:
        """Queues a read of ``buffer.nbytes`` bytes at ``offset`` of ``fd`` into ``buffer`` (a contiguous CPU
        tensor)."""
        return self._submit("read", fd, offset, buffer, path)

    def write(self, fd: int, offset: int, buffer: torch.Tensor, path: str) -> IoHandle:
        """Queues a write of ``buffer`` (a contiguous CPU tensor) at ``offset`` of ``fd``."""
        return self._submit("write", fd, offset, buffer, path)

    def wait(self, handle: IoHandle) -> None:
        self._native().wait(handle.id)

    def poll(self, handle: IoHandle) -> bool:
        return self._native().poll(handle.id)

    def wait_all(self) -> None:
        self._native().wait_all()

    def close(self) -> None:
        """Waits for every transfer, then stops the worker threads and frees the native engine (also when a
        reference cycle keeps this wrapper alive until the interpreter exits). Idempotent."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.wait_all()

    def _native(self):
        if self._engine is None:
            raise RuntimeError("offload: this I/O engine is closed")
        return self._engine

    def _submit(self, op: str, fd: int, offset: int, buffer: torch.Tensor, path: str) -> IoHandle:
        if offset < 0:
            raise ValueError(f"IoEngine.{op}({path}): offset must be >= 0; got {offset}")
        flat = buffer.view(torch.uint8).view(-1) if buffer.is_contiguous() else buffer
        nbytes = buffer.numel() * buffer.element_size()
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            for what, value in (("buffer address", buffer.data_ptr()), ("offset", offset), ("length", nbytes)):
                if value % DIRECT_ALIGNMENT:
                    raise ValueError(f"IoEngine.{op}({path}): the file is open with O_DIRECT, so the {what} must "
                                     f"be a multiple of {DIRECT_ALIGNMENT}; got {value}")
        submit = self._native().read if op == "read" else self._native().write
        handle_id = submit(fd, flat, offset, path)
        return IoHandle(handle_id, op, path, offset, nbytes, buffer)
