"""DeviceWeights: each group's parameters as views into one flat buffer on the compute device.

The model keeps its ``nn.Parameter`` objects; only their ``.data`` is pointed at the group's flat buffer
(``weight_device``) in the compute dtype. After Adam, the new weights reach that buffer by the cheapest route:
- CPU device, bf16/fp16: the native kernel writes them straight into ``weight_device`` in the Adam pass.
- CPU device, fp32, optimizer state in RAM: ``weight_device`` *is* the fp32 master, updated in place.
- CPU device, fp32, state on NVMe: ``weight_device`` is bit-equal to the master in the state file, so the
  update takes it as its master (``lend_master``; Note [master in memory], group_stepper.py): it reads only
  the moments, runs Adam on ``weight_device`` in place, and writes the master home from it. Such a buffer is
  page-aligned (O_DIRECT writes read it), a mapping of its own (``GroupStorage``) claimed for the whole run.
- CUDA: the kernel (or, for fp32, a copy) fills a pinned host buffer ``weight_host``, which is uploaded on a
  side stream; see Note [weight uploads on CUDA].
With several ranks (Note [rank shards]) each rank updates its shard ``[lo, hi)`` of every group only: the
routes above fill that part of the buffer, and ``gather`` (a collective, on the training thread) then brings
every rank's part into every rank's ``weight_device``.
"""

from __future__ import annotations

from typing import Callable

import torch

from offload.ranks import Ranks
from offload.layout.flat_group import FlatGroup
from offload.schedule.device_storage import GroupStorage
from offload.storage.host_pool import HostBuffer, HostPool


class DeviceWeights:
    """The ``Weights`` of ``params="device"``: every group's buffer lives on the device for the whole run."""

    def __init__(self, device: torch.device, dtype: torch.dtype, pool: HostPool, ranks: Ranks = Ranks()) -> None:
        self.device = device
        self.ranks = ranks
        self.dtype = dtype
        self.pool = pool
        self.groups: list[FlatGroup] = []
        self.weight_device: list[torch.Tensor] = []
        self.weight_host: list[HostBuffer | None] = []
        self._aliased: list[bool] = []
        self._master_here: list[bool] = []  # whether the update runs on weight_device (see the module doc)
        self._uploaded: list[torch.cuda.Event | None] = []
        self._upload_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._compute_stream: torch.cuda.Stream | None = None  # the caller's stream, taken by begin_step

    def add(self, group: FlatGroup, master: torch.Tensor | None, alias: torch.Tensor | None,
            state_on_nvme: bool = False) -> None:
        """Creates group g's device buffer from ``master`` (its fp32 flat weights; None: zeros, filled later
        with ``load_weights``); ``bind_parameters`` later points the parameters at it. ``alias``: a CPU fp32
        flat tensor to use as the buffer itself (the master in RAM when the device is the CPU and the dtype
        fp32), or None; never with several ranks (the master is a shard, the buffer the whole group).
        ``state_on_nvme``: the group's optimizer state is on NVMe (then, on the CPU in fp32 with one rank, the
        buffer is what the update runs on: see the module doc)."""
        if alias is not None and group.sharded:
            raise ValueError("offload: a rank's master shard cannot be the weights of the whole group")
        master_here = (state_on_nvme and alias is None and self.device.type == "cpu"
                       and self.dtype == torch.float32 and not group.sharded)
        if alias is not None:
            weights = alias
        elif master_here:
            storage = GroupStorage(self.device, self.dtype, group.numel)  # (its tensor keeps the mapping alive)
            storage.claim()  # for good: the kernel supplies zeroed pages, the copy below fills them
            weights = storage.tensor
            if master is not None:
                weights.copy_(master)
        elif master is None:
            weights = torch.zeros(group.numel, dtype=self.dtype, device=self.device)
        else:
            weights = torch.empty(group.numel, dtype=self.dtype, device=self.device)
            weights.copy_(master)
        staged = self.device.type == "cuda" and self.dtype != torch.float32  # kernel output must be host memory
        self.weight_host.append(self.pool.allocate(group.numel * weights.element_size(),
                                                   f"weights {group.name or '<root>'}") if staged else None)
        if staged and master is not None:  # (a new pool buffer is zero already)
            # The kernel writes only the spans of parameters that received a gradient, and the upload copies
            # the whole buffer: the rest must already hold the current weights.
            self.weight_host[-1].view(self.dtype).copy_(weights)
        self.groups.append(group)
        self.weight_device.append(weights)
        self._aliased.append(alias is not None)
        self._master_here.append(master_here)
        self._uploaded.append(None)

    def bind_parameters(self) -> None:
        """Points every parameter's ``.data`` at its view of the group buffer (the original storage is freed
        unless someone else holds it)."""
        for group, weights in zip(self.groups, self.weight_device):
            for slot in group.slots:
                slot.param.data = group.view(weights, slot)

    def load_weights(self, g: int, master: torch.Tensor, start: int, last: bool) -> None:
        """Sets group g's weights from elements [start, start + len) of its fp32 ``master`` (a checkpoint
        being loaded; shard coordinates); the buffers hold them when this returns. With several ranks the
        ``last`` chunk gathers every rank's shard (a collective)."""
        if self._aliased[g]:
            return  # the weights are the master, which the caller has just filled
        lo = self.groups[g].lo
        start, end = lo + start, lo + start + master.numel()
        if self.weight_host[g] is not None:
            self._wait_upload(g)  # an upload still reading weight_host must finish before it is rewritten
            self.weight_host[g].view(self.dtype)[start:end].copy_(master)
        self.weight_device[g][start:end].copy_(master)
        if last and self.groups[g].sharded:
            self.gather([g])

    def gather(self, groups: list[int]) -> None:
        """Every rank's updated shard of ``groups`` into every rank's device buffer (collective; call on the
        training thread, after ``finish_step``, whose stream wait orders the gather after the uploads)."""
        for g in groups:
            group, weights = self.groups[g], self.weight_device[g]
            self.ranks.all_gather(weights, weights[group.lo:group.hi])

    @property
    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weight_device)

    # (resident for the whole run: the device holds all of them, always)
    resident_bytes = peak_resident_bytes = nbytes

    @property
    def io_failure(self) -> OSError | None:
        return None  # nothing is written to NVMe from here

    def release_all(self) -> None:
        pass  # the buffers stay: load_weights rewrites them in place

    def drain_copies(self) -> None:
        pass  # no copy reads a home: uploads are waited for by kernel_output and close

    def can_lend(self, g: int) -> bool:
        """Whether group g's update runs on its device buffer (see the module doc)."""
        return self._master_here[g]

    def lend_master(self, g: int) -> torch.Tensor | None:
        """The fp32 master for group g's update to run on in place (Note [master in memory]), or None. The
        buffer lives for the whole run, so nothing has to wait for the writes that read it."""
        return self.weight_device[g] if self._master_here[g] else None

    def kernel_output(self, g: int) -> torch.Tensor | None:
        """Where the Adam kernel writes group g's low-precision weights (None for fp32, see after_update).
        Call once per step before group g's update."""
        if self.device.type == "cuda":
            self._wait_upload(g)  # the previous upload must have read its host source before it is rewritten
        if self.dtype == torch.float32:
            return None
        lo, hi = self.groups[g].lo, self.groups[g].hi
        target = self.weight_device[g] if self.device.type == "cpu" else self.weight_host[g].view(self.dtype)
        return target[lo:hi]

    def after_update(self, g: int, master_is_staged: bool,
                     covered: list[tuple[int, int]]) -> Callable[[torch.Tensor, int, bool], None] | None:
        """The callback (``master`` chunk, its start, last chunk?) that moves group g's new weights to the
        device once its fp32 master is final (None when the kernel already put them there). ``start`` counts
        from this rank's shard."""
        lo, hi = self.groups[g].lo, self.groups[g].hi
        weights = self.weight_device[g]
        if self.device.type == "cpu":
            if self.dtype != torch.float32 or self._aliased[g] or self._master_here[g]:
                return None
            return lambda master, start, last: weights[lo + start:lo + start + master.numel()].copy_(master)
        if self.dtype != torch.float32:
            source = self.weight_host[g].view(self.dtype)[lo:hi]
            return lambda master, start, last: self._upload(g, weights[lo:hi], source, wait=False) if last else None
        return lambda master, start, last: self._upload(g, weights[lo + start:lo + start + master.numel()], master,
                                                        wait=master_is_staged)

    def begin_step(self) -> None:
        """Called on the training thread before a step's updates: the stream its kernels run on, which the
        uploads must follow (updates may run on another thread, whose current stream is not that one)."""
        if self.device.type == "cuda":
            self._compute_stream = torch.cuda.current_stream(self.device)

    # Note [weight uploads on CUDA]: the upload stream first waits for the compute stream (the training
    # thread's, recorded by ``begin_step``), so the copy cannot overwrite weights that queued kernels still read; the copy reads the pinned host buffer (weight_host, or
    # the fp32 master) asynchronously and records ``uploaded``. Before the kernel rewrites weight_host in the
    # next step, ``_wait_upload`` blocks on that event. An fp32 master in a staging slot is reused by the
    # optimizer pipeline right after the callback, so that upload is waited for before returning. At the end
    # of the step ``finish_step`` makes the compute stream wait for all uploads: whatever the caller queues
    # next (forward, generate) sees the new weights, without blocking the host.
    def _upload(self, g: int, target: torch.Tensor, source: torch.Tensor, wait: bool) -> None:
        self._upload_stream.wait_stream(self._compute_stream or torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._upload_stream):
            target.copy_(source, non_blocking=True)  # (a later upload of g on this stream is ordered after)
            uploaded = torch.cuda.Event()
            uploaded.record(self._upload_stream)
        self._uploaded[g] = uploaded
        if wait:
            uploaded.synchronize()

    def _wait_upload(self, g: int) -> None:
        if self._uploaded[g] is not None:
            self._uploaded[g].synchronize()
            self._uploaded[g] = None

    def finish_step(self) -> None:
        if self._upload_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._upload_stream)

    def close(self) -> None:
        for g in range(len(self.groups)):
            self._wait_upload(g)
        for buffer in self.weight_host:
            if buffer is not None:
                self.pool.release(buffer)
        self.weight_host.clear()
