"""save_pretrained: the engine's current weights written as a Hugging Face model directory, with bounded RAM.

Note [streamed model export]: the tensors are planned up front (names, dtypes, shapes) in the order they will
be produced: each group's trainable parameters, group by group, from the fp32 masters, then each offloaded
frozen group's parameters (Note [frozen groups]), then the frozen parameters that stay on the device and the
persistent buffers as the model holds them. The plan fixes the shard files (as
``transformers.save_pretrained`` would split them), which are created and preallocated before any data is
written. Then, for each group, its whole fp32 master is read once (an all-gather of the shards with several
ranks) and its parameters are appended, converted to the output dtype one at a time: at most one group's
master and one converted tensor are in memory, whatever the model's size. The directory is staged and moved
into place atomically (Note [atomic model directory], checkpoint/hf_directory.py).

With several ranks the call is collective (every rank reads every master, the gathers pair up) and only rank 0
writes. A failure on rank 0 does not stop its gathers, so no rank waits forever; rank 0's outcome is sent to
every rank at the end, and every rank raises it.
"""

from __future__ import annotations

import copy
import difflib
import logging
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from offload.checkpoint.hf_directory import (INDEX_FILE, ShardPlan, ShardWriter, StagedDirectory, parse_max_shard_size,
                                             plan_shards, write_small_files)
from offload.checkpoint.tensor_file import DTYPE_NAMES
from offload.engine.checkpoint_load import other_tensors
from offload.errors import ConfigError
from offload.storage.io_engine import IoEngine

if TYPE_CHECKING:
    from offload.engine.engine import Engine
    from offload.engine.training_state import TrainingState

log = logging.getLogger("offload")

_DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


class _Source(NamedTuple):
    """One tensor of the output: a slot of group ``group`` (trainable: read from its master; frozen: from its
    weights), or ``tensor``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    group: int | None
    slot: Any = None
    tensor: torch.Tensor | None = None


def save_pretrained(engine: Engine, out_dir: str | Path, *, dtype: str | torch.dtype = "auto",
                    max_shard_size: int | str = "5GB", tokenizer: Any = None, generation_config: Any = None,
                    overwrite: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Writes the engine's current weights to ``out_dir`` as a Hugging Face model directory that
    ``AutoModelForCausalLM.from_pretrained`` loads: ``config.json`` (when the model has a Hugging Face config;
    its dtype says the written one), ``model.safetensors`` or shards with ``model.safetensors.index.json`` (as
    ``transformers.save_pretrained`` lays them out; ``max_shard_size`` an int or "5GB", "500MB", "2GiB"),
    ``generation_config.json`` and the tokenizer's files when given, and ``extra_files`` (name -> bytes).

    Keys are those of ``engine.model.state_dict()``; a tensor tied under several keys is written once, under
    its first. Trainable parameters come from the fp32 masters (the weights after the last step), converted to
    ``dtype`` ("fp32", "bf16", "fp16", a torch floating dtype, or "auto": the model config's dtype, else fp32);
    integer tensors are kept as they are. Host memory stays within one group's master plus one tensor
    (Note [streamed model export]). Atomic: ``out_dir`` holds either its previous contents or the complete new
    model, also after a crash or a full disk; a non-empty ``out_dir`` is replaced only with ``overwrite``
    (else ``OutputExistsError``). Collective with several ranks; rank 0 writes. Returns ``Path(out_dir)``.
    Blocks until everything is written and fsynced (on every rank: until rank 0 has put the directory in place)."""
    state = engine.training_state()  # (quiescent: the masters read below are those of the last step, complete)
    out_dtype = _output_dtype(state.model, dtype)
    limit = parse_max_shard_size(max_shard_size)
    extra = _checked_extra_files(extra_files)
    start = time.perf_counter()
    sources = _sources(state, out_dtype)
    plan = plan_shards([(s.name, s.dtype, s.shape) for s in sources], limit)
    hf_config = _hf_config(state.model, out_dtype)
    _check_names(extra, plan, hf_config is not None, generation_config is not None)
    ranks = state.ranks
    output: _Output | None = None
    try:
        error: BaseException | None = None
        if ranks.rank == 0:
            try:
                # (total_parameters counts as transformers' num_parameters() does: every parameter once)
                parameters = {"total_parameters": sum(p.numel() for p in state.model.parameters())}
                output = _Output(out_dir, overwrite, plan, parameters, state.config.io)
                output.write_small_files(hf_config, generation_config, tokenizer, extra)
                output.open_weights()
            except Exception as e:
                error = e
        error = _from_rank0(ranks, error)  # (every rank raises, before any gather)
        if error is None:
            error = _stream(state, sources, out_dtype, output)
        if output is not None and error is None:
            try:
                output.commit()
            except Exception as e:
                error = e
        error = _from_rank0(ranks, error)
        if error is not None:
            raise error
    except BaseException:
        if output is not None:
            output.abandon()  # the target is as it was
        raise
    seconds = time.perf_counter() - start
    log.info("offload: saved %d tensors (%.2f GB, %d shard%s) to %s in %.1f s", len(sources), plan.total_size / 1e9,
             len(plan.shards), "" if len(plan.shards) == 1 else "s", out_dir, seconds)
    return Path(out_dir)


def _stream(state: TrainingState, sources: list[_Source], out_dtype: torch.dtype, output: _Output | None
            ) -> BaseException | None:
    """Reads every group's master (collective) and appends its tensors to ``output`` (rank 0; None on the
    others), then the other tensors. Returns the first write error (with several ranks the gathers go on after
    one, so that no rank waits forever), or raises it at once with one rank."""
    by_group: dict[int, list[_Source]] = {}
    for source in sources:
        if source.group is not None:
            by_group.setdefault(source.group, []).append(source)
    error: BaseException | None = None
    for group in state.groups + state.frozen_groups:
        g = group.index
        # fp32 master or frozen weights, CPU, ours (collective with several ranks)
        master = state.weights.group_copy(g) if group.frozen else state.full_master(g)
        if output is not None and error is None:
            try:
                _append_group(output.weights, group, master, by_group.get(g, []), out_dtype)
            except Exception as e:
                if not state.ranks.many:
                    raise
                error = e
        del master  # before the next group's is read: one master in memory at a time
    if output is None or error is not None:
        return error
    try:
        for source in sources:
            if source.group is None:
                tensor = source.tensor.detach().to("cpu")
                output.weights.wait(output.weights.append(source.name, tensor.to(source.dtype).contiguous()))
        output.weights.finish()
    except Exception as e:
        if not state.ranks.many:
            raise
        return e
    return None


def _append_group(weights: ShardWriter, group: Any, master: torch.Tensor, sources: list[_Source],
                  out_dtype: torch.dtype) -> None:
    """Writes the group's parameters from its fp32 ``master``; returns once every write is complete."""
    handles = []
    for source in sources:
        view = group.view(master, source.slot)
        if out_dtype == torch.float32:
            handles += weights.append(source.name, view)  # straight from master: waited for below
        else:  # one converted tensor at a time: it is dropped once its write is complete
            weights.wait(weights.append(source.name, view.to(out_dtype)))
    weights.wait(handles)  # the writes read master, which the caller drops only after this


class _Output:
    """Rank 0's side: the staged directory, its small files and the shard writer."""

    def __init__(self, out_dir: str | Path, overwrite: bool, plan: ShardPlan, index_metadata: dict[str, object],
                 io_config: Any) -> None:
        self.plan = plan
        self.index_metadata = index_metadata
        self.io_config = io_config
        self.directory = StagedDirectory(out_dir, overwrite)
        self.io: IoEngine | None = None
        self.weights: ShardWriter | None = None

    def write_small_files(self, hf_config: Any, generation_config: Any, tokenizer: Any,
                          extra: dict[str, bytes]) -> None:
        write_small_files(self.directory, hf_config, generation_config, tokenizer, extra)

    def open_weights(self) -> None:
        """Creates (and preallocates) every shard file, and the index when there are several."""
        index = self.plan.index_json(self.index_metadata)
        if index is not None:
            self.directory.write_file(INDEX_FILE, index)
        self.io = IoEngine(self.io_config)
        self.weights = ShardWriter(self.directory.path, self.plan, self.io)

    def commit(self) -> None:
        self._close_io()
        self.directory.commit()

    def abandon(self) -> None:
        if self.weights is not None:
            self.weights.close()
        self._close_io()
        self.directory.abandon()

    def _close_io(self) -> None:
        if self.io is not None:
            self.io.close()
            self.io = None


def _from_rank0(ranks: Any, error: BaseException | None) -> BaseException | None:
    """Rank 0's ``error`` (or None) on every rank; rank 0 keeps its own exception object. An exception that
    cannot be pickled reaches the others as a RuntimeError with its text."""
    if not ranks.many:
        return error
    sent = error
    if ranks.rank == 0 and error is not None:
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            sent = RuntimeError(f"save_pretrained failed on rank 0 ({type(error).__name__}: {error})")
    shared = ranks.from_rank0(sent)
    return error if ranks.rank == 0 else shared


def _sources(state: TrainingState, out_dtype: torch.dtype) -> list[_Source]:
    """The tensors to write, in the order they are produced: each group's parameters (under the first
    state_dict key of each), group by group (the trainable groups, then the frozen ones), then the other
    state_dict tensors (first key of each)."""
    first_key: dict[int, str] = {}
    for key, value in state.model.state_dict(keep_vars=True).items():
        first_key.setdefault(id(value), key)
    out = []
    for group in state.groups + state.frozen_groups:
        for slot in group.slots:
            if id(slot.param) in first_key:
                out.append(_Source(first_key[id(slot.param)], out_dtype, tuple(slot.shape), group.index, slot=slot))
    for key, tensor in other_tensors(state).items():
        kept = out_dtype if tensor.is_floating_point() else tensor.dtype
        out.append(_Source(key, kept, tuple(tensor.shape), None, tensor=tensor))
    return out


def _output_dtype(model: torch.nn.Module, dtype: object) -> torch.dtype:
    """The dtype floating tensors are written in: ``dtype`` checked, "auto" resolved from the model's config."""
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point and dtype in DTYPE_NAMES:
            return dtype
    elif isinstance(dtype, str):
        if dtype == "auto":
            configured = getattr(getattr(model, "config", None), "dtype", None)
            if isinstance(configured, str):
                configured = getattr(torch, configured.removeprefix("torch."), None)
            if isinstance(configured, torch.dtype) and configured.is_floating_point and configured in DTYPE_NAMES:
                return configured
            return torch.float32
        if dtype in _DTYPE_NAMES:
            return _DTYPE_NAMES[dtype]
    close = difflib.get_close_matches(str(dtype), ["auto", *_DTYPE_NAMES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"dtype: {dtype!r} is not one of 'auto', 'fp32', 'bf16', 'fp16' or a torch floating dtype "
                      f"(torch.float32, torch.bfloat16, torch.float16, torch.float64){hint}")


def _hf_config(model: torch.nn.Module, out_dtype: torch.dtype) -> Any:
    """A copy of the model's Hugging Face config with its dtype and architectures set as
    ``transformers.save_pretrained`` sets them, or None when the model has none."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained") or not hasattr(config, "to_json_string"):
        return None
    config = copy.deepcopy(config)
    config.dtype = str(out_dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    return config


def _checked_extra_files(extra_files: dict[str, bytes] | None) -> dict[str, bytes]:
    if extra_files is None:
        return {}
    if not isinstance(extra_files, dict):
        raise ConfigError(f"extra_files: expected a dict of file name -> bytes; got {type(extra_files).__name__}")
    out = {}
    for name, data in extra_files.items():
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
            raise ConfigError(f"extra_files: {name!r} is not a plain file name (no directories)")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError(f"extra_files[{name!r}]: expected bytes; got {type(data).__name__}")
        out[name] = bytes(data)
    return out


def _check_names(extra: dict[str, bytes], plan: ShardPlan, has_config: bool, has_generation_config: bool) -> None:
    """extra_files may not replace a file save_pretrained writes itself."""
    ours = {shard.file for shard in plan.shards} | ({INDEX_FILE} if plan.sharded else set())
    ours |= {CONFIG_FILE} if has_config else set()
    ours |= {GENERATION_CONFIG_FILE} if has_generation_config else set()
    taken = sorted(ours & set(extra))
    if taken:
        raise ConfigError(f"extra_files: {taken[0]!r} is written by save_pretrained itself; choose another name")
