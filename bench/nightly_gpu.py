#!/usr/bin/env python3
"""Nightly GPU regression run: GPU tests, bench/gpu_peers.py on a fixed set, compared with stored baselines.

Steps (each runs even if an earlier one failed, so one report shows everything):
1. install (unless --no-install): ``pip install -e .[test]``; with --offline ``--no-build-isolation --no-deps``
   (a machine without network that already has torch, transformers, scikit-build-core and nanobind);
2. the GPU-marked tests (``pytest -m gpu``); what they measure (peak device bytes, fetch/kernel overlap) goes
   into the report;
3. the benchmarks in BENCHES, each ``python bench/gpu_peers.py ... --json``;
4. every metric against the baseline of this device (bench/baselines/nightly-gpu.json, keyed by device name):
   offload's tokens/s relative to plain torch in the same run (machines of one kind differ by up to 1.5x, the
   ratio much less) may not fall below (1 - tolerance) x baseline; peak GPU memory and peak RSS may not rise
   above (1 + tolerance) x baseline; the loss after the run may not move by more than its absolute tolerance.
   A mode that keeps state on NVMe is bound by the disk, which differs between machines of one kind far more
   than the GPU does (the same H200 kind: 1.9 and 2.3 s per step), so its speed is judged by ``disk_efficiency``
   instead: the seconds its NVMe bytes per step take at the speed of the disk measured just before the
   benchmark (1 GiB written and read back with offload's I/O engine, median of 3), over the step's seconds.
Writes REPORT_DIR/nightly-gpu-<device>-<date>.json and .md (by default in the work directory, a temporary one
unless --work-dir; a report worth keeping goes to bench/results/ by hand, with its line in INDEX.md). Exits 1 on a
failed test or regression, or when there is no baseline for this device; the baseline file changes only with
--update-baseline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "bench" / "baselines" / "nightly-gpu.json"  # the only stored data any code reads
GPU_PEERS = ROOT / "bench" / "gpu_peers.py"

# name -> arguments of bench/gpu_peers.py. The first is the comparison (and the "10x the device limit" run:
# params-cpu trains with device_memory_limit a tenth of its weights); the second keeps the NVMe path honest
# (a quarter: its 32000 x 1024 embedding alone is more than a tenth of 8 layers).
BENCHES = {
    "llama368m": ["--modes", "torch,torchao,opt-cpu,params-cpu", "--rounds", "5", "--steps", "3"],
    "llama166m-nvme": ["--modes", "torch,nvme", "--layers", "8", "--shrink", "4", "--rounds", "3", "--steps", "2"],
}
# Relative tolerances, except the loss's (absolute: 16 steps at lr 1e-4 lower it by about 0.02, a step that
# updates nothing shows as that much; GPU nondeterminism moves it by about 1e-4).
TOLERANCE = {"tokens_per_s_vs_torch": 0.15, "disk_efficiency": 0.15, "gpu_peak_bytes": 0.10, "peak_rss_bytes": 0.15,
             "loss_last": 0.005}
HIGHER_IS_BETTER = {"tokens_per_s_vs_torch", "disk_efficiency"}
NVME_MODES = {"nvme"}  # bench gpu modes whose speed the disk bounds
PEERS = {"torch", "torchao"}  # tracked for memory and loss only: their speed is the yardstick


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-install", action="store_true", help="use the offload already installed")
    ap.add_argument("--offline", action="store_true", help="install without network (no build isolation, no deps)")
    ap.add_argument("--report-dir", default=None, help="where the report goes (default: the work directory)")
    ap.add_argument("--nvme-dir", default=None, help="swap directory for the NVMe benchmark (default: a temp dir)")
    ap.add_argument("--update-baseline", action="store_true",
                    help="store this run's metrics as the baseline (also after regressions: the explicit way to "
                         "accept them; not after failed tests or benchmarks)")
    ap.add_argument("--work-dir", default=None, help="keep the raw results here (default: a new temporary directory)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    return ap.parse_args()


def run(cmd: list[str], log: list[str], env: dict | None = None, timeout: float = 1800) -> tuple[int, str]:
    """Runs ``cmd`` in the repo root, echoing its output; returns (exit status, output)."""
    print("+ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s", 124
    print(out, flush=True)
    log.append(f"$ {' '.join(cmd)}  (exit {rc}, {time.perf_counter() - start:.0f} s)")
    return rc, out


def install(a: argparse.Namespace, log: list[str]) -> int:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-e"]
    cmd += [".", "--no-build-isolation", "--no-deps"] if a.offline else [".[test]"]
    return run(cmd, log)[0]


def gpu_tests(log: list[str], measured_path: Path) -> dict:
    env = dict(os.environ, OFFLOAD_GPU_REPORT=str(measured_path))
    measured_path.unlink(missing_ok=True)  # the tests append; a reused --work-dir must not mix in an old run
    rc, out = run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "--tb=short", "-p", "no:cacheprovider",
                   "tests"], log, env)
    summary = next((line for line in reversed(out.splitlines())
                    if re.search(r"\d+ (passed|failed|errors?|skipped)", line)), "")
    failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    measured = [json.loads(line) for line in measured_path.read_text().splitlines()] if measured_path.exists() else []
    return {"exit": rc, "summary": summary.strip("= "), "failed": failed, "measured": measured}


def disk_probe(directory: str, rounds: int = 3, nbytes: int = 1 << 30) -> dict:
    """Median (write GB/s, read GB/s) of ``rounds`` passes of ``nbytes`` through offload's I/O engine with the
    default IOConfig, in ``directory`` (where the NVMe benchmark's swap files go)."""
    import statistics

    from offload.cli.tune import measure_throughput
    from offload.config import IOConfig
    from offload.storage import HostPool, IoEngine

    pool = HostPool()
    try:
        buffer = pool.allocate(nbytes, "nightly-disk-probe")
        buffer.tensor.random_(0, 256)
        path = Path(directory) / f"offload-nightly-probe-{os.getpid()}.bin"
        passes = [measure_throughput(path, buffer.tensor, IOConfig(), IoEngine) for _ in range(rounds)]
    finally:
        pool.close()
    return {"write_gbs": statistics.median(w for w, _ in passes), "read_gbs": statistics.median(r for _, r in passes),
            "bytes": nbytes, "rounds": rounds, "directory": directory}


def benches(a: argparse.Namespace, log: list[str], workdir: Path) -> dict:
    results = {}
    for name, args in BENCHES.items():
        out_json = workdir / f"{name}.json"
        extra = ["--dir", a.nvme_dir] if a.nvme_dir and "nvme" in name else []
        disk = None
        if "nvme" in name:  # the same file system as the bench's swap files (its default is a temp dir)
            disk = disk_probe(a.nvme_dir or tempfile.gettempdir())
            print(f"disk: write {disk['write_gbs']:.2f} GB/s, read {disk['read_gbs']:.2f} GB/s", flush=True)
        rc, out = run([sys.executable, str(GPU_PEERS), *args, *extra, "--json", str(out_json)], log)
        results[name] = json.loads(out_json.read_text()) if rc == 0 and out_json.exists() else {"exit": rc,
                                                                                               "tail": out[-2000:]}
        if disk:
            results[name]["disk"] = disk
    return results


def disk_efficiency(mode: dict, disk: dict) -> float:
    """Seconds the mode's NVMe bytes per step take at the probed disk speed, over its seconds per step."""
    per_step = mode["per_step"]
    disk_s = (per_step["nvme_read_bytes"] / (disk["read_gbs"] * 1e9)
              + per_step["nvme_written_bytes"] / (disk["write_gbs"] * 1e9))
    return disk_s / mode["step_s"]


def metrics_of(results: dict) -> dict[str, float]:
    """Flat ``bench/mode/metric`` -> value."""
    flat = {}
    for name, r in results.items():
        if "modes" not in r:
            continue
        flat[f"{name}/peak_rss_bytes"] = r["peak_rss_bytes"]
        torch_speed = r["modes"].get("torch", {}).get("tokens_per_s")
        for mode, m in r["modes"].items():
            for key in ("gpu_peak_bytes", "loss_last"):
                flat[f"{name}/{mode}/{key}"] = m[key]
            if mode in NVME_MODES and "disk" in r:
                flat[f"{name}/{mode}/disk_efficiency"] = disk_efficiency(m, r["disk"])
            elif torch_speed and mode not in PEERS:
                flat[f"{name}/{mode}/tokens_per_s_vs_torch"] = m["tokens_per_s"] / torch_speed
    return flat


def compare(current: dict[str, float], baseline: dict[str, float], benches_run: set[str]) -> list[dict]:
    """One row per baseline metric of a benchmark that ran (a metric it no longer produces is a failure)."""
    rows = []
    for key, base in baseline.items():
        metric = key.rsplit("/", 1)[1]
        if key.split("/", 1)[0] not in benches_run or metric not in TOLERANCE:
            continue
        tol = TOLERANCE[metric]
        now = current.get(key)
        if now is None:
            rows.append({"metric": key, "baseline": base, "now": None, "ok": False, "why": "missing"})
            continue
        if metric in HIGHER_IS_BETTER:
            ok = now >= (1 - tol) * base
        elif metric == "loss_last":
            ok = abs(now - base) <= tol
        else:
            ok = now <= (1 + tol) * base
        rows.append({"metric": key, "baseline": base, "now": now, "ok": ok, "ratio": now / base if base else None})
    return rows


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "no-cuda"
    except Exception:  # torch broken: the report says so
        return "unknown"


def markdown(report: dict) -> str:
    lines = [f"# Nightly GPU run, {report['date']}, {report['device']}", "",
             f"Result: **{'PASS' if report['passed'] else 'FAIL'}** ({'; '.join(report['problems']) or 'no problems'})",
             "", f"GPU tests: {report['tests'].get('summary', 'not run')}", ""]
    for failure in report["tests"].get("failed", []):
        lines.append(f"- {failure}")
    measured = report["tests"].get("measured", [])
    if measured:
        lines += ["", "Measured by the GPU tests:", ""]
        lines += [f"- `{json.dumps(m)}`" for m in measured]
    for name, r in report["bench"].items():
        lines += ["", f"## bench {name}", ""]
        if "modes" not in r:
            lines.append(f"failed (exit {r.get('exit')}):\n\n```\n{r.get('tail', '')}\n```")
            continue
        lines.append(f"{r['params'] / 1e6:.0f}M parameters, {r['batch']}x{r['seq']} tokens/step, {r['rounds']} "
                     f"rounds x {r['steps']} steps, interleaved, medians; process peak RSS "
                     f"{r['peak_rss_bytes'] / 2**30:.1f} GiB")
        if "disk" in r:
            lines.append(f"\nDisk just before ({r['disk']['directory']}): write {r['disk']['write_gbs']:.2f} GB/s, "
                         f"read {r['disk']['read_gbs']:.2f} GB/s (offload's I/O engine, 1 GiB, median of 3)")
        lines += ["", "| mode | s/step | tokens/s | vs torchao | GPU peak GiB | host pool GiB | device limit MiB | "
                      "loss first -> last |", "|---|---|---|---|---|---|---|---|"]
        ref = r["modes"].get("torchao")
        for mode, m in r["modes"].items():
            vs = f"{m['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
            pool = f"{m['host_pool_peak_bytes'] / 2**30:.2f}" if m["host_pool_peak_bytes"] is not None else "-"
            limit = f"{m['device_memory_limit'] / 2**20:.0f}" if m["device_memory_limit"] else "-"
            lines.append(f"| {mode} | {m['step_s']:.3f} | {m['tokens_per_s']:.0f} | {vs} | "
                         f"{m['gpu_peak_bytes'] / 2**30:.2f} | {pool} | {limit} | "
                         f"{m['loss_first']:.4f} -> {m['loss_last']:.4f} |")
        for mode, m in r["modes"].items():
            if mode in NVME_MODES and "disk" in r:
                lines.append(f"\n{mode}: {m['per_step']['nvme_read_bytes'] / 1e9:.2f} GB read + "
                             f"{m['per_step']['nvme_written_bytes'] / 1e9:.2f} GB written per step; disk efficiency "
                             f"{disk_efficiency(m, r['disk']):.2f} (1.00: the step takes only what its bytes need)")
    if report["comparison"]:
        lines += ["", "## Against the baseline", "", "| metric | baseline | now | ratio | ok |",
                  "|---|---|---|---|---|"]
        for row in report["comparison"]:
            ratio = f"{row['ratio']:.3f}" if row.get("ratio") else "-"
            now = "None" if row["now"] is None else format(row["now"], ".6g")
            lines.append(f"| {row['metric']} | {row['baseline']:.6g} | {now} "
                         f"| {ratio} | {'yes' if row['ok'] else '**no**'} |")
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in report["log"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    a = parse_args()
    log: list[str] = []
    problems = []
    if not a.no_install and install(a, log) != 0:
        problems.append("install failed")
    device = device_name()
    workdir = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="offload-nightly-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tests = {} if a.skip_tests else gpu_tests(log, workdir / "measured.jsonl")
    if tests and tests["exit"] != 0:
        problems.append(f"GPU tests failed ({tests['summary']})")
    if tests and re.search(r"\bskipped\b", tests["summary"]) and not re.search(r"\bpassed\b", tests["summary"]):
        problems.append("every GPU test skipped")
    bench = {} if a.skip_bench else benches(a, log, workdir)
    problems += [f"bench {name} failed" for name, r in bench.items() if "modes" not in r]
    current = metrics_of(bench)
    stored = json.loads(BASELINES.read_text()) if BASELINES.exists() else {}
    comparison = []
    if device in stored:
        comparison = compare(current, stored[device]["metrics"], set(bench))
        problems += [f"regression: {row['metric']}" for row in comparison if not row["ok"]]
    elif not a.update_baseline:
        problems.append(f"no baseline for {device!r} in {BASELINES.relative_to(ROOT)}; run with --update-baseline")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    report = {"date": date, "device": device, "passed": not problems, "problems": problems, "tests": tests,
              "bench": bench, "comparison": comparison, "tolerance": TOLERANCE, "log": log}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    out = Path(a.report_dir) if a.report_dir else workdir
    out.mkdir(parents=True, exist_ok=True)
    (out / f"nightly-gpu-{slug}-{date}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"nightly-gpu-{slug}-{date}.md").write_text(markdown(report))
    if a.update_baseline and current and not any(p.startswith(("GPU tests", "bench")) for p in problems):
        stored[device] = {"date": date, "metrics": current}
        BASELINES.parent.mkdir(parents=True, exist_ok=True)
        BASELINES.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        print(f"baseline for {device!r} updated in {BASELINES}")
    print(f"nightly: {'PASS' if not problems else 'FAIL: ' + '; '.join(problems)}; report in {out}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
