"""The nightly GPU script's judgement, which runs on CPU: metrics, the disk probe, the comparison."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("nightly_gpu", Path(__file__).parent.parent / "bench" / "nightly_gpu.py")
nightly = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nightly)


def _bench(nvme_step_s: float) -> dict:
    mode = {"gpu_peak_bytes": 100, "loss_last": 10.0, "per_step": {}}
    return {"peak_rss_bytes": 1000, "disk": {"read_gbs": 2.0, "write_gbs": 1.0},
            "modes": {"torch": dict(mode, tokens_per_s=1000.0, step_s=0.1),
                      "opt-cpu": dict(mode, tokens_per_s=500.0, step_s=0.2),
                      "nvme": dict(mode, tokens_per_s=10.0, step_s=nvme_step_s,
                                   per_step={"nvme_read_bytes": 2e9, "nvme_written_bytes": 1e9})}}


def test_nvme_modes_are_judged_by_the_disk_and_the_others_by_torch():
    metrics = nightly.metrics_of({"b": _bench(nvme_step_s=4.0)})
    # 2 GB at 2 GB/s + 1 GB at 1 GB/s = 2 s of disk time in a 4 s step
    assert metrics["b/nvme/disk_efficiency"] == pytest.approx(0.5)
    assert "b/nvme/tokens_per_s_vs_torch" not in metrics
    assert metrics["b/opt-cpu/tokens_per_s_vs_torch"] == pytest.approx(0.5)
    assert "b/torch/tokens_per_s_vs_torch" not in metrics  # the yardstick itself


def test_comparison_flags_a_slower_disk_step_and_a_missing_metric_only():
    baseline = nightly.metrics_of({"b": _bench(nvme_step_s=4.0)})
    def judged(step_s: float) -> dict:
        return {r["metric"]: r for r in nightly.compare(nightly.metrics_of({"b": _bench(step_s)}), baseline, {"b"})}

    rows = judged(4.4)
    assert all(r["ok"] for r in rows.values())  # 10% slower: within the 15% tolerance
    rows = judged(5.0)
    assert not rows["b/nvme/disk_efficiency"]["ok"]
    assert [m for m, r in rows.items() if not r["ok"]] == ["b/nvme/disk_efficiency"]
    rows = nightly.compare({}, {"b/nvme/disk_efficiency": 1.0}, {"b"})
    assert rows[0]["why"] == "missing" and not rows[0]["ok"]
    assert nightly.compare({}, {"other/nvme/disk_efficiency": 1.0}, {"b"}) == []  # a bench that did not run


def test_disk_probe_measures_and_cleans_up(tmp_path):
    disk = nightly.disk_probe(str(tmp_path), rounds=2, nbytes=16 << 20)
    assert disk["write_gbs"] > 0 and disk["read_gbs"] > 0 and disk["rounds"] == 2
    assert list(tmp_path.iterdir()) == []
