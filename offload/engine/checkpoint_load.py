"""Loading a checkpoint that ``Engine.save`` wrote (``Engine.load``); the format is in ``checkpointing.py``.

Every file is verified (sizes and CRC-32 against the manifest) and matched against the engine (names, shapes,
dtypes) before anything changes, so a bad checkpoint leaves the engine as it was; then the state is read back
group by group through the same bounded staging the save used, the other tensors of the model and the RNG
states are restored. ``load_model_tensors`` and ``other_tensors`` also serve ``load_pretrained``.
"""

from __future__ import annotations

import copy
import logging
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from offload.checkpoint.directory import CheckpointDir
from offload.checkpoint.sharded_reader import state_reader
from offload.checkpoint.tensor_file import FileRecord, TensorFileReader
from offload.engine import checkpoint_meta
from offload.engine.checkpoint_meta import short_list
from offload.engine.checkpointing import META_FILE, MODEL_FILE, STATE_FILES
from offload.engine.frozen_base import check_frozen_fingerprint, is_frozen_weight
from offload.engine.state_fill import fill_group
from offload.errors import CheckpointError
from offload.storage.io_engine import IoEngine

if TYPE_CHECKING:
    from offload.engine.training_state import TrainingState

log = logging.getLogger("offload")


def load(state: TrainingState, path: str, restore_rng: bool) -> dict[str, Any]:
    start = time.perf_counter()
    version, records = _verify(state, path)  # nothing is changed before every byte is known good
    trainable = [slot.name for g in state.groups for slot in g.slots]
    plan = checkpoint_meta.parse(version / META_FILE, trainable, [list(g["names"]) for g in state.param_groups])
    scaler = copy.deepcopy(state.scaler)
    scaler.load_state_dict(plan.scaler)  # (validated: applying it below cannot fail)
    io = IoEngine(state.config.io)
    readers: list = []
    model_reader = None
    try:
        for name in STATE_FILES:  # (saved by any number of ranks: each reads its own shard of every group)
            readers.append(state_reader(version, name, plan.world_size, io))
        model_reader = TensorFileReader(version / (MODEL_FILE + ".safetensors"), io)
        frozen_in_file = check_frozen_fingerprint(state, plan.frozen_fingerprint, version / META_FILE)
        _check_matches(state, readers, model_reader, frozen_in_file)
        # Note [check, then apply]: from here on only the reading of the state can fail.
        state.grads.reset()  # gradients accumulated before the load belong to the state it replaces
        try:
            state.quiesce()
            for group_state in state.store.states:
                group = group_state.group
                fill_group(state.store, state.weights, group_state, lambda parts, start, end, group=group:
                           _read_slots(readers, parts, group, start, end))
            load_model_tensors(state, lambda key: (model_reader, key), frozen_in_file)
        except BaseException as e:
            state.failed = f"loading {path} failed part-way ({type(e).__name__}: {e})"
            raise
    finally:
        for reader in readers + [model_reader]:
            if reader is not None:
                reader.close()
        io.close()
    _apply(state, plan, scaler, restore_rng)
    total = sum(r.size for r in records.values())
    log.info("offload: loaded step %d from %s (%.2f GB in %.1f s)", plan.step, path, total / 1e9,
             time.perf_counter() - start)
    return plan.extra


def _apply(state: TrainingState, plan: checkpoint_meta.LoadPlan, scaler: Any, restore_rng: bool) -> None:
    """The plan's plain values onto the engine (nothing here can fail on a value: the plan was checked)."""
    state.step = plan.step
    for g, group in enumerate(state.groups):
        state.param_steps[g] = [plan.param_steps[slot.name] for slot in group.slots]
    state.scaler = scaler
    for group, saved in zip(state.param_groups, plan.hyper):
        group.update({"lr": saved.lr, "betas": saved.betas, "eps": saved.eps, "weight_decay": saved.weight_decay,
                      **saved.scheduler_keys})
    if restore_rng:
        _restore_rng(plan)


def _verify(state: TrainingState, path: str) -> tuple[Path, dict[str, FileRecord]]:
    """CheckpointDir.verify; with several ranks each checksums its share of the files and every rank raises
    the first failure any rank found (collective)."""
    ranks = state.ranks
    if not ranks.many:
        return CheckpointDir(path).verify()
    found, error = None, None
    try:
        found = CheckpointDir(path).verify(share=(ranks.rank, ranks.world))
    except Exception as e:  # (every rank must reach the exchange below, whatever failed)
        error = str(e) if isinstance(e, CheckpointError) else f"{path}: {type(e).__name__}: {e}"
    errors = [e for e in ranks.all_objects(error) if e is not None]
    if errors:
        raise CheckpointError(errors[0])
    return found

def _check_matches(state: TrainingState, readers: list[TensorFileReader], model_reader: TensorFileReader,
                   frozen_in_file: bool) -> None:
    """Raises CheckpointError unless the checkpoint holds exactly the engine's parameters, with their shapes
    (the frozen floating-point ones only if ``frozen_in_file``: an older checkpoint)."""
    ours = {slot.name: tuple(slot.shape) for g in state.groups for slot in g.slots}
    for reader in readers:
        theirs = {name: e.shape for name, e in reader.entries.items()}
        missing = sorted(set(ours) - set(theirs))
        unexpected = sorted(set(theirs) - set(ours))
        wrong = sorted(n for n in set(ours) & set(theirs) if ours[n] != theirs[n])
        if missing or unexpected or wrong:
            parts = [f"missing {short_list(missing)}" if missing else "",
                     f"unexpected {short_list(unexpected)}" if unexpected else "",
                     "shape mismatch " + ", ".join(f"{n} {list(theirs[n])} vs model {list(ours[n])}"
                                                   for n in wrong[:3]) if wrong else ""]
            raise CheckpointError(f"{reader.path}: does not match the model's trainable parameters: "
                                  + "; ".join(p for p in parts if p))
        bad = [n for n, e in reader.entries.items() if e.dtype != torch.float32]
        if bad:
            raise CheckpointError(f"{reader.path}: tensor {bad[0]!r} is {reader.entries[bad[0]].dtype}, not fp32")
    for key, tensor in other_tensors(state, frozen_in_file).items():
        entry = model_reader.entries.get(key)
        if entry is None:
            raise CheckpointError(f"{model_reader.path}: no tensor {key!r} (a buffer or frozen parameter of "
                                  "the model)")
        if entry.shape != tuple(tensor.shape):
            raise CheckpointError(f"{model_reader.path}: tensor {key!r} has shape {list(entry.shape)}, the model "
                                  f"{list(tensor.shape)}")

def other_tensors(state: TrainingState, frozen_weights: bool = True) -> dict[str, torch.Tensor]:
    """The model's state_dict entries that are in no group (first key of each tensor): buffers, and the frozen
    parameters that stay on the device (not the offloaded frozen ones: Note [frozen groups]; with
    ``frozen_weights`` False, no frozen floating-point parameter: a checkpoint has only their fingerprint)."""
    trainable = {id(slot.param) for g in state.groups + state.frozen_groups for slot in g.slots}
    seen: set[int] = set()
    out = {}
    for key, value in state.model.state_dict(keep_vars=True).items():
        if id(value) in seen or id(value) in trainable or (not frozen_weights and is_frozen_weight(value)):
            continue
        seen.add(id(value))
        out[key] = value
    return out

def _read_slots(readers: list[TensorFileReader], parts: tuple[torch.Tensor, ...], group: Any,
                start: int, end: int) -> None:
    """Reads elements [start, end) of the group's parameters from the three state files into ``parts``
    (which hold exactly those elements)."""
    handles = []
    for reader, part in zip(readers, parts):
        for slot, a, b in group.pieces(start, end):
            handles.append((reader, reader.read(slot.name, (a - slot.offset) * 4, part[a - start:b - start])))
    for reader, handle in handles:
        reader.wait(handle)

def load_model_tensors(state: TrainingState, source_of: Callable[[str], tuple[TensorFileReader, str]],
                       frozen_weights: bool = True) -> None:
    """The model's other state_dict tensors (buffers; frozen parameters that stay on the device, unless not
    ``frozen_weights``), each from ``source_of(key)``: the file and the name it has there; converted to their
    dtype."""
    for key, tensor in other_tensors(state, frozen_weights).items():
        reader, name = source_of(key)
        entry = reader.entry(name)
        staged = torch.empty(entry.shape, dtype=entry.dtype)
        reader.io.wait(reader.read(name, 0, staged))
        with torch.no_grad():
            tensor.copy_(staged)

def _restore_rng(plan: checkpoint_meta.LoadPlan) -> None:
    if plan.rng_torch is not None:
        torch.set_rng_state(plan.rng_torch)
    if plan.rng_cuda is not None and torch.cuda.is_available():
        if len(plan.rng_cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(plan.rng_cuda)
        else:
            log.warning("offload: the checkpoint has CUDA RNG states of %d devices, this machine %d; not restored",
                        len(plan.rng_cuda), torch.cuda.device_count())
    if plan.rng_python is not None:
        random.setstate(plan.rng_python)
    numpy = sys.modules.get("numpy")
    if plan.rng_numpy is not None and numpy is not None:
        numpy.random.set_state(plan.rng_numpy)
