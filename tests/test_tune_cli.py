"""`offload tune`: sweeps the swap directory, writes the best [io] settings, leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys

import offload
from offload.storage.io_engine import resolve_backend


def _tune(*flags):
    return subprocess.run([sys.executable, "-m", "offload", "tune", *flags], capture_output=True, text=True,
                          timeout=600)


def test_tune_writes_the_best_io_settings_and_keeps_the_rest(tmp_path):
    swap = tmp_path / "swap"
    swap.mkdir()
    out = tmp_path / "offload.toml"
    out.write_text('optimizer = "nvme"\nnvme_dir = "/data/swap"\nhost_memory_limit = "8GiB"\n')
    done = _tune("--dir", str(swap), "--size", "64MiB", "--rounds", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(swap.iterdir()) == []
    result = json.loads(done.stdout.strip().splitlines()[-1])
    config = offload.Config.from_file(out)
    assert config.io == offload.IOConfig(**result["best"])  # what Config.from_file reads is what was measured
    assert (config.optimizer, config.nvme_dir, config.host_memory_limit) == ("nvme", "/data/swap", 8 << 30)
    assert "device" not in out.read_text()  # left to be chosen where the config is used
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "GB/s" not in line]
    backends = 2 if resolve_backend("auto") == "io_uring" else 1
    # 4 block sizes x 4 in-flight settings x the backends with O_DIRECT, and buffered at the best one
    assert len(rows) == 16 * backends + 1
    assert result["write_gbs"] > 0 and result["read_gbs"] > 0


def test_tune_errors_are_one_line(tmp_path):
    done = _tune("--dir", str(tmp_path / "missing"))
    assert done.returncode == 1 and done.stderr.strip().startswith("offload tune: error: [Errno 2] --dir:")
    done = _tune("--dir", str(tmp_path), "--size", "1MiB")
    assert done.returncode == 1 and "--size: must be a multiple of 16 MiB" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
