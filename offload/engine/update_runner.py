"""UpdateRunner: how an Engine builds, runs and joins its optimizer updates.

Part of :class:`offload.Engine` (a base class): the per-group update (segments of parameters with their step counts
and hyper-parameters, where the master comes from, what happens to the weights after it), running a list of them on
the stepper, the overlapped step on a background thread (Note [overlapped step], schedule/update_handoff.py), the
state read-ahead of ``backward_step`` (Note [state read-ahead]), joining whatever is in flight (``_sync``) and the
engine's failure state when a step fails part-way.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import torch

from offload.layout.flat_group import shard_spans
from offload.optim.background_step import BackgroundStep
from offload.optim.group_stepper import GroupUpdate, Segment, StepCounters
from offload.optim.state_store import FP32_BYTES, GroupState, StatePlacement
from offload.schedule.offloaded_params import OffloadedParams


class UpdateRunner:
    """The optimizer-update half of :class:`offload.Engine` (its ``__init__`` sets what these methods read)."""

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
