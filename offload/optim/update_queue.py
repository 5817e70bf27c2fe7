"""UpdateQueue: group updates handed over one by one during backward, run in order on one thread."""

from __future__ import annotations

import queue
import threading
from dataclasses import fields
from typing import Callable

import torch

from offload.optim.group_stepper import GroupUpdate, StepCounters


class UpdateQueue:
    """Runs ``run_one(update, ready)`` for each submitted update, in submission order, on its own thread;
    ``ready`` are the events (CUDA gradient copies) that must complete before the update reads its gradients,
    which ``run_one`` waits for (so that its own error handling covers a failed wait too). After
    ``close()`` (no more updates), ``wait()`` joins the thread and returns the summed counters, or raises the
    first error; updates submitted after a failure are dropped (the engine is failed by then). ``wait()`` has
    BackgroundStep's meaning, so the engine joins either kind of step the same way."""

    def __init__(self, run_one: Callable[[GroupUpdate, list[torch.cuda.Event]], StepCounters],
                 name: str = "offload-step", on_start: Callable[[], None] | None = None,
                 at_exit: Callable[[], None] | None = None) -> None:
        """``on_start()`` runs on the queue's thread before the first update (the engine's state read-ahead); an
        error there is ignored, as no update depends on it. ``at_exit()`` runs on the thread when it ends, however
        it ends."""
        self._run_one = run_one
        self._on_start = on_start
        self._at_exit = at_exit
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._counters = StepCounters()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, update: GroupUpdate, ready: list[torch.cuda.Event] = ()) -> None:
        self._items.put((update, list(ready)))

    def close(self) -> None:
        self._items.put(None)

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
                item = self._items.get()
                if item is None:
                    return
                if self._error is not None:
                    continue
                update, ready = item
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
