"""UpdateRunner: how an Engine turns accumulated gradients into optimizer updates, and joins them.

It builds each group's update (segments of parameters with their step counts and hyper-parameters, where the
master comes from, what happens to the weights after it), runs them on the stepper: in place (parameters on the
device), on a background thread overlapping the next forward (offloaded parameters, Note [overlapped step],
schedule/update_handoff.py), or during backward (``backward_step``, Note [updates during backward]); it joins
whatever is in flight (``sync``), reads ahead the state of the next step's first group (Note [state
read-ahead]) and marks the training state failed when a step fails part-way.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from typing import Callable

import torch

from offload.engine.training_state import TrainingState
from offload.engine.types import StepInfo
from offload.layout.flat_group import shard_spans
from offload.optim.background_step import BackgroundStep
from offload.optim.group_stepper import GroupUpdate, Segment, StepCounters
from offload.optim.hyper import step_hyper
from offload.optim.state_store import FP32_BYTES, GroupState, StatePlacement
from offload.optim.update_queue import UpdateQueue
from offload.timeline import Timeline


@dataclasses.dataclass
class UpdateTotals:
    """Running totals over completed updates (what ``engine.stats()`` reports of the optimizer)."""

    nvme_bytes_read: int = 0
    nvme_bytes_written: int = 0
    adam_s: float = 0.0
    io_wait_s: float = 0.0
    steps_during_backward: int = 0  # backward_step calls whose updates overlapped backward

    def add(self, counters: StepCounters) -> None:
        self.nvme_bytes_read += counters.nvme_bytes_read
        self.nvme_bytes_written += counters.nvme_bytes_written
        self.adam_s += counters.adam_s
        self.io_wait_s += counters.io_wait_s


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


class UpdateRunner:
    def __init__(self, state: TrainingState, timeline: Timeline, max_grad_norm: float | None,
                 skip_nonfinite: bool) -> None:
        self.state = state
        self.parts = state.parts
        self.timeline = timeline
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.fp16 = state.config.torch_dtype == torch.float16
        self.totals = UpdateTotals()
        self.arrival_order: list[int] = []  # groups in the order the last backward_step submitted them
        # the param groups' hyper-parameters as the step being built uses them: read (and checked) once when
        # step() or backward_step() is called, so the values in force at that call are the step's, also for
        # updates that run later, overlapping the next forward (Note [overlapped step])
        self.hyper: list[dict] = []

    # ---- the optimizer step --------------------------------------------------------------------------------

    def step(self) -> StepInfo:
        """engine.step(): see its docstring."""
        state, grads = self.state, self.parts.grads
        self.sync(keep_read_ahead=True)
        self.hyper = step_hyper(state.param_groups)  # (raises before anything changes)
        start = time.perf_counter()
        grads.finish()
        if not grads.any_received():
            raise RuntimeError("engine.step(): no parameter received a gradient since the last step; "
                               "call engine.backward(loss) first")
        scale = state.scaler.scale
        norm = grads.global_norm() / scale  # exact: the scale is a power of two (or 1)
        grad_norm = float(norm)
        overflow = not math.isfinite(grad_norm)
        skip = overflow and (self.fp16 or self.skip_nonfinite)
        counters = StepCounters()
        overlapped = False
        if not skip:
            clip = 1.0
            if self.max_grad_norm is not None and math.isfinite(grad_norm):
                # torch.nn.utils.clip_grad_norm_, in fp32 as it does: max_norm / (norm + 1e-6), clamped at 1
                clip = float(torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))
            overlapped = self.parts.offloaded is not None
            counters = self._update_all(clip / scale, overlapped)
        if self.fp16:
            state.scaler.update(overflow)
        label = f"step {state.step}" + (" (skipped)" if skip else " (launched)" if overlapped else "")
        return self._finish(start, label, grad_norm, skip, counters, overlapped)

    def _update_all(self, grad_scale: float, overlapped: bool) -> StepCounters:
        """Every group that received a gradient: launched in the background (offloaded), or run now."""
        updates = [self._update_of(g) for g in self._update_order()]
        try:
            self._count_step()
            if overlapped:
                # e.g. after a forward that raised: every group must be home, but those kept for the next
                # forward, whose update refreshes them (Note [kept through the update])
                self.parts.offloaded.release_all(keep_kept=True)
                return self._launch(updates, grad_scale)
        except KeyboardInterrupt:  # step counts and launched updates may disagree now
            self.state.failed = "a step was interrupted part-way (KeyboardInterrupt)"
            raise
        resident = self.parts.resident
        resident.begin_step()
        counters = self._run_updates(updates, grad_scale)
        self.totals.add(counters)
        resident.finish_step()
        self._gather_device_weights(updates)
        return counters

    def _finish(self, start: float, label: str, grad_norm: float, skipped: bool, counters: StepCounters,
                overlapped: bool) -> StepInfo:
        """The step's record; the gradient accumulators start a new accumulation."""
        grads = self.parts.grads
        grad_bytes, grads.bytes_to_host = grads.bytes_to_host, 0
        grads.reset()
        self.timeline.add("step", label, start, time.perf_counter())
        return StepInfo(step=self.state.step, grad_norm=grad_norm, skipped=skipped,
                        loss_scale=self.state.scaler.scale, time_s=time.perf_counter() - start,
                        adam_s=counters.adam_s, io_wait_s=counters.io_wait_s,
                        nvme_bytes_read=counters.nvme_bytes_read, nvme_bytes_written=counters.nvme_bytes_written,
                        grad_bytes_to_host=grad_bytes, groups_on_nvme=counters.groups_on_nvme,
                        overlapped=overlapped)

    def drop_gradients(self) -> None:
        """engine.zero_grad(): the gradients accumulated since the last step are forgotten (the next backward's
        overwrite the accumulators). Right after a step there are none (it started a new accumulation), and an
        update still overlapping the next forward is not waited for; once a backward ran, it has joined it."""
        if self.parts.grads.any_received():
            self.parts.grads.finish()
            self.parts.grads.reset()

    # ---- updates during backward (Note [updates during backward], above) -------------------------------------

    def can_update_during_backward(self) -> bool:
        """Whether no group's update depends on the others' gradients (nor on an overflow check)."""
        return (self.max_grad_norm is None and not self.fp16 and not self.skip_nonfinite
                and self.parts.grad_swap is None)

    def backward_step(self, backward: Callable[[], None]) -> StepInfo:
        """Runs ``backward`` (the engine's backward of the loss) with each group's update submitted as soon as
        its gradients are complete; returns the step's record. Requires ``can_update_during_backward``."""
        self.sync(keep_read_ahead=True)
        self.hyper = step_hyper(self.state.param_groups)  # (the values in force now; raises before the backward)
        start = time.perf_counter()
        offloaded = self.parts.offloaded
        expect_next = self._expected_next()
        queue = UpdateQueue(lambda update, copies: self._run_updates([update], 1.0, keep_order=True, ready=copies,
                                                                     read_ahead=expect_next),
                            on_start=lambda: self._preload(expect_next([])),
                            at_exit=self._read_ahead_for_next_step)
        self.parts.inflight = queue  # whatever interrupts from here on, close() closes and joins it
        submitted = self._backward_with_updates(backward, queue)
        self.arrival_order = list(submitted)  # the order the next backward_step's read-ahead expects
        queue.close()
        grad_norm = float(self.parts.grads.global_norm())
        self._count_step()
        self.totals.steps_during_backward += 1
        if offloaded is not None:  # joined by the next sync, like an overlapped step
            counters = self._planned_counters(list(submitted.values()))
        else:
            counters = queue.wait()
            self.parts.inflight = None
            self.totals.add(counters)
            self.parts.resident.finish_step()
            self._gather_device_weights(list(submitted.values()))
        return self._finish(start, f"step {self.state.step} (during backward)", grad_norm, False, counters,
                            offloaded is not None)

    def _backward_with_updates(self, backward: Callable[[], None], queue: UpdateQueue) -> dict[int, GroupUpdate]:
        """Runs ``backward`` with GradientStream.on_group_ready submitting each complete group's update to
        ``queue``, then the groups left incomplete; returns the updates submitted, by group, in order."""
        grads, offloaded = self.parts.grads, self.parts.offloaded
        submitted: dict[int, GroupUpdate] = {}

        def ready(g: int, copies: list[torch.cuda.Event]) -> None:
            if not any(grads.received[g]):
                return
            update = self._update_of(g)
            if offloaded is not None:
                offloaded.expect_update([g], drain=False)
                self._mark_updated_when_home(update)
            queue.submit(update, copies)
            submitted[g] = update  # (after: a group that never reached the queue was not updated)

        if offloaded is None:
            self.parts.resident.begin_step()
        grads.count_arrivals()
        grads.on_group_ready = ready
        if offloaded is not None:  # each group's update follows its backward: it may take the weights
            offloaded.lend_to_updates(True)  # (Note [lent to the update])
        try:
            backward()
            grads.finish()
            for g in range(len(self.state.groups)):  # groups with a parameter that got no gradient
                if g not in submitted and any(grads.received[g]):
                    ready(g, [])
        except BaseException:
            queue.close()
            try:
                queue.wait()
            except BaseException:
                pass  # the backward's error is the one to report
            if submitted:
                self.fail("backward_step failed after updating some groups")
            elif offloaded is not None:  # no update was handed over: nothing will mark a group updated
                offloaded.settle_updates()
            raise
        finally:
            grads.on_group_ready = None
            if offloaded is not None:
                offloaded.lend_to_updates(False)
        return submitted

    # ---- running and joining updates -------------------------------------------------------------------------

    def sync(self, keep_read_ahead: bool = False) -> None:
        """Waits for an overlapped step; its failure becomes this call's (and marks the engine failed). Unless
        ``keep_read_ahead`` (training calls), also waits for and drops state reads begun for the next
        backward_step (Note [state read-ahead]): what follows may use the staging slots itself."""
        inflight = self.parts.inflight
        if inflight is not None:
            try:
                counters = inflight.wait()
            except BaseException:
                if inflight.done():  # the step itself failed, and is over
                    self.parts.inflight = None
                raise  # (interrupted while waiting: the step still runs, and close() joins it)
            self.parts.inflight = None
            self.totals.add(counters)
            if self.parts.offloaded is not None:
                self.parts.offloaded.release_returned()  # lent groups nobody uses go home now (Note [lent to the update])
        if not keep_read_ahead:
            self.parts.stepper.discard_preload()

    def fail(self, reason: str) -> None:
        self.state.fail(reason)

    def _run_updates(self, updates: list[GroupUpdate], grad_scale: float, keep_order: bool = False,
                     ready: list[torch.cuda.Event] = (), read_ahead=None) -> StepCounters:
        """Runs ``updates`` (after the CUDA ``ready`` events: their gradient copies); ``read_ahead`` as
        GroupStepper.run's."""
        try:
            for event in ready:
                event.synchronize()
            return self.parts.stepper.run(updates, grad_scale, keep_order=keep_order, read_ahead=read_ahead)
        except BaseException as e:
            # Groups before the failure are updated, the rest are not, and a failed write may have left a
            # group's swap file half old, half new: no later step can be exact, so none is allowed.
            self.fail(f"a step failed part-way ({type(e).__name__}: {e})")
            raise

    def _launch(self, updates: list[GroupUpdate], grad_scale: float) -> StepCounters:
        """Starts the overlapped step; returns what is known now (bytes to move, groups on NVMe)."""
        for update in updates:
            self._mark_updated_when_home(update)
        work = partial(self._run_updates, updates, grad_scale, keep_order=True)  # the next forward's order
        step = BackgroundStep(work)
        # Recorded before it starts: whatever interrupts from here on, close() joins this step (and then lets
        # fetches stop waiting for updates that will never come, EngineParts.release).
        self.parts.inflight = step
        self.parts.offloaded.expect_update([u.state.group.index for u in updates])
        step.start()
        return self._planned_counters(updates)

    def _mark_updated_when_home(self, update: GroupUpdate) -> None:
        """Lets fetches of the group go on once its new weights are home: when its Adam pass ends (the kernel
        wrote them, or their write-back is issued and each fetch waits for it), or, for weights read from the
        state file, once the state writes are complete (Note [weights in the state file])."""
        g, weights = update.state.group.index, self.parts.offloaded
        if weights.home_is_state_file(g):
            update.written = partial(weights.mark_updated, g)
        else:
            update.done = partial(weights.mark_updated, g)

    def _gather_device_weights(self, updates: list[GroupUpdate]) -> None:
        """Several ranks, parameters on the device: every rank's updated shard into every rank's weights (the
        same groups on every rank: the gradients were reduced over all of them). Collective."""
        if self.state.ranks.many:
            self.parts.resident.gather(sorted(u.state.group.index for u in updates))

    @staticmethod
    def _planned_counters(updates: list[GroupUpdate]) -> StepCounters:
        """The NVMe traffic ``updates`` will cause (known before they run): state in and out, gradients in."""
        nvme = [u for u in updates if u.state.placement is StatePlacement.NVME]
        written = sum(u.state.nbytes for u in nvme)
        read = written + sum(u.state.group.shard_numel * FP32_BYTES for u in nvme if u.grad_nvme is not None) \
            - sum(u.state.group.shard_numel * FP32_BYTES for u in nvme if u.master is not None)
        return StepCounters(nvme_bytes_read=read, nvme_bytes_written=written, groups_on_nvme=len(nvme))

    # ---- state read-ahead (Note [state read-ahead], group_stepper.py) ---------------------------------------

    def _expected_next(self) -> Callable[[list[GroupUpdate]], GroupState | None]:
        """Called with the updates just done, returns the state of the group expected next, in the order the
        last backward_step's groups came in (a group that comes out of order is simply read when it comes)."""
        order, done, states = list(self.arrival_order), set(), self.parts.store.states

        def expect_next(updates: list[GroupUpdate]) -> GroupState | None:
            done.update(u.state.group.index for u in updates)
            upcoming = next((g for g in order if g not in done), None)
            return None if upcoming is None else states[upcoming]
        return expect_next

    def _preload(self, state: GroupState | None) -> None:
        if state is not None:
            self.parts.stepper.preload(state)

    def _read_ahead_for_next_step(self) -> None:
        """When a backward_step's updates are all done: start reading the state of the group the next
        backward_step updates first (the head, usually), so that it comes in during the next forward. Anything
        but training drops it first (``sync``)."""
        stepper = self.parts.stepper
        stepper.discard_preload()
        if self.state.failed is None and self.arrival_order:
            try:
                stepper.preload(self.parts.store.states[self.arrival_order[0]])
            except Exception:  # only a read-ahead: the next step reads the state itself (and reports a failure)
                stepper.discard_preload()

    # ---- what each group's update is -------------------------------------------------------------------------

    def _count_step(self) -> None:
        """One more optimizer step, and one more for each parameter that received a gradient."""
        state, received = self.state, self.parts.grads.received
        for g, group in enumerate(state.groups):
            for i in range(len(group.slots)):
                state.param_steps[g][i] += received[g][i]
        state.step += 1

    def _update_order(self) -> list[int]:
        """Groups in the order the next forward uses them (traced), then any it did not use."""
        scheduler = self.parts.scheduler
        order = scheduler.forward_order() if scheduler is not None else []
        traced = set(order)
        return order + [g for g in range(len(self.state.groups)) if g not in traced]

    def _update_of(self, g: int) -> GroupUpdate:
        group, parts = self.state.groups[g], self.parts
        segments = self._segments(g)
        state = parts.store.states[g]
        grad_nvme = parts.grad_swap.files[g] if parts.grad_swap is not None else None
        # (before after_update: a lent group's update runs on its device buffer, Note [lent to the update])
        master = parts.weights.lend_master(g) if state.placement is StatePlacement.NVME else None
        return GroupUpdate(state=state, grad_host=parts.grads.grad_hosts[g], grad_nvme=grad_nvme, segments=segments,
                           master=master, lowp_out=partial(parts.weights.kernel_output, g),
                           after_update=parts.weights.after_update(g, state.placement is StatePlacement.NVME,
                                                                   [(s.start, s.end) for s in segments]))

    def _segments(self, g: int) -> list[Segment]:
        """Runs of group g's parameters that received a gradient and share a step count and hyper-parameters:
        one kernel call each. With several ranks, this rank's part of each (Note [rank shards])."""
        group, received = self.state.groups[g], self.parts.grads.received[g]
        segments: list[Segment] = []
        for i, slot in enumerate(group.slots):
            if not received[i]:
                continue
            step = self.state.param_steps[g][i] + 1
            hyper = self.hyper[slot.hyper_index]
            last = segments[-1] if segments else None
            contiguous = last is not None and received[i - 1] and group.slots[i - 1].hyper_index == slot.hyper_index
            if contiguous and last.step == step:
                segments[-1] = Segment(last.start, slot.end, step, last.lr, last.beta1, last.beta2, last.eps,
                                       last.weight_decay)
            else:
                segments.append(Segment(slot.offset, slot.end, step, hyper["lr"], hyper["betas"][0],
                                        hyper["betas"][1], hyper["eps"], hyper["weight_decay"]))
        if group.sharded:
            segments = [dataclasses.replace(seg, start=a, end=b)
                        for seg in segments for a, b in shard_spans(group, [(seg.start, seg.end)])]
        return segments
