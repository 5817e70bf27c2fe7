#!/usr/bin/env python3
"""Paired A/B of two builds of the native Adam kernel (and DeepSpeedCPUAdam), optionally beside busy processes.

Compares this tree's kernel with another build of offload (a Python environment that has it installed, e.g. a
venv built from an older commit), interleaved round by round in separate processes (A B C, then C B A), on one
flat fp32 tensor with and without the fused bf16 copy. With ``--busy N``, N processes spin on the CPU for the
whole run, as the forward's compute threads do beside the engine's overlapped update: then the kernel's threads
do not progress evenly, which is what the split of the work between them decides.

    python3 tools/ab_adam_builds.py --baseline-python /work/benchvenv/bin/python \\
        --ds-python /work/dsbench/venv/bin/python --rounds 7 --busy 1 --out ab.jsonl

Prints one line per worker run and, at the end, the median of per-round ratios [min-max] for every pair.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys

from offload.bench.adam import run_worker


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-python", required=True, help="python of the environment with the other build")
    ap.add_argument("--ds-python", default=None, help="python of a venv with DeepSpeed (optional)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--numel", type=float, default=100e6)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per worker (median taken)")
    ap.add_argument("--busy", type=int, default=0, help="spinning processes running beside the kernels")
    ap.add_argument("--out", default=None, help="append every raw record as a JSON line to this file")
    a = ap.parse_args()
    if a.rounds < 1 or a.threads < 1 or a.busy < 0:
        ap.error("--rounds and --threads must be >= 1, --busy >= 0")

    worker_args = argparse.Namespace(numel=a.numel, ntensors=1, shapes="flat", grads="fp32", writes="none,bf16",
                                     steps=a.steps)
    runs = {"this": ("ours", sys.executable), "baseline": ("ours", a.baseline_python)}
    if a.ds_python:
        runs["ds"] = ("ds", a.ds_python)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    speeds: dict[tuple[str, int], dict[str, float]] = {}  # (write, round) -> build -> Mparam/s
    out = open(a.out, "a") if a.out else None
    try:
        for rnd in range(a.rounds):
            for name in list(runs) if rnd % 2 == 0 else list(runs)[::-1]:
                impl, python = runs[name]
                for record in run_worker(python, impl, a.threads, worker_args):
                    record.update(build=name, round=rnd, busy=a.busy)
                    if out:
                        out.write(json.dumps(record) + "\n")
                        out.flush()
                    speeds.setdefault((record["write"], rnd), {})[name] = record["mparam_s"]
                    print(f"round {rnd + 1}/{a.rounds} {name} write={record['write']}: "
                          f"{record['mparam_s']:.0f} Mparam/s", file=sys.stderr, flush=True)
    finally:
        for process in busy:
            process.kill()
        if out:
            out.close()

    print(f"{a.threads} threads, {a.busy} busy processes, {a.rounds} rounds; median of per-round ratios [min-max]")
    for write in ("none", "bf16"):
        rows = [v for (w, _), v in sorted(speeds.items()) if w == write]
        for num, den in itertools.combinations(runs, 2):
            ratios = [r[num] / r[den] for r in rows]
            print(f"  bf16 copy={write:4s} {num}/{den}: {statistics.median(ratios):.3f} "
                  f"[{min(ratios):.2f}-{max(ratios):.2f}]  ({statistics.median(r[num] for r in rows):.0f} vs "
                  f"{statistics.median(r[den] for r in rows):.0f} Mparam/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
