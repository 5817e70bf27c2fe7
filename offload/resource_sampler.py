"""ResourceSampler: how busy the swap disk and the CPU are, sampled next to a Timeline's spans.

The engine's spans say when it issued work and when it waited; they cannot say whether the disk was moving
bytes in between. The kernel can: it counts, per block device, the milliseconds during which at least one
request was in flight (``io_ticks``) and the bytes read and written (``psutil.disk_io_counters``, from
``/proc/diskstats``), and the process's CPU time counts what all its threads computed. The sampler reads these
cumulative counters every few milliseconds and keeps them:

- ``usage(spans)`` gives means over any set of time spans (the counters' increase between the spans' ends,
  interpolated between samples): what ``bench/step_timeline.py`` prints per phase of a step;
- the Timeline gets counter tracks (disk busy %, disk MB/s, CPU cores) to look at next to the spans.

Granularity: ``io_ticks`` advances in whole jiffies (4 ms with HZ=250), so a single sample over a 5 ms interval
reads a saturated disk as 80% or 160% busy; the tracks clamp that to 100% for display. The means over spans
use the cumulative counts, so the error is at most about one sample interval of busy time per span end, not
per sample. CPU time comes from ``time.process_time`` (all threads, nanoseconds).

Linux only for the disk; for a directory on a filesystem without a block device (tmpfs, overlay) or where
psutil has no counters for it, the disk counters are left out and ``disk_note`` says why.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psutil


@dataclass(frozen=True)
class DiskCounters:
    """Cumulative counters of one block device: milliseconds with a request in flight, bytes read, bytes written
    (psutil's ``busy_time``, ``read_bytes`` and ``write_bytes``: ``/proc/diskstats`` fields 13, 6 and 10, the
    sectors counted as 512 bytes whatever the device's own sector size)."""
    busy_ms: int
    read_bytes: int
    written_bytes: int


@dataclass(frozen=True)
class Sample:
    t: float                    # time.perf_counter()
    cpu_s: float                # CPU time of the process, all threads
    disk: DiskCounters | None   # None when there is no disk to sample or the read failed


@dataclass(frozen=True)
class Usage:
    """Means over some time: CPU cores in use, the fraction of it the disk had a request in flight, bytes/s."""
    cpu_cores: float
    disk_busy: float | None
    read_bytes_per_s: float | None
    write_bytes_per_s: float | None


def block_device_of(path: str | os.PathLike) -> str | None:
    """The kernel's name of the block device holding ``path`` (``vda``, ``nvme0n1p2``: the names psutil's disk
    counters are keyed by), or None for a filesystem without one."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:  # tmpfs, overlay, btrfs subvolumes, ...
        return None
    try:  # /sys/dev/block/MAJOR:MINOR links to the device's directory, named as the kernel names the device
        return os.path.basename(os.readlink(f"/sys/dev/block/{major}:{minor}"))
    except OSError:
        return None


def disk_counters(per_disk: Mapping[str, Any], device: str) -> DiskCounters | None:
    """The device's counters from ``psutil.disk_io_counters(perdisk=True)``'s answer, or None if it has none."""
    counters = per_disk.get(device)
    if counters is None or not hasattr(counters, "busy_time"):  # (busy_time: Linux and FreeBSD only)
        return None
    return DiskCounters(busy_ms=counters.busy_time, read_bytes=counters.read_bytes,
                        written_bytes=counters.write_bytes)


def read_disk_counters(device: str) -> DiskCounters | None:
    """The device's counters now, or None when the system has none for it. psutil keeps the counters
    increasing across a wrap of the kernel's 32-bit ``io_ticks`` (nowrap)."""
    try:
        return disk_counters(psutil.disk_io_counters(perdisk=True), device)
    except (OSError, NotImplementedError, ValueError):  # neither /proc/diskstats nor /sys/block; a line it cannot read
        return None


def rates(before: DiskCounters, after: DiskCounters, seconds: float) -> tuple[float, float, float]:
    """(busy fraction, bytes read per second, bytes written per second) between two readings ``seconds``
    apart. The busy fraction is not clamped: over a short interval one jiffy more or less moves it a lot."""
    return ((after.busy_ms - before.busy_ms) / 1e3 / seconds,
            (after.read_bytes - before.read_bytes) / seconds,
            (after.written_bytes - before.written_bytes) / seconds)


class ResourceSampler:
    """A daemon thread that, every ``interval`` seconds between ``start()`` and ``stop()``, records the
    cumulative counters of the disk holding ``path`` and of the process's CPU time (``samples``) and adds
    their rates over the interval to ``timeline`` as counter tracks. Cheap: one psutil call (a read of
    /proc/diskstats, about 0.1 ms) per sample."""

    def __init__(self, timeline, path: str | os.PathLike | None = None, interval: float = 0.005) -> None:
        if interval <= 0:
            raise ValueError(f"ResourceSampler: interval must be > 0, got {interval}")
        self._timeline = timeline
        self._interval = interval
        # Why the disk is not sampled, for the caller to print; None when it is, or when no path was given.
        self.disk_note: str | None = None
        self._device = None
        if path is not None:
            try:
                self._device = block_device_of(path)
            except OSError as e:  # (e.g. a swap directory that nothing has needed yet, so never made)
                self.disk_note = f"no disk counters for {path!s}: {e.strerror}"
            else:
                if self._device is None or read_disk_counters(self._device) is None:
                    self._device = None
                    self.disk_note = f"no disk counters for {path!s}: not on a block device psutil has counters for"
        self.samples: list[Sample] = []  # appended by start(), the sampling thread and stop(); read after stop()
        self._last_disk: Sample | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("ResourceSampler: already started")
        self._record()
        self._thread = threading.Thread(target=self._run, name="offload-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops sampling, with one last sample so that the counters cover everything up to now. Idempotent."""
        if self._thread is not None and not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._record()

    def usage(self, spans: list[tuple[float, float]]) -> Usage | None:
        """Means over ``spans`` (``perf_counter`` start and end; non-overlapping), from the cumulative
        counters interpolated at each span's ends (so within about one sample interval of busy time per span
        end); the parts of the spans outside the sampled time do not count. None when no span lies within
        it. Call it after ``stop()``."""
        cpu = _means(self.samples, spans, ("cpu_s",))
        if cpu is None:
            return None
        with_disk = [s for s in self.samples if s.disk is not None]  # (a failed read leaves a gap)
        disk = _means(with_disk, spans, ("busy_ms", "read_bytes", "written_bytes"))
        if disk is None:
            return Usage(cpu[0], None, None, None)
        return Usage(cpu[0], disk[0] / 1e3, disk[1], disk[2])

    def _record(self) -> None:
        disk = read_disk_counters(self._device) if self._device is not None else None
        sample = Sample(time.perf_counter(), time.process_time(), disk)
        if self.samples:
            self._add_tracks(self.samples[-1], sample)
        self.samples.append(sample)
        if disk is not None:
            self._last_disk = sample

    def _add_tracks(self, last: Sample, now: Sample) -> None:
        # A counter value holds from its timestamp to the next one: stamp each with its interval's start.
        if now.t > last.t:
            cores = (now.cpu_s - last.cpu_s) / (now.t - last.t)
            self._timeline.add_counter("CPU cores", last.t, process=round(cores, 3))
        before = self._last_disk  # the last sample whose disk read succeeded
        if before is not None and now.disk is not None and now.t > before.t:
            busy, read, written = rates(before.disk, now.disk, now.t - before.t)
            self._timeline.add_counter("disk busy %", before.t, busy=round(min(100.0, busy * 100), 1))
            self._timeline.add_counter("disk MB/s", before.t, read=round(read / 1e6, 1), write=round(written / 1e6, 1))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._record()


def _means(samples: list[Sample], spans: list[tuple[float, float]], fields: tuple[str, ...]) -> list[float] | None:
    """Per field, the counter's increase over the parts of ``spans`` within ``samples``' time, per second."""
    if len(samples) < 2:
        return None
    inside = [(max(a, samples[0].t), min(b, samples[-1].t)) for a, b in spans]
    inside = [(a, b) for a, b in inside if b > a]
    if not inside:
        return None
    seconds = sum(b - a for a, b in inside)
    return [sum(_at(samples, b, f) - _at(samples, a, f) for a, b in inside) / seconds for f in fields]


def _at(samples: list[Sample], t: float, field: str) -> float:
    """A cumulative counter at time t, interpolated linearly between the samples around it (clamped to the
    first and last)."""
    # the last sample at or before t, and the one after it (the first two before the first sample)
    lo = min(max(bisect.bisect_right(samples, t, key=lambda s: s.t) - 1, 0), len(samples) - 2)
    hi = lo + 1

    def value(s: Sample) -> float:
        return s.cpu_s if field == "cpu_s" else getattr(s.disk, field)
    a, b = samples[lo], samples[hi]
    if b.t <= a.t:
        return value(a)
    w = min(1.0, max(0.0, (t - a.t) / (b.t - a.t)))
    return value(a) + w * (value(b) - value(a))
