"""`offload bench adam`: our native Adam against torch fused AdamW and DeepSpeedCPUAdam, interleaved.

The memory bandwidth of a shared VM drifts by +-50% over minutes, so absolute numbers from different moments
do not compare. Each round therefore runs every implementation back to back (A B C A B C ...), at each thread
count, optionally preceded by the in-place roofline probe (the anchors' `membw` rw4w3 kernel); ratios are taken
within a round and their medians reported. Each implementation runs in its own process (see adam_worker.py),
so that OpenMP thread counts are set before the runtime starts and DeepSpeed can live in another venv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

WORKER = Path(__file__).with_name("adam_worker.py")
IMPLS = ("ours", "ours_optim", "torch_fused", "ds")
# DRAM bytes per parameter and step: read p, g, m, v; write p, m, v; plus the bf16 copy when written.
BYTES_PER_PARAM = {("fp32", "none"): 28, ("fp32", "bf16"): 30, ("bf16", "none"): 26, ("bf16", "bf16"): 28}


@dataclass
class Record:
    impl: str
    threads: int
    shape: str
    grad: str
    write: str
    round: int
    mparam_s: float
    roofline_gbs: float | None = None

    @property
    def key(self) -> tuple:
        return (self.shape, self.grad, self.write, self.threads)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="offload bench adam",
        description="Paired, interleaved Adam benchmark: ours vs torch fused AdamW vs DeepSpeedCPUAdam.",
    )
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5 for a report; default 5)")
    ap.add_argument("--numel", type=float, default=20e6, help="parameters per step (default 20e6; the issue uses 100e6)")
    ap.add_argument("--ntensors", type=int, default=200, help="tensor count of the 'many' shape (default 200)")
    ap.add_argument("--threads", default=None, help="comma list of thread counts (default: 1 and the CPU count)")
    ap.add_argument("--impls", default="ours,ours_optim,torch_fused,ds")
    ap.add_argument("--shapes", default="flat,many")
    ap.add_argument("--grads", default="fp32,bf16")
    ap.add_argument("--writes", default="none,bf16")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round (median taken)")
    ap.add_argument("--ds-python", default=os.environ.get("OFFLOAD_BENCH_DS_PYTHON"),
                    help="python of a venv with deepspeed (default: $OFFLOAD_BENCH_DS_PYTHON, else this python "
                         "if it can import deepspeed, else DeepSpeed is skipped)")
    ap.add_argument("--membw", default=os.environ.get("OFFLOAD_BENCH_MEMBW"),
                    help="path of the anchors' membw binary; measures the rw4w3 roofline in every round")
    ap.add_argument("--membw-n", default="100000000")
    ap.add_argument("--out", default=None, help="append every raw record as a JSON line to this file")
    a = ap.parse_args(argv)
    for name, accepted in (("impls", IMPLS), ("shapes", ("flat", "many")), ("grads", ("fp32", "bf16")),
                           ("writes", ("none", "bf16"))):
        bad = [v for v in getattr(a, name).split(",") if v not in accepted]
        if bad:
            ap.error(f"--{name}: {', '.join(bad)} not in {', '.join(accepted)}")
    if a.rounds < 1 or a.steps < 1 or a.numel < 1 or a.ntensors < 1:
        ap.error("--rounds, --steps, --numel and --ntensors must be >= 1")
    return a


def default_threads() -> list[int]:
    ncpu = len(os.sched_getaffinity(0))
    return sorted({1, ncpu})


def deepspeed_python(requested: str | None) -> str | None:
    if requested:
        return requested
    probe = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True)
    return sys.executable if probe.returncode == 0 else None


def measure_roofline(membw: str, n: str, threads: int) -> float | None:
    """rw4w3 GB/s (read p,g,m,v, write p,m,v: Adam's access pattern with trivial math), median of 6."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="close")
    proc = subprocess.run([membw, n, "6"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{membw} failed with exit code {proc.returncode}: {proc.stderr.strip()[-300:]}")
    for line in proc.stdout.splitlines():
        m = re.match(r"rw4w3\(float\)\s+threads=\d+ n=\d+\s+best\s+[\d.]+ GB/s\s+median\s+([\d.]+) GB/s", line)
        if m:
            return float(m.group(1))
    raise RuntimeError(f"{membw}: no rw4w3 line in its output")


def run_worker(python: str, impl: str, threads: int, a: argparse.Namespace) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [python, str(WORKER), "--impl", impl, "--threads", str(threads), "--numel", str(int(a.numel)),
           "--ntensors", str(a.ntensors), "--shapes", a.shapes, "--grads", a.grads, "--writes", a.writes,
           "--steps", str(a.steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def run_rounds(a: argparse.Namespace, impls: list[str], python_of: dict[str, str], threads: list[int]) -> list[Record]:
    records: list[Record] = []
    out = open(a.out, "a") if a.out else None
    try:
        for rnd in range(a.rounds):
            # Alternate the order every round so that no implementation always runs right after the probe.
            order = impls if rnd % 2 == 0 else impls[::-1]
            for t in threads:
                roof = measure_roofline(a.membw, a.membw_n, t) if a.membw else None
                if roof is not None:
                    print(f"round {rnd + 1}/{a.rounds} threads={t}: rw4w3 roofline {roof:.1f} GB/s", file=sys.stderr)
                for impl in order:
                    for raw in run_worker(python_of[impl], impl, t, a):
                        raw.update(round=rnd, roofline_gbs=roof)
                        if out:
                            out.write(json.dumps(raw) + "\n")
                            out.flush()
                        records.append(Record(impl=raw["impl"], threads=raw["threads"], shape=raw["shape"],
                                              grad=raw["grad"], write=raw["write"], round=rnd,
                                              mparam_s=raw["mparam_s"], roofline_gbs=roof))
                    done = [r for r in records if r.round == rnd and r.impl == impl and r.threads == t]
                    print(f"round {rnd + 1}/{a.rounds} threads={t} {impl}: "
                          + ", ".join(f"{r.shape}/{r.grad}/{r.write} {r.mparam_s:.0f}" for r in done)
                          + " Mparam/s", file=sys.stderr)
    finally:
        if out:
            out.close()
    return records


def summarize(records: Iterable[Record], pairs: list[tuple[str, str]]) -> list[dict]:
    """Per configuration: median Mparam/s of each implementation and, for each (a, b) in `pairs`, the median
    of the per-round ratios a/b (both measured in the same round)."""
    by_cfg: dict[tuple, dict[str, dict[int, Record]]] = {}
    for r in records:
        by_cfg.setdefault(r.key, {}).setdefault(r.impl, {})[r.round] = r
    rows = []
    for (shape, grad, write, threads), impls in sorted(by_cfg.items()):
        row = dict(shape=shape, grad=grad, write=write, threads=threads)
        for impl, per_round in impls.items():
            row[impl] = round(statistics.median(r.mparam_s for r in per_round.values()))
        for num, den in pairs:
            a, b = impls.get(num, {}), impls.get(den, {})
            ratios = [a[k].mparam_s / b[k].mparam_s for k in a if k in b]
            if ratios:
                row[f"{num}/{den}"] = round(statistics.median(ratios), 3)
                row[f"{num}/{den} range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        ours = impls.get("ours", {})
        roof = [r.mparam_s * BYTES_PER_PARAM[(grad, write)] / 1e3 / r.roofline_gbs
                for r in ours.values() if r.roofline_gbs]
        if roof:
            row["ours/roofline"] = round(statistics.median(roof), 3)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], impls: list[str], pairs: list[tuple[str, str]]) -> str:
    cols = ["shape", "grads", "bf16 copy", "threads"] + [f"{i} Mparam/s" for i in impls]
    cols += [f"{a} / {b}" for a, b in pairs] + ["ours / rw4w3 roofline"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * 4 + "---:|" * (len(cols) - 4)]
    for row in rows:
        cells = [row["shape"], row["grad"], "fused" if row["write"] == "bf16" else "-", str(row["threads"])]
        cells += [str(row.get(i, "")) for i in impls]
        for a, b in pairs:
            if f"{a}/{b}" in row:
                lo, hi = row[f"{a}/{b} range"]
                cells.append(f"{row[f'{a}/{b}']:.2f} [{lo:.2f}-{hi:.2f}]")
            else:
                cells.append("")
        cells.append(f"{row['ours/roofline']:.2f}" if "ours/roofline" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    impls = [i for i in a.impls.split(",") if i]
    python_of = {i: sys.executable for i in impls}
    if "ds" in impls:
        ds = deepspeed_python(a.ds_python)
        if ds is None:
            print("DeepSpeed is not importable here and no --ds-python was given: skipping the 'ds' baseline",
                  file=sys.stderr)
            impls.remove("ds")
        else:
            python_of["ds"] = ds
    threads = [int(t) for t in a.threads.split(",")] if a.threads else default_threads()
    records = run_rounds(a, impls, python_of, threads)
    baselines = [i for i in impls if i not in ("ours", "ours_optim")]
    pairs = [("ours", b) for b in baselines if "ours" in impls]
    if "ours_optim" in impls and "torch_fused" in impls:
        pairs.append(("ours_optim", "torch_fused"))
    rows = summarize(records, pairs)
    for row in rows:
        print(json.dumps(row))
    print()
    print(f"Medians of {a.rounds} interleaved rounds, {int(a.numel):,} parameters per step "
          f"('many' = {a.ntensors} tensors); ratios are medians of per-round ratios [min-max].")
    print(markdown_table(rows, impls, pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
