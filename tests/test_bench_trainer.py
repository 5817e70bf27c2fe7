"""bench/trainer.py at a tiny size (a 2-layer model, one round of two measured steps) and its pool command: the
records have their fields, both loops train the same rows to the same losses, the table prints. Behaviour
only, not speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the benchmark trains a transformers model")
pytest.importorskip("accelerate", reason="OffloadTrainer needs accelerate")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "trainer.py"


def run_bench(*args):
    out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")], out.stdout


def test_step_and_pool(tmp_path):
    lines, stdout = run_bench("step", "--size", "tiny", "--rounds", "1", "--warmup", "1", "--steps", "2", "--seq",
                              "32", "--dir", str(tmp_path), "--out", str(tmp_path / "records"))
    runs, summary = lines[:-1], lines[-1]
    assert [r["mode"] for r in runs] == ["trainer", "engine"]
    assert all(len(r["cycle_s"]) == 2 and r["step_s_median"] > 0 for r in runs)
    assert summary["losses_equal_in_every_run"] and summary["ratio_trainer_over_engine"] > 0
    assert "| OffloadTrainer |" in stdout and "OffloadTrainer / engine over 1 rounds" in stdout
    record = tmp_path / "records" / "trainer.json"
    assert len(json.loads(record.read_text())["runs"]) == 2
    assert "command: `python3 bench/trainer.py step" in (tmp_path / "records" / "trainer.md").read_text()
    assert not list(tmp_path.glob("swap-*"))  # the swap directories are removed
    again = tmp_path / "again.json"
    again.write_text(record.read_text())  # (rounds are told apart by their record)
    lines, stdout = run_bench("pool", str(record), str(again), "--out", str(tmp_path / "pooled"))
    assert "over 2 rounds" in stdout and lines[-1]["pooled"] == [str(record), str(again)]
    assert (tmp_path / "pooled" / "pooled.md").is_file()
