"""Engine: trains a model with its optimizer state, gradients and parameters offloaded to host RAM or NVMe."""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from typing import Any

import torch
from torch import nn

from offload.config import Config
from offload.engine import checkpoint_load, checkpointing
from offload.engine.construction import EngineConstruction
from offload.engine.inputs import cast_inputs
from offload.engine.inspection import EngineInspection
from offload.engine.ranks import Ranks
from offload.engine.resources import EngineResources
from offload.engine.types import StepInfo
from offload.engine.update_runner import UpdateRunner
from offload.errors import ConfigError
from offload.exit_signals import terminate_on_signals
from offload.layout.flat_group import build_flat_group
from offload.layout.meta_init import materializers_for
from offload.layout.partition import partition_model
from offload.optim.background_step import BackgroundStep
from offload.optim.group_stepper import GroupUpdate, StepCounters
from offload.optim.hyper import resolve_param_groups
from offload.optim.loss_scale import LossScaler
from offload.optim.update_queue import UpdateQueue
from offload.schedule.fetch_scheduler import FetchScheduler
from offload.schedule.offloaded_params import OffloadedParams
from offload.storage.host_pool import HostPool
from offload.storage.swap_store import SwapStore
from offload.timeline import NO_TIMELINE, Timeline

log = logging.getLogger("offload")


# model -> the open engine wrapping it: a second engine on the same model would add a second set of hooks.
_ENGINE_OF: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


class Engine(EngineConstruction, UpdateRunner, EngineInspection):
    """Trains ``model`` with the placement ``config`` chooses; see DESIGN.md "Public API" and the README.

    The model's trainable parameters are regrouped (one group per block, see ``offload.layout``) into flat
    buffers: the weights in ``config.dtype`` on ``config.device``, and per group an fp32 master copy, Adam's
    moments and an fp32 gradient accumulator on the host, the state in RAM or in swap files on NVMe. Adam
    (``torch.optim.AdamW`` arithmetic, decoupled weight decay) runs on the CPU in the native kernel.
    Frozen parameters (``requires_grad=False``) are only cast and moved: no state, no gradient traffic.
    Everything is allocated here: a budget or disk that is too small fails now, not during training.

    This file holds the public training loop; the construction (``EngineConstruction``), the optimizer updates
    (``UpdateRunner``) and ``state_dict`` / ``stats`` (``EngineInspection``) are base classes in their own
    modules of ``offload/engine/``.
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
        self._gathered = 0  # open engine.gathered() contexts (Note [gathered weights])
        self._failed: str | None = None
        self.swap: SwapStore | None = None
        self._scheduler: FetchScheduler | None = None
        previous = _ENGINE_OF.get(model)
        if previous is not None and previous() is not None and not previous()._closed:
            raise ConfigError("model: it is already wrapped by an open offload.Engine; close that engine first")
        terminate_on_signals()  # SIGTERM / SIGHUP unwind through close() (Note [termination signals])
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

    # ---- training loop ---------------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward, with floating-point tensor inputs cast to the compute dtype and every tensor
        input moved to the device."""
        self._check_open()
        self._check_not_gathered("a forward")
        return self.model(*cast_inputs(args, self.device, self.dtype),
                          **cast_inputs(kwargs, self.device, self.dtype))

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagates ``loss`` (scaled by the fp16 loss scale); gradients add up until ``step()``."""
        self._check_open()
        self._check_not_gathered("a backward")
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
        self._check_not_gathered("a step")
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
    # - after earlier backward() calls (gradient accumulation) a group is complete when all of its parameters
    #   have had this backward's gradient and every one of them has been added into the fp32 accumulator
    #   (GradientStream drains the group's pending host additions before it reports the group ready, Note
    #   [a group is ready once its additions are done]); a group that got gradients only in earlier
    #   micro-batches is updated after backward.
    # Groups left incomplete (a parameter without gradient) are updated after backward. The result is the
    # same as ``backward(); step()``: the same kernel on the same inputs, group by group.
    def backward_step(self, loss: torch.Tensor) -> StepInfo:
        """``backward(loss)`` then ``step()`` in one call, with the same result. When no group's update depends
        on the others (``max_grad_norm`` None, no fp16 loss scaling, ``skip_nonfinite`` off, gradient
        accumulators in host RAM), each group's Adam update starts as soon as its gradients are complete and
        overlaps the rest of backward (Note [updates during backward]), also when earlier ``backward`` calls
        accumulated gradients (the last micro-batch of an accumulation); otherwise it is exactly
        ``backward(loss); step()``. ``StepInfo.time_s`` then covers the
        backward too. A parameter that gets two gradients in one backward (shared by two reentrant
        checkpointed segments) cannot be handled this way: that raises, and the engine is then failed."""
        self._check_open()
        self._check_not_gathered("a backward")
        self._sync(keep_read_ahead=True)
        if (self.max_grad_norm is not None or self.dtype == torch.float16 or self.skip_nonfinite
                or self._res.grad_swap is not None):
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
        return checkpoint_load.load(self, os.fspath(path), restore_rng)

    # ---- inspection (state_dict, stats: offload/engine/inspection.py) ---------------------------------------

    def synchronize(self) -> None:
        """Blocks until the last step is complete: the overlapped optimizer update (offloaded parameters) and,
        on CUDA, every kernel and copy queued on the device. For timing; training never needs it."""
        self._check_open()
        self._sync(keep_read_ahead=True)  # (reads begun for the next step are part of it, not of this one)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- lifetime --------------------------------------------------------------------------------------------

    def close(self, keep_weights: bool | None = None) -> None:
        """Removes the hooks, frees the host buffers and removes the swap files; the engine cannot be used
        afterwards. Idempotent. With offloaded parameters, ``keep_weights`` decides whether their current
        weights go back into the model (which then works on its own) or the parameters become meta tensors
        (no memory; save or export first). The default keeps them unless that would exceed
        ``host_memory_limit`` (a model larger than the host budget is never brought into RAM whole). Kept
        weights go to the device when the model fits ``device_memory_limit`` and the device's free memory,
        else into host memory. With
        several ranks and offloaded parameters, keeping the weights gathers them: every rank must call it (an
        engine of several ranks dropped without ``close()`` leaves meta tensors)."""
        if self._closed:
            return
        if isinstance(self.weights, OffloadedParams):
            limit = self.config.host_memory_limit
            model_bytes = sum(g.numel for g in self.groups) * self._lowp_bytes
            fits = limit is None or model_bytes <= limit
            self._res.keep_weights = fits if keep_weights is None else keep_weights
            device_limit = self.weights.device_limit
            if self._res.keep_weights and self.device.type != "cpu" and device_limit is not None \
                    and model_bytes > device_limit:
                # the parameters were offloaded because the model exceeds the device's share for them: back in
                # host memory (Note [weights back on the host], resources.py)
                self._res.keep_weights = "host"
            if not self._res.keep_weights and keep_weights is None:
                log.warning("offload: closing without bringing the weights back into the model: they exceed "
                            "host_memory_limit; its offloaded parameters are now meta tensors")
        self._closed = True
        self._inflight = None  # _Resources.release joins it
        self._finalizer()

    def gathered(self, module: nn.Module | None = None, writable: bool = False):
        """A context manager in which the trainable parameters of ``module`` (default: the whole model) hold
        their fp32 master values in tensors of their own on the device, readable outside forward; with
        ``writable``, the values at exit become the new masters (Adam's moments kept). Outside it, offloaded
        weights are only valid inside a use. No forward or step inside. See Note [gathered weights]."""
        from offload.engine.gathered import gathered

        self._check_open()
        return gathered(self, module, writable)

    def _check_not_gathered(self, what: str) -> None:
        if self._gathered:
            raise RuntimeError(f"offload.Engine: {what} inside engine.gathered(): the parameters hold fp32 copies "
                               "there; leave the context first")

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
