"""GroupStepper: one Adam step over every group, with NVMe-resident state pipelined through staging slots."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from offload import _C
from offload.optim.state_store import GroupState, OptimizerStateStore, StatePlacement, split_state
from offload.storage.io_engine import IoHandle
from offload.timeline import NO_TIMELINE, Timeline


@dataclass(frozen=True)
class Segment:
    """Elements [start, end) of a group updated with one set of hyper-parameters and one step count."""

    start: int
    end: int
    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


@dataclass
class GroupUpdate:
    """What to do for one group. ``lowp_out()``, called right before the group's Adam pass, returns the flat
    bf16/fp16 tensor (the group's length) that receives the updated weights from the kernel itself, or None;
    ``after_update(master)`` runs once the group's new fp32 master weights are final and before their staging
    slot is reused (for copies the kernel cannot write)."""

    state: GroupState
    grad_host: torch.Tensor
    segments: list[Segment]
    lowp_out: Callable[[], torch.Tensor | None] | None = None
    after_update: Callable[[torch.Tensor], None] | None = None
    done: Callable[[], None] | None = None  # called once the group's update (and after_update) is complete


@dataclass
class StepCounters:
    adam_s: float = 0.0
    io_wait_s: float = 0.0
    nvme_bytes_read: int = 0
    nvme_bytes_written: int = 0
    groups_on_nvme: int = 0


def _interleave(updates: list[GroupUpdate]) -> list[GroupUpdate]:
    """NVMe groups in order with the host groups spread evenly between them, so that the CPU updates host
    groups while the disk moves NVMe groups instead of before or after it."""
    nvme = [u for u in updates if u.state.placement is StatePlacement.NVME]
    host = [u for u in updates if u.state.placement is StatePlacement.HOST]
    if not nvme or not host:
        return nvme or host
    order: list[GroupUpdate] = []
    taken = 0
    for k, update in enumerate(nvme, start=1):
        order.append(update)
        share = (k * len(host)) // len(nvme)
        order.extend(host[taken:share])
        taken = share
    return order


class GroupStepper:
    """Runs the native Adam over each group's segments, from host RAM or through the NVMe pipeline."""

    def __init__(self, store: OptimizerStateStore, timeline: Timeline = NO_TIMELINE) -> None:
        self.store = store
        self.timeline = timeline
        self._issued: dict[int, tuple[str, str, float]] = {}  # handle id -> (track, name, issue time)

    def run(self, updates: list[GroupUpdate], grad_scale: float) -> StepCounters:
        """Updates every group; returns once all state is written back. ``grad_scale`` multiplies every gradient
        (loss-scale unscaling and the clipping factor folded into one factor)."""
        counters = StepCounters()
        # Note [state pipeline]: NVMe groups rotate through STAGING_SLOTS (3) host buffers (fewer when there
        # are fewer NVMe groups, which then never wrap). The read of the k-th NVMe group goes into slot k % 3. Two reads are issued up front; after group k's Adam pass its
        # write is issued, and the read of group k+2 may then reuse slot (k+2) % 3 once the write of group
        # k-1, issued one Adam pass earlier, is complete. So while the CPU updates group k, the disk reads group
        # k+1 and writes group k-1. The wait is on the handle, so a slot is never overwritten while a transfer
        # still uses it.
        order = _interleave(updates)
        nvme = [u for u in order if u.state.placement is StatePlacement.NVME]
        counters.groups_on_nvme = len(nvme)
        reads: dict[int, IoHandle] = {}
        writes: dict[int, IoHandle] = {}
        for k in range(min(2, len(nvme))):
            reads[k] = self._issue_read(nvme[k], k, counters)
        k = 0
        try:
            for update in order:
                if update.state.placement is StatePlacement.HOST:
                    self._adam(update, update.state.state_host.view(torch.float32), grad_scale, counters)
                    continue
                self._wait(reads.pop(k), counters)
                staging = self.store.staging[k % len(self.store.staging)].view(torch.float32)
                self._adam(update, staging, grad_scale, counters)
                writes[k] = self._issue_write(update, staging, counters)
                if k + 2 < len(nvme):
                    if k - 1 in writes:
                        self._wait(writes.pop(k - 1), counters)
                    reads[k + 2] = self._issue_read(nvme[k + 2], k + 2, counters)
                k += 1
        except BaseException:
            # No transfer may outlive the step that owns its staging slot; the first error is the one to report.
            for handle in list(reads.values()) + list(writes.values()):
                try:
                    self.store.swap.wait(handle)
                except OSError:
                    pass
            raise
        for handle in writes.values():
            self._wait(handle, counters)
        return counters

    def _adam(self, update: GroupUpdate, state_flat: torch.Tensor, grad_scale: float,
              counters: StepCounters) -> None:
        numel = update.state.group.numel
        master, exp_avg, exp_avg_sq = split_state(state_flat, numel)
        lowp_out = update.lowp_out() if update.lowp_out is not None else None
        start = time.perf_counter()
        for seg in update.segments:
            span = slice(seg.start, seg.end)
            lowp = lowp_out[span] if lowp_out is not None else None
            _C.adam_step(master[span], update.grad_host[span], exp_avg[span], exp_avg_sq[span], lowp,
                         step=seg.step, lr=seg.lr, beta1=seg.beta1, beta2=seg.beta2, eps=seg.eps,
                         weight_decay=seg.weight_decay, adamw=True, bias_correction=True, grad_scale=grad_scale)
        counters.adam_s += time.perf_counter() - start
        self.timeline.add("adam", update.state.group.name or "<root>", start, time.perf_counter())
        if update.after_update is not None:
            update.after_update(master)
        if update.done is not None:
            update.done()

    def _issue_read(self, update: GroupUpdate, k: int, counters: StepCounters) -> IoHandle:
        state = update.state
        staging = self.store.staging[k % len(self.store.staging)].view(torch.float32)[:3 * state.group.numel]
        counters.nvme_bytes_read += state.nbytes
        handle = self.store.swap.read(state.state_nvme, 0, staging)
        self._issued[handle.id] = ("nvme read", f"state {state.group.name or '<root>'}", time.perf_counter())
        return handle

    def _issue_write(self, update: GroupUpdate, staging: torch.Tensor, counters: StepCounters) -> IoHandle:
        state = update.state
        counters.nvme_bytes_written += state.nbytes
        handle = self.store.swap.write(state.state_nvme, 0, staging[:3 * state.group.numel])
        self._issued[handle.id] = ("nvme write", f"state {state.group.name or '<root>'}", time.perf_counter())
        return handle

    def _wait(self, handle: IoHandle, counters: StepCounters) -> None:
        start = time.perf_counter()
        self.store.swap.wait(handle)
        end = time.perf_counter()
        counters.io_wait_s += end - start
        track, name, issued = self._issued.pop(handle.id, ("nvme read", "?", start))
        self.timeline.add(track, name, issued, end)
