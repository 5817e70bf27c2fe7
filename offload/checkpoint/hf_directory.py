"""Hugging Face model directories written atomically: safetensors shards planned as ``transformers`` lays them
out, streamed in tensor by tensor, in a hidden staging directory that takes the target's place when complete.

Knows nothing of the engine: a caller plans the tensors (names, dtypes, shapes, in the order it will produce
them) with :func:`plan_shards`, opens a :class:`StagedDirectory`, writes its small files there, appends the
tensors through a :class:`ShardWriter` and commits.

Note [atomic model directory]: everything is written into ``<parent>/.<name>.partial-<pid>`` (hidden, so a
crash never leaves a directory that looks like a complete model), every file and directory in it is fsynced,
and only then does it take the target's place: with ``os.rename`` when the target is missing or (without
``overwrite``) an empty directory, where the kernel refuses atomically if it has meanwhile filled; with
``renameat2(RENAME_EXCHANGE)`` when an existing target is replaced, which swaps the two names in one step, so
the target path names the old or the new model at every instant; the old contents, now under the staging
name, are removed afterwards. Where the kernel, libc or filesystem lacks RENAME_EXCHANGE (ENOSYS, EINVAL) the
old directory is first renamed to ``.<name>.old-<pid>`` and the new one renamed in: between the two renames
the target path does not exist. A reader then sees no model (never a mix of two), and a crash in that window
leaves the old model under the ``.old-`` name, which the next save to the same target renames back before
doing anything else. Leftovers of dead processes (``.partial-`` directories, ``.old-`` ones once the target
exists again) are removed when a save starts; those of live processes are never touched.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from offload.checkpoint.directory import fsync_dir, write_file_durably
from offload.checkpoint.tensor_file import TensorEntry, TensorFileWriter, plan_entries
from offload.config import parse_bytes
from offload.errors import ConfigError, OutputExistsError
from offload.storage.io_engine import IoEngine, IoHandle
from offload.storage.ownership import pid_alive

log = logging.getLogger("offload")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses a file whose format is not "pt" (or tf, flax)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1


def parse_max_shard_size(value: int | str) -> int:
    """``max_shard_size`` in bytes: an int, or a size such as "5GB" (decimal: 1e9, as transformers), "500MB",
    "2GiB" (binary). Raises ConfigError naming ``max_shard_size``."""
    size = parse_bytes("max_shard_size", value)
    if size <= 0:
        raise ConfigError(f"max_shard_size: must be a positive size such as '5GB' or '500MB'; got {value!r}")
    return size


@dataclass(frozen=True)
class ShardFile:
    """One safetensors file of a plan: its name and its tensors, with byte ranges, in the order written."""

    file: str
    entries: tuple[TensorEntry, ...]


@dataclass(frozen=True)
class ShardPlan:
    """Where each tensor goes. ``order`` is the order the tensors must be appended in (the order planned);
    ``shards`` are the files in the order ``transformers`` numbers them; ``total_size`` counts tensor bytes."""

    order: tuple[str, ...]
    shards: tuple[ShardFile, ...]
    total_size: int

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1

    def index_json(self, metadata: dict[str, object] | None = None) -> bytes | None:
        """``model.safetensors.index.json`` as ``transformers.save_pretrained`` writes it (None: one file)."""
        if not self.sharded:
            return None
        weight_map = {e.name: shard.file for shard in self.shards for e in shard.entries}
        index = {"metadata": {**(metadata or {}), "total_size": self.total_size}, "weight_map": weight_map}
        return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def plan_shards(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_size: int) -> ShardPlan:
    """Splits ``tensors`` (name, dtype, shape; each name once) into files as huggingface_hub's
    ``split_torch_state_dict_into_shards`` does for ``transformers.save_pretrained``: in order, a new file
    starts when the next tensor would take the current one over ``max_shard_size`` bytes, and a tensor larger
    than the limit gets a file of its own, numbered before the file being filled. One file is
    ``model.safetensors``; several are ``model-00001-of-0000N.safetensors``..."""
    sizes = {e.name: e.nbytes for e in plan_entries(tensors)}
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = []
    current: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    current_size = 0
    for tensor in tensors:
        nbytes = sizes[tensor[0]]
        if nbytes > max_shard_size:
            shards.append([tensor])
            continue
        if current_size + nbytes > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(tensor)
        current_size += nbytes
    if current or not shards:
        shards.append(current)
    count = len(shards)
    files = tuple(ShardFile(SINGLE_FILE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors",
                            tuple(plan_entries(shard))) for i, shard in enumerate(shards))
    return ShardPlan(order=tuple(name for name, _, _ in tensors), shards=files, total_size=sum(sizes.values()))


class ShardWriter:
    """Streams the tensors of a :class:`ShardPlan` into its files in ``directory``, in the plan's order.

    Every file is created and preallocated at once, so a full disk fails before any tensor is written; a file
    is checked, fsynced and closed as soon as its last tensor has been written. ``append`` queues the write and
    returns at once: the caller keeps the tensor unchanged until :meth:`wait` on the handles returns.
    """

    def __init__(self, directory: Path, plan: ShardPlan, io: IoEngine) -> None:
        self.plan = plan
        self._entry = {e.name: (s, e) for s, shard in enumerate(plan.shards) for e in shard.entries}
        self._left = [len(shard.entries) for shard in plan.shards]
        self._writers: list[TensorFileWriter | None] = []
        self._owner: dict[int, int] = {}  # handle id -> its file, for the handles not yet waited for
        self._next = 0
        self.bytes_written = 0
        try:
            for shard in plan.shards:
                self._writers.append(TensorFileWriter(directory / shard.file, list(shard.entries), io,
                                                      _SAFETENSORS_METADATA))
            for s, left in enumerate(self._left):
                if left == 0:  # (a model without tensors: one empty file)
                    self._finish(s)
        except BaseException:
            self.close()
            raise

    def append(self, name: str, tensor: torch.Tensor) -> list[IoHandle]:
        """Queues ``tensor`` (contiguous, on the CPU, of the planned dtype and shape) as tensor ``name``, which
        must be the next one of the plan."""
        if self._next >= len(self.plan.order) or self.plan.order[self._next] != name:
            expected = self.plan.order[self._next] if self._next < len(self.plan.order) else "nothing"
            raise RuntimeError(f"ShardWriter: got tensor {name!r}, the plan expects {expected!r} next")
        s, entry = self._entry[name]
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise RuntimeError(f"ShardWriter: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, the plan "
                               f"says {entry.dtype} {list(entry.shape)}")
        writer = self._writers[s]
        assert writer is not None  # (its last tensor has not come yet)
        handles = writer.append(tensor)
        self._owner.update((h.id, s) for h in handles)
        self._next += 1
        self._left[s] -= 1
        if self._left[s] == 0:
            self._finish(s)  # (waits for these handles too)
        return handles

    def wait(self, handles: list[IoHandle]) -> None:
        """Blocks until the writes of ``handles`` are complete; raises OSError naming the file if one failed."""
        for handle in handles:
            s = self._owner.pop(handle.id, None)
            writer = self._writers[s] if s is not None else None
            if writer is not None:
                writer.wait([handle])

    def finish(self) -> int:
        """Checks that every planned tensor came (all files are then complete and fsynced); the bytes written."""
        if self._next != len(self.plan.order):
            raise RuntimeError(f"ShardWriter: {len(self.plan.order) - self._next} planned tensors were never "
                               f"written (next: {self.plan.order[self._next]!r})")
        return self.bytes_written

    def _finish(self, s: int) -> None:
        writer = self._writers[s]
        self._writers[s] = None
        self.bytes_written += writer.finish().size
        self._owner = {h: owner for h, owner in self._owner.items() if owner != s}

    def close(self) -> None:
        """Abandons the files still open (after a failure); idempotent."""
        for s, writer in enumerate(self._writers):
            if writer is not None:
                writer.close()
                self._writers[s] = None


class StagedDirectory:
    """A directory written beside ``target`` and moved into its place by :meth:`commit` (Note [atomic model
    directory]). Construction checks the target (an existing non-empty directory needs ``overwrite``; a file
    is refused), removes leftovers of dead processes and creates the staging directory ``path``."""

    def __init__(self, target: str | os.PathLike, overwrite: bool) -> None:
        target = Path(os.path.abspath(os.fspath(target)))
        self.target = Path(os.path.realpath(target)) if target.is_symlink() else target
        self.overwrite = overwrite
        parent, name = self.target.parent, self.target.name
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create {parent}: {e.strerror}", str(parent)) from None
        _recover(self.target)
        if self.target.exists() or self.target.is_symlink():
            if not self.target.is_dir():
                raise ConfigError(f"{self.target}: exists and is not a directory; a model directory cannot "
                                  "replace it")
            if not overwrite and any(self.target.iterdir()):
                raise OutputExistsError(self.target)
        self.path = parent / f".{name}.partial-{os.getpid()}"
        try:
            self.path.mkdir()
        except OSError as e:
            raise OSError(e.errno, f"cannot create {self.path}: {e.strerror}", str(self.path)) from None

    def write_file(self, name: str, data: bytes) -> None:
        """Creates ``name`` in the staging directory with ``data`` (fsynced)."""
        write_file_durably(self.path / name, data)

    def commit(self) -> Path:
        """Fsyncs everything in the staging directory and puts it in the target's place; returns the target.
        On failure the staging directory is left for :meth:`abandon` and the target is as it was."""
        _fsync_tree(self.path)
        parent = self.target.parent
        try:
            if not self.overwrite or not os.path.lexists(self.target):
                os.rename(self.path, self.target)  # (fails with ENOTEMPTY if the target filled meanwhile)
                fsync_dir(parent)
                return self.target
            if not _exchange(self.path, self.target):
                self._replace_in_two_steps()
                return self.target
            fsync_dir(parent)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and not self.overwrite:
                raise OutputExistsError(self.target) from None
            raise OSError(e.errno, f"moving {self.path} to {self.target}: {e.strerror}", str(self.target)) \
                from None
        shutil.rmtree(self.path, ignore_errors=True)  # now the old contents (a leftover is removed next time)
        return self.target

    def _replace_in_two_steps(self) -> None:
        """The fallback without RENAME_EXCHANGE: old away, new in (the window of Note [atomic model directory])."""
        old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(self.target, old)
        try:
            os.rename(self.path, self.target)
        except OSError:
            os.rename(old, self.target)
            raise
        fsync_dir(self.target.parent)
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        """Removes the staging directory (after a failure); the target is untouched. Idempotent."""
        shutil.rmtree(self.path, ignore_errors=True)


def _leftovers(target: Path, kind: str) -> list[tuple[Path, int]]:
    """``.<name>.<kind>-<pid>`` directories beside ``target`` whose process is gone (or is this one)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{kind}-(\d+)$")
    found = []
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
            found.append((entry, int(m.group(1))))
    return found


def _recover(target: Path) -> None:
    """Removes what dead saves to ``target`` left; puts back an old model a crash left renamed away."""
    for path, _ in _leftovers(target, "partial"):
        log.info("offload: removing %s, left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)
    for path, _ in _leftovers(target, "old"):
        if not os.path.lexists(target):
            log.warning("offload: %s is missing and %s holds its previous contents (a save was interrupted while "
                        "replacing it); renaming it back", target, path)
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps the names ``a`` and ``b`` atomically (Linux renameat2 with RENAME_EXCHANGE). False where the
    kernel, libc or filesystem cannot (nothing changed then); other errors raise OSError."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    """Fsyncs every file and directory under ``root`` (files written by other libraries, e.g. a tokenizer's,
    are not fsynced by them)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise OSError(e.errno, f"fsync of {path}: {e.strerror}", path) from None
        try:
            fsync_dir(Path(directory))
        except OSError as e:
            raise OSError(e.errno, f"fsync of {directory}: {e.strerror}", directory) from None


def write_small_files(directory: StagedDirectory, hf_config, generation_config, tokenizer,
                      extra: dict[str, bytes]) -> None:
    """A model directory's files beside its weights, into ``directory``'s staging: ``config.json`` (from
    ``hf_config``), the generation config, the tokenizer's files and ``extra`` (name -> bytes); each None (or
    empty) is left out."""
    staging = str(directory.path)
    if hf_config is not None:
        hf_config.save_pretrained(staging)
    if generation_config is not None:
        generation_config.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    for name, data in extra.items():
        directory.write_file(name, data)
