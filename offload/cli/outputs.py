"""Checks that the places a command will write to can be written, before the long work starts: a run that has
trained for hours must not fail at its end because its checkpoint directory or report file is unwritable."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from offload.errors import ConfigError


def check_writable_dir(flag: str, path: str | os.PathLike) -> None:
    """``path`` is (or can be made) a directory this process can create files in. Leaves nothing behind: a
    directory made for the check is removed again. Raises ConfigError naming ``flag``, the path and the reason."""
    path = Path(path)
    made = []
    try:
        for parent in reversed([path, *path.parents]):
            if not parent.exists():
                parent.mkdir()
                made.append(parent)
        if not path.is_dir():
            raise OSError(errno.ENOTDIR, "exists and is not a directory")
        _create_and_remove_a_file(path)
    except OSError as e:
        raise ConfigError(f"{flag}: cannot write to {path}: {e.strerror or e}") from None
    finally:
        for directory in reversed(made):
            try:
                directory.rmdir()
            except OSError:
                pass


def check_writable_file(flag: str, path: str | os.PathLike) -> None:
    """``path`` can be created (or replaced) by this process: its directory exists and takes new files, and the
    path is not a directory. Raises ConfigError naming ``flag``, the path and the reason."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag}: {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{flag}: cannot write {path}: the directory {parent} does not exist")
    try:
        _create_and_remove_a_file(parent)
    except OSError as e:
        raise ConfigError(f"{flag}: cannot write {path}: {e.strerror or e}") from None


def _create_and_remove_a_file(directory: Path) -> None:
    fd, probe = tempfile.mkstemp(prefix=".offload-write-check-", dir=directory)
    os.close(fd)
    os.unlink(probe)
