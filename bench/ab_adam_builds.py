#!/usr/bin/env python3
"""Paired A/B of two builds of the native Adam kernel (and DeepSpeedCPUAdam), optionally beside busy processes.

Compares this tree's kernel with another build of offload (a Python environment that has it installed, e.g. a
venv built from an older commit), interleaved round by round in separate processes (A B C, then C B A), on one
flat fp32 tensor with and without the fused bf16 copy. With ``--busy N``, N processes spin on the CPU for the
whole run, as the forward's compute threads do beside the engine's overlapped update: then the kernel's threads
do not progress evenly, which is what the split of the work between them decides.

    python3 bench/ab_adam_builds.py --baseline-python /work/benchvenv/bin/python \\
        --ds-python /work/dsbench/venv/bin/python --rounds 7 --busy 1 --out /tmp/ab.jsonl

Prints one line per worker run and, at the end, the median of per-round ratios [min-max] for every pair
(offload.bench.harness). DeepSpeed runs in bench/adam_ds_worker.py.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
from pathlib import Path

from offload.bench.adam import WORKER, run_worker
from offload.bench.harness import JsonLines, median, paired_ratio, round_order

DS_WORKER = Path(__file__).resolve().with_name("adam_ds_worker.py")


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
    runs = {"this": ("ours", sys.executable, WORKER), "baseline": ("ours", a.baseline_python, WORKER)}
    if a.ds_python:
        runs["ds"] = ("ds", a.ds_python, DS_WORKER)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    speeds: dict[tuple[str, str], dict[int, float]] = {}  # (write, build) -> round -> Mparam/s
    try:
        with JsonLines(a.out) as out:
            for rnd in range(a.rounds):
                for name in round_order(list(runs), rnd):
                    impl, python, script = runs[name]
                    for record in run_worker(python, impl, a.threads, worker_args, script):
                        record.update(build=name, round=rnd, busy=a.busy)
                        out.write(record)
                        speeds.setdefault((record["write"], name), {})[rnd] = record["mparam_s"]
                        print(f"round {rnd + 1}/{a.rounds} {name} write={record['write']}: "
                              f"{record['mparam_s']:.0f} Mparam/s", file=sys.stderr, flush=True)
    finally:
        for process in busy:
            process.kill()

    print(f"{a.threads} threads, {a.busy} busy processes, {a.rounds} rounds; median of per-round ratios [min-max]")
    for write in ("none", "bf16"):
        for num, den in itertools.combinations(runs, 2):
            a_speed, b_speed = speeds[(write, num)], speeds[(write, den)]
            print(f"  bf16 copy={write:4s} {num}/{den}: {paired_ratio(a_speed, b_speed).cell()}  "
                  f"({median(a_speed.values()):.0f} vs {median(b_speed.values()):.0f} Mparam/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
