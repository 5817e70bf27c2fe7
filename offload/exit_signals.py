"""SIGTERM and SIGHUP become an orderly exit, as SIGINT already is, so that a job stopped by a scheduler (Slurm,
Kubernetes and systemd stop jobs with SIGTERM) or by a closed terminal removes its swap files.

Note [termination signals]: by default SIGTERM and SIGHUP end a Python process at once, skipping ``finally``
blocks, ``atexit`` hooks and finalizers, so every swap file of the run (as large as the training state) stays on
disk. ``terminate_on_signals`` replaces only the *default* action: a handler installed by the program or a
framework is kept, and so is an ignored signal. The handler does no work of its own: Python runs it in the
main thread between two bytecodes, and it raises :class:`Terminated` (a ``SystemExit`` with the shell's code
for a signal, 128 + its number), exactly how the default SIGINT handler raises KeyboardInterrupt. The stack
unwinds through the engine's ``close`` and the swap store's finalizers like any other exit. A second signal
while unwinding raises again at the next bytecode; SIGKILL cannot be caught, which is what the ownership lock
of the swap directories covers (Note [ownership by lock]).
"""

from __future__ import annotations

import signal
import threading

_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM or SIGHUP arrives; ``code`` is 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def terminate_on_signals() -> None:
    """Makes SIGTERM and SIGHUP raise :class:`Terminated` in the main thread where their action is still the
    default. Idempotent; does nothing outside the main thread (Python delivers signals to the main thread
    only, and only it may install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _raise_terminated)
