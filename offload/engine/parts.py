"""EngineParts: what an engine is made of (everything it allocates), built by ``build_parts`` and released in
one place."""

from __future__ import annotations

import logging

import torch
from torch import nn

from offload.schedule.device_weights import DeviceWeights
from offload.schedule.grad_stream import GradientStream
from offload.schedule.grad_swap import GradSwap
from offload.optim.background_step import BackgroundStep
from offload.optim.state_store import OptimizerStateStore
from offload.schedule.device_weights import DeviceWeights
from offload.schedule.fetch_scheduler import FetchScheduler
from offload.schedule.offloaded_params import OffloadedParams
from offload.storage.host_pool import HostBuffer, HostPool
from offload.storage.swap_store import SwapStore

log = logging.getLogger("offload")


class EngineParts:
    """What an engine is made of: the host pool and swap store, the weights, the gradient stream and its
    accumulators, the optimizer state store and its stepper, the fetch scheduler (offloaded parameters), and
    the update in flight. ``build_parts`` fills it (each part as soon as it is allocated, so that a failed
    construction releases what was made); ``release`` frees it all: at close(), after a failed construction,
    or when an engine that was never closed is collected. Holds no reference to the engine itself."""

    def __init__(self, pool: HostPool, frozen_bytes: int) -> None:
        self.pool = pool
        self.frozen_bytes = frozen_bytes  # frozen parameters stay whole on the device, outside the groups
        self.swap: SwapStore | None = None
        self.grad_hosts: list[HostBuffer] = []
        self.grads: GradientStream | None = None
        self.weights: Weights | None = None
        # The weights again, under their own type: offloaded (params="cpu"|"nvme") or resident on the device
        # (params="device"); exactly one is set. What both do goes through ``weights``.
        self.offloaded: OffloadedParams | None = None
        self.resident: DeviceWeights | None = None
        self.scheduler: FetchScheduler | None = None
        self.store: OptimizerStateStore | None = None
        # An overlapped optimizer step (BackgroundStep) or backward_step's updates (UpdateQueue) still running:
        # the one place it is recorded, so that release() joins it before freeing what it uses.
        self.inflight: BackgroundStep | UpdateQueue | None = None
        self.stepper: GroupStepper | None = None  # its state reads begun for the next step end before staging goes
        self.grad_swap: GradSwap | None = None
        # close(): offloaded weights go back into the model: True (on the device, else in host memory if the
        # device is full), "host" (in host memory), False (the parameters become meta tensors)
        self.keep_weights: bool | str = True

    def choose_what_to_keep(self, keep_weights: bool | None, host_memory_limit: int | None) -> None:
        """At close(): whether offloaded weights go back into the model, and where (``keep_weights``, see
        Engine.close). By default they do unless the model exceeds ``host_memory_limit``."""
        weights = self.offloaded
        if weights is None:
            return  # resident weights are the model's own tensors already
        model_bytes = sum(g.numel for g in weights.groups) * weights.dtype.itemsize
        fits = host_memory_limit is None or model_bytes <= host_memory_limit
        self.keep_weights = fits if keep_weights is None else keep_weights
        if self.keep_weights and weights.device.type != "cpu" and weights.device_limit is not None \
                and model_bytes > weights.device_limit:
            # the parameters were offloaded because the model exceeds the device's share for them: back in host
            # memory (Note [weights back on the host])
            self.keep_weights = "host"
        if not self.keep_weights and keep_weights is None:
            log.warning("offload: closing without bringing the weights back into the model: they exceed "
                        "host_memory_limit; its offloaded parameters are now meta tensors")

    def _restore_model(self) -> None:
        """Offloaded parameters get their weights back in real storage: the model works without the engine.
        Unless ``keep_weights`` is False: they then become meta tensors (shapes only, no memory)."""
        weights, host_copies = self.offloaded, None
        if self.keep_weights:
            try:
                if self.keep_weights != "host":
                    try:
                        weights.materialize()
                        return
                    except torch.OutOfMemoryError:
                        # Note [weights back on the host]: the whole model does not fit the device next to what
                        # the program holds there; the device copies made so far go, and the weights come
                        # back in host memory instead, one group at a time through the device
                        weights.release_all()
                        log.warning("offload: the model's weights do not fit the device; they go back into "
                                    "the model in host memory (model.to(device) moves them)")
                host_copies = weights.copy_to_host()
            except Exception as e:  # a failed engine may not manage; the model is then unusable, say so
                log.warning("offload: could not bring the offloaded weights back into the model (%s); its "
                            "offloaded parameters are now meta tensors", e)
        # (never views of released storage: reading those would read freed memory)
        weights.release_all()
        weights.unguard_parameters()
        for g, group in enumerate(weights.groups):
            for i, slot in enumerate(group.slots):
                data = (host_copies[g][i] if host_copies is not None
                        else torch.empty(slot.shape, dtype=slot.param.dtype, device="meta"))
                torch.utils.swap_tensors(slot.param, nn.Parameter(data, requires_grad=slot.param.requires_grad))

    def release(self) -> None:
        if self.inflight is not None:
            close = getattr(self.inflight, "close", None)
            if close is not None:  # an UpdateQueue left open by an interrupted backward_step: no more updates
                close()
            try:
                self.inflight.wait()  # nothing below may be freed while the step still uses it
            except BaseException:  # already reported to the caller, or about to be dropped with the engine
                pass
            self.inflight = None
        if self.offloaded is not None:
            # No update runs any more; one that was announced (expect_update) but interrupted before it ran
            # never will, and the weights at home are then the last ones written: fetches need not wait.
            self.offloaded.settle_updates()
        try:
            if self.stepper is not None:
                self.stepper.discard_preload()
            if self.scheduler is not None:
                self.scheduler.close()
                self._restore_model()
            if self.grads is not None:
                self.grads.close(self.pool)  # removes the hooks; waits for gradient copies still in flight
            if self.weights is not None:
                self.weights.close()
            if self.store is not None:
                self.store.close()
            if self.grad_swap is not None:
                self.grad_swap.close()
            for buffer in self.grad_hosts:
                self.pool.release(buffer)
            self.grad_hosts.clear()
        finally:
            if self.swap is not None:
                self.swap.close()
            self.pool.close()
