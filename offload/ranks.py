"""Ranks: the process group an engine partitions its state over, and the few collectives it needs.

Note [collective order]: every collective here is issued from the training thread (or, for gradients, the
thread autograd runs the hooks on), at points that every rank reaches in the same order because they follow
the model's own execution: a group's gradients are reduce-scattered when its last gradient arrives in backward,
its weights are all-gathered when a forward or backward first uses it after a fetch, and the step's norm, a
checkpoint or ``state_dict()`` are collective calls every rank makes. Nothing timing-dependent (a prefetch
that found room, a read that finished early, the background optimizer thread) ever issues one; that is what
keeps the ranks from deadlocking or pairing the wrong tensors. It also means every rank must run the same
model code: as with DistributedDataParallel, every rank must produce gradients for the same parameters in a
backward (a parameter unused on one rank but used on another hangs the reduction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor forms of these collectives (the old names warn); older torch has only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Ranks:
    """``rank`` of ``world`` in ``group`` (None: the default group). ``world == 1``: no collectives at all.
    Tensors handed to the collectives live on ``device``, the compute device (NCCL: CUDA, gloo: CPU)."""

    rank: int = 0
    world: int = 1
    group: Any = None
    device: torch.device = torch.device("cpu")

    @staticmethod
    def resolve(device: torch.device, process_group: Any = None) -> Ranks:
        """The ranks of ``process_group``, or of the default group when ``torch.distributed`` is initialised
        (one rank otherwise, and for a group of one). Raises ValueError when the group's backend cannot run
        collectives on tensors of ``device``."""
        if process_group is None and not (dist.is_available() and dist.is_initialized()):
            return Ranks()
        world = dist.get_world_size(process_group)
        if world == 1:
            return Ranks()
        backend = str(dist.get_backend(process_group))
        wanted = "nccl" if device.type == "cuda" else "gloo"
        if backend != wanted:
            raise ValueError(f"process_group: its backend is {backend!r}; with device={device.type!r} the engine "
                             f"runs its collectives on {device.type} tensors, which needs {wanted!r}")
        return Ranks(rank=dist.get_rank(process_group), world=world, group=process_group, device=device)

    @property
    def many(self) -> bool:
        return self.world > 1

    # Note [gloo without scratch]: gloo's reduce_scatter and all_gather allocate host buffers the size of the
    # whole input on every call; glibc then keeps that memory (its mmap threshold rises to the size freed), so
    # a rank's RSS grew by several groups' worth, which is what partitioning is meant to save. On gloo the
    # same results therefore come from one collective per rank's shard that works in place: a ``reduce``
    # into the owner's part of the buffer, a ``broadcast`` from each owner's part. NCCL works in device
    # memory the caching allocator reuses: there the fused collectives are used.
    def reduce_scatter_mean(self, shard_out: torch.Tensor, full: torch.Tensor) -> None:
        """``shard_out`` = this rank's 1/world of the mean over ranks of ``full`` (equal-sized shards);
        ``full`` is clobbered."""
        if self._gloo:
            n = shard_out.numel()
            for r in range(self.world):
                dist.reduce(full[r * n:(r + 1) * n], dst=self._global_rank(r), group=self.group)
            shard_out.copy_(full[self.rank * n:(self.rank + 1) * n])
        else:
            _reduce_scatter_single(shard_out, full, group=self.group)
        shard_out.div_(self.world)

    def all_gather(self, full_out: torch.Tensor, shard: torch.Tensor) -> None:
        """Rank r's ``shard`` into elements [r * len, (r + 1) * len) of ``full_out`` on every rank. ``shard``
        may be this rank's part of ``full_out`` itself."""
        if self._gloo:
            n = shard.numel()
            mine = full_out[self.rank * n:(self.rank + 1) * n]
            if mine.data_ptr() != shard.data_ptr():
                mine.copy_(shard)
            for r in range(self.world):
                dist.broadcast(full_out[r * n:(r + 1) * n], src=self._global_rank(r), group=self.group)
        else:
            _all_gather_single(full_out, shard, group=self.group)

    @property
    def _gloo(self) -> bool:
        return self.device.type == "cpu"  # (resolve: the CPU device runs on gloo, CUDA on NCCL)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``value`` (any device; returned on the CPU)."""
        return self._all_reduce(value, dist.ReduceOp.SUM)

    def max(self, value: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum over ranks of ``value`` (any device; returned on the CPU)."""
        return self._all_reduce(value, dist.ReduceOp.MAX)

    def _all_reduce(self, value: torch.Tensor, op: Any) -> torch.Tensor:
        moved = value.to(self.device, copy=True)
        dist.all_reduce(moved, op=op, group=self.group)
        return moved.cpu()

    def all_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable) on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=self._global_rank(0), group=self.group)
        return box[0]

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)
