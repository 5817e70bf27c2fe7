"""UpdateQueue: group updates handed over one by one during backward, run on one thread, most urgent first."""

from __future__ import annotations

import heapq
import itertools
import threading
from dataclasses import fields
from typing import Callable

import torch

from offload.optim.group_stepper import GroupUpdate, StepCounters


class UpdateQueue:
    """Runs ``run_one(update, ready)`` for each submitted update on its own thread, in submission order or,
    with ``priority``, lowest ``priority(update)`` first among those submitted and not yet started (ties in
    submission order);
    ``ready`` are the events (CUDA gradient copies) that must complete before the update reads its gradients,
    which ``run_one`` waits for (so that its own error handling covers a failed wait too). After
    ``close()`` (no more updates), ``wait()`` joins the thread and returns the summed counters, or raises the
    first error; updates submitted after a failure are dropped (the engine is failed by then). ``wait()`` has
    BackgroundStep's meaning, so the engine joins either kind of step the same way."""

    def __init__(self, run_one: Callable[[GroupUpdate, list[torch.cuda.Event]], StepCounters],
                 name: str = "offload-step", on_start: Callable[[], None] | None = None,
                 at_exit: Callable[[], None] | None = None,
                 priority: Callable[[GroupUpdate], int] | None = None) -> None:
        """``on_start()`` runs on the queue's thread before the first update (the engine's state read-ahead); an
        error there is ignored, as no update depends on it. ``at_exit()`` runs on the thread when it ends, however
        it ends."""
        self._run_one = run_one
        self._on_start = on_start
        self._at_exit = at_exit
        self._priority = priority
        # Pending updates as (priority, submission number, update, ready); ``close`` pushes a sentinel that
        # sorts after every update, so the thread ends only once the heap is drained. Guarded by ``_cond``.
        self._heap: list[tuple] = []
        self._cond = threading.Condition()
        self._numbers = itertools.count()
        self._counters = StepCounters()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, update: GroupUpdate, ready: list[torch.cuda.Event] = ()) -> None:
        rank = self._priority(update) if self._priority is not None else 0
        self._push((0, rank, next(self._numbers), update, list(ready)))

    def close(self) -> None:
        self._push((1, 0, next(self._numbers), None, []))

    def next_pending(self) -> GroupUpdate | None:
        """The update that would start next if the thread took one now (None if none is pending)."""
        with self._cond:
            return self._heap[0][3] if self._heap else None

    def _push(self, item: tuple) -> None:
        with self._cond:
            heapq.heappush(self._heap, item)
            self._cond.notify()

    def _take(self) -> tuple[GroupUpdate | None, list[torch.cuda.Event]]:
        with self._cond:
            while not self._heap:
                self._cond.wait()
            _, _, _, update, ready = heapq.heappop(self._heap)
            return update, ready

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> StepCounters:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._counters

    def _loop(self) -> None:
        try:
            if self._on_start is not None:
                try:
                    self._on_start()
                except Exception:
                    pass  # read-ahead only: each update reads what it needs itself
            while True:
                update, ready = self._take()
                if update is None:
                    return
                if self._error is not None:
                    continue
                try:
                    done = self._run_one(update, ready)
                    for f in fields(StepCounters):
                        setattr(self._counters, f.name, getattr(self._counters, f.name) + getattr(done, f.name))
                except BaseException as e:  # handed to whoever waits
                    self._error = e
        finally:
            if self._at_exit is not None:
                try:
                    self._at_exit()
                except BaseException as e:
                    if self._error is None:
                        self._error = e
