"""DirectoryOwner: a run's claim on a directory (swap files, scratch, a checkpoint being written), held as an
advisory lock for the life of the process, so that a directory whose claim has gone is known to be abandoned.

Note [ownership by lock]: a process ID says nothing about whether the writer of a directory still runs: in a
container every run is PID 1, and on a host PIDs are reused, so a killed run's directory (as large as the whole
training state) looked owned forever. Instead the owner holds ``flock(LOCK_EX)`` on the directory's
``owner.lock`` from creation until it removes the directory. The kernel drops the lock when the last descriptor
of that open file goes, which includes every way a process can die (SIGKILL, the OOM killer), in any PID
namespace. Whoever can take the lock afterwards knows nobody holds the directory: ``is_abandoned`` takes it
without blocking and keeps it while the caller removes the directory, so two cleaners cannot race either.
flock conflicts between two open file descriptions even within one process, so a process never mistakes its
own directory for an abandoned one. A child forked without exec shares the descriptor and keeps the claim alive
until it exits too, which is what a directory still in use by it needs. The PID is still written beside the
lock, for people. Directories of older releases (``owner.pid`` only) are judged by their PID as before.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = "owner.lock"
PID_FILE = "owner.pid"  # written by releases before the lock, still written for people to read


class DirectoryBusy(OSError):
    """The directory is claimed by another live process (or another claim of this one)."""


class DirectoryOwner:
    """Holds the claim on ``directory`` until :meth:`release`. ``claim`` raises :class:`DirectoryBusy` at once
    when another claim is held (no waiting)."""

    def __init__(self, directory: str | os.PathLike, fd: int) -> None:
        self.directory = Path(directory)
        self._fd: int | None = fd

    @classmethod
    def claim(cls, directory: str | os.PathLike, what: str = "directory") -> DirectoryOwner:
        """Claims an existing directory. ``what`` names it in the error (e.g. "checkpoint directory")."""
        directory = Path(directory)
        fd = _locked_lock_file(directory)
        if fd is None:
            holder = _read_pid(directory)
            raise DirectoryBusy(errno.EBUSY, f"the {what} {directory} is in use by another process"
                                + (f" (pid {holder})" if holder else "") + "; wait for it to finish or use "
                                "another path", str(directory))
        try:
            (directory / PID_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        except OSError:
            os.close(fd)
            raise
        return cls(directory, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drops the claim (idempotent). Remove the directory before, not after: once released it may be taken
        for abandoned."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __del__(self) -> None:
        self.release()


def is_abandoned(directory: str | os.PathLike) -> DirectoryOwner | None:
    """If nobody holds ``directory`` (its writer died), a claim on it for the caller, who removes the directory
    and then releases the claim; None if it is held, or if it has no owner files at all (not ours, or still
    being created). A directory of an older release, with only ``owner.pid``, is abandoned when that process
    no longer runs; it is then claimed first like the others."""
    directory = Path(directory)
    if (directory / LOCK_FILE).exists():
        try:
            return DirectoryOwner.claim(directory)
        except OSError:
            return None
    pid = _read_pid(directory)
    if pid is None:
        return None
    try:
        number = int(pid.split()[0])
    except ValueError:
        return None
    if number == os.getpid() or pid_alive(number):
        return None
    try:
        return DirectoryOwner.claim(directory)
    except OSError:
        return None


def _locked_lock_file(directory: Path) -> int | None:
    """A descriptor of ``directory/owner.lock`` holding its exclusive lock, or None if another holds it. A lock
    file is made under a private name, locked, and only then linked to its name (Note [ownership by lock]):
    nobody can find it unlocked, so a directory being set up is never taken for abandoned."""
    path = directory / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            private = directory / f".{LOCK_FILE}.{os.getpid()}.{id(path):x}"
            fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
                os.link(private, path)
            except FileExistsError:  # another claimer linked theirs first: contend for that one
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            finally:
                private.unlink(missing_ok=True)
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd


def _read_pid(directory: Path) -> str | None:
    try:
        return (directory / PID_FILE).read_text().strip() or None
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine; a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
