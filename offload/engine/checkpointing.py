"""Saving an Engine's complete training state (``Engine.save``), and the checkpoint format that
``checkpoint_load.py`` (``Engine.load``) reads back.

A checkpoint version holds (see ``offload.checkpoint.directory`` for the atomic layout around it):

- ``master.safetensors``, ``exp_avg.safetensors``, ``exp_avg_sq.safetensors``: fp32, one tensor per trainable
  parameter under its name in the model, in group order. Keyed by name, not by our flat layout, so a checkpoint
  loads whatever the placement of the engine that loads it (RAM or NVMe, another host budget) and the master
  file is directly a full-precision copy of the weights.
- ``model.safetensors``: the rest of ``model.state_dict()`` (buffers, frozen integer tensors) as the engine holds
  it. Frozen floating-point parameters are not stored: ``meta.json`` holds their fingerprint (frozen_base.py).
- ``meta.json``: step counts, loss scaler, hyper-parameters, RNG states, the config, the caller's ``extra``, and
  where each ``model.state_dict()`` key is stored (what ``offload.export`` needs to work without the model).
- ``config.json``: the model's Hugging Face config, when it has one.

State on NVMe is streamed out of the swap files through staging slots, chunk by chunk (the swap files are read,
never copied); state in RAM is written straight from the host buffers. Only the bounded staging is used, so a
save or load needs no memory beyond the engine's budget and a fixed 16 MiB for checksums.

With several ranks every rank writes its shard of the three state files (Note [sharded checkpoints],
sharded_reader.py) into the version directory rank 0 opened, rank 0 writes the rest, and rank 0 commits once
every rank has reported its files written and fsynced; a failure on any rank abandons the version on all.
``save`` and ``load`` are then collective calls, and the checkpoint path must be one directory all ranks see.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from offload.checkpoint.directory import CheckpointDir, write_file_durably
from offload.checkpoint.sharded_reader import SHAPES_KEY, SHARD_OFFSETS_KEY, rank_file_name
from offload.checkpoint.tensor_file import FileRecord, TensorFileWriter, byte_view, plan_entries
from offload.engine.frozen_base import FINGERPRINT_KEY, frozen_fingerprint, is_frozen_weight
from offload.errors import CheckpointError
from offload.optim.state_store import STATE_PARTS, StatePlacement, chunks, split_state
from offload.storage.io_engine import IoEngine, IoHandle

if TYPE_CHECKING:
    from offload.engine.training_state import TrainingState

log = logging.getLogger("offload")

STATE_FILES = ("master", "exp_avg", "exp_avg_sq")  # in the order of a group's state run (split_state)
MODEL_FILE = "model"
META_FILE = "meta.json"
HF_CONFIG_FILE = "config.json"


def save(state: TrainingState, path: str, extra: dict[str, Any] | None) -> Path:
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise TypeError(f"engine.save: extra must be a dict; got {type(extra).__name__}")
    try:
        extra_json = json.loads(json.dumps(extra))
    except (TypeError, ValueError) as e:
        raise TypeError(f"engine.save: extra must hold JSON values only (numbers, strings, lists, dicts): {e}") \
            from None
    if state.grads.any_received():
        raise RuntimeError("engine.save: gradients were accumulated since the last step and a checkpoint cannot "
                           "hold them; call engine.step() before saving")
    start = time.perf_counter()
    ranks = state.ranks
    directory = CheckpointDir(path)
    if not ranks.many:
        version = directory.begin(state.step)
        try:
            records = _write_files(state, version, extra_json)
            directory.commit(version, records)
        except BaseException:
            directory.abandon(version)  # the previous checkpoint, if any, is still the current one
            raise
    else:
        version, records = _save_ranks(state, directory, extra_json)
    total = sum(r.size for r in records.values())
    seconds = time.perf_counter() - start
    log.info("offload: saved step %d to %s (%.2f GB in %.1f s, %.2f GB/s)", state.step, path, total / 1e9,
             seconds, total / 1e9 / max(seconds, 1e-9))
    return version


def _write_files(state: TrainingState, version: Path, extra: dict[str, Any]) -> dict[str, FileRecord]:
    """This rank's files of the checkpoint (all of them with one rank): its state shards, and on rank 0 the
    model's other tensors, meta.json and config.json. Returns their records."""
    io = IoEngine(state.config.io)
    try:
        records = _write_optimizer_state(state, version, io)
        frozen_fingerprint(state)  # (collective the first time: every rank, before rank 0 writes meta.json)
        if state.ranks.rank == 0:
            keys, other = _state_dict_layout(state)
            records[MODEL_FILE + ".safetensors"] = _write_tensors(version / (MODEL_FILE + ".safetensors"), other,
                                                                  io)
            meta = _meta(state, keys, extra)
            records[META_FILE] = write_file_durably(version / META_FILE, json.dumps(meta, indent=1).encode())
            hf_config = _hf_config_json(state.model)
            if hf_config is not None:
                records[HF_CONFIG_FILE] = write_file_durably(version / HF_CONFIG_FILE, hf_config.encode())
        return records
    finally:
        io.close()


def _save_ranks(state: TrainingState, directory: CheckpointDir, extra: dict[str, Any]) -> tuple[Path, dict]:
    """The collective save: rank 0 opens the version, every rank writes its files, rank 0 commits if all did.
    Every rank raises if any failed (naming the rank and its error), and the version is then removed."""
    ranks = state.ranks
    opened: tuple[str | None, str | None] = (None, None)
    if ranks.rank == 0:
        try:
            opened = (str(directory.begin(state.step)), None)
        except Exception as e:
            opened = (None, f"{type(e).__name__}: {e}")
    name, error = ranks.from_rank0(opened)
    if error is not None:
        raise CheckpointError(f"engine.save: rank 0 could not start the checkpoint ({error})")
    version = Path(name)
    records, error = {}, None
    try:
        records = _write_files(state, version, extra)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    reports = ranks.all_objects((records, error))
    failed = [(r, err) for r, (_, err) in enumerate(reports) if err is not None]
    merged = {name: record for rank_records, _ in reports for name, record in rank_records.items()}
    outcome = None
    if ranks.rank == 0:
        try:
            if failed:
                directory.abandon(version)
            else:
                directory.commit(version, merged)
        except Exception as e:
            directory.abandon(version)
            outcome = f"rank 0 could not commit it ({type(e).__name__}: {e})"
    outcome = ranks.from_rank0(outcome)
    if failed:
        rank, err = failed[0]
        raise CheckpointError(f"engine.save: rank {rank} failed to write its part ({err}); nothing was saved")
    if outcome is not None:
        raise CheckpointError(f"engine.save: {outcome}; nothing was saved")
    return version, merged


def _state_entries(state: TrainingState) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...]]], dict[str, str]]:
    """The tensors of this rank's state files, in the order they are written (group by group), and the files'
    metadata: whole parameters with one rank; with several, the run of each parameter's elements in this
    rank's shard with where it starts (Note [sharded checkpoints])."""
    if not state.ranks.many:
        return [(slot.name, torch.float32, tuple(slot.shape)) for g in state.groups for slot in g.slots], \
            {"format": "pt"}
    tensors, offsets, shapes = [], {}, {}
    for group in state.groups:
        for slot, a, b in group.pieces(group.lo, group.hi):
            tensors.append((slot.name, torch.float32, (b - a,)))
            offsets[slot.name] = a - slot.offset
            shapes[slot.name] = list(slot.shape)
    return tensors, {"format": "pt", SHARD_OFFSETS_KEY: json.dumps(offsets), SHAPES_KEY: json.dumps(shapes)}


def _write_optimizer_state(state: TrainingState, version: Path, io: IoEngine) -> dict[str, FileRecord]:
    """master, exp_avg and exp_avg_sq of every trainable parameter (this rank's shard of each), group by
    group, into three files."""
    store = state.store
    tensors, metadata = _state_entries(state)
    entries = plan_entries(tensors)
    writers = []
    try:
        for name in STATE_FILES:
            file_name = rank_file_name(name, state.ranks.rank, state.ranks.world)
            writers.append(TensorFileWriter(version / file_name, entries, io, metadata))
        # Note [checkpoint staging]: NVMe groups come in through at most two of the optimizer's staging slots
        # (free: no step is running). The writes of a chunk are queued and the read of the next chunk goes to
        # the other slot; a slot is refilled only after the writes queued from it are complete.
        slots = store.staging[:2]
        writes_from: list[list[tuple[int, list[IoHandle]]]] = [[] for _ in slots]
        turn = 0
        for state in store.states:
            group = state.group
            lo = group.lo  # the state buffers hold the shard: element e of the group is at e - lo
            if state.placement is StatePlacement.HOST:
                parts = split_state(state.state_host.view(torch.float32), group.shard_numel)
                for writer, part in zip(writers, parts):
                    for _, a, b in group.pieces(group.lo, group.hi):
                        writer.append(part[a - lo:b - lo])
                continue
            for start, end in chunks(group.shard_numel, store.chunk_elements):
                s = turn % len(slots)
                turn += 1
                for w, handles in writes_from[s]:
                    writers[w].wait(handles)
                writes_from[s] = []
                staging = slots[s].view(torch.float32)[:STATE_PARTS * (end - start)]
                for handle in store.transfer("read", state, start, end, staging):
                    store.swap.wait(handle)
                parts = split_state(staging, end - start)
                for w, part in enumerate(parts):
                    for _, a, b in group.pieces(lo + start, lo + end):
                        writes_from[s].append((w, writers[w].append(part[a - lo - start:b - lo - start])))
        return {writer.path.name: writer.finish() for writer in writers}
    finally:
        for writer in writers:
            writer.close()


def _state_dict_layout(state: TrainingState) -> tuple[list[list[str]], list[tuple[str, torch.Tensor]]]:
    """For every key of ``model.state_dict()``: [key, "master", parameter name] for trainable parameters,
    [key, "alias", first key] for a tensor already listed under another key (tied weights), [key, "frozen",
    key] for a frozen floating-point parameter (fingerprinted, not stored), [key, "model", key] for the rest,
    whose CPU copies are returned as the second value."""
    trainable = {id(slot.param): slot.name for g in state.groups for slot in g.slots}
    first_key: dict[int, str] = {}
    keys, other = [], []
    for key, value in state.model.state_dict(keep_vars=True).items():
        if id(value) in first_key:
            keys.append([key, "alias", first_key[id(value)]])
            continue
        first_key[id(value)] = key
        if id(value) in trainable:
            keys.append([key, "master", trainable[id(value)]])
        elif is_frozen_weight(value):
            keys.append([key, "frozen", key])
        else:
            keys.append([key, MODEL_FILE, key])
            other.append((key, value.detach().to("cpu").contiguous()))
    return keys, other


def _write_tensors(path: Path, tensors: list[tuple[str, torch.Tensor]], io: IoEngine) -> FileRecord:
    writer = TensorFileWriter(path, plan_entries([(n, t.dtype, tuple(t.shape)) for n, t in tensors]), io,
                              {"format": "pt"})
    try:
        for _, tensor in tensors:
            writer.append(tensor.reshape(-1))
        return writer.finish()
    finally:
        writer.close()


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": _encode_bytes(torch.get_rng_state()), "python": _python_rng()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = [_encode_bytes(s) for s in torch.cuda.get_rng_state_all()]
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        states["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return states


def _encode_bytes(state: torch.Tensor) -> str:
    return base64.b64encode(bytes(byte_view(state.contiguous()))).decode()


def _python_rng() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _meta(state: TrainingState, keys: list[list[str]], extra: dict[str, Any]) -> dict[str, Any]:
    from offload import __version__

    return {
        "offload_version": __version__,
        "step": state.step,
        "world_size": state.ranks.world,
        "param_steps": {slot.name: state.param_steps[g][i] for g, group in enumerate(state.groups)
                        for i, slot in enumerate(group.slots)},
        "loss_scaler": state.scaler.state_dict(),
        "param_groups": [_group_meta(group) for group in state.param_groups],
        "config": dataclasses.asdict(state.config),
        "state_dict_keys": keys,
        FINGERPRINT_KEY: frozen_fingerprint(state),
        "rng": _rng_states(),
        "extra": extra,
    }


def _group_meta(group: dict[str, Any]) -> dict[str, Any]:
    """A param group as meta.json keeps it: names, hyper-parameters, and the numbers an lr scheduler keeps in
    the group (``initial_lr``, ``max_lr``...), restored by ``load`` as torch's ``optimizer.load_state_dict``
    restores them: a scheduler built before ``load`` whose ``load_state_dict`` follows continues where it was.
    Other values are not JSON and are left out."""
    out: dict[str, Any] = {"names": list(group["names"])}
    for key, value in group.items():
        if key in ("params", "names"):
            continue
        if key == "betas":
            out[key] = [float(b) for b in value]
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = value
    return out


def _hf_config_json(model: torch.nn.Module) -> str | None:
    """The model's Hugging Face config as config.json text (with ``architectures`` set), or None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    data = json.loads(config.to_json_string(use_diff=False))
    if not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
