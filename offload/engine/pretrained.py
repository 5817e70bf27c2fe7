"""load_pretrained: a Hugging Face safetensors checkpoint (one file or sharded) streamed into an engine.

Each group is filled piece by piece: the parameter bytes of an optimizer chunk are read from the files with
pread (no mapping of the file, so the process's RSS does not grow with the checkpoint), converted to fp32 into
the group's master (its host state, or a staging slot written to its NVMe state), and the compute-dtype weights
are made from it where they live. At most one chunk of master weights (plus the dtype conversion buffer) is in
memory at a time, whatever the model's size.

``PretrainedValues`` serves ``Engine(model, config, pretrained=path)`` instead: a model on the meta device is
then filled from the checkpoint as the engine is built, with no random initialisation computed for what the
checkpoint holds and every home written once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from offload.checkpoint.tensor_file import TensorFileReader
from offload.engine.checkpoint_load import load_model_tensors, other_tensors
from offload.engine.state_fill import fill_group
from offload.errors import CheckpointError
from offload.layout.meta_init import ValueSource, storage_key, value_sources
from offload.optim.state_store import CHUNK_ELEMENTS, chunks
from offload.storage.io_engine import IoEngine

if TYPE_CHECKING:
    from offload.engine.engine import Engine
    from offload.engine.training_state import TrainingState

log = logging.getLogger("offload")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a checkpoint directory (sharded with an index, or a
    single model.safetensors) or one .safetensors file."""
    if path.is_file():
        return {"": path}
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: path / file for name, file in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a usable safetensors index ({type(e).__name__}: {e})") from None
    if (path / SINGLE_FILE).is_file():
        return {"": path / SINGLE_FILE}
    raise CheckpointError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} is there (nor is it a .safetensors file)")


def load_pretrained(engine: Engine, path: str | Path) -> None:
    """Replaces the engine's weights with those of a Hugging Face safetensors checkpoint at ``path`` (a directory
    with ``model.safetensors`` or a sharded ``model.safetensors.index.json``, or one ``.safetensors`` file),
    converting dtypes on the fly. Trainable parameters go to their fp32 masters and compute-dtype copies
    (wherever they live: device, host RAM, NVMe), frozen parameters to their compute-dtype copies (offloaded
    ones where they live), persistent buffers to the model. A tied parameter needs one of its names in the
    checkpoint. A PEFT model (``peft.get_peft_model``) loads its base model's checkpoint: its names are mapped
    back to the base's (Note [peft names]) and its adapters keep their initial values. Call it before the
    first step: the Adam moments stay zero. Missing or unexpected tensors and shape mismatches raise
    ``CheckpointError`` naming them, before anything is changed."""
    state = engine.training_state()
    if state.step > 0 or state.grads.any_received():
        raise CheckpointError("load_pretrained: the engine has already trained (or holds gradients); load "
                              "pretrained weights right after building it")
    start = time.perf_counter()
    path = Path(path)
    files = checkpoint_files(path)
    io = IoEngine(state.config.io)
    readers: dict[Path, TensorFileReader] = {}
    try:
        where = _open_files(files, io, readers)
        targets = _targets(state.model)
        targets["other"] = other_tensors(state)
        slots = [(slot.param, slot.shape) for g in state.groups + state.frozen_groups for slot in g.slots]
        _check(slots + [(t, t.shape) for t in targets["other"].values()], where, targets,
               f"load_pretrained({path})")
        try:
            state.quiesce()
            state.frozen_fingerprint = None  # (the frozen values change here)
            for group_state in state.store.states:  # the masters; the moments of a new engine stay zero
                group = group_state.group
                kept = None  # (adapters keep their values: read them before the group is rewritten)
                if any(targets["source"][id(slot.param)] is None for slot in group.slots):
                    kept = state.store.read_master(group_state)
                fill_group(state.store, state.weights, group_state, lambda parts, start, end, group=group,
                           kept=kept: _read_master(group, parts[0], start, end, where, targets, kept))
            for group in state.frozen_groups:
                _fill_frozen(state, group, where, targets)
            sources = {key: targets["source"][id(tensor)] for key, tensor in targets["other"].items()}
            load_model_tensors(state, lambda key: (where[sources[key]], sources[key]))
        except BaseException as e:
            state.failed = f"loading {path} failed part-way ({type(e).__name__}: {e})"
            raise
    finally:
        for reader in readers.values():
            reader.close()
        io.close()
    total = sum(r.size for r in readers.values())
    log.info("offload: loaded %s (%.2f GB in %.1f s)", path, total / 1e9, time.perf_counter() - start)


# Note [peft names]: ``peft.get_peft_model`` wraps the model and renames its parameters: every name gains the
# prefix ``base_model.model.``, a layer that gets an adapter keeps its own weights under ``.base_layer.``, and a
# ``modules_to_save`` module is held twice, under ``.original_module.`` and ``.modules_to_save.<adapter>.``. The
# base checkpoint has the plain names; each of the model's names is looked up under its own name first, then
# under the name with those renames undone. A PEFT model's adapter weights (``lora_*``) have no base name: a
# new adapter keeps its initial values.
_PEFT_PREFIX = "base_model.model."
_PEFT_WRAPPERS = re.compile(r"\.(base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")
_PEFT_ADAPTER = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def _open_files(files: dict[str, Path], io: IoEngine, readers: dict[Path, TensorFileReader]
                ) -> dict[str, TensorFileReader]:
    """Opens each of the checkpoint's files into ``readers`` (the caller closes them, also when this fails
    part-way); returns the reader of each tensor name."""
    for file in dict.fromkeys(files.values()):
        readers[file] = TensorFileReader(file, io)
    return {name: readers[file] for file in readers for name in readers[file].entries
            if files.get(name, files.get("")) == file}


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def _names_in_checkpoint(key: str, peft: bool) -> list[str]:
    """The checkpoint names model key ``key`` may be stored under (Note [peft names])."""
    if not peft or not key.startswith(_PEFT_PREFIX):
        return [key]
    return [key, _PEFT_WRAPPERS.sub("", key[len(_PEFT_PREFIX):])]


def _targets(model: torch.nn.Module) -> dict:
    """The checkpoint names each tensor of the model may be read from (its own names or, for a tied
    parameter, any of its names; a PEFT model's also mapped to its base's), and its PEFT adapters."""
    peft = _is_peft(model)
    names_of: dict[int, list[str]] = {}
    adapters: set[int] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(value), []).extend(_names_in_checkpoint(key, peft))
        if peft and value.requires_grad and _PEFT_ADAPTER.search(key):
            adapters.add(id(value))
    return {"names": names_of, "adapters": adapters}


def _check(tensors: list[tuple[torch.Tensor, torch.Size]], where: dict[str, TensorFileReader], targets: dict,
           what: str) -> None:
    """Raises CheckpointError (prefixed ``what``) unless every one of ``tensors`` but the PEFT adapters has a
    name in the checkpoint, of its shape, and every tensor of the checkpoint has a place in the model; then
    sets ``targets["source"]``: the checkpoint name each tensor reads from (None for an adapter)."""
    missing, mismatched, used = [], [], set()
    for tensor, shape in tensors:
        names = targets["names"][id(tensor)]
        present = [n for n in names if n in where]
        used.update(names)
        if not present:
            if id(tensor) not in targets["adapters"]:
                missing.append(names[0])
            continue
        entry = where[present[0]].entry(present[0])
        if tuple(entry.shape) != tuple(shape):
            mismatched.append(f"{present[0]} (checkpoint {list(entry.shape)}, model {list(shape)})")
    unexpected = sorted(set(where) - used)
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_some(mismatched)}")
    if problems:
        raise CheckpointError(f"{what}: the checkpoint does not fit the model: " + "; ".join(problems))
    # each tensor reads from the first of its names the checkpoint has (an adapter absent from it: None)
    targets["source"] = {id(t): next((n for n in targets["names"][id(t)] if n in where), None)
                         for t, _ in tensors}


def _fill_frozen(state: TrainingState, group, where: dict[str, TensorFileReader], targets: dict) -> None:
    """A frozen group's home from the checkpoint (this rank's shard), one chunk of fp32 values at a time."""
    pieces = chunks(group.shard_numel, CHUNK_ELEMENTS)
    buffer = torch.empty(min(group.shard_numel, CHUNK_ELEMENTS), dtype=torch.float32)
    for k, (start, end) in enumerate(pieces):
        chunk = buffer[:end - start]
        chunk.zero_()  # (padding between parameters is zero)
        _read_master(group, chunk, group.lo + start, group.lo + end, where, targets)
        state.weights.load_weights(group.index, chunk, start, k == len(pieces) - 1)


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:5])
    return f"{len(items)} tensors ({shown}{', ...' if len(items) > 5 else ''})"


def _read_master(group, master: torch.Tensor, start: int, end: int, where: dict[str, TensorFileReader],
                 targets: dict, kept: torch.Tensor | None = None) -> None:
    """Elements [start, end) of the group's parameters, read and converted to fp32 into ``master``; a PEFT
    adapter the checkpoint does not have is copied from ``kept`` (the group's master shard before the load)."""
    for slot, a, b in group.pieces(start, end):
        name = targets["source"][id(slot.param)]
        if name is None:  # a PEFT adapter the base checkpoint does not have: it keeps its current value
            master[a - start:b - start].copy_(kept[a - group.lo:b - group.lo])
            continue
        reader = where[name]
        entry = reader.entry(name)
        item = torch.empty((), dtype=entry.dtype).element_size()
        out = master[a - start:b - start]
        if entry.dtype == torch.float32:
            reader.io.wait(reader.read(name, (a - slot.offset) * item, out))
        else:
            staged = torch.empty(b - a, dtype=entry.dtype)
            reader.io.wait(reader.read(name, (a - slot.offset) * item, staged))
            out.copy_(staged)


class PretrainedValues:
    """The values of a model on the meta device from a Hugging Face safetensors checkpoint, for
    ``Engine(model, config, pretrained=path)``: the first of the engine's value sources (Note [values provided
    elsewhere], meta_init.py), so the groups are filled straight from the checkpoint and the init_empty replay
    makes only what the checkpoint lacks (a PEFT model's adapters). The checkpoint is matched against the model
    (names, shapes, as ``load_pretrained`` does) when this is made, before the engine allocates anything; each
    tensor is then read whole when the engine asks for it (one group's values in memory at a time, as with
    the replay), in the checkpoint's dtype (the engine converts it where it stores it)."""

    def __init__(self, model: torch.nn.Module, path: str | Path, io_config) -> None:
        self.path = Path(path)
        files = checkpoint_files(self.path)
        self._io = IoEngine(io_config)
        self._readers: dict[Path, TensorFileReader] = {}
        self.bytes_read, self.seconds = 0, 0.0
        try:
            self._where = _open_files(files, self._io, self._readers)
            targets = _targets(model)
            unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
            _check([(t, t.shape) for t in unique.values()], self._where, targets, f"pretrained={self.path}")
        except BaseException:
            self.close()
            raise
        self._source: dict[int, str] = {i: name for i, name in targets["source"].items() if name is not None}
        # the storages the replay leaves alone (Note [values provided elsewhere])
        self.provided = frozenset(storage_key(t) for i, t in unique.items() if i in self._source)

    def value(self, t: torch.Tensor) -> torch.Tensor | None:
        name = self._source.get(id(t))
        if name is None:
            return None
        start = time.perf_counter()
        reader = self._where[name]
        entry = reader.entry(name)
        out = torch.empty(tuple(entry.shape), dtype=entry.dtype)
        reader.wait(reader.read(name, 0, out))
        self.bytes_read += entry.nbytes
        self.seconds += time.perf_counter() - start
        if out.dtype != t.dtype and not (isinstance(t, torch.nn.Parameter) and t.is_floating_point()):
            out = out.to(t.dtype)  # (a buffer, or integer parameter, keeps its own dtype)
        return out

    def ready_at(self, t: torch.Tensor) -> float | None:
        return -1 if id(t) in self._source else None

    def why_not(self, t: torch.Tensor) -> str:
        return f"{self.path} does not have it"

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._io.close()


@contextlib.contextmanager
def meta_value_sources(model: torch.nn.Module, pretrained: str | Path | None, io_config
                       ) -> Iterator[list[ValueSource]]:
    """The value sources of a model on the meta device (``value_sources``), with the checkpoint at
    ``pretrained`` first when given: matched against the model on entry (a misfit raises here), closed on exit."""
    if pretrained is None:
        yield value_sources(model)
        return
    checkpoint = PretrainedValues(model, pretrained, io_config)
    try:
        yield value_sources(model, checkpoint)
    finally:
        checkpoint.close()
    log.info("offload: weights from %s (%.2f GB read in %.1f s)", checkpoint.path, checkpoint.bytes_read / 1e9,
             checkpoint.seconds)
