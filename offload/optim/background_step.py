"""BackgroundStep: one optimizer step running on its own thread, joined at the next synchronisation point."""

from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class BackgroundStep(Generic[T]):
    """Runs ``work()`` on a new thread once ``start()`` is called. ``wait()`` joins it and returns its result,
    or raises the exception it raised. The work's native calls (Adam kernel, I/O waits) release the GIL, so it
    proceeds while the caller's thread runs the next forward. Built and started in two calls so that the
    owner can record the step before its thread exists: a KeyboardInterrupt inside ``start()`` then still
    leaves a step its owner joins."""

    def __init__(self, work: Callable[[], T], name: str = "offload-step") -> None:
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self, work: Callable[[], T]) -> None:
        try:
            self._result = work()
        except BaseException as e:  # handed to whoever waits
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> T:
        if self._thread.ident is None:  # never started (interrupted before): nothing ran
            raise RuntimeError("offload: the optimizer step was interrupted before it started")
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result
