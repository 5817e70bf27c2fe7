"""HostToDevice: fills a group's device storage from host memory, on a copy stream of its own on CUDA.

On the CPU device a fill is a plain ``copy_`` that is complete when it returns. On CUDA it is asynchronous and
returns the event that marks its end; Note [fetch stream] says what orders it against the compute stream.
"""

from __future__ import annotations

import torch

# Note [fetch stream]: weights are copied host -> device on one dedicated stream, so that the fetch of the next
# groups runs while the compute stream runs the current one. Three orderings make this safe:
# 1. Before the copy: the target's storage was just allocated on the compute stream, and the caching allocator
#    may hand out a block that kernels still queued there use (its reuse is only ordered on that stream). So
#    the copy stream first waits for everything queued on the compute stream so far. In forward this is
#    issued before the current group's kernels are queued: the copy overlaps them.
# 2. After the copy: the compute stream waits for the copy's event before the first kernel that reads the
#    weights (``wait_ready``, when the group is made resident), without blocking the host.
# 3. The target's storage is marked as used by the copy stream (record_stream): when the group is released,
#    the allocator does not reuse the block until the copy has run, even if it was never waited for.
# The host source must stay unchanged until the copy has read it: a staging slot is reused only after its
# copy's event has completed, and a host home is rewritten by the optimizer only after ``drain``.


class HostToDevice:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def asynchronous(self) -> bool:
        return self.stream is not None

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> torch.cuda.Event | None:
        """Copies ``source`` (host; pinned on CUDA, else the copy is not asynchronous) into ``target`` (device).
        Returns None when the copy is complete (CPU), else the event recorded after it on the copy stream."""
        if self.stream is None:
            target.copy_(source)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # (1)
        with torch.cuda.stream(self.stream):
            target.copy_(source, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        target.record_stream(self.stream)  # (3)
        return copied

    def wait_ready(self, copied: torch.cuda.Event | None) -> None:
        """Kernels queued on the compute stream from now on see the copy's result (2). Does not block the host."""
        if copied is not None:
            torch.cuda.current_stream(self.device).wait_event(copied)

    def drain(self) -> None:
        """Blocks until every copy issued so far has read its host source (the optimizer is about to rewrite
        the homes, or the host buffers are about to be freed). One host synchronisation per step."""
        if self.stream is not None:
            self.stream.synchronize()
