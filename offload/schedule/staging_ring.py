"""ByteRing: first-in first-out allocation of byte ranges inside one fixed staging buffer."""

from __future__ import annotations

from collections import deque


class ByteRing:
    """Hands out ranges ``[start, start + nbytes)`` of a buffer of ``capacity`` bytes, each aligned to
    ``align``, and takes them back oldest first. ``take`` returns None when no range fits until older ranges
    are released; the caller decides how to make room (e.g. wait for the oldest transfer)."""

    def __init__(self, capacity: int, align: int = 512) -> None:
        self.capacity = capacity // align * align  # every range is a whole number of ``align`` units
        self.align = align
        self._ranges: deque[tuple[int, int]] = deque()  # live ranges, oldest first

    def __len__(self) -> int:
        return len(self._ranges)

    def take(self, nbytes: int) -> int | None:
        """Start of a free range of ``nbytes`` (> 0, at most ``capacity``), or None if none is free now."""
        if not 0 < nbytes <= self.capacity:
            raise ValueError(f"ByteRing.take: {nbytes} bytes does not fit a ring of {self.capacity} bytes")
        size = -(-nbytes // self.align) * self.align
        if not self._ranges:
            start = 0
        else:
            oldest_start = self._ranges[0][0]
            newest_start, newest_end = self._ranges[-1]
            wrapped = newest_start < oldest_start  # the newest ranges sit before the oldest one
            if wrapped:
                start = newest_end if newest_end + size <= oldest_start else None
            elif newest_end + size <= self.capacity:
                start = newest_end
            else:
                start = 0 if size <= oldest_start else None
        if start is None:
            return None
        self._ranges.append((start, start + size))
        return start

    def release_oldest(self) -> None:
        self._ranges.popleft()
