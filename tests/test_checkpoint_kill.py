"""kill -9 at random moments during saves: every time, the newest complete checkpoint loads and resumes exactly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import offload
from checkpoint_child import make_engine, train_step
from engine_reference import batches

CHILD = Path(__file__).parent / "checkpoint_child.py"
STEPS = 12
DEFAULT_TRIALS = 3
SLOW_TRIALS = 20
PLACEMENTS = ["device/cpu", "nvme/nvme"]


def _reference(placement: str, swap_dir: Path) -> dict[str, torch.Tensor]:
    with make_engine(str(swap_dir), placement) as engine:
        for step in batches("mlp", STEPS, micro=1):
            train_step(engine, step)
        return engine.state_dict()


_REFERENCE: dict[str, dict[str, torch.Tensor]] = {}


def _kill_during_a_save(ckpt: Path, swap_dir: Path, placement: str, rng: random.Random) -> tuple[int, int]:
    """Runs the child and kills it with SIGKILL a random time (0-20 ms) after it announced a randomly chosen
    save (the child spends most of its time saving). Returns (the last save it reported complete, the last
    save it started)."""
    target = rng.randint(1, STEPS // 2)
    child = subprocess.Popen([sys.executable, str(CHILD), str(ckpt), str(swap_dir), str(STEPS), placement],
                             stdout=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in child.stdout:
            seen.append(line)
            if line.split() == ["saving", str(target)]:
                time.sleep(rng.uniform(0.0, 0.02))
                break
        os.kill(child.pid, signal.SIGKILL)
        output = "".join(seen) + child.stdout.read()  # everything it printed before it died
    finally:
        child.kill()
        child.wait()
    completed = max([int(k) for word, k in map(str.split, output.splitlines()) if word == "saved"], default=0)
    started = max(int(k) for word, k in map(str.split, output.splitlines()) if word == "saving")
    return completed, started


def _trial(tmp_path: Path, trial: int, placement: str) -> None:
    rng = random.Random(1000 + trial)
    ckpt, swap_dir = tmp_path / "ckpt", tmp_path / "swap"
    if placement not in _REFERENCE:
        _REFERENCE[placement] = _reference(placement, tmp_path / "ref-swap")
    completed, started = _kill_during_a_save(ckpt, swap_dir, placement, rng)
    have_checkpoint = (ckpt / "CURRENT").exists()
    # Resuming starts from another initialisation (the checkpoint must supply everything); starting over (killed
    # in the first save) from the same one.
    seed = 99 if have_checkpoint else 0
    with make_engine(str(swap_dir), placement, seed=seed) as engine:  # also cleans the dead child's swap files
        leftovers = [p for p in swap_dir.glob("*") if str(os.getpid()) not in p.name]
        assert leftovers == [], leftovers
        if not have_checkpoint:
            assert completed == 0
            with pytest.raises(offload.CheckpointError):
                engine.load(ckpt)
            resumed_from = 0
        else:
            resumed_from = engine.load(ckpt)["step"]
            # the newest complete save: the last one reported, or the one that was killed after its commit
            assert resumed_from in (completed, started)
        for step in batches("mlp", STEPS, micro=1)[resumed_from:]:
            train_step(engine, step)
        state = engine.state_dict()
    reference = _REFERENCE[placement]
    differ = [k for k in reference if not torch.equal(state[k], reference[k])]
    assert not differ, (f"{placement}: killed after save {completed} in save {started}, resumed from "
                        f"{resumed_from}; differ: {differ}")


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("trial", range(DEFAULT_TRIALS))
def test_kill_during_save_resumes_exactly(tmp_path, trial, placement):
    _trial(tmp_path, trial, placement)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(DEFAULT_TRIALS, SLOW_TRIALS))
def test_kill_during_save_resumes_exactly_many_times(tmp_path, trial):
    _trial(tmp_path, trial, PLACEMENTS[trial % 2])
