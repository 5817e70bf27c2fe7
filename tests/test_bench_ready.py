"""bench/ready.py at a tiny size (one round of both kinds): both ways reach a ready engine with the same
weights, the records have their fields, the table prints. Behaviour only, not speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the benchmark builds a transformers model")
pytest.importorskip("peft", reason="its LoRA kind needs peft")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "ready.py"


def test_both_ways_to_a_ready_engine_are_recorded(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--rounds", "1", "--sizes", "tiny", "--dir", str(tmp_path),
                          "--out", str(tmp_path / "records")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))["summary"]
    assert set(summary) == {"tiny-full", "tiny-lora"}
    for kind in summary.values():
        assert kind["same_weights"] and kind["ratio"] > 0 and len(kind["per_round"]) == 1
        assert all(kind[way]["ready_s"] > 0 and kind[way]["ru_maxrss_bytes"] > 0 for way in ("load", "pretrained"))
    assert "| tiny lora |" in out.stdout
    record = json.loads((tmp_path / "records" / "ready.json").read_text())
    assert [(r["kind"], r["way"]) for r in record["runs"]] == [("full", "load"), ("full", "pretrained"),
                                                               ("lora", "load"), ("lora", "pretrained")]
    assert not list(tmp_path.glob("swap-*")) and not (tmp_path / "model-tiny").exists()  # (no --keep)
