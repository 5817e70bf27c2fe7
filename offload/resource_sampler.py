"""ResourceSampler: how busy the swap disk and the CPU are, sampled into a Timeline as counter tracks.

The engine's spans say when it issued work and when it waited; they cannot say whether the disk was moving
bytes in between. The kernel can: ``/proc/diskstats`` counts, per block device, the milliseconds during which
at least one request was in flight (``io_ticks``) and the sectors read and written, and ``/proc/self/stat``
the CPU time of this process. Sampling them every few milliseconds gives "disk busy %", "disk MB/s" and "CPU
cores" next to the spans: where the disk sits idle while compute runs, and the other way round.

Linux only; elsewhere (or for a directory on a filesystem without a block device, e.g. tmpfs) the disk
counters are left out with one note in the trace and the CPU counter remains.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

SECTOR_BYTES = 512  # /proc/diskstats counts 512-byte sectors whatever the device's own sector size


@dataclass(frozen=True)
class DiskCounters:
    busy_ms: int
    sectors_read: int
    sectors_written: int


def block_device_of(path: str | os.PathLike) -> tuple[int, int] | None:
    """(major, minor) of the block device holding ``path``, or None for a filesystem without one."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    return None if major == 0 else (major, minor)  # major 0: tmpfs, overlay, btrfs subvolumes, ...


def read_disk_counters(device: tuple[int, int]) -> DiskCounters | None:
    """The device's line of /proc/diskstats (fields: major minor name reads merged sectors ms writes merged
    sectors ms in-flight io_ticks ...), or None where it has none."""
    try:
        with open("/proc/diskstats") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 13 and (int(fields[0]), int(fields[1])) == device:
                    return DiskCounters(busy_ms=int(fields[12]), sectors_read=int(fields[5]),
                                        sectors_written=int(fields[9]))
    except OSError:
        return None
    return None


def process_cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (``os.times`` reads the same counters)."""
    t = os.times()
    return t.user + t.system


class ResourceSampler:
    """A daemon thread that, every ``interval`` seconds between ``start()`` and ``stop()``, adds to
    ``timeline`` the disk holding ``path`` (busy %, read and write MB/s over the interval) and the process's
    CPU use (cores). Cheap: three small /proc reads per sample."""

    def __init__(self, timeline, path: str | os.PathLike | None = None, interval: float = 0.005) -> None:
        if interval <= 0:
            raise ValueError(f"ResourceSampler: interval must be > 0, got {interval}")
        self._timeline = timeline
        self._interval = interval
        self._device = block_device_of(path) if path is not None else None
        if self._device is not None and read_disk_counters(self._device) is None:
            self._device = None
        # Why the disk tracks are missing, for the caller to print; None when they are there or not asked for.
        self.disk_note: str | None = None
        if path is not None and self._device is None:
            self.disk_note = f"no disk counters for {path!s}: not on a block device listed in /proc/diskstats"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("ResourceSampler: already started")
        self._thread = threading.Thread(target=self._run, name="offload-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def _run(self) -> None:
        last_t, last_cpu = time.perf_counter(), process_cpu_seconds()
        last_disk = read_disk_counters(self._device) if self._device is not None else None
        while not self._stop.wait(self._interval):
            now, cpu = time.perf_counter(), process_cpu_seconds()
            dt = now - last_t
            if dt <= 0:
                continue
            # A counter value holds from its timestamp to the next one: stamp each with its interval's start.
            self._timeline.add_counter("CPU cores", last_t, process=round((cpu - last_cpu) / dt, 3))
            if last_disk is not None:
                disk = read_disk_counters(self._device)
                if disk is not None:
                    busy = min(100.0, (disk.busy_ms - last_disk.busy_ms) / 1e3 / dt * 100)
                    self._timeline.add_counter("disk busy %", last_t, busy=round(busy, 1))
                    self._timeline.add_counter(
                        "disk MB/s", last_t,
                        read=round((disk.sectors_read - last_disk.sectors_read) * SECTOR_BYTES / dt / 1e6, 1),
                        write=round((disk.sectors_written - last_disk.sectors_written) * SECTOR_BYTES / dt / 1e6, 1))
                    last_disk = disk
            last_t, last_cpu = now, cpu
