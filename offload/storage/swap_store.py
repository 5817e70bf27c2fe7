"""SwapStore: preallocated swap files in a private per-run directory, read and written by the IoEngine."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from offload.config import IOConfig
from offload.errors import ConfigError, format_bytes
from offload.storage.io_engine import DIRECT_ALIGNMENT, IoEngine, IoHandle
from offload.storage.ownership import PID_FILE, DirectoryOwner, is_abandoned

log = logging.getLogger("offload")

RUN_PREFIX = "offload-swap-"
OWNER_FILE = PID_FILE  # the owner's PID, for people; ownership itself is a lock (Note [ownership by lock])


@dataclass(frozen=True)
class SwapFile:
    """One preallocated file: ``capacity`` bytes (whole 4 KiB pages) at ``path``, open as ``fd``."""

    name: str
    path: str
    fd: int
    capacity: int
    direct: bool


def clean_stale_runs(root: str | os.PathLike, prefix: str = RUN_PREFIX) -> list[Path]:
    """Removes the run directories (``prefix*``) under ``root`` that no live process holds (runs killed with
    SIGKILL or by the OOM killer leave them behind; Note [ownership by lock]). Returns what was removed; logs one
    line per directory."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for run_dir in sorted(root.glob(prefix + "*")):
        claim = is_abandoned(run_dir)
        if claim is None:
            continue  # held by a live run, not ours, or still being created: leave it alone
        try:
            who = (run_dir / OWNER_FILE).read_text().strip() or "?"
        except OSError:
            who = "?"
        shutil.rmtree(run_dir, ignore_errors=True)
        claim.release()
        log.warning("removed %s, left behind by process %s, which no longer holds it", run_dir, who)
        removed.append(run_dir)
    return removed


def _probe_direct(run_dir: Path) -> bool:
    """True if the filesystem of ``run_dir`` accepts O_DIRECT."""
    probe = run_dir / ".direct-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    probe.unlink()
    return True


class SwapStore:
    """Swap files for offloaded state under ``root``, in a private directory of this run.

    The directory (mode 0700, files 0600) is held by this process through a lock on its ``owner.lock`` (Note
    [ownership by lock]); it is removed by :meth:`close`, on normal interpreter exit, and, if the process was
    killed, by the next SwapStore on the same root (or ``offload clean ROOT``). Files are preallocated with
    ``posix_fallocate`` after a free-space check, so running out of disk shows up when the store is set up, with
    how much was needed and how much is free, not halfway through training. With ``io.direct="auto"`` a
    filesystem that refuses O_DIRECT (ramfs, tmpfs before 6.6, some overlay filesystems) gets buffered I/O and one
    warning; ``io.direct=True`` makes that an error.
    """

    def __init__(self, root: str | os.PathLike, io: IOConfig | None = None, label: str = "") -> None:
        """``label`` (e.g. ``rank1``) goes into the run directory's name, so that the ranks of one job sharing
        ``root`` can be told apart."""
        self.io = io or IOConfig()
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise OSError(errno.ENOTDIR, f"the swap directory {self.root} (nvme_dir) exists and is not a directory",
                          str(self.root))
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            clean_stale_runs(self.root)
            prefix = f"{RUN_PREFIX}{os.getpid()}-" + (f"{label}-" if label else "")
            self.run_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
            self._owner = DirectoryOwner.claim(self.run_dir, "swap directory")
        except OSError as e:
            raise OSError(e.errno, f"cannot create a swap directory under {self.root}: {e.strerror}",
                          str(self.root)) from None
        try:
            self.direct = self._choose_direct()
            self._engine = IoEngine(self.io)
        except BaseException:
            shutil.rmtree(self.run_dir, ignore_errors=True)  # a store that failed to start leaves nothing
            self._owner.release()
            raise
        self._files: dict[str, SwapFile] = {}
        # Runs once: from close(), when the store is collected, or at interpreter exit (finalize's own hook).
        self._finalizer = weakref.finalize(self, SwapStore._remove, self._engine, self.run_dir, self._files,
                                           self._owner)

    def _choose_direct(self) -> bool:
        if self.io.direct is False:
            return False
        if _probe_direct(self.run_dir):
            return True
        if self.io.direct is True:
            raise ConfigError(f"io.direct: the filesystem of {self.root} refuses O_DIRECT; "
                              "use io.direct='auto' (buffered fallback) or another nvme_dir")
        log.warning("%s refuses O_DIRECT (ramfs, an older tmpfs or an overlay filesystem?): swap files use "
                    "buffered I/O, which goes through the page cache", self.root)
        return False

    def check_space(self, needs: dict[str, int]) -> None:
        """Raises ENOSPC naming the whole run's need when the files it will create (``needs``: bytes by what they
        hold, e.g. {"optimizer state": ..., "weights": ...}) do not fit in the free space, before any is made:
        a disk that is too small shows up with the total, not with the first file that no longer fits."""
        pages = {what: -(-nbytes // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT for what, nbytes in needs.items() if nbytes}
        total = sum(pages.values())
        usage = shutil.disk_usage(self.run_dir)
        if usage.total > 0 and total > usage.free:  # (ramfs reports no size at all: nothing to check against)
            parts = ", ".join(f"{what} {format_bytes(nbytes)}" for what, nbytes in pages.items())
            raise OSError(errno.ENOSPC, f"the run needs {format_bytes(total)} of swap files in {self.root} "
                          f"({parts}) and {format_bytes(usage.free)} are free; free space, choose another nvme_dir "
                          "or keep more state in RAM (host_memory_limit)", str(self.root))

    def create(self, name: str, nbytes: int) -> SwapFile:
        """A new file that holds ``nbytes`` (rounded up to whole 4 KiB pages), preallocated on disk."""
        if name in self._files:
            raise ValueError(f"SwapStore.create: a swap file named {name!r} exists already")
        if nbytes <= 0:
            raise ValueError(f"SwapStore.create({name!r}): nbytes must be > 0; got {nbytes}")
        capacity = -(-nbytes // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
        usage = shutil.disk_usage(self.run_dir)
        free = usage.free
        if usage.total > 0 and capacity > free:  # (ramfs reports no size at all: nothing to check against)
            raise OSError(errno.ENOSPC, f"swap file {name!r} needs {capacity} bytes but {free} are free "
                          f"in {self.run_dir}; free space or choose another nvme_dir", str(self.run_dir))
        path = self.run_dir / f"{len(self._files):05d}.swap"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if self.direct else 0)
        fd = os.open(path, flags, 0o600)
        try:
            os.posix_fallocate(fd, 0, capacity)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise OSError(e.errno, f"preallocating {capacity} bytes for swap file {name!r}: {e.strerror}",
                          str(path)) from None
        swap = SwapFile(name=name, path=str(path), fd=fd, capacity=capacity, direct=self.direct)
        self._files[name] = swap
        return swap

    def write(self, swap: SwapFile, offset: int, buffer: torch.Tensor) -> IoHandle:
        """Queues a write of ``buffer`` at ``offset`` of ``swap``; wait for it with :meth:`wait`."""
        self._check_range("write", swap, offset, buffer)
        return self._engine.write(swap.fd, offset, buffer, swap.path)

    def read(self, swap: SwapFile, offset: int, buffer: torch.Tensor) -> IoHandle:
        """Queues a read into ``buffer`` from ``offset`` of ``swap``; wait for it with :meth:`wait`."""
        self._check_range("read", swap, offset, buffer)
        return self._engine.read(swap.fd, offset, buffer, swap.path)

    def wait(self, handle: IoHandle) -> None:
        self._engine.wait(handle)

    def poll(self, handle: IoHandle) -> bool:
        """True once the transfer has ended (``wait`` then returns at once, or raises its error)."""
        return self._engine.poll(handle)

    def wait_all(self) -> None:
        self._engine.wait_all()

    def close(self) -> None:
        """Waits for outstanding transfers, then closes and removes every file and the run directory, and
        stops the I/O engine. Idempotent."""
        try:
            if self._finalizer.alive:
                self._engine.wait_all()
        finally:
            self._finalizer()

    def __enter__(self) -> SwapStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _remove(engine: IoEngine, run_dir: Path, files: dict[str, SwapFile], owner: DirectoryOwner) -> None:
        try:
            engine.wait_all()  # no transfer may still use a descriptor closed below
        except OSError as e:
            log.warning("a swap transfer nobody waited for failed: %s", e)
        for swap in files.values():
            try:
                os.close(swap.fd)
            except OSError:
                pass
        files.clear()
        shutil.rmtree(run_dir, ignore_errors=True)
        owner.release()  # (after the removal: a released directory may be taken for abandoned)
        try:
            engine.close()
        except OSError:
            pass  # reported above

    @staticmethod
    def _check_range(op: str, swap: SwapFile, offset: int, buffer: torch.Tensor) -> None:
        nbytes = buffer.numel() * buffer.element_size()
        if offset < 0 or offset + nbytes > swap.capacity:
            raise ValueError(f"SwapStore.{op}({swap.name!r}): bytes [{offset}, {offset + nbytes}) are outside "
                             f"the file's {swap.capacity} bytes")
