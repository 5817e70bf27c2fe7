"""ShardedTensorReader: the tensor files that several ranks saved, read as if they were one.

Note [sharded checkpoints]: with several ranks each rank writes its own ``master``, ``exp_avg`` and
``exp_avg_sq`` files (``master.rank{r}.safetensors``): for every trainable parameter with elements in the
rank's shard, one 1-D tensor under the parameter's name holding the contiguous run of its flattened elements
that the rank owns; the file's metadata (``shard_offsets``, JSON) gives the index of each run's first element,
and ``shapes`` the parameter's full shape. This reader answers reads of any element range of the full
parameter by reading the runs of the ranks that hold it, so a checkpoint saved by N ranks loads into an
engine with any number of ranks (each reads its own shard of every group) and ``offload export`` writes the
whole tensors, with no step that first assembles a full copy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from offload.checkpoint.tensor_file import TensorEntry, TensorFileReader
from offload.errors import CheckpointError
from offload.storage.io_engine import IoEngine, IoHandle

SHARD_OFFSETS_KEY = "shard_offsets"
SHAPES_KEY = "shapes"


def rank_file_name(base: str, rank: int, world: int) -> str:
    """The name of state file ``base`` (master, exp_avg, exp_avg_sq) written by ``rank`` of ``world``: one
    file of whole tensors with one rank, one file of shard runs per rank otherwise."""
    return f"{base}.safetensors" if world == 1 else f"{base}.rank{rank}.safetensors"


def state_reader(version: Path, base: str, world: int, io: IoEngine) -> TensorFileReader | ShardedTensorReader:
    """The reader of state file ``base`` (master, exp_avg, exp_avg_sq) of a checkpoint saved by ``world``
    ranks: the one file of a single-rank save, or every rank's."""
    if world == 1:
        return TensorFileReader(version / rank_file_name(base, 0, 1), io)
    return ShardedTensorReader(version, base, world, io)


class ShardedTensorReader:
    """``entries`` maps each parameter to a TensorEntry with its full shape (``begin`` 0); ``read`` queues the
    reads of a byte range of the full tensor and returns their handles, ``wait`` waits for them."""

    def __init__(self, version: Path, base: str, world: int, io: IoEngine) -> None:
        self.path = version / rank_file_name(base, 0, world)
        self.io = io
        self._files: list[TensorFileReader] = []
        # name -> [(first element, element count, file)], by first element
        self._runs: dict[str, list[tuple[int, int, TensorFileReader]]] = {}
        self.entries: dict[str, TensorEntry] = {}
        try:
            for rank in range(world):
                self._add(TensorFileReader(version / rank_file_name(base, rank, world), io))
            self._check_complete()
        except BaseException:
            self.close()
            raise

    def _add(self, reader: TensorFileReader) -> None:
        self._files.append(reader)
        try:
            offsets = json.loads(reader.metadata[SHARD_OFFSETS_KEY])
            shapes = json.loads(reader.metadata[SHAPES_KEY])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{reader.path}: no valid shard metadata ({type(e).__name__}: {e})") from None
        for name, entry in reader.entries.items():
            if name not in offsets or name not in shapes or len(entry.shape) != 1:
                raise CheckpointError(f"{reader.path}: tensor {name!r} is not a shard run with an offset and a shape")
            shape = tuple(int(d) for d in shapes[name])
            known = self.entries.get(name)
            if known is not None and (known.shape != shape or known.dtype != entry.dtype):
                raise CheckpointError(f"{reader.path}: tensor {name!r} is {entry.dtype} {list(shape)} here, "
                                      f"{known.dtype} {list(known.shape)} in another rank's file")
            nbytes = math.prod(shape) * torch.empty((), dtype=entry.dtype).element_size()
            self.entries[name] = TensorEntry(name, entry.dtype, shape, 0, nbytes)
            self._runs.setdefault(name, []).append((int(offsets[name]), entry.shape[0], reader))

    def _check_complete(self) -> None:
        """Every element of every tensor in exactly one run."""
        for name, runs in self._runs.items():
            runs.sort(key=lambda run: run[0])
            covered = 0
            for first, count, reader in runs:
                if first != covered:
                    raise CheckpointError(f"{reader.path}: tensor {name!r}: the ranks' runs leave a gap or overlap "
                                          f"at element {min(first, covered)}")
                covered += count
            total = math.prod(self.entries[name].shape)
            if covered != total:
                raise CheckpointError(f"{self.path}: tensor {name!r}: the ranks' runs hold {covered} of its "
                                      f"{total} elements")

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path} (and the other ranks' files): no tensor {name!r}") from None

    def read(self, name: str, byte_offset: int, out: torch.Tensor) -> list[IoHandle]:
        """Queues reads of ``out.nbytes`` bytes of tensor ``name`` from ``byte_offset`` within the full tensor
        into ``out`` (contiguous CPU), from whichever ranks' runs hold them."""
        entry = self.entry(name)
        item = out.element_size()
        if byte_offset % item or out.dtype != entry.dtype:
            raise ValueError(f"{self.path}: read of {name!r} must be whole {entry.dtype} elements")
        first, count = byte_offset // item, out.numel()
        flat = out.view(-1)
        handles = []
        for run_first, run_count, reader in self._runs[name]:
            a, b = max(first, run_first), min(first + count, run_first + run_count)
            if a < b:
                handles.append(reader.read(name, (a - run_first) * item, flat[a - first:b - first]))
        return handles

    def wait(self, handles: list[IoHandle]) -> None:
        for handle in handles:
            self.io.wait(handle)

    def close(self) -> None:
        for reader in self._files:
            reader.close()
        self._files.clear()
