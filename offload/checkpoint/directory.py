"""CheckpointDir: a checkpoint path whose content is replaced atomically, so the last complete save always loads.

Layout of a checkpoint at ``PATH``::

    PATH/CURRENT                      {"version": "v-00000020-1f3a9c", "manifest_crc32": ...}
    PATH/v-00000020-1f3a9c/           one complete save: tensor files, meta.json, manifest.json

Note [atomic checkpoints]: a save writes a new version directory next to the current one, fsyncs every file
and the directory, writes ``manifest.json`` (each file's size and CRC-32) last, and only then points
``CURRENT`` at it: ``CURRENT.tmp`` is written and fsynced, renamed over ``CURRENT`` (atomic on POSIX) and the
directory fsynced. A crash at any point leaves ``CURRENT`` naming a complete version. Only after the switch are
older versions and leftovers of killed saves removed. Directories are recognised by their name pattern;
anything else in ``PATH`` is never touched. One process saves to a path at a time: a save holds the path's
``owner.lock`` (Note [ownership by lock], storage/ownership.py) from ``begin`` to ``commit`` or ``abandon``, and a
second process saving to it meanwhile fails at once.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import zlib
from pathlib import Path

from offload.checkpoint.tensor_file import FileRecord, file_crc32
from offload.errors import CheckpointError
from offload.storage.ownership import LOCK_FILE, PID_FILE, DirectoryOwner

CURRENT = "CURRENT"
MANIFEST = "manifest.json"
FORMAT = "offload-checkpoint"
FORMAT_VERSION = 1
_VERSION_DIR = re.compile(r"^v-\d{8,}-[0-9a-f]{8}$")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> FileRecord:
    """Creates ``path`` with ``data`` and fsyncs it; errors name the path."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise OSError(e.errno, f"writing {path}: {e.strerror}", str(path)) from None
    return FileRecord(len(data), zlib.crc32(data))


class CheckpointDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._owner: DirectoryOwner | None = None  # held by a save in progress

    # ---- saving ----------------------------------------------------------------------------------------------

    def begin(self, step: int) -> Path:
        """Creates and returns an empty version directory for a new save. ``PATH`` is created if missing; an
        existing ``PATH`` must be an offload checkpoint or empty (so a mistyped path never mixes with other data)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create checkpoint directory {self.path}: {e.strerror}",
                          str(self.path)) from None
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: exists and is not a directory")
        foreign = [p.name for p in self.path.iterdir()
                   if p.name not in (CURRENT, CURRENT + ".tmp", LOCK_FILE, PID_FILE) and not _VERSION_DIR.match(p.name)
                   and not p.name.startswith("." + LOCK_FILE)]
        if foreign:
            raise CheckpointError(f"{self.path}: not an offload checkpoint directory (it holds {foreign[0]!r}); "
                                  "choose an empty or new path")
        self._owner = DirectoryOwner.claim(self.path, "checkpoint directory")  # DirectoryBusy: another saver
        version = self.path / f"v-{step:08d}-{secrets.token_hex(4)}"
        try:
            version.mkdir()
        except OSError as e:
            self._release()
            raise OSError(e.errno, f"cannot create {version}: {e.strerror}", str(version)) from None
        return version

    def _release(self) -> None:
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    def commit(self, version: Path, records: dict[str, FileRecord]) -> None:
        """Makes ``version`` (whose files are written and fsynced; ``records`` lists them) the current one,
        then removes every other version. See Note [atomic checkpoints]."""
        manifest = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                               "files": {name: {"size": r.size, "crc32": r.crc32}
                                         for name, r in sorted(records.items())}}, indent=1).encode()
        manifest_record = write_file_durably(version / MANIFEST, manifest)
        fsync_dir(version)
        pointer = json.dumps({"version": version.name, "manifest_crc32": manifest_record.crc32}).encode()
        pending = self.path / (CURRENT + ".tmp")
        try:
            write_file_durably(pending, pointer)
            os.replace(pending, self.path / CURRENT)
        except OSError as e:
            pending.unlink(missing_ok=True)  # e.g. a full disk: CURRENT still names the previous version
            raise OSError(e.errno, f"switching {self.path / CURRENT}: {e.strerror}", str(self.path)) from None
        try:
            fsync_dir(self.path)
        except OSError as e:
            raise OSError(e.errno, f"switching {self.path / CURRENT}: {e.strerror}", str(self.path)) from None
        self.remove_stale(keep=version.name)
        self._release()

    def abandon(self, version: Path) -> None:
        """Removes a save that failed; the current version is untouched (also when the failure came after
        ``CURRENT`` had switched to ``version``: then it is the current one and stays)."""
        try:
            current = self._pointer().get("version")
        except CheckpointError:
            current = None
        if version.name != current:
            shutil.rmtree(version, ignore_errors=True)
        self._release()

    def remove_stale(self, keep: str | None = None) -> None:
        """Removes version directories other than ``keep`` (default: the current one), e.g. left by killed saves."""
        keep = keep if keep is not None else self._pointer().get("version")
        for entry in self.path.iterdir():
            if _VERSION_DIR.match(entry.name) and entry.name != keep:
                shutil.rmtree(entry, ignore_errors=True)
        (self.path / (CURRENT + ".tmp")).unlink(missing_ok=True)

    # ---- loading ---------------------------------------------------------------------------------------------

    def _pointer(self) -> dict:
        current = self.path / CURRENT
        try:
            data = current.read_bytes()
        except FileNotFoundError:
            if not self.path.exists():
                raise CheckpointError(f"{self.path}: no such checkpoint") from None
            raise CheckpointError(f"{current}: missing; {self.path} holds no complete offload checkpoint") from None
        except OSError as e:
            raise CheckpointError(f"{current}: cannot read ({e.strerror})") from None
        try:
            pointer = json.loads(data)
            if not isinstance(pointer, dict) or not _VERSION_DIR.match(str(pointer["version"])):
                raise ValueError("unexpected content")
            int(pointer["manifest_crc32"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{current}: corrupt (not an offload checkpoint pointer)") from None
        return pointer

    def current(self) -> tuple[Path, dict[str, FileRecord]]:
        """The current version directory and its manifest, which is checked against ``CURRENT``."""
        pointer = self._pointer()
        version = self.path / pointer["version"]
        manifest_path = version / MANIFEST
        try:
            raw = manifest_path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{manifest_path}: cannot read ({e.strerror})") from None
        if zlib.crc32(raw) != int(pointer["manifest_crc32"]):
            raise CheckpointError(f"{manifest_path}: checksum mismatch (the file is corrupt)")
        try:
            manifest = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{manifest_path}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise CheckpointError(f"{manifest_path}: expected an object, got {type(manifest).__name__}")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r} version "
                                  f"{manifest.get('format_version')!r}; this offload reads {FORMAT!r} version "
                                  f"{FORMAT_VERSION}")
        return version, _file_records(manifest_path, manifest.get("files"))

    def verify(self, share: tuple[int, int] = (0, 1)) -> tuple[Path, dict[str, FileRecord]]:
        """``current()``, after checking every file's size, then every file's CRC-32, against the manifest.
        Raises CheckpointError naming the first file that is missing, truncated, grown or corrupt. ``share``
        (k, n): checksum only the k-th of every n files (in name order), for n processes that verify one
        checkpoint together; sizes are checked for all."""
        version, records = self.current()
        for name, record in records.items():
            path = version / name
            try:
                size = path.stat().st_size
            except OSError as e:
                raise CheckpointError(f"{path}: missing ({e.strerror})") from None
            if size != record.size:
                raise CheckpointError(f"{path}: {size} bytes, the manifest says {record.size} (truncated or "
                                      "overwritten)")
        k, n = share
        for name, record in sorted(records.items())[k::n]:
            if file_crc32(version / name).crc32 != record.crc32:
                raise CheckpointError(f"{version / name}: checksum mismatch (the file is corrupt)")
        return version, records


def _file_records(manifest_path: Path, files: object) -> dict[str, FileRecord]:
    """The manifest's ``files``: plain file names of the version directory, each with its size and CRC-32."""
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{manifest_path}: files: expected an object naming the checkpoint's files, got "
                              f"{type(files).__name__}")
    records = {}
    for name, record in files.items():
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise CheckpointError(f"{manifest_path}: files: {name!r} is not a file name of the checkpoint")
        size = record.get("size") if isinstance(record, dict) else None
        crc = record.get("crc32") if isinstance(record, dict) else None
        if (isinstance(size, bool) or not isinstance(size, int) or size < 0 or isinstance(crc, bool)
                or not isinstance(crc, int) or not 0 <= crc < 1 << 32):
            raise CheckpointError(f"{manifest_path}: files.{name}: expected a size and a crc32 (integers), got "
                                  f"{record!r}")
        records[name] = FileRecord(size, crc)
    return records
