"""Engine: trains a model with its optimizer state, gradients and parameters offloaded to host RAM or NVMe."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import weakref
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from offload.config import Config
from offload.engine import checkpointing
from offload.engine.device_weights import DeviceWeights
from offload.engine.grad_stream import GradientStream, staging_ring_bytes
from offload.engine.grad_swap import GRAD_SWAP_BUFFERS, GradSwap
from offload.engine.inputs import cast_inputs
from offload.engine.ranks import Ranks
from offload.engine.resources import EngineResources
from offload.engine.types import EngineStats, StepInfo
from offload.errors import ConfigError, MemoryBudgetError
from offload.layout.flat_group import build_flat_group, gather_fp32, shard_spans
from offload.engine.state_fill import fill_group, master_from_values
from offload.layout.meta_init import LOG_ATTRIBUTE, materializers_for, meta_value, order_of_completion
from offload.layout.partition import partition_model
from offload.schedule.fetch_scheduler import FetchScheduler, max_use_width, uses_by_module
from offload.schedule.offloaded_params import OffloadedParams
from offload.optim.background_step import BackgroundStep
from offload.optim.group_stepper import GroupStepper, GroupUpdate, Segment, StepCounters
from offload.optim.hyper import resolve_param_groups
from offload.optim.loss_scale import LossScaler
from offload.optim.update_queue import UpdateQueue
from offload.optim.state_store import (FP32_BYTES, STATE_PARTS, GroupState, OptimizerStateStore, StatePlacement,
                                       plan_placement, split_state, staging_bytes)
from offload.storage.host_pool import HostPool
from offload.storage.swap_store import SwapStore
from offload.timeline import NO_TIMELINE, Timeline

log = logging.getLogger("offload")


# model -> the open engine wrapping it: a second engine on the same model would add a second set of hooks.
_ENGINE_OF: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


class Engine:
    """Trains ``model`` with the placement ``config`` chooses; see DESIGN.md "Public API" and the README.

    The model's trainable parameters are regrouped (one group per block, see ``offload.layout``) into flat
    buffers: the weights in ``config.dtype`` on ``config.device``, and per group an fp32 master copy, Adam's
    moments and an fp32 gradient accumulator on the host, the state in RAM or in swap files on NVMe. Adam
    (``torch.optim.AdamW`` arithmetic, decoupled weight decay) runs on the CPU in the native kernel.
    Frozen parameters (``requires_grad=False``) are only cast and moved: no state, no gradient traffic.
    Everything is allocated here: a budget or disk that is too small fails now, not during training.
    """

    def __init__(self, model: nn.Module, config: Config | None = None, *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 max_grad_norm: float | None = None, loss_scale: str | float = "dynamic",
                 param_groups: list[dict[str, Any]] | None = None, skip_nonfinite: bool = False,
                 timeline: Timeline | None = None, process_group: Any = None) -> None:
        self.config = config = config if config is not None else Config()
        if not isinstance(config, Config):
            raise ConfigError(f"config: expected an offload.Config; got {type(config).__name__}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and
                                              math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ConfigError(f"max_grad_norm: expected None or a positive number; got {max_grad_norm!r}")
        self.model = model
        self.device = torch.device(config.device)
        try:
            self.ranks = Ranks.resolve(self.device, process_group)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.dtype = config.torch_dtype
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.timeline = timeline if timeline is not None else NO_TIMELINE
        self._scaler = LossScaler(loss_scale, enabled=self.dtype == torch.float16)
        partition = partition_model(model)
        trainable = [(n, p) for spec in partition.groups for n, p in zip(spec.param_names, spec.params)]
        if not trainable:
            raise ConfigError("model: it has no trainable parameters (every parameter has requires_grad=False)")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.param_groups, hyper_of = resolve_param_groups(model, trainable, param_groups, defaults)
        self.groups = [build_flat_group(i, spec, hyper_of, self.ranks.rank, self.ranks.world)
                       for i, spec in enumerate(partition.groups)]
        self._frozen = partition.frozen
        # A model built on the meta device is materialised group by group (offload/layout/meta_init.py).
        on_meta = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
        self._meta = materializers_for(model) if on_meta else None
        self._lowp_bytes = torch.empty((), dtype=self.dtype).element_size()
        self._frozen_bytes = sum(p.numel() * (self._lowp_bytes if p.is_floating_point() else p.element_size())
                                 for _, p in self._frozen)  # frozen parameters stay on the device
        self._param_steps = [[0] * len(g.slots) for g in self.groups]
        self._step = 0
        self._nvme_read = self._nvme_written = 0
        self._adam_s = self._io_wait_s = 0.0
        self._inflight: BackgroundStep | UpdateQueue | None = None
        self._eager_steps = 0  # steps whose updates overlapped backward (backward_step), for tests and stats
        self._closed = False
        self._failed: str | None = None
        self.swap: SwapStore | None = None
        self._scheduler: FetchScheduler | None = None
        previous = _ENGINE_OF.get(model)
        if previous is not None and previous() is not None and not previous()._closed:
            raise ConfigError("model: it is already wrapped by an open offload.Engine; close that engine first")
        self._res = EngineResources(HostPool(config.host_memory_limit, pin=self.device.type == "cuda"))
        self.pool = self._res.pool
        try:
            attach = self._build()
        except BaseException:
            self._res.release()
            raise
        attach()  # nothing above changed the model; this (which cannot fail) does
        _ENGINE_OF[model] = weakref.ref(self)
        # Bringing offloaded weights back gathers them from every rank: only an explicit close(), which every
        # rank calls, may do that. An engine of several ranks that is collected (or reaches interpreter exit)
        # unclosed leaves meta tensors instead of issuing a collective the other ranks never join.
        if self.ranks.many:
            self._res.keep_weights = False
        # An engine dropped without close() still removes its hooks and swap files (the hooks hold the
        # gradient stream, not the engine, so the engine can be collected).
        self._finalizer = weakref.finalize(self, self._res.release)

    def _build(self) -> Callable[[], None]:
        """Allocates and fills every buffer without touching the model; returns the step that points the model
        at them. A failure here (budget, disk space, I/O) therefore leaves the model exactly as it was."""
        config, res = self.config, self._res
        offloaded = config.params != "device"
        self._check_device_budget(offloaded)
        grad_staging, fixed = self._make_weights(offloaded)
        grads_on_nvme = self._gradients_go_to_nvme(fixed)
        placement = self._make_gradients_and_state(grads_on_nvme, fixed)
        order = {id(p): i for i, p in enumerate(self.model.parameters())}
        grad_hosts = [None] * len(self.groups) if grads_on_nvme else [b.view(torch.float32) for b in res.grad_hosts]
        res.grads = self._grads = GradientStream(self.groups, grad_hosts, self.device, self.pool, grad_staging,
                                                 order, self.timeline, self.ranks)
        self._grads.grad_swap = res.grad_swap
        self._fill_groups(placement)
        frozen = [(p, self._value(p, name).to(self.device, self.dtype if p.is_floating_point() else None))
                  for name, p in self._frozen]
        buffers = [(module, name, self._value(buffer, f"{path}.{name}" if path else name).to(self.device))
                   for path, module in self.model.named_modules()
                   for name, buffer in module._buffers.items() if buffer is not None]
        self._meta = None  # the replay log and anything it still holds go now
        self.swap = res.swap
        self._stepper = res.stepper = GroupStepper(self.store, self.timeline)
        # Note [master in memory], group_stepper.py: groups whose update may run on the weights in memory.
        # (Bound to the weights, not to the engine: resources must not keep a dropped engine alive.)
        can_lend = self.weights.can_lend
        self._stepper.master_in_memory = lambda state: can_lend(state.group.index)
        self._arrival_order: list[int] = []  # groups in the order the last backward_step submitted them
        on_nvme = placement.count(StatePlacement.NVME)
        log.info("offload: %d groups, %d trainable parameters; parameters on %s; optimizer state of %d groups "
                 "in RAM, %d on NVMe; gradients on %s", len(self.groups),
                 sum(s.numel for g in self.groups for s in g.slots), config.params, len(self.groups) - on_nvme,
                 on_nvme, "NVMe" if grads_on_nvme else "the host")

        def attach() -> None:
            for param in self.model.parameters():
                param.grad = None  # a gradient left from before would be added into the first step
            if hasattr(self.model, LOG_ATTRIBUTE):
                delattr(self.model, LOG_ATTRIBUTE)  # the model is real now; its init_empty log is spent
            for param in self.model.parameters():
                if param.is_meta:  # .data cannot change a tensor's device: swap in an empty CPU tensor first
                    torch.utils.swap_tensors(param, nn.Parameter(torch.empty(0, dtype=param.dtype),
                                                                 requires_grad=param.requires_grad))
            self.weights.bind_parameters()
            for param, data in frozen:
                param.data = data
            for module, name, buffer in buffers:
                module._buffers[name] = buffer
            self._grads.attach()
            if offloaded:
                res.scheduler = self._scheduler = FetchScheduler(self.model, self.groups, self.weights,
                                                                 config.prefetch_layers, self.timeline)
                self._grads.on_param_done = self._scheduler.param_done

        return attach

    def _make_weights(self, offloaded: bool) -> tuple[int, int]:
        """The weights' buffers (device-resident, or offloaded with their staging). Returns the CUDA gradient
        staging size and the host bytes still to be allocated for weights and that staging."""
        config, res, lowp_bytes = self.config, self._res, self._lowp_bytes
        largest_param = max(s.numel for g in self.groups for s in g.slots) * lowp_bytes
        # (several ranks reduce the gradients on the device and copy shards: no staging ring)
        grad_staging = staging_ring_bytes(largest_param) if self.device.type == "cuda" and not self.ranks.many else 0
        # Host buffers of the parameters that are allocated after the plan: charge them first.
        weights_host = 0
        if config.params == "cpu":  # the homes: this rank's shards
            weights_host = sum(HostPool.mapped_size(g.shard_numel * lowp_bytes) for g in self.groups)
        elif self.device.type == "cuda" and self.dtype != torch.float32:  # kernel output of whole groups
            weights_host = sum(HostPool.mapped_size(g.numel * lowp_bytes) for g in self.groups)
        if offloaded and (config.params == "nvme" or config.optimizer == "nvme"):
            res.swap = self._swap_store()
        if offloaded:
            # Frozen parameters stay on the device: the offloaded groups get what the limit leaves.
            limit = config.device_memory_limit
            width = max_use_width(uses_by_module(self.model, self.groups))
            # fp32 weights with the optimizer on NVMe are read from the masters (Note [weights in the state file])
            in_state = self.dtype == torch.float32 and config.params == "nvme" and config.optimizer == "nvme"
            res.weights = OffloadedParams(self.groups, config.params, self.dtype, self.pool, res.swap,
                                          None if limit is None else limit - self._frozen_bytes,
                                          fetch_slots=(config.prefetch_layers + 1) * width, timeline=self.timeline,
                                          device=self.device, weights_in_state=in_state,
                                          gather=self.ranks.all_gather if self.ranks.many else None,
                                          lend_limit=config.prefetch_layers + 1)
        else:
            res.weights = DeviceWeights(self.device, self.dtype, self.pool, self.ranks)
        self.weights = res.weights
        return grad_staging, weights_host + (HostPool.mapped_size(grad_staging) if grad_staging else 0)

    def _make_gradients_and_state(self, grads_on_nvme: bool, fixed: int) -> list[StatePlacement]:
        """Gradient accumulators (host or NVMe) and the optimizer state store; returns each group's placement."""
        config, res = self.config, self._res
        if grads_on_nvme:
            largest = max(g.shard_numel for g in self.groups)
            needed = (self.pool.stats().in_use + fixed + GRAD_SWAP_BUFFERS * HostPool.mapped_size(FP32_BYTES * largest)
                      + staging_bytes(largest, parts=STATE_PARTS + 1))  # the gradients travel with the state
            if needed > config.host_memory_limit:
                raise MemoryBudgetError("the staging buffers alone, with gradients and optimizer state all on NVMe",
                                        needed, config.host_memory_limit, "host_memory_limit")
            if res.swap is None:
                res.swap = self._swap_store()
            res.grad_swap = GradSwap(self.groups, self.pool, res.swap, buffers=GRAD_SWAP_BUFFERS)
        else:
            for group in self.groups:
                res.grad_hosts.append(self.pool.allocate(group.shard_numel * FP32_BYTES,
                                                         f"gradient accumulator {group.name or '<root>'}"))
        budget_left = None
        if config.host_memory_limit is not None:
            budget_left = config.host_memory_limit - self.pool.stats().in_use - fixed
        placement = [StatePlacement.NVME] * len(self.groups) if grads_on_nvme else \
            plan_placement(self.groups, config.optimizer == "nvme", budget_left)
        nvme_numels = [g.shard_numel for g, p in zip(self.groups, placement) if p is StatePlacement.NVME]
        if nvme_numels and res.swap is None:
            res.swap = self._swap_store()
        res.store = self.store = OptimizerStateStore(self.pool, res.swap, nvme_numels, grads_on_nvme=grads_on_nvme)
        return placement

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
        largest group next to the frozen parameters (which stay on the device)."""
        limit = self.config.device_memory_limit
        group_bytes = [g.numel * self._lowp_bytes for g in self.groups]
        needed = self._frozen_bytes + (max(group_bytes) if offloaded else sum(group_bytes))
        if limit is not None and needed > limit:
            what = ("the largest parameter group next to the frozen parameters" if offloaded
                    else "parameters resident on the device (params='device')")
            raise MemoryBudgetError(what, needed, limit, "device_memory_limit")

    def _fill_groups(self, placement: list[StatePlacement]) -> None:
        """Each group's optimizer state and weights, from the model's current values (group by group)."""
        in_state = getattr(self.weights, "weights_in_state", False)
        # (several ranks: a master shard cannot be the device weights of a whole group)
        device_alias = self.config.params == "device" and self.device.type == "cpu" and not self.ranks.many
        alias_master = self.dtype == torch.float32 and (self.config.params == "cpu" or device_alias or in_state)
        for group, where in zip(self.groups, placement):
            master = gather_fp32(group) if self._meta is None else None  # (meta: zeros now, filled below)
            state = self.store.add(group, where, None if master is None else master[group.lo:group.hi])
            if in_state and where is StatePlacement.NVME:
                self.weights.add(group, master, None, alias_file=state.state_nvme)
                continue
            alias = None
            if alias_master and where is StatePlacement.HOST:
                alias = split_state(state.state_host.view(torch.float32), group.shard_numel)[0]
            if isinstance(self.weights, DeviceWeights):
                self.weights.add(group, master, alias, state_on_nvme=where is StatePlacement.NVME)
            else:
                self.weights.add(group, master, alias)
        if self._meta is not None:
            # Groups are filled in the order the replay finishes them (Note [replay]), one at a time.
            for g in order_of_completion(self._meta, self.groups):
                group = self.groups[g]
                values = {id(slot.param): self._value(slot.param, slot.name) for slot in group.slots}
                fill_group(self, self.store.states[g],
                           master_from_values(group, lambda slot: values[id(slot.param)]))
                del values

    def _value(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """``t`` itself, or for a meta tensor its materialised value."""
        return meta_value(self._meta, t, name) if t.is_meta else t.data

    # ---- training loop ---------------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward, with floating-point tensor inputs cast to the compute dtype and every tensor
        input moved to the device."""
        self._check_open()
        return self.model(*cast_inputs(args, self.device, self.dtype),
                          **cast_inputs(kwargs, self.device, self.dtype))

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagates ``loss`` (scaled by the fp16 loss scale); gradients add up until ``step()``."""
        self._check_open()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("engine.backward: loss must be a tensor with one element")
        if self.dtype == torch.float16:
            loss = loss.float() * self._scaler.scale
        self._sync(keep_read_ahead=True)  # the gradient accumulators are about to be written: the last step
        # must have read them
        try:
            if self._scheduler is None:
                loss.backward()
                return
            self._scheduler.begin_backward()
            try:
                loss.backward()
            finally:
                self._scheduler.end_backward()  # every group goes home, where the step updates it (but the kept ones)
        finally:
            if self._res.grad_swap is not None:
                self._grads.finish()  # accumulators on NVMe are written out after every backward

    def step(self) -> StepInfo:
        """Updates every parameter that received a gradient since the last step (torch's rule: one that got
        none is left alone, state and step count included), then starts a new accumulation.

        With parameters on the device the update is complete when this returns. With offloaded parameters
        (``params="cpu"|"nvme"``) it continues on a background thread, group by group in the order the next
        forward needs them, and each group's next fetch waits for that group's update only (see Note
        [overlapped step]); ``StepInfo.overlapped`` is then True and the Adam / I/O times of the step are
        added to ``engine.stats()`` when it completes. The result is the same either way."""
        self._check_open()
        self._sync(keep_read_ahead=True)
        start = time.perf_counter()
        self._grads.finish()
        if not self._grads.any_received():
            raise RuntimeError("engine.step(): no parameter received a gradient since the last step; "
                               "call engine.backward(loss) first")
        scale = self._scaler.scale
        norm = self._grads.global_norm() / scale  # exact: the scale is a power of two (or 1)
        grad_norm = float(norm)
        overflow = not math.isfinite(grad_norm)
        skip = overflow and (self.dtype == torch.float16 or self.skip_nonfinite)
        counters = StepCounters()
        overlapped = False
        if not skip:
            clip = 1.0
            if self.max_grad_norm is not None and math.isfinite(grad_norm):
                # torch.nn.utils.clip_grad_norm_, in fp32 as it does: max_norm / (norm + 1e-6), clamped at 1
                clip = float(torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))
            updates = [self._update_of(g) for g in self._update_order()]
            overlapped = self._scheduler is not None
            try:
                self._count_step()
                if overlapped:
                    # e.g. after a forward that raised: every group must be home, but those kept for the next
                    # forward, whose update refreshes them (Note [kept through the update])
                    self.weights.release_all(keep_kept=True)
                    counters = self._launch(updates, clip / scale)
            except KeyboardInterrupt:  # step counts and launched updates may disagree now
                self._failed = "a step was interrupted part-way (KeyboardInterrupt)"
                raise
            if not overlapped:
                self.weights.begin_step()
                counters = self._run_updates(updates, clip / scale)
                self._add_counters(counters)
                self.weights.finish_step()
                self._gather_device_weights(updates)
        if self.dtype == torch.float16:
            self._scaler.update(overflow)
        grad_bytes, self._grads.bytes_to_host = self._grads.bytes_to_host, 0
        self._grads.reset()
        label = f"step {self._step}" + (" (skipped)" if skip else " (launched)" if overlapped else "")
        self.timeline.add("step", label, start, time.perf_counter())
        return StepInfo(step=self._step, grad_norm=grad_norm, skipped=skip, loss_scale=self._scaler.scale,
                        time_s=time.perf_counter() - start, adam_s=counters.adam_s, io_wait_s=counters.io_wait_s,
                        nvme_bytes_read=counters.nvme_bytes_read, nvme_bytes_written=counters.nvme_bytes_written,
                        grad_bytes_to_host=grad_bytes, groups_on_nvme=counters.groups_on_nvme,
                        overlapped=overlapped)

    # Note [updates during backward]: without clipping, fp16 loss scaling or skip_nonfinite, a group's update
    # depends on its own gradients only, so ``backward_step`` runs it as soon as the last of them arrives
    # (GradientStream.on_group_ready, on the thread running autograd) while backward goes on with the other
    # groups: the Adam pass overlaps backward instead of following it. The updates run one by one on an
    # UpdateQueue thread, each first waiting for its group's gradient copies (CUDA). What makes it safe:
    # - no autograd node reads a group's weights after all of its parameters have their gradients (the node
    #   that reads a weight also produces its gradient), so rewriting them cannot change this backward; on
    #   CUDA the weight upload waits for the kernels queued before it (Note [weight uploads on CUDA]);
    # - offloaded weights: the group is already released (param_done runs first) and ``expect_update`` makes
    #   its next fetch wait for the update, as in the overlapped step;
    # - state on NVMe goes through the same staging pipeline, one group at a time (the UpdateQueue runs one
    #   update at a time; nothing else uses the optimizer's staging during backward); gradients on NVMe are
    #   excluded, since their accumulators are written out only when backward ends;
    # - the gradients of this backward only: an accumulation started by backward() takes the plain path.
    # Groups left incomplete (a parameter without gradient) are updated after backward. The result is the
    # same as ``backward(); step()``: the same kernel on the same inputs, group by group.
    def backward_step(self, loss: torch.Tensor) -> StepInfo:
        """``backward(loss)`` then ``step()`` in one call, with the same result. When no group's update depends
        on the others (``max_grad_norm`` None, no fp16 loss scaling, ``skip_nonfinite`` off, gradient
        accumulators in host RAM, no gradient left by an earlier ``backward``), each group's Adam update
        starts as soon as its gradients are complete and overlaps the rest of backward (Note [updates during
        backward]); otherwise it is exactly ``backward(loss); step()``. ``StepInfo.time_s`` then covers the
        backward too. A parameter that gets two gradients in one backward (shared by two reentrant
        checkpointed segments) cannot be handled this way: that raises, and the engine is then failed."""
        self._check_open()
        self._sync(keep_read_ahead=True)
        if (self.max_grad_norm is not None or self.dtype == torch.float16 or self.skip_nonfinite
                or self._res.grad_swap is not None or self._grads.any_received()):
            self.backward(loss)
            return self.step()
        start = time.perf_counter()
        offloaded = isinstance(self.weights, OffloadedParams)
        submitted: dict[int, GroupUpdate] = {}
        expect_next = self._expected_next()
        queue = UpdateQueue(lambda update, copies: self._run_updates([update], 1.0, keep_order=True, ready=copies,
                                                                     read_ahead=expect_next),
                            on_start=lambda: self._preload(expect_next([])),
                            at_exit=self._read_ahead_for_next_step)
        self._res.inflight = queue  # whatever interrupts from here on, close() closes and joins it

        def ready(g: int, copies: list[torch.cuda.Event]) -> None:
            if not any(self._grads.received[g]):
                return
            update = self._update_of(g)
            if offloaded:
                self.weights.expect_update([g], drain=False)
                self._mark_updated_when_home(update)
            queue.submit(update, copies)
            submitted[g] = update  # (after: a group that never reached the queue was not updated)

        if not offloaded:
            self.weights.begin_step()
        self._grads.count_arrivals()
        self._grads.on_group_ready = ready
        if offloaded:  # each group's update follows its backward: it may take the weights (Note [lent to ...])
            self.weights.lend_to_updates(True)
        try:
            self.backward(loss)
            self._grads.finish()
            for g in range(len(self.groups)):  # groups with a parameter that got no gradient
                if g not in submitted and any(self._grads.received[g]):
                    ready(g, [])
        except BaseException:
            queue.close()
            try:
                queue.wait()
            except BaseException:
                pass  # the backward's error is the one to report
            if submitted:
                self._fail("backward_step failed after updating some groups")
            elif offloaded:  # no update was handed over: nothing will mark a group updated
                self.weights.settle_updates()
            raise
        finally:
            self._grads.on_group_ready = None
            if offloaded:
                self.weights.lend_to_updates(False)
        self._arrival_order = list(submitted)  # the order the next backward_step's read-ahead expects
        queue.close()
        grad_norm = float(self._grads.global_norm())
        self._count_step()
        self._eager_steps += 1
        if offloaded:
            self._inflight = self._res.inflight = queue  # joined by the next _sync, like an overlapped step
            counters = self._planned_counters(list(submitted.values()))
        else:
            counters = queue.wait()
            self._res.inflight = None
            self._add_counters(counters)
            self.weights.finish_step()
            self._gather_device_weights(list(submitted.values()))
        grad_bytes, self._grads.bytes_to_host = self._grads.bytes_to_host, 0
        self._grads.reset()
        self.timeline.add("step", f"step {self._step} (during backward)", start, time.perf_counter())
        return StepInfo(step=self._step, grad_norm=grad_norm, skipped=False, loss_scale=self._scaler.scale,
                        time_s=time.perf_counter() - start, adam_s=counters.adam_s, io_wait_s=counters.io_wait_s,
                        nvme_bytes_read=counters.nvme_bytes_read, nvme_bytes_written=counters.nvme_bytes_written,
                        grad_bytes_to_host=grad_bytes, groups_on_nvme=counters.groups_on_nvme, overlapped=offloaded)

    def _gather_device_weights(self, updates: list[GroupUpdate]) -> None:
        """Several ranks, parameters on the device: every rank's updated shard into every rank's weights (the
        same groups on every rank: the gradients were reduced over all of them). Collective."""
        if self.ranks.many:
            self.weights.gather(sorted(u.state.group.index for u in updates))

    def _expected_next(self) -> Callable[[list[GroupUpdate]], GroupState | None]:
        """For a backward_step's state read-ahead (Note [state read-ahead], group_stepper.py): called with the
        updates just done, returns the state of the group expected next, in the order the last backward_step's
        groups came in (a group that comes out of order is simply read when it comes)."""
        order, done = list(self._arrival_order), set()

        def expect_next(updates: list[GroupUpdate]) -> GroupState | None:
            done.update(u.state.group.index for u in updates)
            upcoming = next((g for g in order if g not in done), None)
            return None if upcoming is None else self.store.states[upcoming]
        return expect_next

    def _preload(self, state: GroupState | None) -> None:
        if state is not None:
            self._stepper.preload(state)

    def _read_ahead_for_next_step(self) -> None:
        """When a backward_step's updates are all done: start reading the state of the group the next
        backward_step updates first (the head, usually), so that it comes in during the next forward. Anything
        but training drops it first (``_sync``)."""
        self._stepper.discard_preload()
        if self._failed is None and self._arrival_order:
            try:
                self._stepper.preload(self.store.states[self._arrival_order[0]])
            except Exception:  # only a read-ahead: the next step reads the state itself (and reports a failure)
                self._stepper.discard_preload()

    def _count_step(self) -> None:
        """One more optimizer step, and one more for each parameter that received a gradient."""
        for g, group in enumerate(self.groups):
            for i in range(len(group.slots)):
                self._param_steps[g][i] += self._grads.received[g][i]
        self._step += 1

    def _run_updates(self, updates: list[GroupUpdate], grad_scale: float, keep_order: bool = False,
                     ready: list[torch.cuda.Event] = (), read_ahead=None) -> StepCounters:
        """Runs ``updates`` (after the CUDA ``ready`` events: their gradient copies); ``read_ahead`` as
        GroupStepper.run's."""
        try:
            for event in ready:
                event.synchronize()
            return self._stepper.run(updates, grad_scale, keep_order=keep_order, read_ahead=read_ahead)
        except BaseException as e:
            # Groups before the failure are updated, the rest are not, and a failed write may have left a
            # group's swap file half old, half new: no later step can be exact, so none is allowed.
            self._fail(f"a step failed part-way ({type(e).__name__}: {e})")
            raise

    def _fail(self, reason: str) -> None:
        """The state is inconsistent: the engine refuses to go on, and fetches waiting for updates must not hang."""
        self._failed = reason
        if isinstance(self.weights, OffloadedParams):
            self.weights.abort_updates(reason)

    def _launch(self, updates: list[GroupUpdate], grad_scale: float) -> StepCounters:
        """Starts the overlapped step; returns what is known now (bytes to move, groups on NVMe)."""
        for update in updates:
            self._mark_updated_when_home(update)
        work = partial(self._run_updates, updates, grad_scale, keep_order=True)  # the next forward's order
        step = BackgroundStep(work)
        # Recorded before it starts: whatever interrupts from here on, close() joins this step (and then lets
        # fetches stop waiting for updates that will never come, EngineResources.release).
        self._inflight = self._res.inflight = step
        self.weights.expect_update([u.state.group.index for u in updates])
        step.start()
        return self._planned_counters(updates)

    def _mark_updated_when_home(self, update: GroupUpdate) -> None:
        """Lets fetches of the group go on once its new weights are home: when its Adam pass ends (the kernel
        wrote them, or their write-back is issued and each fetch waits for it), or, for weights read from the
        state file, once the state writes are complete (Note [weights in the state file])."""
        g = update.state.group.index
        if self.weights.home_is_state_file(g):
            update.written = partial(self.weights.mark_updated, g)
        else:
            update.done = partial(self.weights.mark_updated, g)

    @staticmethod
    def _planned_counters(updates: list[GroupUpdate]) -> StepCounters:
        """The NVMe traffic ``updates`` will cause (known before they run): state in and out, gradients in."""
        nvme = [u for u in updates if u.state.placement is StatePlacement.NVME]
        written = sum(u.state.nbytes for u in nvme)
        read = written + sum(u.state.group.shard_numel * FP32_BYTES for u in nvme if u.grad_nvme is not None) \
            - sum(u.state.group.shard_numel * FP32_BYTES for u in nvme if u.master is not None)
        return StepCounters(nvme_bytes_read=read, nvme_bytes_written=written, groups_on_nvme=len(nvme))

    def _sync(self, keep_read_ahead: bool = False) -> None:
        """Waits for an overlapped step; its failure becomes this call's (and marks the engine failed). Unless
        ``keep_read_ahead`` (training calls), also waits for and drops state reads begun for the next
        backward_step (Note [state read-ahead]): what follows may use the staging slots itself."""
        inflight = self._inflight
        if inflight is not None:
            try:
                counters = inflight.wait()
            except BaseException:
                if inflight.done():  # the step itself failed, and is over
                    self._inflight = self._res.inflight = None
                raise  # (interrupted while waiting: the step still runs, and close() joins it)
            self._inflight = self._res.inflight = None
            self._add_counters(counters)
            if isinstance(self.weights, OffloadedParams):
                self.weights.reap()  # lent groups nobody uses go home now (Note [lent to the update])
        if not keep_read_ahead and getattr(self, "_stepper", None) is not None:
            self._stepper.discard_preload()

    def _add_counters(self, counters: StepCounters) -> None:
        self._nvme_read += counters.nvme_bytes_read
        self._nvme_written += counters.nvme_bytes_written
        self._adam_s += counters.adam_s
        self._io_wait_s += counters.io_wait_s

    def _update_order(self) -> list[int]:
        """Groups in the order the next forward uses them (traced), then any it did not use."""
        order = self._scheduler.forward_order() if self._scheduler is not None else []
        traced = set(order)
        return order + [g for g in range(len(self.groups)) if g not in traced]

    def _update_of(self, g: int) -> GroupUpdate:
        group = self.groups[g]
        received = self._grads.received[g]
        segments: list[Segment] = []
        for i, slot in enumerate(group.slots):
            if not received[i]:
                continue
            step = self._param_steps[g][i] + 1
            hyper = self.param_groups[slot.hyper_index]
            last = segments[-1] if segments else None
            contiguous = last is not None and received[i - 1] and group.slots[i - 1].hyper_index == slot.hyper_index
            if contiguous and last.step == step:
                segments[-1] = Segment(last.start, slot.end, step, last.lr, last.beta1, last.beta2, last.eps,
                                       last.weight_decay)
            else:
                segments.append(Segment(slot.offset, slot.end, step, hyper["lr"], hyper["betas"][0],
                                        hyper["betas"][1], hyper["eps"], hyper["weight_decay"]))
        if group.sharded:  # this rank's part of each, counted from its shard (Note [rank shards])
            segments = [dataclasses.replace(seg, start=a, end=b)
                        for seg in segments for a, b in shard_spans(group, [(seg.start, seg.end)])]
        state = self.store.states[g]
        grad_nvme = self._res.grad_swap.files[g] if self._res.grad_swap is not None else None
        # (before after_update: a lent group's update runs on its device buffer, Note [lent to the update])
        master = self.weights.lend_master(g) if state.placement is StatePlacement.NVME else None
        return GroupUpdate(state=state, grad_host=self._grads.grad_hosts[g], grad_nvme=grad_nvme, segments=segments,
                           master=master, lowp_out=partial(self.weights.kernel_output, g),
                           after_update=self.weights.after_update(g, state.placement is StatePlacement.NVME,
                                                                  [(s.start, s.end) for s in segments]))

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group; setting it sets every group's (next step on)."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"engine.lr: expected a finite number >= 0; got {value}")
        for group in self.param_groups:
            group["lr"] = value

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Writes everything needed to continue training exactly to the checkpoint directory ``path``: fp32
        master weights, Adam moments and step counts, the loss scale, hyper-parameters, RNG states (torch CPU
        and CUDA, Python, numpy), the other tensors of ``model.state_dict()``, the config, the model's HF
        config, and ``extra`` (JSON values, e.g. the data position), returned by :meth:`load`.

        Atomic (Note [atomic checkpoints]): ``path`` keeps its previous checkpoint until the new one is
        complete and fsynced, then switches to it in one rename; a failure (e.g. ``OSError`` ENOSPC with the
        path) or a kill leaves the previous checkpoint loadable. State on NVMe is streamed out of the swap
        files. Blocks until done. Call it between steps (not with gradients accumulated)."""
        self._check_open()
        self._sync()
        checkpointing.save(self, os.fspath(path), extra)

    def load(self, path: str | os.PathLike, restore_rng: bool = True) -> dict[str, Any]:
        """Restores the state :meth:`save` wrote to ``path`` into this engine (built for the same model, with
        any placement) and returns the ``extra`` dict saved with it. Every file is checked against the
        manifest's sizes and CRC-32 before anything changes: a missing, truncated or corrupt file raises
        :class:`offload.CheckpointError` naming it, and the engine is left as it was. Gradients accumulated
        since the last step are dropped. Tensor files are safetensors and metadata JSON: nothing in a
        checkpoint is executed."""
        self._check_open()
        self._sync()
        return checkpointing.load(self, os.fspath(path), restore_rng)

    # ---- inspection ------------------------------------------------------------------------------------------

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

    def synchronize(self) -> None:
        """Blocks until the last step is complete: the overlapped optimizer update (offloaded parameters) and,
        on CUDA, every kernel and copy queued on the device. For timing; training never needs it."""
        self._check_open()
        self._sync(keep_read_ahead=True)  # (reads begun for the next step are part of it, not of this one)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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

    # ---- lifetime --------------------------------------------------------------------------------------------

    def close(self, keep_weights: bool | None = None) -> None:
        """Removes the hooks, frees the host buffers and removes the swap files; the engine cannot be used
        afterwards. Idempotent. With offloaded parameters, ``keep_weights`` decides whether their current
        weights go back into the model (which then works on its own) or the parameters become meta tensors
        (no memory; save or export first). The default keeps them unless that would exceed
        ``host_memory_limit`` (a model larger than the host budget is never brought into RAM whole). With
        several ranks and offloaded parameters, keeping the weights gathers them: every rank must call it (an
        engine of several ranks dropped without ``close()`` leaves meta tensors)."""
        if self._closed:
            return
        if isinstance(self.weights, OffloadedParams):
            limit = self.config.host_memory_limit
            fits = limit is None or sum(g.numel for g in self.groups) * self._lowp_bytes <= limit
            self._res.keep_weights = fits if keep_weights is None else keep_weights
            if not self._res.keep_weights and keep_weights is None:
                log.warning("offload: closing without bringing the weights back into the model: they exceed "
                            "host_memory_limit; its offloaded parameters are now meta tensors")
        self._closed = True
        self._inflight = None  # _Resources.release joins it
        self._finalizer()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("offload.Engine: this engine is closed")
        failure = getattr(self.weights, "io_failure", None)
        if failure is not None and self._failed is None:
            self._failed = f"writing weights back to NVMe failed ({failure})"
        if self._failed is not None:
            raise RuntimeError(f"offload.Engine: {self._failed}; the optimizer state is inconsistent, so the "
                               "engine refuses to go on; build a new engine (and load the last checkpoint)")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
