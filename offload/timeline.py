"""Timeline: spans of compute, fetches, gradient copies, Adam and NVMe transfers, written as a Chrome trace.

Pass ``Engine(..., timeline=Timeline())``, run a few steps, then ``timeline.save("trace.json")`` and open the
file in https://ui.perfetto.dev or chrome://tracing. Each kind of work has its own track, so what overlaps is
visible at a glance. Transfers are shown from the moment they are issued to the moment the engine waited for
them (an upper bound of their duration: the engine does not ask the disk when it finished).

``timeline.sampling(nvme_dir)`` adds, for the steps run inside it, counter tracks of how busy the disk under
``nvme_dir`` and the CPU were (resource_sampler.py): the spans say what the engine asked for, the counters
what the hardware did.

Without a timeline every recording call is a no-op on the shared :data:`NO_TIMELINE`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from offload.resource_sampler import ResourceSampler

# Track names, in the order they are shown.
TRACKS = ("compute", "fetch", "gradients", "adam", "nvme read", "nvme write", "step")


class Timeline:
    """Collects spans in memory (a few hundred bytes each; meant for a few steps, not a whole run). A timeline
    built with ``enabled=False`` (the shared :data:`NO_TIMELINE`) records nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._origin = time.perf_counter()
        self._events: list[dict] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter()

    @property
    def origin(self) -> float:
        """The ``now()`` value that the trace's time 0 stands for (events' ``ts`` are microseconds after it)."""
        return self._origin

    def add(self, track: str, name: str, start: float, end: float, **args: object) -> None:
        """A span on ``track`` from ``start`` to ``end`` (``now()`` values)."""
        if not self.enabled:
            return
        event = {"name": name, "cat": track, "ph": "X", "pid": os.getpid(), "tid": TRACKS.index(track),
                 "ts": (start - self._origin) * 1e6, "dur": max(end - start, 0.0) * 1e6, "args": args}
        with self._lock:
            self._events.append(event)

    @contextmanager
    def span(self, track: str, name: str, **args: object) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(track, name, start, time.perf_counter(), **args)

    def add_counter(self, name: str, at: float, **values: float) -> None:
        """Counter values (a ``now()`` time; each holds until the next sample of ``name``), drawn as a graph."""
        if not self.enabled:
            return
        event = {"name": name, "cat": "resources", "ph": "C", "pid": os.getpid(), "ts": (at - self._origin) * 1e6,
                 "args": values}
        with self._lock:
            self._events.append(event)

    @contextmanager
    def sampling(self, path: str | os.PathLike | None = None, interval: float = 0.005) -> Iterator[ResourceSampler]:
        """Within the block, samples the disk holding ``path`` (busy %, MB/s read and written) and this
        process's CPU use every ``interval`` seconds into counter tracks; the sampler it yields keeps the
        cumulative counters for exact means over any spans (``usage``; see resource_sampler.py)."""
        if not self.enabled:
            yield ResourceSampler(self, None, interval)  # never started: no samples, no disk, usage() is None
            return
        sampler = ResourceSampler(self, path, interval)
        sampler.start()
        try:
            yield sampler
        finally:
            sampler.stop()

    def events(self) -> list[dict]:
        with self._lock:
            return list(self._events)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the Chrome trace JSON (atomically: a temporary file renamed over ``path``)."""
        meta = [{"name": "thread_name", "ph": "M", "pid": os.getpid(), "tid": i, "args": {"name": track}}
                for i, track in enumerate(TRACKS)]
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": meta + self.events(), "displayTimeUnit": "ms"}, f)
        os.replace(tmp, path)


NO_TIMELINE = Timeline(enabled=False)
