"""Engine: trains a model with its optimizer state, gradients and parameters offloaded to host RAM or NVMe.

A thin front over its parts (Note [the engine's parts]).
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from typing import Any

import torch
from torch import nn

from offload.config import Config
from offload.engine import checkpoint_load, checkpointing, inspection
from offload.engine.build import build_parts
from offload.engine.inputs import cast_inputs
from offload.engine.parts import EngineParts
from offload.engine.pretrained import load_pretrained, meta_value_sources
from offload.engine.training_state import TrainingState
from offload.engine.types import EngineStats, StepInfo
from offload.engine.update_runner import UpdateRunner
from offload.errors import ConfigError
from offload.exit_signals import terminate_on_signals
from offload.layout.flat_group import build_flat_group, frozen_groups, resident_bytes
from offload.layout.partition import partition_model
from offload.optim.hyper import resolve_param_groups, validated_hyper
from offload.optim.loss_scale import LossScaler
from offload.ranks import Ranks
from offload.schedule.weights import Weights
from offload.storage.host_pool import HostPool
from offload.storage.swap_store import SwapStore
from offload.timeline import NO_TIMELINE, Timeline

# model -> the open engine wrapping it: a second engine on the same model would add a second set of hooks.
_ENGINE_OF: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()

# Note [the engine's parts]: an Engine owns three objects, each with one job. ``EngineParts`` (parts.py) is
# everything allocated (host pool, swap store, weights, gradient stream, optimizer state store and stepper,
# fetch scheduler, the update in flight), filled by ``build_parts`` (build.py) and freed by its ``release``,
# which is also the engine's finalizer: it holds no reference to the engine, so a dropped engine is collected
# and still cleans up. ``TrainingState`` (training_state.py) is what training changes besides the buffers
# (step counts, loss scale, hyper-parameters, the failure state) with references to the parts: checkpoints,
# pretrained loading, export and ``gathered`` work on it alone. ``UpdateRunner`` (update_runner.py) turns
# gradients into optimizer updates and joins them. The engine checks its inputs and its state (open, not
# failed, not inside ``gathered``) and hands each call to the part that does it.


class Engine:
    """Trains ``model`` with the placement ``config`` chooses; see DESIGN.md "Public API" and the README.

    The model's trainable parameters are regrouped (one group per block, see ``offload.layout``) into flat
    buffers: the weights in ``config.dtype`` on ``config.device``, and per group an fp32 master copy, Adam's
    moments and an fp32 gradient accumulator on the host, the state in RAM or in swap files on NVMe. Adam
    (``torch.optim.AdamW`` arithmetic, decoupled weight decay) runs on the CPU in the native kernel.
    Frozen parameters (``requires_grad=False``) are cast to ``config.dtype`` and follow ``params=`` like the
    trainable ones (with offloaded parameters they are fetched and released by block too, and counted
    against ``device_memory_limit``), with no optimizer state, no gradients and no write-back.
    Everything is allocated here: a budget or disk that is too small fails now, not during training.
    ``pretrained``: a Hugging Face safetensors checkpoint (directory or file) the weights start from, as with
    ``offload.load_pretrained``; for a model on the meta device the groups are filled from it directly, so no
    random initialisation is computed for the weights it holds and each home is written once (only a PEFT
    model's adapters, or what the checkpoint lacks, come from the ``init_empty`` replay: Note [values provided
    elsewhere]). A checkpoint that does not fit the model raises ``CheckpointError`` before anything is
    allocated.
    """

    def __init__(self, model: nn.Module, config: Config | None = None, *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 max_grad_norm: float | None = None, loss_scale: str | float = "dynamic",
                 param_groups: list[dict[str, Any]] | None = None, skip_nonfinite: bool = False,
                 timeline: Timeline | None = None, process_group: Any = None,
                 pretrained: str | os.PathLike | None = None) -> None:
        self.config = config = config if config is not None else Config()
        if not isinstance(config, Config):
            raise ConfigError(f"config: expected an offload.Config; got {type(config).__name__}")
        _check_max_grad_norm(max_grad_norm)
        self.model = model
        self.device = torch.device(config.device)
        self.ranks = ranks = _resolve_ranks(self.device, process_group)
        self.dtype = config.torch_dtype
        self.timeline = timeline if timeline is not None else NO_TIMELINE
        partition = partition_model(model)
        trainable = [(n, p) for spec in partition.groups for n, p in zip(spec.param_names, spec.params)]
        if not trainable:
            raise ConfigError("model: it has no trainable parameters (every parameter has requires_grad=False)")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.param_groups, hyper_of = resolve_param_groups(model, trainable, param_groups, defaults)
        self._defaults = validated_hyper("", defaults)  # (engine.optimizer's defaults)
        self.groups = [build_flat_group(i, spec, hyper_of, ranks.rank, ranks.world)
                       for i, spec in enumerate(partition.groups)]
        self.frozen_groups, resident_frozen = frozen_groups(partition, config.params != "device", ranks.rank,
                                                            ranks.world, len(self.groups))
        # A model built on the meta device is materialised group by group (offload/layout/meta_init.py).
        on_meta = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
        _check_not_wrapped(model)
        # (a checkpoint is matched against the model as the sources are made, before anything is allocated)
        with meta_value_sources(model, pretrained, config.io) if on_meta else contextlib.nullcontext() as sources:
            terminate_on_signals()  # SIGTERM / SIGHUP unwind through close() (Note [termination signals])
            self._parts = parts = EngineParts(HostPool(config.host_memory_limit, pin=self.device.type == "cuda"),
                                              resident_bytes(resident_frozen, self.dtype))
            try:
                attach = build_parts(parts, model, config, self.groups, self.frozen_groups, resident_frozen,
                                     ranks, self.timeline, sources)
            except BaseException:
                parts.release()
                raise
        attach()  # nothing above changed the model; this (which cannot fail) does
        self._closed = False
        self._state = TrainingState(model, config, ranks, self.device, self.groups, self.frozen_groups,
                                    self.param_groups, parts,
                                    LossScaler(loss_scale, enabled=self.dtype == torch.float16))
        self._runner = UpdateRunner(self._state, self.timeline, max_grad_norm, skip_nonfinite)
        _ENGINE_OF[model] = weakref.ref(self)
        # Bringing offloaded weights back gathers them from every rank: only an explicit close(), which every
        # rank calls, may do that. An engine of several ranks that is collected (or reaches interpreter exit)
        # unclosed leaves meta tensors instead of issuing a collective the other ranks never join.
        if ranks.many:
            parts.keep_weights = False
        # An engine dropped without close() still removes its hooks and swap files (the hooks hold the
        # gradient stream, not the engine, so the engine can be collected).
        self._finalizer = weakref.finalize(self, parts.release)
        if pretrained is not None and not on_meta:  # (a model with values: they are replaced)
            self._load_pretrained_or_close(pretrained)

    def _load_pretrained_or_close(self, path: str | os.PathLike) -> None:
        try:
            load_pretrained(self, path)
        except BaseException:
            self.close()
            raise

    _optimizer_view = None  # engine.optimizer, made on first use (Note [the optimizer view], optimizer_view.py)

    # ---- the parts a caller may look at ---------------------------------------------------------------------

    @property
    def weights(self) -> Weights:
        """The compute-dtype weights: resident on the device, or offloaded (``OffloadedParams``)."""
        return self._parts.weights

    @property
    def pool(self) -> HostPool:
        return self._parts.pool

    @property
    def swap(self) -> SwapStore | None:
        """The swap files under ``config.nvme_dir``, or None when nothing is on NVMe."""
        return self._parts.swap

    @property
    def store(self):
        """The optimizer state store (every group's fp32 master, m and v, in RAM or on NVMe)."""
        return self._parts.store

    # ---- training loop ---------------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward, with floating-point tensor inputs cast to the compute dtype and every tensor
        input moved to the device."""
        self._check_usable("a forward")
        return self.model(*cast_inputs(args, self.device, self.dtype),
                          **cast_inputs(kwargs, self.device, self.dtype))

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagates ``loss`` (scaled by the fp16 loss scale); gradients add up until ``step()``."""
        self._check_usable("a backward")
        loss = self._checked_loss(loss)
        # the gradient accumulators are about to be written: the last step must have read them
        self._runner.sync(keep_read_ahead=True)
        self._backward(loss)

    def _checked_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, scaled by the fp16 loss scale."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("engine.backward: loss must be a tensor with one element")
        return loss.float() * self._state.scaler.scale if self.dtype == torch.float16 else loss

    def _backward(self, loss: torch.Tensor) -> None:
        """The backward pass itself, the last step joined (by the caller)."""
        parts = self._parts
        try:
            if parts.scheduler is None:
                loss.backward()
                return
            parts.scheduler.begin_backward()
            try:
                loss.backward()
            finally:
                parts.scheduler.end_backward()  # every group goes home, where the step updates it (but the kept)
        finally:
            if parts.grad_swap is not None:
                parts.grads.finish()  # accumulators on NVMe are written out after every backward

    def step(self) -> StepInfo:
        """Updates every parameter that received a gradient since the last step (torch's rule: one that got
        none is left alone, state and step count included), then starts a new accumulation.

        With parameters on the device the update is complete when this returns. With offloaded parameters
        (``params="cpu"|"nvme"``) it continues on a background thread, group by group in the order the next
        forward needs them, and each group's next fetch waits for that group's update only (see Note
        [overlapped step]); ``StepInfo.overlapped`` is then True and the Adam / I/O times of the step are
        added to ``engine.stats()`` when it completes. The result is the same either way."""
        self._check_usable("a step")
        info = self._runner.step()
        self._mark_step_taken()
        return info

    def backward_step(self, loss: torch.Tensor) -> StepInfo:
        """``backward(loss)`` then ``step()`` in one call, with the same result. When no group's update depends
        on the others (``max_grad_norm`` None, no fp16 loss scaling, ``skip_nonfinite`` off, gradient
        accumulators in host RAM), each group's Adam update starts as soon as its gradients are complete and
        overlaps the rest of backward (Note [updates during backward]), also when earlier ``backward`` calls
        accumulated gradients (the last micro-batch of an accumulation); otherwise it is exactly
        ``backward(loss); step()``. ``StepInfo.time_s`` then covers the backward too. A parameter that gets
        two gradients in one backward (shared by two reentrant checkpointed segments) cannot be handled this
        way: that raises, and the engine is then failed."""
        self._check_usable("a backward")
        if not self._runner.can_update_during_backward():
            self.backward(loss)
            return self.step()
        loss = self._checked_loss(loss)
        # (the runner joins the last step first, then runs the backward with its queue of updates in flight:
        # a backward that joined what is in flight would wait for that queue, Note [updates during backward])
        info = self._runner.backward_step(lambda: self._backward(loss))
        self._mark_step_taken()
        return info

    def zero_grad(self) -> None:
        """Drops the gradients accumulated by ``backward`` since the last step. A step starts a new accumulation
        by itself, so right after one this does nothing (and does not wait for the update in flight)."""
        self._check_usable("zero_grad")
        self._runner.drop_gradients()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """A ``torch.optim.Optimizer`` view of the engine (``offload.engine.optimizer_view``): its
        ``param_groups`` are the engine's, so any ``torch.optim.lr_scheduler`` attached to it drives every
        group's learning rate; ``step()`` and ``zero_grad()`` are the engine's; ``state_dict()`` gives the Adam
        state in torch.optim.AdamW's format. The same object for the life of the engine."""
        from offload.engine.optimizer_view import EngineOptimizer

        if self._optimizer_view is None:
            self._optimizer_view = EngineOptimizer(self, dict(self._defaults))
        return self._optimizer_view

    def _mark_step_taken(self) -> None:
        # torch's lr schedulers warn when they step before their optimizer did, and learn that it did from an
        # ``_opt_called`` flag on the optimizer (set by the wrapper they put on its step()): a loop that calls
        # engine.step() rather than engine.optimizer.step() stepped the optimizer too.
        if self._optimizer_view is not None:
            self._optimizer_view._opt_called = True

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

    # ---- checkpoints and inspection --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Writes everything needed to continue training exactly to the checkpoint directory ``path``: fp32
        master weights, Adam moments and step counts, the loss scale, hyper-parameters, RNG states (torch CPU
        and CUDA, Python, numpy), the other tensors of ``model.state_dict()``, the config, the model's HF
        config, and ``extra`` (JSON values, e.g. the data position), returned by :meth:`load`.

        Atomic (Note [atomic checkpoints]): ``path`` keeps its previous checkpoint until the new one is
        complete and fsynced, then switches to it in one rename; a failure (e.g. ``OSError`` ENOSPC with the
        path) or a kill leaves the previous checkpoint loadable. State on NVMe is streamed out of the swap
        files. Blocks until done. Call it between steps (not with gradients accumulated)."""
        checkpointing.save(self.training_state(), os.fspath(path), extra)

    def load(self, path: str | os.PathLike, restore_rng: bool = True) -> dict[str, Any]:
        """Restores the state :meth:`save` wrote to ``path`` into this engine (built for the same model, with
        any placement) and returns the ``extra`` dict saved with it. Every file is checked against the
        manifest's sizes and CRC-32 before anything changes: a missing, truncated or corrupt file raises
        :class:`offload.CheckpointError` naming it, and the engine is left as it was. Gradients accumulated
        since the last step are dropped. Tensor files are safetensors and metadata JSON: nothing in a
        checkpoint is executed."""
        return checkpoint_load.load(self.training_state(), os.fspath(path), restore_rng)

    def state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The model's state with the fp32 master weights for trainable parameters: CPU tensors the caller
        owns (each its own storage; they stay valid after ``close()``), under the keys of
        ``model.state_dict()``. Frozen parameters (from wherever they live, one group at a time) and buffers
        are copied as the engine holds them, frozen floating-point parameters converted to fp32. With
        ``trainable_only``, only the trainable parameters (e.g. a LoRA adapter: no copy of the frozen base).
        Collective with several ranks: every rank calls it, and every rank gets the whole model."""
        return inspection.state_dict(self.training_state(), trainable_only)

    def stats(self) -> EngineStats:
        """Memory and traffic counters since the engine was built (see ``EngineStats``)."""
        return inspection.stats(self._state, self._runner.totals, self._closed)

    def training_state(self) -> TrainingState:
        """The training state, quiescent: the last step's updates complete and no state read in flight, for
        checkpointing, loading and export (``offload.save_pretrained``, ``offload.load_pretrained``). Raises if
        the engine is closed or failed."""
        self._check_open()
        self._runner.sync()
        return self._state

    def synchronize(self) -> None:
        """Blocks until the last step is complete: the overlapped optimizer update (offloaded parameters) and,
        on CUDA, every kernel and copy queued on the device. For timing; training never needs it."""
        self._check_open()
        self._runner.sync(keep_read_ahead=True)  # (reads begun for the next step are part of it, not of this one)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def gathered(self, module: nn.Module | None = None, writable: bool = False):
        """A context manager in which the trainable parameters of ``module`` (default: the whole model) hold
        their fp32 master values in tensors of their own on the device, readable outside forward; with
        ``writable``, the values at exit become the new masters (Adam's moments kept). Outside it, offloaded
        weights are only valid inside a use. No forward or step inside. See Note [gathered weights]."""
        from offload.engine.gathered import gathered

        return gathered(self.training_state(), module, writable)

    # ---- lifetime --------------------------------------------------------------------------------------------

    def close(self, keep_weights: bool | None = None) -> None:
        """Removes the hooks, frees the host buffers and removes the swap files; the engine cannot be used
        afterwards. Idempotent. With offloaded parameters, ``keep_weights`` decides whether their current
        weights go back into the model (which then works on its own) or the parameters become meta tensors
        (no memory; save or export first). The default keeps them unless that would exceed
        ``host_memory_limit`` (a model larger than the host budget is never brought into RAM whole). Kept
        weights go to the device when the model fits ``device_memory_limit`` and the device's free memory,
        else into host memory. With several ranks and offloaded parameters, keeping the weights gathers them:
        every rank must call it (an engine of several ranks dropped without ``close()`` leaves meta tensors)."""
        if self._closed:
            return
        self._parts.choose_what_to_keep(keep_weights, self.config.host_memory_limit)
        self._closed = True
        self._finalizer()  # EngineParts.release: joins the update in flight first

    def _check_usable(self, what: str) -> None:
        self._check_open()
        if self._state.gathered_contexts:
            raise RuntimeError(f"offload.Engine: {what} inside engine.gathered(): the parameters hold fp32 copies "
                               "there; leave the context first")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("offload.Engine: this engine is closed")
        state = self._state
        failure = self._parts.weights.io_failure
        if failure is not None and state.failed is None:
            state.failed = f"writing weights back to NVMe failed ({failure})"
        if state.failed is not None:
            raise RuntimeError(f"offload.Engine: {state.failed}; the optimizer state is inconsistent, so the "
                               "engine refuses to go on; build a new engine (and load the last checkpoint)")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_max_grad_norm(max_grad_norm: Any) -> None:
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and
                                          math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ConfigError(f"max_grad_norm: expected None or a positive number; got {max_grad_norm!r}")



def _resolve_ranks(device: torch.device, process_group: Any) -> Ranks:
    try:
        return Ranks.resolve(device, process_group)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_not_wrapped(model: nn.Module) -> None:
    previous = _ENGINE_OF.get(model)
    if previous is not None and previous() is not None and not previous()._closed:
        raise ConfigError("model: it is already wrapped by an open offload.Engine; close that engine first")
