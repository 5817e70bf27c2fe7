"""EngineResources: everything an engine allocates, released in one place."""

from __future__ import annotations

import logging

import torch
from torch import nn

from offload.engine.device_weights import DeviceWeights
from offload.engine.grad_stream import GradientStream
from offload.engine.grad_swap import GradSwap
from offload.optim.background_step import BackgroundStep
from offload.optim.state_store import OptimizerStateStore
from offload.schedule.fetch_scheduler import FetchScheduler
from offload.schedule.offloaded_params import OffloadedParams
from offload.storage.host_pool import HostBuffer, HostPool
from offload.storage.swap_store import SwapStore

log = logging.getLogger("offload")


class EngineResources:
    """Everything an engine allocates, released in one place: by close(), by a failed construction, or when
    an engine that was never closed is collected. Holds no reference to the engine itself."""

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self.swap: SwapStore | None = None
        self.grad_hosts: list[HostBuffer] = []
        self.grads: GradientStream | None = None
        self.weights: DeviceWeights | OffloadedParams | None = None
        self.scheduler: FetchScheduler | None = None
        self.store: OptimizerStateStore | None = None
        self.inflight: BackgroundStep | None = None  # an overlapped optimizer step still running
        self.stepper = None  # GroupStepper: its state reads begun for the next step end before staging is freed
        self.grad_swap: GradSwap | None = None
        # close(): offloaded weights go back into the model: True (on the device, else in host memory if the
        # device is full), "host" (in host memory), False (the parameters become meta tensors)
        self.keep_weights: bool | str = True

    def _restore_model(self) -> None:
        """Offloaded parameters get their weights back in real storage: the model works without the engine.
        Unless ``keep_weights`` is False: they then become meta tensors (shapes only, no memory)."""
        host_copies = None
        if self.keep_weights:
            try:
                if self.keep_weights != "host":
                    try:
                        self.weights.materialize()
                        return
                    except torch.OutOfMemoryError:
                        # Note [weights back on the host]: the whole model does not fit the device next to what
                        # the program holds there; the device copies made so far go, and the weights come
                        # back in host memory instead, one group at a time through the device
                        self.weights.release_all()
                        log.warning("offload: the model's weights do not fit the device; they go back into "
                                    "the model in host memory (model.to(device) moves them)")
                host_copies = self.weights.copy_to_host()
            except Exception as e:  # a failed engine may not manage; the model is then unusable, say so
                log.warning("offload: could not bring the offloaded weights back into the model (%s); its "
                            "offloaded parameters are now meta tensors", e)
        # (never views of released storage: reading those would read freed memory)
        self.weights.release_all()
        self.weights.unguard_parameters()
        for g, group in enumerate(self.weights.groups):
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
        if isinstance(self.weights, OffloadedParams):
            # No update runs any more; one that was announced (expect_update) but interrupted before it ran
            # never will, and the weights at home are then the last ones written: fetches need not wait.
            self.weights.settle_updates()
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
