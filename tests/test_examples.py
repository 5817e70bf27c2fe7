"""The examples in examples/ run as their docstrings say and write a model directory transformers loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the examples fine-tune a transformers model")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script, extra", [
    ("plain_loop.py", []),
    pytest.param("hf_trainer.py", ["--run-dir", "run"], marks=pytest.mark.skipif(
        __import__("importlib").util.find_spec("accelerate") is None, reason="the Trainer needs accelerate")),
])
def test_an_example_fine_tunes_and_writes_a_model(script, extra, tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--steps", "3", "--seq-len", "64",
                           "--nvme-dir", str(tmp_path / "swap"), "--out", str(tmp_path / "out"), *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[72, 101, 108, 108, 111]])).logits).all()
    assert not [p for p in (tmp_path / "swap").rglob("*") if p.is_file()]  # close() removed the swap files
