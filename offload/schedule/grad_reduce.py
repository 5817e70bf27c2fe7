"""ShardReducer: with several ranks, sums each group's gradients over the ranks into this rank's shard.

A group's gradients are collected, as autograd finishes them, into a full-group fp32 buffer on the compute
device (``full_device``, the group's flat layout, zero where no gradient came). When the last parameter of the
group has its gradient, the buffer is reduce-scattered: every rank receives the mean over the ranks of its own
shard [lo, hi) (Note [rank shards], flat_group.py), which is what ``GradientStream`` then adds into the
rank's fp32 accumulator on the host. The mean makes the result that of one process on the global batch when
every rank's loss is the mean over its equal share of that batch (DistributedDataParallel's convention).

Buffers are kept for reuse: as many exist as groups were ever in progress at once (one or two for models
whose groups finish one after another in backward). A group that never completes in a backward (a parameter
without gradient) is reduced by ``flush``, which first agrees with the other ranks on which parameters got one
(Note [collective order], ranks.py).
"""

from __future__ import annotations

import torch

from typing import Callable

from offload.ranks import Ranks
from offload.layout.flat_group import FlatGroup


class ShardReduced:
    """A group's reduced shard: ``shard_device`` (fp32, the shard's length, valid until the next reduction)
    and which of its parameters it carries a gradient of."""

    __slots__ = ("group_index", "shard_device", "slots")

    def __init__(self, group_index: int, shard_device: torch.Tensor, slots: list[int]) -> None:
        self.group_index = group_index
        self.shard_device = shard_device
        self.slots = slots


class ShardReducer:
    def __init__(self, groups: list[FlatGroup], ranks: Ranks, device: torch.device) -> None:
        self.groups = groups
        self.ranks = ranks
        self.device = device
        largest = max(g.numel for g in groups)
        self._largest = largest
        # Buffers of the largest group's length; a group in progress uses a prefix of one.
        self._free_full: list[torch.Tensor] = [torch.empty(largest, dtype=torch.float32, device=device)]
        self._full: dict[int, torch.Tensor] = {}          # group in progress -> its buffer (whole)
        self._arrived: dict[int, set[int]] = {}           # group in progress -> slots with a gradient in it
        # The reduce-scatter's output. A reduced shard is added into the host accumulator before the next
        # reduction starts (both on the thread running the hooks), so one buffer serves every group.
        self._shard_device = torch.empty(largest // ranks.world, dtype=torch.float32, device=device)

    def add(self, g: int, slot_index: int, grad: torch.Tensor) -> ShardReduced | None:
        """Adds a parameter's gradient into group g's full buffer; the group's reduced shard once this was
        its last parameter (a collective), else None."""
        group = self.groups[g]
        if g not in self._full:
            self._start(g)
        target = group.view(self._full[g], group.slots[slot_index])
        if slot_index in self._arrived[g]:  # a second gradient before the group completed (micro-batches)
            target.add_(grad)
        else:
            target.copy_(grad)
            self._arrived[g].add(slot_index)
        if len(self._arrived[g]) < len(group.slots):
            return None
        return self._reduce(g, sorted(self._arrived[g]))

    def flush(self, take: Callable[[ShardReduced], None]) -> None:
        """Reduces every group some rank has a gradient of but that has not completed, in group order, with
        the parameters any rank has a gradient of, and hands each to ``take`` (before the next reduction
        reuses the shard buffer). Collective: every rank calls it at the same point."""
        offsets, total = [], 0
        for group in self.groups:
            offsets.append(total)
            total += len(group.slots)
        local = torch.zeros(total, dtype=torch.uint8)
        for g, arrived in self._arrived.items():
            for i in arrived:
                local[offsets[g] + i] = 1
        union = self.ranks.max(local)
        for g, group in enumerate(self.groups):
            slots = [i for i in range(len(group.slots)) if union[offsets[g] + i]]
            if slots:
                if g not in self._full:
                    self._start(g)  # no gradient here: this rank adds zeros
                take(self._reduce(g, slots))

    def _start(self, g: int) -> None:
        if self._free_full:
            full = self._free_full.pop()
        else:
            full = torch.empty(self._largest, dtype=torch.float32, device=self.device)
        full[:self.groups[g].numel].zero_()  # padding and parameters without a gradient must read as zero
        self._full[g] = full
        self._arrived[g] = set()

    def _reduce(self, g: int, slots: list[int]) -> ShardReduced:
        group = self.groups[g]
        full = self._full.pop(g)
        self._arrived.pop(g)
        shard = self._shard_device[:group.shard_numel]
        self.ranks.reduce_scatter_mean(shard, full[:group.numel])
        self._free_full.append(full)
        return ShardReduced(g, shard, slots)

    def close(self) -> None:
        self._full.clear()
        self._arrived.clear()
        self._free_full.clear()
