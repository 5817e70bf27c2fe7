"""bench/finetune.py at a tiny size (a 2-layer model, a few MB of JSONL, one round of one measured step): the
records have their fields and the table prints. Behaviour only, not speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "finetune.py"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("finetune-bench")  # shared: the tiny model directory is made once


def run_bench(*args, timeout=120):
    out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return lines, out.stdout


def test_step_compares_the_cli_with_the_worker(scratch):
    lines, stdout = run_bench("step", "--size", "tiny", "--rounds", "1", "--warmup", "1", "--steps", "1", "--seq",
                              "64", "--dir", str(scratch), "--out", str(scratch / "records"))
    runs, summary = lines[:-1], lines[-1]
    assert [r["mode"] for r in runs] == ["cli", "worker"]
    for run in runs:
        assert run["step_s_median"] > 0 and len(run["step_s"]) == 1 and len(run["cycle_s"]) == 1
        assert len(run["losses"]) == 2
    assert summary["bench"] == "finetune-step" and summary["failed"] == 0
    assert summary["summary"]["ratio_cli_over_worker"] > 0 and len(summary["summary"]["per_round_ratio"]) == 1
    assert "| mode | runs |" in stdout and "CLI / worker s/step" in stdout
    record = json.loads((scratch / "records" / "step.json").read_text())
    assert len(record["runs"]) == 2 and record["machine"]["cores"] >= 1
    assert "command: `python3 bench/finetune.py step" in (scratch / "records" / "step.md").read_text()
    assert not list(scratch.glob("swap-*"))  # the swap directories are removed


def test_tokenize_reports_speed_memory_and_the_cache_hit(scratch):
    lines, stdout = run_bench("tokenize", "--size", "tiny", "--mb", "3", "--dir", str(scratch))
    result = lines[-1]
    assert result["bench"] == "finetune-tokenize"
    assert result["bytes"] >= 3e6 and result["tokens"] > 0 and result["mb_per_s"] > 0 and result["tokens_per_s"] > 0
    assert set(result["records"]) == {"text", "prompt_completion"}
    assert 0 < result["trained"] < result["tokens"]  # prompts are not trained
    assert result["rss_growth_bytes"] >= 0 and result["cache_hit"] and result["same_tokens"]
    assert "| MB | tokens |" in stdout
    assert not (scratch / "tokenize").exists()  # the 3 MB file and its cache are removed
