"""build_parts: how an Engine allocates and fills its parts before it touches the model.

The weights (device-resident or offloaded), the gradient accumulators, the optimizer state store and its
placement, each group filled from the model's current values (or, for a model on the meta device, from its
value sources: a pretrained checkpoint, the ``init_empty`` replay). Every
allocation happens here, so a budget or a disk that is too small fails at construction, not mid-training, and
the model is changed only once all of it has succeeded (``build_parts`` returns the step that changes it).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from offload.config import Config
from offload.engine.parts import EngineParts
from offload.engine.state_fill import fill_group, master_from_values
from offload.errors import MemoryBudgetError
from offload.layout.flat_group import FlatGroup, gather_fp32
from offload.layout.meta_init import LOG_ATTRIBUTE, meta_value, order_of_completion
from offload.optim.group_stepper import GroupStepper
from offload.optim.state_store import (FP32_BYTES, STATE_PARTS, OptimizerStateStore, StatePlacement, plan_placement,
                                       split_state, staging_bytes)
from offload.ranks import Ranks
from offload.schedule.device_weights import DeviceWeights
from offload.schedule.fetch_scheduler import FetchScheduler, max_use_width, uses_by_module
from offload.schedule.grad_stream import GradientStream, staging_ring_bytes
from offload.schedule.grad_swap import GRAD_SWAP_BUFFERS, GradSwap
from offload.schedule.offloaded_params import OffloadedParams
from offload.storage.host_pool import HostPool
from offload.storage.swap_store import SwapStore
from offload.timeline import Timeline

log = logging.getLogger("offload")


def build_parts(parts: EngineParts, model: nn.Module, config: Config, groups: list[FlatGroup],
                frozen_groups: list[FlatGroup], frozen: list[tuple[str, nn.Parameter]], ranks: Ranks,
                timeline: Timeline, sources: Any) -> Callable[[], None]:
    """Allocates and fills every part into ``parts`` without touching the model; returns the step that points
    the model at them. A failure here (budget, disk space, I/O) therefore leaves the model exactly as it was
    (the caller releases ``parts``). ``frozen_groups``: the offloaded frozen parameters (Note [frozen groups]);
    ``frozen``: the other frozen parameters, which stay whole on the device. ``sources``: where the
    values of a model built on the meta device come from (``value_sources``: a pretrained checkpoint, the
    ``init_empty`` replay, each module's init), or None."""
    return _PartsBuilder(parts, model, config, groups, frozen_groups, frozen, ranks, timeline, sources).build()


class _PartsBuilder:
    """The construction steps, sharing what they all read; lives for one ``build_parts`` call."""

    def __init__(self, parts: EngineParts, model: nn.Module, config: Config, groups: list[FlatGroup],
                 frozen_groups: list[FlatGroup], frozen: list[tuple[str, nn.Parameter]], ranks: Ranks,
                 timeline: Timeline, sources: Any) -> None:
        self.parts, self.model, self.config, self.groups = parts, model, config, groups
        self.frozen_groups = frozen_groups
        self.frozen, self.ranks, self.timeline, self.sources = frozen, ranks, timeline, sources
        self.pool = parts.pool
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.lowp_bytes = torch.empty((), dtype=self.dtype).element_size()

    def build(self) -> Callable[[], None]:
        config, parts = self.config, self.parts
        offloaded = config.params != "device"
        self._check_device_budget(offloaded)
        grad_staging, fixed = self._make_weights(offloaded)
        grads_on_nvme = self._gradients_go_to_nvme(fixed)
        placement = self._make_gradients_and_state(grads_on_nvme, fixed)
        order = {id(p): i for i, p in enumerate(self.model.parameters())}
        grad_hosts = [None] * len(self.groups) if grads_on_nvme else [b.view(torch.float32) for b in parts.grad_hosts]
        grads = parts.grads = GradientStream(self.groups, grad_hosts, self.device, self.pool, grad_staging, order,
                                             self.timeline, self.ranks)
        grads.grad_swap = parts.grad_swap
        self._fill_groups(placement)
        self._fill_frozen_groups()
        if self.sources is not None:
            self._fill_from_sources()
        frozen = [(p, self._value(p, name).to(self.device, self.dtype if p.is_floating_point() else None))
                  for name, p in self.frozen]
        buffers = [(module, name, self._value(buffer, f"{path}.{name}" if path else name).to(self.device))
                   for path, module in self.model.named_modules()
                   for name, buffer in module._buffers.items() if buffer is not None]
        self.sources = None  # the replay log and anything it still holds go now (the caller closes a checkpoint)
        stepper = parts.stepper = GroupStepper(parts.store, self.timeline)
        # Note [master in memory], group_stepper.py: groups whose update may run on the weights in memory.
        # (Bound to the weights, not to the engine: the parts must not keep a dropped engine alive.)
        weights, can_lend = parts.weights, parts.weights.can_lend
        stepper.master_in_memory = lambda state: can_lend(state.group.index)
        on_nvme = placement.count(StatePlacement.NVME)
        log.info("offload: %d groups, %d trainable parameters (%d frozen in %d groups of their own); parameters "
                 "on %s; optimizer state of %d groups in RAM, %d on NVMe; gradients on %s", len(self.groups),
                 sum(s.numel for g in self.groups for s in g.slots),
                 sum(s.numel for g in self.frozen_groups for s in g.slots), len(self.frozen_groups),
                 config.params, len(self.groups) - on_nvme, on_nvme, "NVMe" if grads_on_nvme else "the host")

        model, timeline = self.model, self.timeline

        def attach() -> None:  # (a closure over what it needs, not over this builder)
            for param in model.parameters():
                param.grad = None  # a gradient left from before would be added into the first step
            if hasattr(model, LOG_ATTRIBUTE):
                delattr(model, LOG_ATTRIBUTE)  # the model is real now; its init_empty log is spent
            for param in model.parameters():
                if param.is_meta:  # .data cannot change a tensor's device: swap in an empty CPU tensor first
                    torch.utils.swap_tensors(param, nn.Parameter(torch.empty(0, dtype=param.dtype),
                                                                 requires_grad=param.requires_grad))
            weights.bind_parameters()
            for param, data in frozen:
                param.data = data
            for module, name, buffer in buffers:
                module._buffers[name] = buffer
            grads.attach()
            if parts.offloaded is not None:
                parts.scheduler = FetchScheduler(model, parts.offloaded.groups, parts.offloaded,
                                                 config.prefetch_layers, timeline)
                grads.on_param_done = parts.scheduler.param_done

        return attach

    def _make_weights(self, offloaded: bool) -> tuple[int, int]:
        """The weights' buffers (device-resident, or offloaded with their staging). Returns the CUDA gradient
        staging size and the host bytes still to be allocated for weights and that staging."""
        config, parts, lowp_bytes = self.config, self.parts, self.lowp_bytes
        largest_param = max(s.numel for g in self.groups for s in g.slots) * lowp_bytes
        # (several ranks reduce the gradients on the device and copy shards: no staging ring)
        grad_staging = staging_ring_bytes(largest_param) if self.device.type == "cuda" and not self.ranks.many else 0
        # Host buffers of the parameters that are allocated after the plan: charge them first.
        weights_host = 0
        if config.params == "cpu":  # the homes: this rank's shards (the frozen groups' too)
            weights_host = sum(HostPool.mapped_size(g.shard_numel * lowp_bytes)
                               for g in self.groups + self.frozen_groups)
        elif self.device.type == "cuda" and self.dtype != torch.float32:  # kernel output of whole groups
            weights_host = sum(HostPool.mapped_size(g.numel * lowp_bytes) for g in self.groups)
        if offloaded and (config.params == "nvme" or config.optimizer == "nvme"):
            parts.swap = self._swap_store()
        if offloaded:
            # Frozen parameters outside the groups stay on the device: the groups get what the limit leaves.
            limit = config.device_memory_limit
            width = max_use_width(uses_by_module(self.model, self.groups + self.frozen_groups))
            # fp32 weights with the optimizer on NVMe are read from the masters (Note [weights in the state file])
            in_state = self.dtype == torch.float32 and config.params == "nvme" and config.optimizer == "nvme"
            parts.weights = parts.offloaded = OffloadedParams(
                self.groups + self.frozen_groups, config.params, self.dtype, self.pool, parts.swap,
                None if limit is None else limit - parts.frozen_bytes, fetch_slots=(config.prefetch_layers + 1) * width,
                timeline=self.timeline, device=self.device, weights_in_state=in_state,
                gather=self.ranks.all_gather if self.ranks.many else None, lend_limit=config.prefetch_layers + 1)
        else:
            parts.weights = parts.resident = DeviceWeights(self.device, self.dtype, self.pool, self.ranks)
        return grad_staging, weights_host + (HostPool.mapped_size(grad_staging) if grad_staging else 0)

    def _make_gradients_and_state(self, grads_on_nvme: bool, fixed: int) -> list[StatePlacement]:
        """Gradient accumulators (host or NVMe) and the optimizer state store; returns each group's placement."""
        config, parts = self.config, self.parts
        if grads_on_nvme:
            self._check_swap_space([StatePlacement.NVME] * len(self.groups), grads_on_nvme)
            largest = max(g.shard_numel for g in self.groups)
            needed = (self.pool.stats().in_use + fixed + GRAD_SWAP_BUFFERS * HostPool.mapped_size(FP32_BYTES * largest)
                      + staging_bytes(largest, parts=STATE_PARTS + 1))  # the gradients travel with the state
            if needed > config.host_memory_limit:
                raise MemoryBudgetError("the staging buffers alone, with gradients and optimizer state all on NVMe",
                                        needed, config.host_memory_limit, "host_memory_limit")
            if parts.swap is None:
                parts.swap = self._swap_store()
            parts.grad_swap = GradSwap(self.groups, self.pool, parts.swap, buffers=GRAD_SWAP_BUFFERS)
        else:
            for group in self.groups:
                parts.grad_hosts.append(self.pool.allocate(group.shard_numel * FP32_BYTES,
                                                           f"gradient accumulator {group.name or '<root>'}"))
        budget_left = None
        if config.host_memory_limit is not None:
            budget_left = config.host_memory_limit - self.pool.stats().in_use - fixed
        placement = [StatePlacement.NVME] * len(self.groups) if grads_on_nvme else \
            plan_placement(self.groups, config.optimizer == "nvme", budget_left)
        nvme_numels = [g.shard_numel for g, p in zip(self.groups, placement) if p is StatePlacement.NVME]
        if nvme_numels and parts.swap is None:
            parts.swap = self._swap_store()
        if not grads_on_nvme:
            self._check_swap_space(placement, grads_on_nvme)
        parts.store = OptimizerStateStore(self.pool, parts.swap, nvme_numels, grads_on_nvme=grads_on_nvme)
        return placement

    def _check_swap_space(self, placement: list[StatePlacement], grads_on_nvme: bool) -> None:
        """Every swap file the engine will create, summed, against the free space (before the first is made)."""
        swap, weights = self.parts.swap, self.parts.offloaded
        if swap is None:
            return
        homes_on_nvme = weights is not None and self.config.params == "nvme"
        trainable_homes = homes_on_nvme and not weights.weights_in_state  # (else the state files are the homes)
        swap.check_space({
            "optimizer state": sum(STATE_PARTS * FP32_BYTES * g.shard_numel
                                   for g, p in zip(self.groups, placement) if p is StatePlacement.NVME),
            "weights": sum(weights.home_nbytes(g.index) for g in self.groups) if trainable_homes else 0,
            "frozen weights": sum(weights.home_nbytes(g.index) for g in self.frozen_groups) if homes_on_nvme else 0,
            "gradients": sum(FP32_BYTES * g.shard_numel for g in self.groups) if grads_on_nvme else 0})

    def _swap_store(self) -> SwapStore:
        """The swap store under ``nvme_dir``; each rank's in a directory of its own."""
        return SwapStore(self.config.nvme_dir, self.config.io,
                         label=f"rank{self.ranks.rank}" if self.ranks.many else "")

    def _gradients_go_to_nvme(self, fixed: int) -> bool:
        """True when the optimizer state is on NVMe and the host budget cannot hold the gradient accumulators
        (4 bytes per parameter) next to the fixed buffers and the optimizer's staging; then the accumulators
        and all optimizer state live on NVMe (see GradSwap)."""
        limit = self.config.host_memory_limit
        if limit is None or self.config.optimizer != "nvme":
            return False
        grads = sum(HostPool.mapped_size(g.shard_numel * FP32_BYTES) for g in self.groups)
        staging = staging_bytes(max(g.shard_numel for g in self.groups))
        return self.pool.stats().in_use + fixed + grads + staging > limit

    def _check_device_budget(self, offloaded: bool) -> None:
        """Fails now if the parameters cannot fit ``device_memory_limit``: all of them (params="device"), or the
        widest use of groups (a block's trainable and frozen groups) next to the frozen parameters that stay
        on the device."""
        limit = self.config.device_memory_limit
        if offloaded:
            groups = self.groups + self.frozen_groups
            uses = uses_by_module(self.model, groups)
            widest = max((sum(groups[g].numel for g in use) for use in uses.values()), default=0)
            needed = self.parts.frozen_bytes + max(widest, max(g.numel for g in groups)) * self.lowp_bytes
        else:
            needed = self.parts.frozen_bytes + sum(g.numel for g in self.groups) * self.lowp_bytes
        if limit is not None and needed > limit:
            what = ("the widest use of parameter groups next to the frozen parameters kept on the device"
                    if offloaded else "parameters resident on the device (params='device')")
            raise MemoryBudgetError(what, needed, limit, "device_memory_limit")

    def _fill_groups(self, placement: list[StatePlacement]) -> None:
        """Each group's optimizer state and weights, from the model's current values (group by group; for a
        model on the meta device: zeros here, filled by ``_fill_from_sources``)."""
        store, offloaded = self.parts.store, self.parts.offloaded
        in_state = offloaded is not None and offloaded.weights_in_state
        # (several ranks: a master shard cannot be the device weights of a whole group)
        device_alias = self.config.params == "device" and self.device.type == "cpu" and not self.ranks.many
        alias_master = self.dtype == torch.float32 and (self.config.params == "cpu" or device_alias or in_state)
        for group, where in zip(self.groups, placement):
            master = gather_fp32(group) if self.sources is None else None  # (meta: zeros now, filled below)
            state = store.add(group, where, None if master is None else master[group.lo:group.hi])
            if in_state and where is StatePlacement.NVME:
                offloaded.add(group, master, None, alias_file=state.state_nvme)
                continue
            alias = None
            if alias_master and where is StatePlacement.HOST:
                alias = split_state(state.state_host.view(torch.float32), group.shard_numel)[0]
            if offloaded is None:
                self.parts.resident.add(group, master, alias, state_on_nvme=where is StatePlacement.NVME)
            else:
                offloaded.add(group, master, alias)

    def _fill_frozen_groups(self) -> None:
        """Each frozen group's home, from the model's current values (for a model on the meta device: made
        empty here, filled by ``_fill_from_sources``)."""
        weights = self.parts.offloaded
        for group in self.frozen_groups:  # (homes are made in index order, after the trainable groups')
            weights.add(group, None if self.sources is not None else self._flat_values(group), None)

    def _fill_from_sources(self) -> None:
        """A model on the meta device: every group, trainable or frozen, filled in the order its sources finish
        its values (those read from a checkpoint first, then as the replay finishes them: Note [replay]), one
        at a time, so that each value is handed on as soon as it is final (a LoRA model's adapters are created
        after its whole base: filling them first would hold the base)."""
        store, every = self.parts.store, self.groups + self.frozen_groups
        for i in order_of_completion(self.sources, every):
            group = every[i]
            if group.frozen:
                self.parts.offloaded.load_weights(group.index, self._flat_values(group)[group.lo:group.hi], 0, True)
                continue
            values = {id(slot.param): self._value(slot.param, slot.name) for slot in group.slots}
            fill_group(store, self.parts.weights, store.states[group.index],
                       master_from_values(group, lambda slot: values[id(slot.param)]))
            del values

    def _flat_values(self, group: FlatGroup) -> torch.Tensor:
        """A frozen group's values in its flat layout, in the compute dtype (what its home holds)."""
        flat = torch.zeros(group.numel, dtype=self.dtype)
        for slot in group.slots:
            group.view(flat, slot).copy_(self._value(slot.param, slot.name))
        return flat

    def _value(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """``t`` itself, or for a meta tensor its materialised value."""
        return meta_value(self.sources, t, name) if t.is_meta else t.data
