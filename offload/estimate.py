"""What a training run needs, per placement: device memory, host RAM (peak RSS) and disk, before running it.

The model is described by its shape only: built on the meta device from a preset or a Hugging Face config (the
exact parameter groups the engine will make), or, from a bare parameter count, a Llama of standard
proportions. The byte counts follow the engine's own allocations (see Note [what the estimate counts]); the
constants in the activation term are the usual transformer ones (a layer saves about 34 x hidden + 10 x
intermediate bytes per token in bf16), so that term is approximate and grows with batch x sequence.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import psutil
import torch

from offload.schedule.grad_stream import staging_ring_bytes
from offload.schedule.grad_swap import GRAD_SWAP_BUFFERS
from offload.layout.flat_group import GROUP_ALIGN_ELEMENTS
from offload.optim.state_store import (CHUNK_ELEMENTS, FP32_BYTES, STATE_PARTS, StatePlacement, chunks,
                                       plan_placement, staging_slots)
from offload.schedule.write_back import WRITEBACK_SLOTS
from offload.schedule.weight_homes import LOAD_PIECE_BYTES
from offload.storage.host_pool import HostPool
from offload.storage.io_engine import DIRECT_ALIGNMENT

# (params, optimizer, gradients), fastest first. Gradients go to NVMe when host_memory_limit is below what
# their fp32 accumulators need (4 B/param); the engine decides that itself.
PLACEMENTS = (("device", "cpu", "host"), ("cpu", "cpu", "host"), ("device", "nvme", "host"), ("cpu", "nvme", "host"),
              ("nvme", "nvme", "host"), ("nvme", "nvme", "nvme"))
# Llama shapes by size (hidden, layers, intermediate, heads), for a bare parameter count.
_LLAMA_SHAPES = ((768, 12, 2048, 12), (1024, 24, 2816, 16), (2048, 24, 5504, 16), (2560, 32, 6912, 20),
                 (4096, 32, 11008, 32), (5120, 40, 13824, 40), (6656, 60, 17920, 52), (8192, 80, 22016, 64))


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model."""

    name: str
    group_numels: tuple[int, ...]  # trainable elements per engine group
    frozen_numel: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int = 0
    largest_param: int = 0         # elements of the largest trainable parameter
    use_width: int = 1             # the most groups one module's forward needs at once (a tied head: 2)
    exact_groups: bool = True      # False: groups derived from a parameter count
    # Frozen floating-point parameters (e.g. a LoRA run's base) in groups of their own, by block: offloaded
    # like the trainable groups unless params="device" (elements per group, and their unpadded total)
    frozen_group_numels: tuple[int, ...] = ()
    frozen_grouped_numel: int = 0

    @property
    def numel(self) -> int:
        return sum(self.group_numels)


@dataclass(frozen=True)
class Estimate:
    params: str
    optimizer: str
    gradients: str
    device: str
    device_bytes: int         # parameters on the compute device at their peak (+ activations on a GPU)
    host_pool_bytes: int      # the engine's host buffers (pinned on CUDA)
    host_peak_bytes: int      # expected peak RSS of the training process
    disk_bytes: int           # swap files in nvme_dir
    nvme_read_per_step: int
    nvme_written_per_step: int
    parts: dict[str, int] = field(default_factory=dict)
    state_groups_in_ram: int = 0  # groups whose optimizer state stays in RAM (optimizer="cpu": all of them)

    @property
    def placement(self) -> str:
        return f"params={self.params} optimizer={self.optimizer}" + (
            " gradients=nvme" if self.gradients == "nvme" else "")


def parse_count(text: str) -> int | None:
    """'350M', '7B', '1.3e9', '125000000' -> a parameter count; None if ``text`` is not a count."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([kmbt]?)\s*", text.lower())
    if not m:
        return None
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2)]
    return int(float(m.group(1)) * scale)


def shape_from_count(count: int, vocab: int = 32000) -> ModelShape:
    """A Llama of standard proportions with about ``count`` parameters (untied embedding and head)."""
    def layer_numel(h: int, inter: int) -> int:
        return 4 * h * h + 3 * h * inter + 2 * h

    h, layers, inter, heads = min(_LLAMA_SHAPES, key=lambda s: abs(math.log(max(count, 1) / (
        s[1] * layer_numel(s[0], s[2]) + 2 * vocab * s[0]))))
    standard = layers * layer_numel(h, inter) + 2 * vocab * h
    if abs(count - standard) > 0.1 * standard:  # a nominal size ("7B" is Llama-2-7B's 6.74B) keeps its depth
        layers = max(1, round((count - 2 * vocab * h) / layer_numel(h, inter)))
    groups = (vocab * h,) + (layer_numel(h, inter),) * layers + (vocab * h + h,)
    return ModelShape(f"{count / 1e6:.0f}M-parameter Llama (assumed: hidden {h}, {layers} layers)", groups, 0,
                      h, inter, layers, vocab, heads=heads, largest_param=max(vocab * h, h * inter),
                      exact_groups=False)


def shape_from_model(model: torch.nn.Module, name: str) -> ModelShape:
    """The engine's groups of ``model`` (any device, the meta device included) and its transformer sizes."""
    from offload.layout.partition import partition_model
    from offload.schedule.fetch_scheduler import max_use_width, uses_by_module
    from offload.layout.flat_group import build_flat_group

    partition = partition_model(model)
    groups = [build_flat_group(i, spec, {id(p): 0 for p in spec.params}) for i, spec in enumerate(partition.groups)]
    frozen = [build_flat_group(len(groups) + k, spec, {id(p): 0 for p in spec.params})
              for k, spec in enumerate(partition.frozen_groups)]
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", 0) or 0
    return ModelShape(name, tuple(g.numel for g in groups), sum(p.numel() for _, p in partition.frozen),
                      hidden, getattr(config, "intermediate_size", 4 * hidden) or 0,
                      getattr(config, "num_hidden_layers", 0) or 0, getattr(config, "vocab_size", 0) or 0,
                      heads=getattr(config, "num_attention_heads", 0) or 0,
                      largest_param=max(p.numel() for spec in partition.groups for p in spec.params),
                      use_width=max_use_width(uses_by_module(model, groups + frozen)),
                      frozen_group_numels=tuple(g.numel for g in frozen),
                      frozen_grouped_numel=sum(p.numel() for spec in partition.frozen_groups for p in spec.params))


# The linear layers of a standard Llama block (shape_from_count's; no grouped-query attention): input and output
# features, each hidden (h) or intermediate (i).
_LLAMA_LINEARS = {"q_proj": "hh", "k_proj": "hh", "v_proj": "hh", "o_proj": "hh", "gate_proj": "hi", "up_proj": "hi",
                  "down_proj": "ih"}


def with_lora(shape: ModelShape, r: int, targets: list[str] | str) -> ModelShape:
    """``shape`` (one from a parameter count: a standard Llama) trained as a LoRA adapter of rank ``r`` on
    ``targets`` ("all-linear": every linear layer of the blocks; or names among q_proj, k_proj, v_proj, o_proj,
    gate_proj, up_proj, down_proj and lm_head): each target adds r x (inputs + outputs) trainable elements to
    its block's group; the whole model becomes the frozen base, in its groups. For a real model, build the peft
    model and use ``shape_from_model``."""
    names = list(_LLAMA_LINEARS) if targets == "all-linear" else list(targets)
    unknown = [n for n in names if n not in _LLAMA_LINEARS and n != "lm_head"]
    if unknown:
        raise ValueError(f"with_lora: {unknown[0]!r} is not a linear layer of the assumed Llama "
                         f"({', '.join(_LLAMA_LINEARS)}, lm_head)")
    h, inter = shape.hidden, shape.intermediate
    per_block = sum(r * sum({"h": h, "i": inter}[f] for f in _LLAMA_LINEARS[n]) for n in names if n != "lm_head")
    groups = [per_block] * shape.layers + ([r * (h + shape.vocab)] if "lm_head" in names else [])
    return dataclasses.replace(shape, group_numels=tuple(groups), frozen_numel=shape.numel + shape.frozen_numel,
                               largest_param=r * max(h, inter, shape.vocab if "lm_head" in names else 0),
                               use_width=2, frozen_group_numels=shape.group_numels,
                               frozen_grouped_numel=shape.numel)


def activation_bytes(shape: ModelShape, batch: int, seq_len: int, dtype_bytes: int,
                     checkpointing: bool = False) -> int:
    """Peak bytes of activations: what autograd keeps for backward (per layer and token about 34 x hidden + 10 x
    intermediate bytes in bf16, and the attention scores where the attention keeps them; the logits and their
    fp32 loss terms), plus backward's working set on top (the gradients of about two layers' activations and of
    the logits). With ``checkpointing`` a layer keeps its input; backward recomputes a layer at a time (+2 layers)."""
    tokens = batch * seq_len
    per_layer = tokens * (34 * shape.hidden + 10 * shape.intermediate + shape.heads * seq_len * 2) * dtype_bytes // 2
    logits = tokens * (shape.vocab * (dtype_bytes + 2 * FP32_BYTES) + 4 * shape.hidden)
    kept = shape.layers * (tokens * shape.hidden * dtype_bytes if checkpointing else per_layer)
    return kept + logits + (4 if checkpointing else 2) * per_layer + logits


# Note [what the estimate counts]: host buffers are the engine's HostPool allocations, each rounded to whole pages:
# fp32 gradient accumulators (4 B/param); Adam state in RAM (12 B/param) or, on NVMe, the staging slots of the state
# pipeline; the weights' homes (params="cpu": one compute-dtype copy, none for fp32 with state in RAM, where the
# master is the home) or, for params="nvme", two write-back slots of the largest group (none for fp32 with the
# optimizer on NVMe, whose weights are read from the masters in the state files: Note [weights in the state file])
# and, on CUDA, the fetch slots ((prefetch + 1) x use width; the CPU device reads into its own buffers, Note [CPU
# device pages]); on CUDA, the pinned weight buffers the kernel writes (params="device")
# and the gradient staging ring. On the CPU device the "device" weights are RAM too: all of them (params="device";
# none extra for fp32, which aliases the master) or the resident groups. The peak RSS is the larger of two moments:
# building the engine (the process as it is, the model's fp32 parameters as built in RAM, every host buffer and the
# device weights) and training (the process, the buffers, the resident weights, and the activations with backward's
# working set). With several ranks every figure is one rank's: the host buffers, swap files and NVMe traffic are
# those of its shard of each group (Note [rank shards]), while the model as built, the device weights and the
# activations are per process, and the gradient reduction adds two fp32 buffers of the largest group on the
# device (RAM on the CPU device).

def estimate(shape: ModelShape, params: str, optimizer: str, gradients: str = "host", *, dtype: str = "bf16",
             device: str = "cpu",
             batch: int = 1, seq_len: int = 512, prefetch: int = 2, device_memory_limit: int | None = None,
             base_rss: int | None = None, model_in_ram: bool = True, ranks: int = 1,
             host_memory_limit: int | None = None, activation_checkpointing: bool = False) -> Estimate:
    """One rank's figures when ``ranks`` share the state (one process: 1); see Note [what the estimate counts].
    With ``optimizer="nvme"`` and a ``host_memory_limit``, the groups whose state fits what the limit leaves stay
    in RAM, as the engine places them (``plan_placement``, Note [which state stays in RAM])."""
    layout = _layout(shape, params, optimizer, gradients, dtype, device, prefetch, ranks)
    parts = _host_buffers(layout)
    on_nvme = _place_state(layout, parts, host_memory_limit)
    pool = sum(parts.values())
    reduction = 2 * FP32_BYTES * max(layout.whole) if ranks > 1 else 0  # ShardReducer's buffers, on the device
    device_weights = _device_weights(layout, device_memory_limit)
    activations = activation_bytes(shape, batch, seq_len, layout.element, activation_checkpointing)
    base = psutil.Process().memory_info().rss if base_rss is None else base_rss
    model_fp32 = FP32_BYTES * (shape.numel + shape.frozen_numel) if model_in_ram else 0
    host_peak = _host_peak(layout, base, model_fp32, pool, device_weights, reduction, activations)
    read, written = _nvme_traffic(layout, on_nvme)
    parts.update({"base process": base, "model as built (fp32)": model_fp32, "activations": activations})
    if ranks > 1:
        parts["gradient reduction buffers (device)"] = reduction
    return Estimate(params, optimizer, gradients, device,
                    device_bytes=device_weights + (activations + reduction if layout.cuda else 0),
                    host_pool_bytes=pool, host_peak_bytes=host_peak, disk_bytes=_disk_bytes(layout, on_nvme),
                    nvme_read_per_step=read, nvme_written_per_step=written, parts=parts,
                    state_groups_in_ram=len(layout.numels) - sum(on_nvme))


@dataclass(frozen=True)
class _Layout:
    """One estimate's placement and model, with what follows from them for every term."""

    shape: ModelShape
    params: str
    optimizer: str
    gradients: str
    dtype: str
    cuda: bool
    prefetch: int
    ranks: int
    element: int          # bytes per weight in the compute dtype
    in_state: bool        # fp32 weights are the masters in the state files on NVMe
    whole: list[int]      # elements of each group, padded for the ranks
    numels: list[int]     # this rank's shard of each group
    frozen_whole: list[int]   # the same for the frozen groups, when they are offloaded (params != "device")
    frozen_numels: list[int]


def _layout(shape: ModelShape, params: str, optimizer: str, gradients: str, dtype: str, device: str, prefetch: int,
            ranks: int) -> _Layout:
    """The layout of ``shape`` for this placement, dtype, device and number of ranks."""
    align = GROUP_ALIGN_ELEMENTS * ranks

    def padded(numels: tuple[int, ...]) -> list[int]:  # (for the ranks)
        return [-(-n // align) * align if ranks > 1 else n for n in numels]
    whole = padded(shape.group_numels)
    frozen_whole = padded(shape.frozen_group_numels) if params != "device" else []  # (else resident, whole)
    return _Layout(shape, params, optimizer, gradients, dtype, device.startswith("cuda"), prefetch, ranks,
                   element={"fp32": 4, "bf16": 2, "fp16": 2}[dtype],
                   in_state=dtype == "fp32" and params == "nvme" and optimizer == "nvme",
                   whole=whole, numels=[n // ranks for n in whole], frozen_whole=frozen_whole,
                   frozen_numels=[n // ranks for n in frozen_whole])


def _host_buffers(layout: _Layout) -> dict[str, int]:
    """The engine's host buffers by name, in bytes, before the optimizer state is placed: gradients, optimizer
    state or staging, weight homes or slots, and the gradient staging ring (Note [what the estimate counts])."""
    numels, element, mapped = layout.numels, layout.element, HostPool.mapped_size
    largest = max(numels)
    parts: dict[str, int] = {}
    if layout.gradients == "nvme":  # (only with the state on NVMe: they travel with it)
        parts["gradient buffers"] = GRAD_SWAP_BUFFERS * mapped(FP32_BYTES * largest)
        parts["optimizer staging"] = _staging(numels, parts=STATE_PARTS + 1)
    else:
        parts["gradient accumulators"] = sum(mapped(FP32_BYTES * n) for n in numels)
    if layout.optimizer == "cpu":
        parts["optimizer state"] = sum(mapped(STATE_PARTS * FP32_BYTES * n) for n in numels)
    elif layout.gradients != "nvme":
        parts["optimizer staging"] = _staging(numels)
    if layout.params == "cpu" and not (layout.dtype == "fp32" and layout.optimizer == "cpu"):
        parts["weight homes"] = sum(mapped(element * n) for n in numels)
    if layout.params == "cpu" and layout.frozen_numels:  # (a compute-dtype copy, whatever the dtype)
        parts["frozen weight homes"] = sum(mapped(element * n) for n in layout.frozen_numels)
    if layout.params == "nvme":
        # A fetch slot holds any group's home; a write-back slot a trainable group's, or a piece of a frozen
        # one's (frozen homes are written only when filled, piece by piece: weight_homes.LOAD_PIECE_BYTES).
        fetch_slot = mapped(element * max(numels + layout.frozen_numels))
        frozen = element * max(layout.frozen_numels, default=0)
        writeback_slot = mapped(max(element * largest, min(frozen, LOAD_PIECE_BYTES)))
        writeback = 0 if layout.in_state and not frozen else WRITEBACK_SLOTS
        # CPU: reads land in the device buffers
        fetch = (layout.prefetch + 1) * layout.shape.use_width if layout.cuda else 0
        if fetch + writeback:
            parts["weight fetch and write-back slots"] = fetch * fetch_slot + writeback * writeback_slot
    elif layout.params == "device" and layout.cuda and layout.dtype != "fp32":
        parts["pinned weights for upload"] = sum(mapped(element * n) for n in layout.whole)  # (whole groups)
    if layout.cuda and layout.ranks == 1:  # (several ranks reduce on the device and copy shards)
        parts["gradient staging ring"] = mapped(staging_ring_bytes(layout.shape.largest_param * element))
    return parts


def _staging(numels: list[int], parts: int = STATE_PARTS) -> int:
    """The optimizer's staging slots for state on NVMe (OptimizerStateStore): one chunk of the largest group
    each, no more slots than there are chunks (a LoRA run's few small groups have fewer chunks than slots)."""
    largest = max(numels)
    chunk = min(largest, CHUNK_ELEMENTS)
    slots = min(sum(len(chunks(n, chunk)) for n in numels), staging_slots(largest))
    return slots * HostPool.mapped_size(parts * FP32_BYTES * chunk)


def _place_state(layout: _Layout, parts: dict[str, int], host_memory_limit: int | None) -> list[bool]:
    """Whether each group's state is on NVMe, as the engine places it (``plan_placement``, Note [which state
    stays in RAM]); adds the state kept in RAM to ``parts``, and drops the staging when none is on NVMe."""
    numels = layout.numels
    on_nvme = [layout.optimizer == "nvme"] * len(numels)  # each group's state
    if layout.optimizer == "nvme" and layout.gradients != "nvme" and host_memory_limit is not None:
        # What the engine has allocated or charged when it plans the state: everything above but the staging.
        left = host_memory_limit - sum(v for k, v in parts.items() if k != "optimizer staging")
        placement = plan_placement([_Group(n) for n in numels], True, left)
        on_nvme = [p is StatePlacement.NVME for p in placement]
        in_ram = [n for n, nvme in zip(numels, on_nvme) if not nvme]
        if in_ram:
            parts["optimizer state in RAM"] = sum(HostPool.mapped_size(STATE_PARTS * FP32_BYTES * n) for n in in_ram)
        if not any(on_nvme):
            del parts["optimizer staging"]
    return on_nvme


def _device_weights(layout: _Layout, device_memory_limit: int | None) -> int:
    """Bytes of weights on the compute device at their peak: all of them (params="device") or the resident
    groups, bounded by ``device_memory_limit``; the frozen weights included."""
    shape, element = layout.shape, layout.element
    if layout.params == "device":
        return shape.numel * element + shape.frozen_numel * element
    frozen_resident = shape.frozen_numel - shape.frozen_grouped_numel  # (frozen outside the groups, e.g. integer)
    resident = ((layout.prefetch + 1) * shape.use_width * max(layout.whole + layout.frozen_whole) * element
                + frozen_resident * element)
    return min(resident, device_memory_limit) if device_memory_limit else resident


def _host_peak(layout: _Layout, base: int, model_fp32: int, pool: int, device_weights: int, reduction: int,
               activations: int) -> int:
    """The expected peak RSS: the larger of building the engine and training (Note [what the estimate
    counts])."""
    aliased = layout.params == "device" and layout.dtype == "fp32" and layout.optimizer == "cpu" and layout.ranks == 1
    weights_in_ram = 0 if layout.cuda else (0 if aliased else device_weights) + reduction  # (aliased: the master)
    at_build = base + model_fp32 + pool + (weights_in_ram if layout.params == "device" else 0)
    in_training = base + pool + weights_in_ram + (0 if layout.cuda else activations)
    return max(at_build, in_training)


def _disk_bytes(layout: _Layout, on_nvme: list[bool]) -> int:
    """Bytes of this rank's swap files: the state on NVMe, the weights (params="nvme", unless they are the
    masters in the state files) and the gradients on NVMe."""
    disk = 0
    disk += sum(_file(STATE_PARTS * FP32_BYTES * n) for n, nvme in zip(layout.numels, on_nvme) if nvme)
    if layout.params == "nvme" and not layout.in_state:
        disk += sum(_file(layout.element * n) for n in layout.numels)
    if layout.params == "nvme":  # the frozen groups' homes (they have no state file to live in)
        disk += sum(_file(layout.element * n) for n in layout.frozen_numels)
    if layout.gradients == "nvme":
        disk += sum(_file(FP32_BYTES * n) for n in layout.numels)
    return disk


def _nvme_traffic(layout: _Layout, on_nvme: list[bool]) -> tuple[int, int]:
    """(bytes read, bytes written) on NVMe by this rank per step."""
    read = written = 0
    share = layout.shape.numel if layout.ranks == 1 else sum(layout.numels)  # this rank's elements
    state_share = sum(n for n, nvme in zip(layout.numels, on_nvme) if nvme)  # this rank's elements with state on NVMe
    if layout.optimizer == "nvme":
        # fp32 weights on the CPU device are the masters: the update reads only m and v (Note [master in
        # memory]; with params on NVMe that depends on room at run time, so all three are counted there)
        master_in_memory = (layout.dtype == "fp32" and not layout.cuda and layout.params == "device"
                            and layout.ranks == 1)
        read += (STATE_PARTS - master_in_memory) * FP32_BYTES * state_share
        written += STATE_PARTS * FP32_BYTES * state_share
    if layout.params == "nvme":
        # fetched in forward and again in backward; fp32 weights in the state file: only the groups whose state
        # is on NVMe come from the disk (Note [weights in the state file])
        read += 2 * layout.element * (state_share if layout.in_state else share)
        if not layout.in_state:
            written += layout.element * share  # the new weights, written back once (else the state write is it)
        # the frozen groups (this rank's elements): read only, never written
        read += 2 * layout.element * (layout.shape.frozen_grouped_numel if layout.ranks == 1
                                      else sum(layout.frozen_numels))
    if layout.gradients == "nvme":        # written after backward, read by the optimizer (one micro-batch)
        read += FP32_BYTES * share
        written += FP32_BYTES * share
    return read, written


@dataclass(frozen=True)
class _Group:
    """What plan_placement reads of a group."""
    shard_numel: int


def _file(nbytes: int) -> int:
    return -(-nbytes // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT


def fits(e: Estimate, ram: int, gpu: int | None, disk: int | None, host_limit: int | None = None) -> bool:
    """Whether ``e``'s host peak fits ``ram``, its device bytes ``gpu`` (when given: a GPU run), its swap files
    ``disk`` and its host buffers ``host_limit`` (a host_memory_limit; the engine refuses to start above it)."""
    return (e.host_peak_bytes <= ram and (gpu is None or e.device_bytes <= gpu) and
            (disk is None or e.disk_bytes <= disk) and (host_limit is None or e.host_pool_bytes <= host_limit))


def recommend(estimates: list[Estimate], ram: int, gpu: int | None, disk: int | None,
              host_limit: int | None = None) -> Estimate | None:
    """The first placement (fastest first: PLACEMENTS order) that fits; None if none does."""
    return next((e for e in estimates if fits(e, ram, gpu, disk, host_limit)), None)
