"""SIGTERM and SIGHUP unwind a process that uses the engine like SIGINT does: its swap files are removed, the exit
code is the shell's for the signal, and a handler the program installed itself is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    import offload
    {setup}
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    engine = offload.Engine(model, offload.Config(device="cpu", dtype="fp32", optimizer="nvme", nvme_dir=sys.argv[1]))
    print(engine.swap.run_dir, flush=True)
    while True:
        engine.backward(engine(torch.randn(4, 64)).sum())
        engine.step()
        time.sleep(0.01)
""")


def _start(tmp_path, setup: str = "", signum: int = signal.SIGTERM) -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen([sys.executable, "-c", SCRIPT.format(setup=setup), str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    run_dir = child.stdout.readline().strip()
    assert os.path.isdir(run_dir), child.stderr.read()
    return child, run_dir


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_the_signal_removes_the_swap_files_and_exits_with_its_code(tmp_path, signum):
    child, run_dir = _start(tmp_path, signum=signum)
    child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signum, err[-2000:]
    assert not os.path.exists(run_dir) and list(tmp_path.iterdir()) == []


def test_a_handler_of_the_program_is_kept(tmp_path):
    setup = "signal.signal(signal.SIGTERM, lambda *a: (print('own handler', flush=True), os._exit(7)))"
    child, run_dir = _start(tmp_path, setup)
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 7 and "own handler" in out
    assert os.path.isdir(run_dir)  # the program chose to exit at once; the next run (or offload clean) removes it
    from offload.storage.swap_store import clean_stale_runs

    assert [str(p) for p in clean_stale_runs(tmp_path)] == [run_dir]
