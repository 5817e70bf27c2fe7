"""What an Engine reports about itself: full fp32 weights (``state_dict``) and statistics (``stats``), as
plain functions over its training state and the update runner's totals."""

from __future__ import annotations

import torch
from torch import nn

from offload.engine.training_state import TrainingState
from offload.engine.types import EngineStats
from offload.engine.update_runner import UpdateTotals
from offload.optim.state_store import StatePlacement


def state_dict(state: TrainingState, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """engine.state_dict(): see its docstring. ``state`` is quiescent (no update in flight)."""
    where = {id(slot.param): (g, slot) for g, group in enumerate(state.groups) for slot in group.slots}
    frozen_where = {id(slot.param): (k, slot) for k, group in enumerate(state.frozen_groups) for slot in group.slots}
    masters: dict[int, torch.Tensor] = {}
    frozen_flats: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}
    for key, value in state.model.state_dict(keep_vars=True).items():
        if id(value) in copies:  # a tied parameter: the same tensor under every name, as torch does
            out[key] = copies[id(value)]
            continue
        if id(value) in where:
            g, slot = where[id(value)]
            if g not in masters:
                masters[g] = state.full_master(g)
            tensor = state.groups[g].view(masters[g], slot).clone()
        elif trainable_only:
            continue
        elif id(value) in frozen_where:  # (one frozen group's copy at a time: they come in group order)
            k, slot = frozen_where[id(value)]
            if k not in frozen_flats:
                frozen_flats.clear()
                frozen_flats[k] = state.weights.group_copy(state.frozen_groups[k].index)
            tensor = state.frozen_groups[k].view(frozen_flats[k], slot).to(torch.float32, copy=True)
        else:
            tensor = value.detach().to("cpu", copy=True)
            if isinstance(value, nn.Parameter) and tensor.is_floating_point():
                tensor = tensor.float()
        copies[id(value)] = out[key] = tensor
    return out


def stats(state: TrainingState, totals: UpdateTotals, closed: bool) -> EngineStats:
    """engine.stats(): the memory and traffic counters since the engine was built."""
    parts = state.parts
    pool = parts.pool.stats()
    placements = [s.placement for s in parts.store.states] if not closed else []
    # NVMe traffic outside the optimizer step: gradients between backward passes, weights fetched/written back
    other_read = other_written = 0
    fetch_wait = 0.0
    if parts.grad_swap is not None:
        other_read, other_written = parts.grad_swap.bytes_read, parts.grad_swap.bytes_written
    if parts.offloaded is not None:
        other_read += parts.offloaded.nvme_bytes_read
        other_written += parts.offloaded.nvme_bytes_written
        fetch_wait = parts.offloaded.fetch_wait_s
    weights = parts.weights
    return EngineStats(device_param_bytes=weights.resident_bytes + parts.frozen_bytes,
                       device_param_bytes_peak=weights.peak_resident_bytes + parts.frozen_bytes,
                       host_bytes_in_use=pool.in_use, host_bytes_peak=pool.peak,
                       host_memory_limit=state.config.host_memory_limit,
                       nvme_bytes_read=totals.nvme_bytes_read + other_read,
                       nvme_bytes_written=totals.nvme_bytes_written + other_written,
                       optimizer_adam_s=totals.adam_s, optimizer_io_wait_s=totals.io_wait_s,
                       gradients_on_nvme=parts.grad_swap is not None,
                       optimizer_groups_on_host=placements.count(StatePlacement.HOST),
                       optimizer_groups_on_nvme=placements.count(StatePlacement.NVME),
                       fetch_wait_s=fetch_wait, rank=state.ranks.rank, world_size=state.ranks.world,
                       steps_during_backward=totals.steps_during_backward)
