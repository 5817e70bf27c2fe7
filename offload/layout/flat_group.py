"""FlatGroup: where each parameter of a group sits inside the group's flat buffers.

Every buffer of a group (fp32 master, Adam m and v, gradient accumulator, the device weights in the compute
dtype) has the same element layout, so one offset locates a parameter in all of them and the native Adam runs
over long contiguous spans. Parameters are ordered by hyper-parameter group, so that each hyper-parameter
group is one span.

Note [rank shards]: with several ranks (``torch.distributed``) the group's length is padded to a multiple of
``world * GROUP_ALIGN_ELEMENTS`` and rank r owns elements ``[lo, hi) = [r * numel / world, (r + 1) * numel /
world)``: its host and NVMe buffers (master, m, v, gradient accumulator, the offloaded weights) hold only that
shard, in the same order, so host buffers index ``element - lo``. The device buffer of the weights always holds
the whole group (an all-gather of the shards fills it). Each shard is whole 4 KiB pages in every dtype, as
O_DIRECT needs. One rank: ``lo = 0``, ``hi = numel``.

Note [frozen groups]: frozen parameters (``requires_grad=False``, e.g. the base of a LoRA model) are offloaded
like trainable ones, in groups of their own (``FlatGroup.frozen``) made by block the same way, whose indices
follow the trainable groups' (so the optimizer's indices 0..T-1 never reach them). A frozen group has a home
in the compute dtype and a device buffer, and nothing else: no master, moments or gradients, and no update,
so no fetch of it ever waits for one, it is never kept through or lent to an update, and it is never written
back. The fetch scheduler fetches it with its block's trainable group and releases it in backward once that
block's backward no longer reads it (Note [frozen release in backward], schedule/fetch_scheduler.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from offload.layout.partition import ModelPartition, ParamGroupSpec

# Each parameter starts on a multiple of 64 elements: whole cache lines in fp32 and in bf16, so SIMD loads and
# the kernel's streaming stores of the low-precision copy are aligned.
PARAM_ALIGN_ELEMENTS = 64
# A group's length is a multiple of 2048 elements: its buffers are whole 4 KiB pages in fp32 and in bf16/fp16,
# as O_DIRECT file I/O requires, and the three fp32 state buffers sit back to back in one swap file with every
# part aligned.
GROUP_ALIGN_ELEMENTS = 2048


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Slot:
    """One parameter inside its group's flat buffers: elements [offset, offset + numel)."""

    name: str
    param: nn.Parameter
    offset: int
    numel: int
    shape: torch.Size
    hyper_index: int

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class FlatGroup:
    """The layout of one group. ``numel`` counts padding: the elements between and after parameters are zero in
    every buffer and stay zero under Adam (zero gradient, zero state, zero weight)."""

    index: int
    name: str
    slots: tuple[Slot, ...]
    numel: int
    lo: int     # this rank's shard of every host buffer: elements [lo, hi) (Note [rank shards])
    hi: int
    # Frozen parameters (requires_grad=False) offloaded like trainable ones: only the compute-dtype weights
    # exist (no master, moments or gradients), they never change, and the group's index follows the
    # trainable groups' (Note [frozen groups]).
    frozen: bool = False

    @property
    def shard_numel(self) -> int:
        return self.hi - self.lo

    @property
    def sharded(self) -> bool:
        return self.shard_numel != self.numel

    def view(self, flat: torch.Tensor, slot: Slot) -> torch.Tensor:
        """The part of a flat buffer of this group that holds ``slot``, in the parameter's shape."""
        return flat[slot.offset:slot.end].view(slot.shape)

    def pieces(self, start: int, end: int) -> Iterator[tuple[Slot, int, int]]:
        """(slot, a, b) for every slot with elements in [start, end) of the group: [a, b) is that overlap."""
        for slot in self.slots:
            a, b = max(slot.offset, start), min(slot.end, end)
            if a < b:
                yield slot, a, b


def build_flat_group(index: int, spec: ParamGroupSpec, hyper_index_of: dict[int, int], rank: int = 0,
                     world: int = 1, frozen: bool = False) -> FlatGroup:
    """Lays out ``spec``'s parameters, grouped by hyper-parameter group (stable within one), with ``rank``'s
    shard of ``world`` (Note [rank shards]). A ``frozen`` group's parameters have no hyper-parameter group
    (``hyper_index_of`` is not read; every slot's ``hyper_index`` is -1)."""
    if frozen:
        hyper_index_of = {id(p): -1 for p in spec.params}
    order = sorted(range(len(spec.params)), key=lambda i: hyper_index_of[id(spec.params[i])])
    slots = []
    offset = 0
    for i in order:
        param = spec.params[i]
        slots.append(Slot(name=spec.param_names[i], param=param, offset=offset, numel=param.numel(),
                          shape=param.shape, hyper_index=hyper_index_of[id(param)]))
        offset = _round_up(offset + param.numel(), PARAM_ALIGN_ELEMENTS)
    align = GROUP_ALIGN_ELEMENTS * world
    numel = max(align, _round_up(offset, align))
    shard = numel // world
    return FlatGroup(index=index, name=spec.name, slots=tuple(slots), numel=numel, lo=rank * shard,
                     hi=(rank + 1) * shard, frozen=frozen)


def gather_fp32(group: FlatGroup) -> torch.Tensor:
    """Group ``group``'s current parameter values as one fp32 CPU flat tensor in its layout (padding zero)."""
    master = torch.zeros(group.numel, dtype=torch.float32)
    for slot in group.slots:
        group.view(master, slot).copy_(slot.param.detach())
    return master


def shard_spans(group: FlatGroup, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of group-coordinate element ranges ``spans`` inside this rank's shard, in shard coordinates
    (``element - lo``); empty parts are left out."""
    out = []
    for a, b in spans:
        a, b = max(a, group.lo), min(b, group.hi)
        if a < b:
            out.append((a - group.lo, b - group.lo))
    return out


def frozen_groups(partition: ModelPartition, offloaded: bool, rank: int, world: int, first_index: int
                  ) -> tuple[list[FlatGroup], list[tuple[str, nn.Parameter]]]:
    """With ``offloaded`` parameters, the frozen floating-point ones are offloaded too, in groups of their own
    whose indices follow the trainable groups' (Note [frozen groups]). Returns those groups and the frozen
    parameters that stay whole on the device (all of them when not ``offloaded``)."""
    groups = [build_flat_group(first_index + k, spec, {}, rank, world, frozen=True)
              for k, spec in enumerate(partition.frozen_groups)] if offloaded else []
    in_groups = {id(slot.param) for group in groups for slot in group.slots}
    return groups, [(n, p) for n, p in partition.frozen if id(p) not in in_groups]


def resident_bytes(resident_frozen: list[tuple[str, nn.Parameter]], dtype: torch.dtype) -> int:
    """The device bytes of the frozen parameters that stay there (floating-point ones in ``dtype``)."""
    lowp_bytes = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * (lowp_bytes if p.is_floating_point() else p.element_size()) for _, p in resident_frozen)
