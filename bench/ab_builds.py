#!/usr/bin/env python3
"""A/B of two builds of offload on the same training benchmarks, interleaved in fresh processes.

Each build is a directory that ``pip install --no-deps --target DIR <source tree>`` filled (its own
``offload`` package with its own native module). Every run is a new process that imports offload from that
directory only: the bootstrap below drops any other ``offload`` on the path (an editable install's finder, the
source checkout) before the benchmark starts, and the run records which ``offload/__init__.py`` it imported.

    pip install --no-deps --target /tmp/ab/a /tmp/ab/src-a     # the build before
    pip install --no-deps --target /tmp/ab/b /tmp/ab/src-b     # the build after
    python3 bench/ab_builds.py --a /tmp/ab/a --b /tmp/ab/b --rounds 5 --dir /nvme/scratch --out /tmp/ab.jsonl

Benchmarks, each round A B then B A on the next (``offload.bench.harness.round_order``):
- ``e2e``: bench/e2e_worker.py ``--mode ours-inf`` (params and optimizer on NVMe), the 30M Llama in bf16,
  batch 1 x 512: the median step time of the measured steps;
- ``step``: ``offload bench step --params nvme --layers 4`` (whole training steps with offloaded parameters):
  the median offloaded step time.
Prints one JSON line per run and a table of medians, B/A of the medians and the per-round B/A [min-max].
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
E2E_WORKER = HERE / "e2e_worker.py"

# Runs argv[2:] as ``python -m offload ...`` (argv[1] == "-m") or as a script, importing offload from the build
# directory argv[0] only.
BOOTSTRAP = """
import os, runpy, sys
build, kind, target, *rest = sys.argv[1:]
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]
sys.path[:] = [build] + [p for p in sys.path if p and os.path.abspath(p) != os.getcwd()
                          and not os.path.isfile(os.path.join(p, 'offload', '__init__.py'))]
import offload
print('# offload from ' + offload.__file__, file=sys.stderr, flush=True)
sys.argv = [target] + rest
runpy.run_module(target, run_name='__main__', alter_sys=True) if kind == '-m' else \\
    runpy.run_path(target, run_name='__main__')
"""


def run(build: str, bench: str, scratch: Path, threads: int) -> dict:
    """One fresh process of ``bench`` against ``build``; returns its step time and what it imported."""
    with tempfile.TemporaryDirectory(dir=scratch) as swap:
        if bench == "e2e":
            cmd = ["script", str(E2E_WORKER), "--mode", "ours-inf", "--size", "30m", "--dtype", "bf16",
                   "--seq", "512", "--warmup", "1", "--steps", "4", "--threads", str(threads), "--swap", swap]
        else:
            out = Path(swap) / "step.jsonl"
            cmd = ["-m", "offload", "bench", "step", "--params", "nvme", "--layers", "4", "--rounds", "1",
                   "--dir", swap, "--out", str(out)]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", BOOTSTRAP, build, *cmd], capture_output=True, text=True,
                              cwd=swap, timeout=900)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"ab_builds: {bench} on {build} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        imported = next(line.split(" from ", 1)[1] for line in proc.stderr.splitlines()
                        if line.startswith("# offload from "))
        if not imported.startswith(str(Path(build).resolve())):
            raise SystemExit(f"ab_builds: the {bench} run imported {imported}, not the build in {build}")
        if bench == "e2e":
            record = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
            step_s = record["step_s"]  # (the median over the measured steps)
        else:
            records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
            step_s = _median([r["offload_s"] for r in records if "offload_s" in r])
    return {"bench": bench, "build": build, "step_s": step_s, "wall_s": round(wall, 1), "imported": imported}


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="the build before (a pip --target directory)")
    ap.add_argument("--b", required=True, help="the build after")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--benches", default="e2e,step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="scratch directory for swap files (NVMe)")
    ap.add_argument("--out", default=None, help="append every run as a JSON line to this file")
    a = ap.parse_args()
    benches = a.benches.split(",")
    scratch = Path(a.dir)
    scratch.mkdir(parents=True, exist_ok=True)
    times: dict[tuple[str, str], list[float]] = {}
    out = open(a.out, "a") if a.out else None
    try:
        for rnd in range(a.rounds):
            for bench in benches:
                for label in (("A", "B") if rnd % 2 == 0 else ("B", "A")):
                    record = dict(run(a.a if label == "A" else a.b, bench, scratch, a.threads), side=label,
                                  round=rnd)
                    print(json.dumps(record), flush=True)
                    if out:
                        out.write(json.dumps(record) + "\n")
                    times.setdefault((bench, label), []).append(record["step_s"])
    finally:
        if out:
            out.close()
    print("\n| benchmark | A median s/step | B median s/step | B/A of medians | per-round B/A [min-max] |")
    print("|---|---:|---:|---:|---|")
    for bench in benches:
        ta, tb = times[(bench, "A")], times[(bench, "B")]
        per_round = [b / x for x, b in zip(ta, tb)]
        print(f"| {bench} | {_median(ta):.3f} | {_median(tb):.3f} | {_median(tb) / _median(ta):.3f} | "
              f"{_median(per_round):.3f} [{min(per_round):.3f}-{max(per_round):.3f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
