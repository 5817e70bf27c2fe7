"""GroupStorage: the device memory behind one offloaded group's weights, claimed for a use and given back after.

The parameters of a group are views into one flat tensor for the whole run (``OffloadedParams.bind_parameters``);
autograd saves views of it too. So the memory must come and go *under* that tensor, never by replacing it.

- CUDA: the tensor's storage is resized: ``resize_(nbytes)`` takes a block from the caching allocator,
  ``resize_(0)`` returns it. Every fill is a copy from a pinned host buffer (Note [fetch stream]).
- CPU: Note [CPU device pages].
"""

from __future__ import annotations

import mmap

import torch

from offload import _C
from offload.storage.host_pool import PAGE

_HUGE_PAGE = 2 << 20

# Note [CPU device pages]: on the CPU device the "device" buffer of a group is a private anonymous mapping of
# its own, mapped once for the whole run, so its address never changes and is page-aligned. Two things follow:
# 1. A fetch from NVMe reads with O_DIRECT straight into the buffer: no host staging slot, no copy on the
#    training thread (a torch allocation from ``resize_`` is only 64-byte aligned, and a new one each time).
# 2. Giving the group back is ``MADV_DONTNEED``: the kernel takes the pages (RSS follows the resident set, so
#    ``device_memory_limit`` is real memory), while the mapping stays. The pages are then made inaccessible
#    (``PROT_NONE``), so a use of released weights faults at once instead of reading zeros; claiming the group
#    makes them readable and writable again before anything, the I/O engine included, touches them. The
#    kernel supplies fresh zeroed pages as the read or the copy first touches them.
# Both calls change only this mapping, from the training thread, while nothing reads or writes the buffer
# (a release waits for a read in flight first).


class GroupStorage:
    """One group's device buffer: ``tensor`` (flat, ``numel`` elements of ``dtype``), empty until ``claim``."""

    def __init__(self, device: torch.device, dtype: torch.dtype, numel: int) -> None:
        self.device = torch.device(device)
        self.nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self._mapping: mmap.mmap | None = None
        if self.device.type == "cpu":
            size = max(PAGE, -(-self.nbytes // PAGE) * PAGE)
            self._mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if size >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
                self._mapping.madvise(mmap.MADV_HUGEPAGE)  # fewer faults and TLB misses when it fills
            # frombuffer keeps the mapping alive as long as any view of the weights exists (also after close).
            self.tensor = torch.frombuffer(self._mapping, dtype=torch.uint8)[:self.nbytes].view(dtype)
            self._claimed = True  # a new mapping is accessible; give_back below makes it follow the rule
            self.give_back()
        else:
            self.tensor = torch.empty(numel, dtype=dtype, device=self.device)
            self.tensor.untyped_storage().resize_(0)
            self._claimed = False

    @property
    def claimed(self) -> bool:
        """Whether the buffer holds memory that may be read (between ``claim`` and ``give_back``)."""
        return self._claimed

    @property
    def direct(self) -> bool:
        """Whether an NVMe read may target the buffer itself (page-aligned host memory at a fixed address)."""
        return self._mapping is not None

    @property
    def address(self) -> int:
        """The buffer's address; on CUDA 0 while given back."""
        return self.tensor.untyped_storage().data_ptr()

    def claim(self) -> None:
        """Makes the buffer usable (its contents are undefined until filled)."""
        if self._claimed:
            return
        if self._mapping is not None:
            _C.protect_pages(self.address, len(self._mapping), True)
        else:
            self.tensor.untyped_storage().resize_(self.nbytes)
        self._claimed = True

    def give_back(self) -> None:
        """Returns the memory (to the OS on the CPU, to the caching allocator on CUDA). Nothing may still be
        reading or writing the buffer, except (CUDA) a copy the storage was recorded on (Note [fetch stream], 3)."""
        if not self._claimed:
            return
        if self._mapping is not None:
            self._mapping.madvise(mmap.MADV_DONTNEED)
            _C.protect_pages(self.address, len(self._mapping), False)
        else:
            self.tensor.untyped_storage().resize_(0)
        self._claimed = False
