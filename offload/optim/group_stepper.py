"""GroupStepper: one Adam step over every group, with NVMe-resident state pipelined through staging slots."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from offload import _C
from offload.optim.state_store import (ALL_PARTS, FP32_BYTES, MOMENTS, STATE_PARTS, GroupState, OptimizerStateStore,
                                       StatePlacement, chunks, split_state)
from offload.storage.io_engine import IoHandle
from offload.storage.swap_store import SwapFile
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
    """What to do for one group, in the coordinates of this rank's shard of it (the whole group with one rank;
    Note [rank shards]). ``lowp_out()``, called right before the group's Adam pass, returns the flat
    bf16/fp16 tensor (the shard's length) that receives the updated weights from the kernel itself, or None;
    ``after_update(master, start, last)`` runs for each chunk of the group (elements [start, start +
    len(master)); ``last`` for the final one) once its new fp32 master weights are final and before their
    staging slot is reused (for copies the kernel cannot write)."""

    state: GroupState
    grad_host: torch.Tensor | None  # fp32 flat accumulator in host memory, or None: read from grad_nvme
    segments: list[Segment]
    lowp_out: Callable[[], torch.Tensor | None] | None = None
    after_update: Callable[[torch.Tensor, int, bool], None] | None = None
    done: Callable[[], None] | None = None  # called once the group's update (and after_update) is complete
    grad_nvme: SwapFile | None = None       # the group's gradients on NVMe (its state is on NVMe too)
    # Called once the group's new state is in its home: right after ``done`` for a group in RAM, once the
    # writes of all its chunks are complete for a group on NVMe (later than ``done``, which comes when the last
    # chunk's Adam pass ends). What reads the state file itself (weights fetched from the master) waits for it,
    # and so does whoever frees ``master``.
    written: Callable[[], None] | None = None
    # The group's fp32 master weights already in memory (this rank's shard, page-aligned), bit-equal to the
    # master part of its state file, for a group on NVMe: Note [master in memory]. None: read with the moments.
    master: torch.Tensor | None = None


@dataclass
class StepCounters:
    adam_s: float = 0.0
    io_wait_s: float = 0.0
    nvme_bytes_read: int = 0
    nvme_bytes_written: int = 0
    groups_on_nvme: int = 0


@dataclass
class _Run:
    """One ``GroupStepper.run``'s bookkeeping. Chunks are (update, start, end): elements [start, end) of the
    update's group (a host group is one chunk); the run's k-th NVMe chunk goes through staging slot
    ``_slot_index(k)`` (Note [state pipeline])."""

    order: list[GroupUpdate]                      # the groups in update order
    work: list[tuple[GroupUpdate, int, int]]      # every chunk, in update order
    nvme: list[tuple[GroupUpdate, int, int]]      # the NVMe chunks of ``work``, in order
    counters: StepCounters
    reads: dict[int, list[IoHandle]]              # NVMe chunk -> its reads in flight
    writes: dict[int, list[IoHandle]]             # NVMe chunk -> its writes in flight (not all waited for)
    # NVMe chunks of each group (by id) whose writes are not complete yet; 0 calls the group's ``written``.
    unwritten: dict[int, int]
    ahead: int                                    # reads in flight (S - 1 of Note [state pipeline], at least 1)


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
        # The slot that the next run's first NVMe chunk goes to: the rotation goes on from run to run, so that a
        # run's first chunks do not land in the slots whose writes the run before may still be finishing.
        self._base = 0
        # Note [state read-ahead]: ``preload(state)`` issues the reads of that group's first chunks into the
        # slots the next run will use first (chunk k in slot base + k), so that they proceed while its
        # gradients are still being computed. A run given ``read_ahead`` does so itself for the group expected
        # next as soon as its last Adam pass is done, into the slots its own writes in flight leave free, and
        # only then waits for those writes: the disk reads the next group's state while it writes this one's.
        # The next run takes the reads over if it is that group's; any other run, and ``discard_preload``,
        # waits for them first, since they fill slots that run is about to reuse.
        # (state, {chunk: handles}, whether the reads include the master).
        self._preloaded: tuple[GroupState, dict[int, list[IoHandle]], bool] | None = None
        # Note [master in memory]: an fp32 group whose weights are the master part of its state file was
        # just read from there for backward, and the weights are still in memory when its update runs (the
        # caller lends them: ``GroupUpdate.master``). The update then reads only the moments, runs Adam on
        # the weights in place and writes the master from them: one part in three less to read. Whoever lends
        # the memory keeps it until the group's ``written``. ``master_in_memory(state)`` says whether that is
        # expected for a group, so that a read-ahead leaves its master out; a run whose update then comes
        # without it reads the master itself.
        self.master_in_memory: Callable[[GroupState], bool] = lambda state: False

    def run(self, updates: list[GroupUpdate], grad_scale: float, keep_order: bool = False,
            read_ahead: Callable[[list[GroupUpdate]], GroupState | None] | None = None) -> StepCounters:
        """Updates every group; returns once all state is written back. ``grad_scale`` multiplies every gradient
        (loss-scale unscaling and the clipping factor folded into one factor). ``keep_order`` updates the groups
        in the given order (an overlapped step: the next forward's); otherwise host groups are spread between
        NVMe groups, so that the CPU works while the disk does. ``read_ahead(updates)``, called once the last
        Adam pass is done, names the group whose update comes next (or None): see Note [state read-ahead]."""
        # Note [state pipeline]: NVMe groups are cut into chunks (CHUNK_ELEMENTS), and the chunks rotate
        # through the S staging slots (STAGING_SLOTS; fewer when there are fewer chunks, which then never
        # wrap). The read of the k-th NVMe chunk goes into slot (base + k) % S. S-1 reads are issued up front;
        # after chunk k's Adam pass its write is issued, and the read of chunk k+S-1 may then reuse its slot
        # once the write of chunk k-1, issued one Adam pass earlier, is complete. So while the CPU
        # updates chunk k, the disk reads chunks k+1..k+S-2 and writes chunk k-1: enough bytes in flight to
        # keep the disk busy with chunks much smaller than a group. Waits are on the handles, so a slot is
        # never overwritten while a transfer still uses it.
        run = self._plan(updates, keep_order)
        try:
            self._issue_first_reads(run)
            self._update_all(run, grad_scale)
        except BaseException:
            # No transfer may outlive the step that owns its staging slot (or reads a lent master, which its
            # owner frees once the step has failed), whether the step failed issuing its first reads (those
            # before, and the preloaded ones the run took over, are in flight) or later; the first error is the
            # one to report.
            self._wait_quietly(list(run.reads.values()) + list(run.writes.values()))
            raise
        busy = {self._slot_index(j) for j in run.writes}
        self._base = self._slot_index(len(run.nvme))
        if read_ahead is not None:
            self._read_ahead(read_ahead, run.order, busy)
        self._finish_writes(run)
        return run.counters

    def _plan(self, updates: list[GroupUpdate], keep_order: bool) -> _Run:
        """The run's chunks in update order, with the preloaded reads it can take over (plus the reads of the
        masters a preload left out and the updates do not lend); any other preload is waited for here (Note
        [state read-ahead])."""
        counters = StepCounters()
        order = list(updates) if keep_order else _interleave(updates)
        counters.groups_on_nvme = sum(u.state.placement is StatePlacement.NVME for u in order)
        work = [(u, start, end) for u in order for start, end in
                (chunks(u.state.group.shard_numel, self.store.chunk_elements)
                 if u.state.placement is StatePlacement.NVME else [(0, u.state.group.shard_numel)])]
        nvme = [item for item in work if item[0].state.placement is StatePlacement.NVME]
        reads = self._take_preload(nvme, counters)
        unwritten = {id(u): sum(1 for v, _, _ in nvme if v is u) for u in order}
        return _Run(order, work, nvme, counters, reads, {}, unwritten, ahead=max(1, len(self.store.staging) - 1))

    def _issue_first_reads(self, run: _Run) -> None:
        """Issues the reads of the first ``run.ahead`` NVMe chunks that a preload has not issued already."""
        for k in range(min(run.ahead, len(run.nvme))):
            if k not in run.reads:
                run.reads[k] = self._transfer("read", run.nvme[k], k, run.counters)

    def _update_all(self, run: _Run, grad_scale: float) -> None:
        """Adam over every chunk of the run in order: a host group in place in its state, an NVMe chunk in its
        staging slot through the pipeline (Note [state pipeline]). Returns with the last chunks' writes still
        in flight (in ``run.writes``); on an error, transfers may still be in flight in ``run.reads`` and
        ``run.writes``."""
        k = 0  # the next NVMe chunk
        lowp_out = None
        for item in run.work:
            update, start, end = item
            if start == 0:  # a group's first chunk: where its new low-precision weights go
                lowp_out = update.lowp_out() if update.lowp_out is not None else None
            if update.state.placement is StatePlacement.HOST:
                master, m, v = split_state(update.state.state_host.view(torch.float32),
                                           update.state.group.shard_numel)
                self._adam(update, start, end, (master, m, v), lowp_out, grad_scale, run.counters)
                continue
            self._update_nvme_chunk(run, k, item, lowp_out, grad_scale)
            k += 1

    def _update_nvme_chunk(self, run: _Run, k: int, item: tuple[GroupUpdate, int, int],
                           lowp_out: torch.Tensor | None, grad_scale: float) -> None:
        """The run's k-th NVMe chunk (``item``): waits for its reads, runs Adam on it in its staging slot and
        issues its write; then, if a chunk is left to read, waits for the write of chunk k-1 and issues the read
        of chunk k+ahead into the slot that write frees (Note [state pipeline])."""
        update, start, end = item
        self._wait_all(run.reads.pop(k), run.counters)
        staging = self._slot(k)[:self.store.parts * (end - start)]
        parts = split_state(staging, end - start)
        if update.master is not None:
            parts = (update.master[start:end],) + parts[1:]
        grad = staging[STATE_PARTS * (end - start):] if update.grad_nvme is not None else None
        self._adam(update, start, end, parts, lowp_out, grad_scale, run.counters, grad)
        run.writes[k] = self._transfer("write", item, k, run.counters)
        if k + run.ahead < len(run.nvme):
            if k - 1 in run.writes:
                self._wait_writes(run, k - 1)
            run.reads[k + run.ahead] = self._transfer("read", run.nvme[k + run.ahead], k + run.ahead, run.counters)

    def _wait_writes(self, run: _Run, j: int) -> None:
        """Waits for the writes of the run's j-th NVMe chunk; calls its group's ``written`` once the writes of
        all the group's chunks are complete."""
        handles = run.writes[j]
        while handles:  # (each handle leaves the list only once waited for: see the failure paths in run)
            self._wait(handles[0], run.counters)
            handles.pop(0)
        del run.writes[j]
        update = run.nvme[j][0]
        run.unwritten[id(update)] -= 1
        if run.unwritten[id(update)] == 0 and update.written is not None:
            update.written()

    def _read_ahead(self, read_ahead: Callable[[list[GroupUpdate]], GroupState | None], order: list[GroupUpdate],
                    busy: set[int]) -> None:
        """Preloads the group ``read_ahead(order)`` names, outside the slots in ``busy`` (Note [state
        read-ahead]). Never raises an Exception: a failed read-ahead is discarded."""
        try:
            expected = read_ahead(order)
            if expected is not None:
                self.preload(expected, busy)
        except Exception:  # only a read-ahead: the writes still in flight must still be waited for, and the next
            self.discard_preload()  # run reads what it needs itself

    def _finish_writes(self, run: _Run) -> None:
        """Waits for the writes still in flight, in chunk order (calling each group's ``written``); after a
        failure, for the rest of them too before raising."""
        try:
            for j in sorted(run.writes):
                self._wait_writes(run, j)
        except BaseException:
            self._wait_quietly(list(run.writes.values()))  # the later chunks' writes, and the rest of the failed one's
            raise

    def _wait_quietly(self, handle_lists: list[list[IoHandle]]) -> None:
        """Waits for every transfer in ``handle_lists`` after a failure, ignoring their own outcomes (the one
        that failed, already consumed by its wait, is refused again as unknown)."""
        for handles in handle_lists:
            for handle in handles:
                try:
                    self.store.swap.wait(handle)
                except (OSError, ValueError):
                    pass

    def preload(self, state: GroupState, busy: set[int] = frozenset()) -> None:
        """Starts reading the first chunks of ``state``'s group (on NVMe, its gradients in RAM), whose update is
        expected next (Note [state read-ahead]), into the next run's first slots up to the first one in
        ``busy`` (slots whose transfers are still in flight). On the thread that runs the updates."""
        if self._preloaded is not None and self._preloaded[0] is state:
            return
        self.discard_preload()
        if state.placement is not StatePlacement.NVME or self.store.parts != STATE_PARTS:
            return  # (gradients on NVMe are read with the state, and they are not complete yet)
        item = GroupUpdate(state=state, grad_host=None, segments=[])
        with_master = not self.master_in_memory(state)
        pieces = chunks(state.group.shard_numel, self.store.chunk_elements)
        ahead = max(1, len(self.store.staging) - 1)
        handles: dict[int, list[IoHandle]] = {}
        # recorded as they are issued: a failure part-way leaves no stray read
        self._preloaded = (state, handles, with_master)
        for k, (start, end) in enumerate(pieces[:ahead]):
            if self._slot_index(k) in busy:
                break
            handles[k] = self._transfer("read", (item, start, end), k, StepCounters(),
                                        parts=ALL_PARTS if with_master else MOMENTS)

    def discard_preload(self) -> None:
        """Waits for the reads of a preload nobody took (their slots are free again afterwards)."""
        preloaded, self._preloaded = self._preloaded, None
        if preloaded is None:
            return
        for handles in preloaded[1].values():
            for handle in handles:
                self._issued.pop(handle.id, None)
                try:
                    self.store.swap.wait(handle)
                except OSError:
                    pass  # nobody reads what it brought; the group's next run reads it again and reports

    def _take_preload(self, nvme: list[tuple[GroupUpdate, int, int]],
                      counters: StepCounters) -> dict[int, list[IoHandle]]:
        """The preloaded reads, if they are those of this run's first chunks (then counted in ``counters``)."""
        preloaded = self._preloaded
        if preloaded is None:
            return {}
        state, handles, with_master = preloaded
        pieces = chunks(state.group.shard_numel, self.store.chunk_elements)
        if nvme and nvme[0][0].state is state and nvme[0][0].grad_nvme is None and \
                all(k < len(nvme) and nvme[k][0].state is state and nvme[k][1:] == pieces[k] for k in handles):
            self._preloaded = None
            counters.nvme_bytes_read += sum(h.nbytes for hs in handles.values() for h in hs)
            if not with_master and nvme[0][0].master is None:  # expected in memory, but it is not: read it
                for k in handles:
                    handles[k] = handles[k] + self._transfer("read", nvme[k], k, counters, parts=(0,))
            return dict(handles)
        self.discard_preload()
        return {}

    def _slot_index(self, k: int) -> int:
        """The staging slot of the run's k-th NVMe chunk."""
        return (self._base + k) % len(self.store.staging) if self.store.staging else 0

    def _slot(self, k: int) -> torch.Tensor:
        return self.store.staging[self._slot_index(k)].view(torch.float32)

    def _adam(self, update: GroupUpdate, start: int, end: int, state: tuple[torch.Tensor, ...],
              lowp_out: torch.Tensor | None, grad_scale: float, counters: StepCounters,
              grad_chunk: torch.Tensor | None = None) -> None:
        """Adam over elements [start, end) of a group; ``state`` holds (master, m, v) of exactly those elements,
        ``grad_chunk`` their gradients when they came from NVMe (else they are in ``update.grad_host``);
        ``lowp_out`` is the group's whole kernel output (or None)."""
        master, exp_avg, exp_avg_sq = state
        began = time.perf_counter()
        for seg in update.segments:
            a, b = max(seg.start, start), min(seg.end, end)
            if a >= b:
                continue
            local = slice(a - start, b - start)
            lowp = lowp_out[a:b] if lowp_out is not None else None
            grad = grad_chunk[local] if grad_chunk is not None else update.grad_host[a:b]
            _C.adam_step(master[local], grad, exp_avg[local], exp_avg_sq[local], lowp,
                         step=seg.step, lr=seg.lr, beta1=seg.beta1, beta2=seg.beta2, eps=seg.eps,
                         weight_decay=seg.weight_decay, adamw=True, bias_correction=True, grad_scale=grad_scale)
        counters.adam_s += time.perf_counter() - began
        self.timeline.add("adam", update.state.group.name or "<root>", began, time.perf_counter())
        last = end == update.state.group.shard_numel
        if update.after_update is not None:
            update.after_update(master[:end - start], start, last)
        if last and update.done is not None:
            update.done()
        if last and update.written is not None and update.state.placement is StatePlacement.HOST:
            update.written()

    def _transfer(self, op: str, item: tuple[GroupUpdate, int, int], k: int, counters: StepCounters,
                  parts: tuple[int, ...] | None = None) -> list[IoHandle]:
        """Issues the transfers of chunk ``item`` through slot k: a read of ``parts`` (None: those the update
        needs, the moments only when its master is in memory; its gradients too unless ``parts`` is given), or
        the write of all three."""
        update, start, end = item
        state = update.state
        staging = self._slot(k)[:self.store.parts * (end - start)]
        master = update.master[start:end] if update.master is not None else None
        if parts is None:
            parts, grad_nvme = (MOMENTS if master is not None else ALL_PARTS), update.grad_nvme
        else:
            grad_nvme = None
        handles = self.store.transfer(op, state, start, end, staging, grad_nvme, master=master, parts=parts)
        nbytes = (len(handles)) * (end - start) * FP32_BYTES
        if op == "read":
            counters.nvme_bytes_read += nbytes
        else:
            counters.nvme_bytes_written += nbytes
        track = "nvme read" if op == "read" else "nvme write"
        now = time.perf_counter()
        for handle in handles:
            self._issued[handle.id] = (track, f"state {state.group.name or '<root>'}", now)
        return handles

    def _wait_all(self, handles: list[IoHandle], counters: StepCounters) -> None:
        for handle in handles:
            self._wait(handle, counters)

    def _wait(self, handle: IoHandle, counters: StepCounters) -> None:
        start = time.perf_counter()
        self.store.swap.wait(handle)
        end = time.perf_counter()
        counters.io_wait_s += end - start
        track, name, issued = self._issued.pop(handle.id, ("nvme read", "?", start))
        self.timeline.add(track, name, issued, end)
