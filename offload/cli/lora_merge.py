"""save_merged: a LoRA run's model written as a full Hugging Face model directory, the adapter merged into the
base weights (``--merge-lora``), with bounded RAM.

Note [streamed merge]: the tensors are those of the base model's ``state_dict()`` with peft's wrapping taken
out: an adapted layer ``X`` (``X.base_layer.weight`` and ``X.lora_A/lora_B``) becomes ``X.weight = base +
delta`` (peft's ``get_delta_weight``: ``B @ A * alpha / r``, transposed for fan-in-fan-out layers) and
``X.bias``; the adapters themselves are not written. Names, dtypes and shapes are planned up front, so the shard
files (split as ``transformers.save_pretrained`` would) are created and preallocated before any value is
computed. Values are then produced one unit at a time (a block of the model, or a module outside the blocks)
inside ``engine.gathered(unit)``, each tensor written and dropped before the next is made: at most one unit's
gathered weights and one merged tensor are in memory. The sum is taken in fp32 and converted to the output
dtype once, as peft's ``merge_and_unload`` on an fp32 model does. The base weights are those the engine holds
(and the adapter was trained against): in the compute dtype, so a model stored in fp32 and trained in bf16 is
merged onto its bf16-rounded base. The directory is staged and moved into place
atomically (Note [atomic model directory], checkpoint/hf_directory.py). With several ranks every rank gathers
(the gathers are collective) and rank 0 writes.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from offload.checkpoint.hf_directory import (INDEX_FILE, ShardWriter, StagedDirectory, parse_max_shard_size, plan_shards,
                                             write_small_files)
from offload.cli.lora import ADAPTER
from offload.errors import ConfigError
from offload.storage.io_engine import IoEngine

log = logging.getLogger("offload")


class _Tensor(NamedTuple):
    """One tensor of the merged model: its name there, the dtype and shape written, the module gathered to
    produce it, and where its value comes from (``layer``: merged from that LoRA layer; else ``tensor``)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    unit: nn.Module
    tensor: torch.Tensor
    layer: nn.Module | None = None


def save_merged(engine: Any, out_dir: str | Path, *, dtype: torch.dtype, max_shard_size: int | str,
                tokenizer: Any = None, generation_config: Any = None, extra_files: dict[str, bytes] | None = None,
                overwrite: bool = False, write: bool = True, collective: bool = False) -> Path:
    """Writes the base model of the engine's peft model with its LoRA adapter merged in, as a Hugging Face
    model directory ``AutoModelForCausalLM.from_pretrained`` loads (Note [streamed merge]): ``config.json`` of
    the base model in ``dtype`` (floating tensors; others keep theirs), safetensors shards of at most
    ``max_shard_size``, the tokenizer's files, ``generation_config.json`` and ``extra_files`` when given.
    Atomic; a non-empty ``out_dir`` is replaced only with ``overwrite``. ``write``: whether this rank writes
    (rank 0; the others only take part in the gathers); ``collective``: several ranks gather. Raises ConfigError for an adapter that cannot be merged
    by addition (DoRA, LoRA biases, a layer tied to another)."""
    start = time.perf_counter()
    base = engine.model.get_base_model()
    tensors = merged_tensors(base, dtype)
    plan = plan_shards([(t.name, t.dtype, t.shape) for t in tensors], parse_max_shard_size(max_shard_size))
    directory = io = writer = None
    try:
        if write:
            directory = StagedDirectory(out_dir, overwrite)
            _write_small_files(directory, base, dtype, tokenizer, generation_config, extra_files or {})
            index = plan.index_json({"total_parameters": sum(t.tensor.numel() for t in tensors)})
            if index is not None:
                directory.write_file(INDEX_FILE, index)
            io = IoEngine(engine.config.io)
            writer = ShardWriter(directory.path, plan, io)
        error = _stream(engine, tensors, writer, collective)
        if error is not None:
            raise error
        if writer is not None:
            writer.finish()
            io.close()
            io = None
            directory.commit()
    except BaseException:
        if writer is not None:
            writer.close()
        if directory is not None:
            directory.abandon()  # the target is as it was
        raise
    finally:
        if io is not None:
            io.close()
    log.info("offload: merged model of %d tensors (%.2f GB) written to %s in %.1f s", len(tensors),
             plan.total_size / 1e9, out_dir, time.perf_counter() - start)
    return Path(out_dir)


def merged_tensors(base: nn.Module, dtype: torch.dtype) -> list[_Tensor]:
    """The merged model's tensors in the order they are produced: the base model's ``state_dict()`` order with
    each adapted layer's ``base_layer.`` prefix taken out and its adapters left out; a tensor tied under
    several names once, under its first (as ``transformers.save_pretrained`` does)."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    modules = dict(base.named_modules())
    state = base.state_dict(keep_vars=True)
    keys_of: dict[int, list[str]] = {}
    for key, tensor in state.items():
        keys_of.setdefault(id(tensor), []).append(key)
    out, seen = [], set()
    for key, tensor in state.items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        name, layer = _merged_name(key, layers)
        if name is None:  # an adapter's own tensor
            continue
        if layer is not None:
            _check_mergeable(name, layer, keys_of[id(tensor)])
        kept = dtype if tensor.is_floating_point() else tensor.dtype
        out.append(_Tensor(name, kept, tuple(tensor.shape), _unit(key, modules), tensor, layer))
    return out


def _merged_name(key: str, layers: dict[str, nn.Module]) -> tuple[str | None, nn.Module | None]:
    """The merged model's name for state_dict ``key`` and, for an adapted layer's weight, the LoRA layer
    producing it; (None, None) for the adapters' own tensors."""
    for prefix, layer in layers.items():
        if not key.startswith(prefix + "."):
            continue
        rest = key[len(prefix) + 1:]
        if not rest.startswith("base_layer."):
            return None, None  # lora_A, lora_B, ... of this layer
        attribute = rest.removeprefix("base_layer.")
        return f"{prefix}.{attribute}", (layer if attribute == "weight" else None)
    return key, None


def _check_mergeable(name: str, layer: nn.Module, keys: list[str]) -> None:
    if layer.use_dora.get(ADAPTER, False) or getattr(layer, "lora_bias", {}).get(ADAPTER, False):
        raise ConfigError(f"--merge-lora: {name} has a DoRA or bias adapter, which is not merged by addition; write "
                          "the adapter directory instead (drop --merge-lora)")
    if len(keys) > 1:
        raise ConfigError(f"--merge-lora: {name} is adapted but shares its weight with {', '.join(keys[1:])} (tied "
                          "weights); a merged model would need them untied; leave it out of --lora-targets or write "
                          "the adapter directory (drop --merge-lora)")


def _unit(key: str, modules: dict[str, nn.Module]) -> nn.Module:
    """The module gathered to produce ``key``: its block (a child of a ModuleList, e.g. ``model.layers.3``), or
    the module owning it for tensors outside the blocks."""
    owner = key.rpartition(".")[0]
    path = owner
    while path:
        parent = path.rpartition(".")[0]
        if isinstance(modules.get(parent), nn.ModuleList):
            return modules[path]
        path = parent
    return modules[owner]


def _stream(engine: Any, tensors: list[_Tensor], writer: ShardWriter | None, collective: bool
            ) -> BaseException | None:
    """Produces every tensor, one unit gathered at a time, and appends it to ``writer`` (None: a rank that does
    not write). With one rank an error is raised at once; with several, the first write error is returned after
    the last gather, so that every rank's gathers pair up."""
    error: BaseException | None = None
    i = 0
    while i < len(tensors):
        unit = tensors[i].unit
        j = i
        while j < len(tensors) and tensors[j].unit is unit:
            j += 1
        with torch.no_grad(), engine.gathered(unit):
            for t in tensors[i:j]:
                value = _value(t).to("cpu", t.dtype).contiguous()  # (dropped once written)
                if writer is None or error is not None:
                    continue
                try:
                    writer.wait(writer.append(t.name, value))
                except Exception as e:
                    if not collective:
                        raise
                    error = e
        i = j
    return error


def _value(t: _Tensor) -> torch.Tensor:
    """``t``'s value inside its unit's gathered context: a merged weight in fp32 (base + delta), else the tensor
    as the model holds it."""
    if t.layer is None:
        return t.tensor.detach()
    weight = t.tensor.detach()
    delta = t.layer.get_delta_weight(ADAPTER).detach()
    return weight.float() + delta.to(weight.device, torch.float32)


def _write_small_files(directory: StagedDirectory, base: nn.Module, dtype: torch.dtype, tokenizer: Any,
                       generation_config: Any, extra_files: dict[str, bytes]) -> None:
    """config.json (the base model's, with the written dtype and architecture, as save_pretrained sets them),
    the generation config, the tokenizer and ``extra_files``."""
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config = copy.deepcopy(config)
        config.dtype = str(dtype).removeprefix("torch.")
        config.architectures = [type(base).__name__]
    else:
        config = None
    write_small_files(directory, config, generation_config, tokenizer, extra_files)
