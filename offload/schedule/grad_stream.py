"""GradientStream: moves each gradient off the device as soon as autograd has accumulated it.

A post-accumulate-grad hook on every trainable parameter takes the finished ``param.grad``, adds it into the
group's fp32 host accumulator (``grad_host``, the layout of FlatGroup), records the L2 norm of the accumulated
value, and drops the device gradient. Across micro-batches the accumulator sums in fp32, and the recorded norm
is always that of the sum so far, so after the last ``backward`` the global norm is known without another pass
over the gradients. The norms are computed as ``torch.nn.utils.clip_grad_norm_`` computes them (one
``vector_norm`` per parameter, then the norm of those, in the model's parameter order), so clipping scales the
gradients by the very same fp32 factor (on CUDA the first gradient's norm is reduced on the device, in fp32,
in the GPU's order: the factor agrees to fp32 rounding; see Note [first gradient on CUDA]).

With several ranks the gradients go through a ShardReducer (grad_reduce.py) instead: a group's gradients are
reduce-scattered on the device once all of them have arrived, and the accumulator holds this rank's shard of
the mean over ranks. The norm is then the norm of each group's shard, summed in squares over the ranks.
"""

from __future__ import annotations

import math
from collections import deque
from functools import partial
from typing import Callable, NamedTuple

import torch

from offload import _C
from offload.schedule.grad_reduce import ShardReduced, ShardReducer
from offload.schedule.grad_swap import GradSwap
from offload.ranks import Ranks
from offload.schedule.staging_ring import ByteRing
from offload.layout.flat_group import FlatGroup, Slot
from offload.storage.host_pool import HostBuffer, HostPool
from offload.timeline import NO_TIMELINE, Timeline

STAGING_RING_MIN_BYTES = 64 << 20


def staging_ring_bytes(largest_param_bytes: int) -> int:
    """CUDA: the pinned ring the gradients stream through: two of the largest gradient (each 512-byte aligned),
    and at least STAGING_RING_MIN_BYTES."""
    return max(STAGING_RING_MIN_BYTES, 2 * -(-largest_param_bytes // 512) * 512)


class _PendingCopy(NamedTuple):
    done: torch.cuda.Event
    staging: torch.Tensor     # pinned host view holding the device gradient once ``done`` has fired
    group_index: int
    slot_index: int


class GradientStream:
    """Gradient hooks for ``groups``; ``grad_hosts[g]`` is group g's fp32 accumulator (zero padding kept).

    On a CUDA device the copies run on a side stream into a pinned staging ring of ``staging_bytes`` taken from
    ``pool``; see Note [gradient copies on CUDA]. On the CPU the hook accumulates directly.
    """

    def __init__(self, groups: list[FlatGroup], grad_hosts: list[torch.Tensor | None], device: torch.device,
                 pool: HostPool, staging_bytes: int, param_order: dict[int, int],
                 timeline: Timeline = NO_TIMELINE, ranks: Ranks = Ranks()) -> None:
        """``param_order``: id(param) -> its position in ``model.parameters()`` (the order of the norms).
        ``grad_hosts[g]`` is None for a group whose accumulator lives on NVMe (``grad_swap``, set later).
        With several ``ranks`` the accumulators hold this rank's shard (Note [rank shards])."""
        self.groups = groups
        self.grad_hosts = grad_hosts
        self.device = device
        self.received = [[False] * len(g.slots) for g in groups]
        self.norms: list[list[torch.Tensor | None]] = [[None] * len(g.slots) for g in groups]
        self._order = [[param_order[id(slot.param)] for slot in g.slots] for g in groups]
        self.bytes_to_host = 0
        self.timeline = timeline
        self.on_param_done: Callable[[int, int], None] | None = None  # (group, slot): its gradient is taken
        # (group, the CUDA copies its accumulator still waits for): every parameter of the group has had its
        # gradient in this backward (set by Engine.backward_step; counted from ``count_arrivals``).
        self.on_group_ready: Callable[[int, list[torch.cuda.Event]], None] | None = None
        self._arrived: list[set[int]] = [set() for _ in groups]
        self._copies_of_group: list[list[torch.cuda.Event]] = [[] for _ in groups]
        self.grad_swap: GradSwap | None = None
        self._pending: deque[_PendingCopy] = deque()
        self._first_copies: list[torch.cuda.Event] = []  # device -> accumulator copies not yet waited for
        self._staging: HostBuffer | None = None
        self.ranks = ranks
        self.reducer = ShardReducer(groups, ranks, device) if ranks.many else None
        self._shard_norms: dict[int, torch.Tensor] = {}  # several ranks: group -> norm of its shard's accumulator
        if device.type == "cuda" and self.reducer is None:
            self._side_stream = torch.cuda.Stream(device)
            self._staging = pool.allocate(staging_bytes, "gradient staging")
            self._ring = ByteRing(staging_bytes)
        self._hooks: list = []

    def attach(self) -> None:
        """Registers the hooks on the parameters."""
        self._hooks = [slot.param.register_post_accumulate_grad_hook(partial(self._on_grad, g.index, i))
                       for g in self.groups for i, slot in enumerate(g.slots)]

    def count_arrivals(self) -> None:
        """Starts counting, per group, the parameters whose gradient has arrived (for ``on_group_ready``)."""
        self._arrived = [set() for _ in self.groups]
        self._copies_of_group = [[] for _ in self.groups]

    def _on_grad(self, group_index: int, slot_index: int, param: torch.Tensor) -> None:
        grad, param.grad = param.grad, None  # the device gradient is dropped now: only the host keeps it
        if grad is not None:
            self._take(group_index, slot_index, grad)
        if self.on_group_ready is not None:
            arrived = self._arrived[group_index]
            if slot_index in arrived:
                # A second gradient in one backward (a parameter shared by two reentrant checkpointed
                # segments): its group may already be updating, so this backward cannot be completed exactly.
                raise RuntimeError(f"offload: parameter {self.groups[group_index].slots[slot_index].name!r} "
                                   "received a second gradient in one backward (a parameter shared by "
                                   "reentrant checkpointed segments?); engine.backward_step cannot overlap "
                                   "its update: use engine.backward(loss); engine.step()")
            arrived.add(slot_index)
            if len(arrived) == len(self.groups[group_index].slots):
                self._drain_group(group_index)
                self.on_group_ready(group_index, list(self._copies_of_group[group_index]))

    def _take(self, group_index: int, slot_index: int, grad: torch.Tensor) -> None:
        if self.reducer is not None:
            with self.timeline.span("gradients", self.groups[group_index].slots[slot_index].name):
                reduced = self.reducer.add(group_index, slot_index, grad)
                if reduced is not None:
                    self._add_shard(reduced)
        elif self.device.type == "cuda" and grad.numel() > 0:
            if self.grad_hosts[group_index] is not None and not self.received[group_index][slot_index]:
                self._copy_first(group_index, slot_index, grad)
            else:
                self._copy_async(group_index, slot_index, grad)
        else:
            self.bytes_to_host += grad.numel() * grad.element_size()
            self._accumulate(group_index, slot_index, grad)
        if self.on_param_done is not None:
            self.on_param_done(group_index, slot_index)

    def _accumulate(self, group_index: int, slot_index: int, grad_host_in: torch.Tensor,
                    staged: bool = False) -> None:
        group = self.groups[group_index]
        slot: Slot = group.slots[slot_index]
        with self.timeline.span("gradients", slot.name):
            self._add_into(group, slot, group_index, slot_index, grad_host_in, staged)

    # Note [staged additions in one native pass]: a staged gradient (CUDA, a later micro-batch's) is added by
    # the native kernel, which widens bf16/fp16, adds, stores and sums the squares of the result in one pass over
    # the two buffers, on the kernel thread pool, without the GIL. torch would take three passes here (it widens
    # a mixed-dtype operand into a temporary it allocates and faults in, then adds, then a norm pass), on the
    # thread running autograd: at 7B that was ~6 s per micro-batch during which backward's kernels stopped
    # being issued (bench/results/gpu-scale-h200-2026-12-04). The norm is that of the same fp32 sum, summed in
    # double in a fixed order (Note [sum of squares in a fixed order] in native/adam_kernel.inc): it agrees with
    # torch's fp32 ``vector_norm`` to fp32 rounding, as the device-reduced first norms do (Note [first gradient
    # on CUDA]). The CPU device keeps torch's operations, whose norms match ``clip_grad_norm_`` bit for bit.
    def _add_into(self, group: FlatGroup, slot: Slot, group_index: int, slot_index: int,
                  grad_host_in: torch.Tensor, staged: bool) -> None:
        flat = self.grad_hosts[group_index]
        if flat is None:
            flat = self.grad_swap.accumulator(group_index, holds_data=any(self.received[group_index]))
        accum = group.view(flat, slot)
        received = self.received[group_index][slot_index]
        if staged:
            sum_of_squares = _C.accumulate_grad(accum, grad_host_in, overwrite=not received)
            self.norms[group_index][slot_index] = torch.tensor(math.sqrt(sum_of_squares), dtype=torch.float32)
        else:
            if received:
                accum.add_(grad_host_in)
            else:
                accum.copy_(grad_host_in)
            self.norms[group_index][slot_index] = torch.linalg.vector_norm(accum)  # the sum's, read while cached
        self.received[group_index][slot_index] = True
        if self.grad_hosts[group_index] is None:
            self.grad_swap.arrived(group_index, slot_index)

    # Note [gradient copies on CUDA]: the gradient is produced on the compute stream, so the side stream first
    # waits for everything queued there so far, then copies into a range of the pinned staging ring and
    # records ``done``. ``record_stream`` tells the caching allocator that the side stream still reads the
    # gradient, so dropping ``param.grad`` cannot let its memory be reused before the copy has read it. A ring
    # range is reused only after its copy's ``done`` has been waited for and the gradient added into the fp32
    # accumulator on the host (``_drain_one``), oldest first.
    def _copy_async(self, group_index: int, slot_index: int, grad: torch.Tensor) -> None:
        nbytes = grad.numel() * grad.element_size()
        self.bytes_to_host += nbytes
        start = self._ring.take(nbytes)
        while start is None:
            self._drain_one()
            start = self._ring.take(nbytes)
        staging = self._staging.tensor[start:start + nbytes].view(grad.dtype).view(grad.shape)
        self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side_stream):
            staging.copy_(grad, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._side_stream)
        grad.record_stream(self._side_stream)
        self._pending.append(_PendingCopy(done, staging, group_index, slot_index))
        while self._pending and self._pending[0].done.query():
            self._drain_one()

    # Note [first gradient on CUDA]: the first gradient of a parameter in an accumulation (with one
    # micro-batch per step: every gradient) needs no host arithmetic: the GPU widens it to fp32 and the side
    # stream copies it straight into the parameter's range of the pinned fp32 accumulator, and its norm is
    # reduced on the device (kept as a device scalar until ``global_norm``). The host thread running autograd
    # only issues work, so backward's kernels keep coming; PCIe carries 4 bytes per parameter instead of 2,
    # which it has to spare, while the host saves a widening pass and a norm pass over the gradients. Ordering:
    # the side stream waits for the compute stream (the gradient and its widened copy are complete); the
    # widened tensor is allocated on the side stream, so its memory is reused only after the copy there; the
    # gradient is marked used by the side stream as in Note [gradient copies on CUDA]. A later micro-batch's
    # gradient of the same parameter goes through the staging ring on the same stream, so its ``done`` event
    # also covers this copy before the host adds into the accumulator; ``finish`` waits for the rest.
    def _copy_first(self, group_index: int, slot_index: int, grad: torch.Tensor) -> None:
        group = self.groups[group_index]
        accum = group.view(self.grad_hosts[group_index], group.slots[slot_index])
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)  # on the compute stream
        self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side_stream):
            wide = grad.to(torch.float32)
            accum.copy_(wide, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._side_stream)
        grad.record_stream(self._side_stream)
        self._first_copies.append(done)
        if self.on_group_ready is not None:
            self._copies_of_group[group_index].append(done)
        self.received[group_index][slot_index] = True
        self.norms[group_index][slot_index] = norm
        self.bytes_to_host += accum.numel() * accum.element_size()

    def _add_shard(self, reduced: ShardReduced) -> None:
        """Adds a group's reduced shard into its accumulator: the first of an accumulation overwrites the whole
        shard (every element: parameters without a gradient get zeros), later ones add."""
        g = reduced.group_index
        started = any(self.received[g])
        flat = self.grad_hosts[g]
        if flat is None:
            flat = self.grad_swap.accumulator(g, holds_data=started)
        shard = reduced.shard_device  # (CUDA: the copies below wait for the reduction on the current stream)
        if started:
            flat.add_(shard.to("cpu"))
        else:
            flat.copy_(shard)
        self.bytes_to_host += flat.numel() * flat.element_size()
        for i in reduced.slots:
            self.received[g][i] = True
        self._shard_norms[g] = torch.linalg.vector_norm(flat)
        if self.grad_hosts[g] is None:
            for i in reduced.slots:
                self.grad_swap.arrived(g, i)

    # Note [a group is ready once its additions are done]: a gradient that is not the first of its accumulation
    # (a later micro-batch's) reaches the accumulator only when ``_drain_one`` adds its staged copy on the host,
    # which may be after the hook that completes the group has run. An update started then would read a
    # partial sum, so before a group is reported ready the staged copies queued so far are added, oldest
    # first, up to the group's last one. The thread running autograd waits for that copy only (the group's
    # last gradient, just issued); first gradients are copied straight into the accumulator, and the update
    # waits for their events instead (``_copies_of_group``).
    def _drain_group(self, group_index: int) -> None:
        last = max((i for i, copy in enumerate(self._pending) if copy.group_index == group_index), default=-1)
        for _ in range(last + 1):
            self._drain_one()

    def _drain_one(self) -> None:
        copy = self._pending.popleft()
        copy.done.synchronize()
        self._accumulate(copy.group_index, copy.slot_index, copy.staging, staged=True)
        self._ring.release_oldest()

    def finish(self) -> None:
        """Blocks until every gradient handed to a hook is in its accumulator (on NVMe for swapped groups).
        Collective with several ranks (groups that did not complete are reduced now)."""
        if self.reducer is not None:
            self.reducer.flush(self._add_shard)
        while self._pending:
            self._drain_one()
        for done in self._first_copies:
            done.synchronize()
        self._first_copies.clear()
        if self.grad_swap is not None:
            self.grad_swap.end_backward()

    def global_norm(self) -> torch.Tensor:
        """The fp32 L2 norm over every gradient received since the last reset (0-dim tensor). Collective with
        several ranks."""
        if self.reducer is not None:
            local = torch.zeros(())
            if self._shard_norms:
                local = torch.linalg.vector_norm(torch.stack([self._shard_norms[g] for g in sorted(self._shard_norms)]))
            return self.ranks.sum(local.square()).sqrt()
        ordered = sorted((self._order[g][i], norm) for g, per_group in enumerate(self.norms)
                         for i, norm in enumerate(per_group) if norm is not None)
        if not ordered:
            return torch.zeros(())
        norms = [norm for _, norm in ordered]
        on_device = [k for k, norm in enumerate(norms) if norm.device.type != "cpu"]
        if on_device:  # one device -> host transfer for all of them
            moved = torch.stack([norms[k] for k in on_device]).cpu()
            for j, k in enumerate(on_device):
                norms[k] = moved[j]
        return torch.linalg.vector_norm(torch.stack(norms))

    def any_received(self) -> bool:
        return any(any(per_group) for per_group in self.received)

    def reset(self) -> None:
        """Starts a new accumulation (after a step): the next gradient of each parameter overwrites."""
        for per_group in self.received:
            per_group[:] = [False] * len(per_group)
        for per_group in self.norms:
            per_group[:] = [None] * len(per_group)
        self._shard_norms.clear()
        for copies in self._copies_of_group:
            copies.clear()

    def close(self, pool: HostPool) -> None:
        """Removes the hooks; waits for copies in flight before the staging ring goes back to the pool."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self.reducer is not None:
            self.reducer.close()
        for copy in self._pending:
            copy.done.synchronize()
        self._pending.clear()
        for done in self._first_copies:
            done.synchronize()
        self._first_copies.clear()
        if self._staging is not None:
            pool.release(self._staging)
            self._staging = None
