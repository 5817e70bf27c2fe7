"""GradSwap: fp32 gradient accumulators that live on NVMe between backward passes.

When even the gradient accumulators (4 bytes per parameter) do not fit the host budget, each group's
accumulator gets a region of a swap file. During backward a group's accumulator is in one of a few host
buffers while its gradients arrive; once every parameter of the group has its gradient for this backward (or
backward ends) it is written out and the buffer is free again. A later micro-batch reads it back before adding
to it. The optimizer step reads it from the file together with the group's state.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from offload.layout.flat_group import FlatGroup
from offload.optim.state_store import FP32_BYTES
from offload.storage.host_pool import HostBuffer, HostPool
from offload.storage.swap_store import SwapFile, SwapStore

GRAD_SWAP_BUFFERS = 2  # host buffers for accumulators on NVMe: groups whose gradients are arriving at once


class GradSwap:
    def __init__(self, groups: list[FlatGroup], pool: HostPool, swap: SwapStore, buffers: int) -> None:
        self.groups = groups
        self.pool = pool
        self.swap = swap
        self.files: list[SwapFile] = [swap.create(f"gradients {g.index}", g.shard_numel * FP32_BYTES) for g in groups]
        largest = max(g.shard_numel for g in groups) * FP32_BYTES
        self._buffers: list[HostBuffer] = [pool.allocate(largest, f"gradient staging {i}") for i in range(buffers)]
        self._free = list(range(buffers))
        self._loaded: OrderedDict[int, int] = OrderedDict()  # group -> buffer, oldest first
        self._arrived: dict[int, set[int]] = {}               # group -> slots with a gradient this backward
        self.bytes_read = 0
        self.bytes_written = 0

    def accumulator(self, g: int, holds_data: bool) -> torch.Tensor:
        """Group g's fp32 accumulator in host memory. ``holds_data``: some parameter of g already has a
        gradient this step, so the file holds partial sums that must be read back first."""
        if g in self._loaded:
            return self._view(g)
        if not self._free:
            self._flush(next(iter(self._loaded)))  # the oldest group in progress goes out, to come back later
        buffer = self._free.pop()
        self._loaded[g] = buffer
        view = self._view(g)
        if holds_data:
            self.swap.wait(self.swap.read(self.files[g], 0, view))
            self.bytes_read += view.numel() * FP32_BYTES
        else:
            view.zero_()  # the buffer held another group's gradients: the padding must read as zero
        return view

    def arrived(self, g: int, slot_index: int) -> None:
        """A parameter of group g has its gradient added for this backward; the last one sends g out."""
        arrived = self._arrived.setdefault(g, set())
        arrived.add(slot_index)
        if len(arrived) == len(self.groups[g].slots) and g in self._loaded:
            self._flush(g)

    def end_backward(self) -> None:
        """Writes out every accumulator still in host memory."""
        for g in list(self._loaded):
            self._flush(g)
        self._arrived.clear()

    def _view(self, g: int) -> torch.Tensor:
        return self._buffers[self._loaded[g]].tensor[:self.groups[g].shard_numel * FP32_BYTES].view(torch.float32)

    def _flush(self, g: int) -> None:
        view = self._view(g)
        self.swap.wait(self.swap.write(self.files[g], 0, view))
        self.bytes_written += view.numel() * FP32_BYTES
        self._free.append(self._loaded.pop(g))

    def close(self) -> None:
        for buffer in self._buffers:
            self.pool.release(buffer)
        self._buffers.clear()
