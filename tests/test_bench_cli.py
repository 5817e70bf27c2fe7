"""The `offload` command line, the paired benchmarks of offload/bench/ and the comparison tools of bench/ (run tiny, for
behaviour, not for speed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from offload.bench.adam import Record, markdown_table, summarize
from offload.bench.harness import JsonLines, Ratio, markdown_table as harness_table, paired_ratio, round_order

BENCH = Path(__file__).resolve().parent.parent / "bench"  # the comparison scripts of the source tree


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "offload", *args], capture_output=True, text=True, timeout=timeout)


def test_info_names_the_active_variant():
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    assert "simd=" in out.stdout and "threads=" in out.stdout


def test_no_command_prints_help_and_fails():
    out = run_cli()
    assert out.returncode == 2 and "bench" in out.stdout


def test_the_peer_comparisons_point_to_the_source_tree():
    for what, script in (("gpu", "bench/gpu_peers.py"), ("e2e", "bench/e2e.py")):
        out = run_cli("bench", what, timeout=60)
        assert out.returncode == 2 and script in out.stderr and "source tree" in out.stderr
        assert (BENCH.parent / script).exists()
    out = run_cli("bench", "nothing", timeout=60)
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = run_cli("bench", "--help", timeout=60)
    assert "{adam,io,step}" in out.stdout and "bench/gpu_peers.py" in out.stdout


def test_harness_alternates_the_order_and_pairs_ratios_by_round(tmp_path):
    assert round_order("ABC", 0) == ["A", "B", "C"] and round_order("ABC", 1) == ["C", "B", "A"]
    ratio = paired_ratio({0: 2.0, 1: 3.0, 2: 9.0}, {0: 1.0, 1: 2.0, 3: 1.0})  # round 2 and 3: one side only
    assert ratio == Ratio(1.75, 1.5, 2.0) and ratio.cell() == "1.75 [1.50-2.00]"
    assert paired_ratio({0: 1.0}, {1: 1.0}) is None
    table = harness_table(["what", "a", "b"], [["x", 1, None]], labels=1)
    assert table.splitlines() == ["| what | a | b |", "|---|---:|---:|", "| x | 1 |  |"]
    with pytest.raises(ValueError, match="2 cells under 3 columns"):
        harness_table(["what", "a", "b"], [["x", 1]])
    with JsonLines(str(tmp_path / "r.jsonl")) as out:
        out.write({"round": 0})
        out.write({"round": 1})
    assert [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()] == [{"round": 0},
                                                                                             {"round": 1}]
    with JsonLines(None) as out:  # no --out: nothing written
        out.write({"round": 0})


def test_bench_adam_runs_interleaved_and_prints_json_and_table(tmp_path):
    raw = tmp_path / "raw.jsonl"
    out = run_cli("bench", "adam", "--rounds", "2", "--numel", "200000", "--ntensors", "10", "--threads", "1",
                  "--impls", "ours,ours_optim,torch_fused", "--steps", "2", "--out", str(raw))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    # 2 shapes x 2 gradient dtypes x 2 copy modes at 1 thread; each with both implementations and their ratio.
    assert len(rows) == 8
    for row in rows:
        assert row["ours"] > 0 and row["torch_fused"] > 0 and "ours/torch_fused" in row
    assert sum("ours_optim/torch_fused" in row for row in rows) == 2  # CPUAdam: fp32 grads, no copy only
    assert "| shape | grads | bf16 copy | threads |" in out.stdout
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    assert {r["round"] for r in records} == {0, 1}
    # Rounds alternate the order of the implementations.
    assert "round 1/2 threads=1 ours:" in out.stderr and "round 2/2 threads=1 torch_fused:" in out.stderr


def test_summary_takes_medians_of_per_round_ratios():
    def rec(impl, rnd, mps):
        return Record(impl=impl, threads=1, shape="flat", grad="fp32", write="none", round=rnd, mparam_s=mps,
                      roofline_gbs=56.0)

    # Ours is 10% faster than the baseline in every round, while both drift by 2x between rounds.
    records = [rec("ours", 0, 1100), rec("base", 0, 1000), rec("ours", 1, 2200), rec("base", 1, 2000),
               rec("ours", 2, 1650), rec("base", 2, 1500)]
    (row,) = summarize(records, [("ours", "base")])
    assert row["ours/base"] == 1.1 and row["ours/base range"] == [1.1, 1.1]
    assert row["ours"] == 1650 and row["base"] == 1500
    assert row["ours/roofline"] == round(1650 * 28 / 1e3 / 56.0, 3)
    table = markdown_table([row], ["ours", "base"], [("ours", "base")])
    assert "1.10 [1.10-1.10]" in table


def test_bench_io_runs_ours_and_removes_its_files(tmp_path):
    out = run_cli("bench", "io", "--dir", str(tmp_path), "--size", "8MiB", "--rounds", "2", "--impls", "ours")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [row["op"] for row in rows] == ["write", "read"] and all(row["ours"] > 0 for row in rows)
    assert "| op | ours GB/s (best config) |" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_bench_io_summary_compares_best_configs_within_rounds():
    from offload.bench.io import summarize

    records = []
    for rnd, scale in ((0, 1.0), (1, 2.0)):  # the disk doubles its speed between rounds; ratios do not move
        records += [dict(impl="ours", op="read", config="a", gbs=1.0 * scale, round=rnd),
                    dict(impl="ours", op="read", config="b", gbs=2.2 * scale, round=rnd),
                    dict(impl="ds", op="read", config="x", gbs=2.0 * scale, round=rnd)]
    (read,) = [row for row in summarize(records, ["ours", "ds"]) if row["op"] == "read"]
    assert read["ours/ds"] == 1.1 and read["ours/ds range"] == [1.1, 1.1]
    assert read["ours best config"] == "b"


def test_bench_step_optimizer_alone_reports_the_floor(tmp_path):
    out = run_cli("bench", "step", "--numel", str(4096 * 4096), "--rounds", "1", "--placements", "cpu,nvme",
                  "--dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    rounds = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"kind": "round"')]
    assert {r["placement"] for r in rounds} == {"cpu", "nvme"}
    nvme = next(r for r in rounds if r["placement"] == "nvme")
    assert nvme["bytes_read"] == nvme["bytes_written"] > 0 and nvme["floor_s"] > 0 and nvme["ratio"] > 0
    assert "step/floor" in out.stdout
    assert not any(p.name.startswith("offload-swap-") for p in tmp_path.iterdir())


def test_bench_step_with_offloaded_parameters(tmp_path):
    out = run_cli("bench", "step", "--params", "nvme", "--optimizer", "nvme", "--layers", "2", "--hidden", "64",
                  "--tokens", "32", "--steps", "1", "--rounds", "1", "--dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    record = json.loads(next(line for line in out.stdout.splitlines() if line.startswith('{"round"')))
    assert record["offload"]["nvme_bytes"] > 0 and record["compute"]["nvme_bytes"] == 0
    assert record["offload"]["device_peak"] <= record["offload"]["device_limit"]
    assert record["ratio"] > 0 and "offload / max(compute, I/O)" in out.stdout
    assert list(tmp_path.iterdir()) == []  # the runs' swap directories are gone, and nothing else was made


def test_ab_adam_builds_tool_alternates_two_builds_beside_a_busy_process(tmp_path):
    raw = tmp_path / "ab.jsonl"
    out = subprocess.run([sys.executable, str(BENCH / "ab_adam_builds.py"), "--baseline-python", sys.executable,
                          "--rounds", "2", "--threads", "1", "--numel", "100000", "--steps", "2", "--busy", "1",
                          "--out", str(raw)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    assert {(r["build"], r["write"], r["round"]) for r in records} == \
        {(b, w, n) for b in ("this", "baseline") for w in ("none", "bf16") for n in (0, 1)}
    assert all(r["busy"] == 1 and r["mparam_s"] > 0 for r in records)
    assert "bf16 copy=none this/baseline" in out.stdout and "bf16 copy=bf16 this/baseline" in out.stdout
    bad = subprocess.run([sys.executable, str(BENCH / "ab_adam_builds.py"), "--baseline-python", sys.executable,
                          "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--rounds" in bad.stderr


def test_step_timeline_tool_writes_a_chrome_trace(tmp_path):
    trace = tmp_path / "trace.json"
    out = subprocess.run([sys.executable, str(BENCH / "step_timeline.py"), "--layers", "2", "--hidden", "64",
                          "--seq", "16", "--steps", "2", "--dir", str(tmp_path), "--out", str(trace)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    assert {"compute", "adam", "nvme read", "nvme write"} <= {e.get("cat") for e in events}
    assert any(e["ph"] == "C" and e["name"] == "CPU cores" for e in events)
    assert "1 timed steps" in out.stdout and "whole step" in out.stdout and "forward: compute" in out.stdout


def test_scale_check_tool_trains_with_the_state_over_budget(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "scale_check.py"), "--dir", str(tmp_path), "--hidden",
                          "256", "--layers", "4", "--vocab", "1000", "--tokens", "16", "--steps", "2",
                          "--budget-ratio", "1.1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # (a model this small cannot go to 4x: the staging buffers alone would not fit; README has the 4x run)
    assert report["state_over_budget"] == 1.1
    assert report["host_bytes_peak"] <= report["host_memory_limit"]
    assert report["losses"][1] < report["losses"][0]


def test_bench_e2e_runs_every_offload_mode_against_torch_and_reports(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "e2e.jsonl"
    done = subprocess.run([sys.executable, str(BENCH / "e2e.py"), "--sizes", "tiny", "--dtypes", "fp32",
                           "--rounds", "1", "--warmup", "1", "--steps", "2", "--dir", str(tmp_path),
                           "--modes", "torch,ours-cpu,ours-nvme,ours-inf", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in records] == ["torch", "ours-cpu", "ours-nvme", "ours-inf"]
    for r in records:
        assert r["step_s"] > 0 and r["peak_rss_bytes"] > 0 and len(r["losses"]) == 3
    assert records[3]["written_bytes_per_step"] > 0  # params and state on NVMe: the disk is written every step
    assert "| tiny | fp32 | ours-inf | 1 |" in done.stdout and "ours-cpu step / torch = " in done.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["e2e.jsonl"]  # the swap directories are gone
    refused = subprocess.run([sys.executable, str(BENCH / "e2e.py"), "--modes", "ds-nvme"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--ds-python" in refused.stderr
