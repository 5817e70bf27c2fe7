"""EngineInspection: what an Engine reports about itself: full fp32 weights and statistics.

Part of :class:`offload.Engine` (a base class): ``state_dict()`` assembles the model's state with the fp32
masters (gathered from every rank's shard when there are several), ``stats()`` the memory and traffic counters.
"""

from __future__ import annotations

import torch
from torch import nn

from offload.engine.types import EngineStats
from offload.optim.state_store import StatePlacement
from offload.schedule.offloaded_params import OffloadedParams


class EngineInspection:
    """The inspection part of :class:`offload.Engine` (its ``__init__`` sets what these methods read)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state with the fp32 master weights for trainable parameters: CPU tensors the caller
        owns (each its own storage; they stay valid after ``close()``), under the keys of
        ``model.state_dict()``. Frozen parameters and buffers are copied to the CPU as they are on the device,
        frozen floating-point parameters converted to fp32. Collective with several ranks: every rank calls
        it, and every rank gets the whole model."""
        self._check_open()
        self._sync()
        where = {id(slot.param): (g, slot) for g, group in enumerate(self.groups) for slot in group.slots}
        masters: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        copies: dict[int, torch.Tensor] = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            if id(value) in copies:  # a tied parameter: the same tensor under every name, as torch does
                out[key] = copies[id(value)]
                continue
            if id(value) in where:
                g, slot = where[id(value)]
                if g not in masters:
                    masters[g] = self._full_master(g)
                tensor = self.groups[g].view(masters[g], slot).clone()
            else:
                tensor = value.detach().to("cpu", copy=True)
                if isinstance(value, nn.Parameter) and tensor.is_floating_point():
                    tensor = tensor.float()
            copies[id(value)] = out[key] = tensor
        return out

    def _full_master(self, g: int) -> torch.Tensor:
        """Group g's whole fp32 master (a new CPU tensor); with several ranks an all-gather of the shards."""
        shard = self.store.read_master(self.store.states[g])
        if not self.ranks.many:
            return shard
        group = self.groups[g]
        full = torch.empty(group.numel, dtype=torch.float32, device=self.ranks.device)
        self.ranks.all_gather(full, shard.to(self.ranks.device))
        return full.cpu()

    def stats(self) -> EngineStats:
        pool = self.pool.stats()
        placements = [s.placement for s in self.store.states] if not self._closed else []
        # NVMe traffic outside the optimizer step: gradients between backward passes, weights fetched/written back
        other_read = other_written = 0
        fetch_wait = 0.0
        if self._res.grad_swap is not None:
            other_read, other_written = self._res.grad_swap.bytes_read, self._res.grad_swap.bytes_written
        if isinstance(self.weights, OffloadedParams):
            now, peak = self.weights.resident_bytes, self.weights.peak_resident_bytes
            other_read += self.weights.nvme_bytes_read
            other_written += self.weights.nvme_bytes_written
            fetch_wait = self.weights.fetch_wait_s
        else:
            now = peak = self.weights.nbytes
        return EngineStats(device_param_bytes=now + self._frozen_bytes,
                           device_param_bytes_peak=peak + self._frozen_bytes,
                           host_bytes_in_use=pool.in_use, host_bytes_peak=pool.peak,
                           host_memory_limit=self.config.host_memory_limit,
                           nvme_bytes_read=self._nvme_read + other_read,
                           nvme_bytes_written=self._nvme_written + other_written,
                           optimizer_adam_s=self._adam_s, optimizer_io_wait_s=self._io_wait_s,
                           gradients_on_nvme=self._res.grad_swap is not None,
                           optimizer_groups_on_host=placements.count(StatePlacement.HOST),
                           optimizer_groups_on_nvme=placements.count(StatePlacement.NVME),
                           fetch_wait_s=fetch_wait, rank=self.ranks.rank, world_size=self.ranks.world)
