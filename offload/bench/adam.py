"""`offload bench adam`: our native Adam against torch fused AdamW, interleaved.

Each round runs every implementation back to back (A B C, then C B A), at each thread count, optionally
preceded by the in-place roofline probe (the anchors' `membw` rw4w3 kernel); ratios are taken within a round
and their medians reported (offload.bench.harness). Each implementation runs in its own process (see
adam_worker.py), so that OpenMP thread counts are set before the runtime starts and a peer can live in another
venv: bench/adam_ds.py of the source tree runs this same benchmark with DeepSpeedCPUAdam added.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from offload.bench.harness import (JsonLines, markdown_table as table, median, paired_ratio, put_ratio, ratio_cell,
                                   round_order)

WORKER = Path(__file__).with_name("adam_worker.py")
IMPLS = ("ours", "ours_optim", "torch_fused")
OURS = ("ours", "ours_optim")
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


def argument_parser(prog: str, description: str, impls: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options of this benchmark, with ``impls`` the implementations --impls accepts (all by default)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5 for a report; default 5)")
    ap.add_argument("--numel", type=float, default=20e6, help="parameters per step (default 20e6; the issue uses 100e6)")
    ap.add_argument("--ntensors", type=int, default=200, help="tensor count of the 'many' shape (default 200)")
    ap.add_argument("--threads", default=None, help="comma list of thread counts (default: 1 and the CPU count)")
    ap.add_argument("--impls", default=",".join(impls), help=f"comma list from {','.join(impls)} (default: all)")
    ap.add_argument("--shapes", default="flat,many")
    ap.add_argument("--grads", default="fp32,bf16")
    ap.add_argument("--writes", default="none,bf16")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round (median taken)")
    ap.add_argument("--membw", default=os.environ.get("OFFLOAD_BENCH_MEMBW"),
                    help="path of the anchors' membw binary; measures the rw4w3 roofline in every round")
    ap.add_argument("--membw-n", default="100000000")
    ap.add_argument("--out", default=None, help="append every raw record as a JSON line to this file")
    return ap


def check_args(ap: argparse.ArgumentParser, a: argparse.Namespace, impls: tuple[str, ...]) -> argparse.Namespace:
    """Refuses (through ``ap.error``) values outside what the benchmark runs."""
    for name, accepted in (("impls", impls), ("shapes", ("flat", "many")), ("grads", ("fp32", "bf16")),
                           ("writes", ("none", "bf16"))):
        bad = [v for v in getattr(a, name).split(",") if v not in accepted]
        if bad:
            ap.error(f"--{name}: {', '.join(bad)} not in {', '.join(accepted)}" + _peer_hint(bad))
    if a.rounds < 1 or a.steps < 1 or a.numel < 1 or a.ntensors < 1:
        ap.error("--rounds, --steps, --numel and --ntensors must be >= 1")
    return a


def _peer_hint(bad: list[str]) -> str:
    return " (DeepSpeed's is in bench/adam_ds.py of the source tree)" if "ds" in bad else ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argument_parser("offload bench adam", "Paired, interleaved Adam benchmark: ours vs torch fused AdamW.",
                         IMPLS)
    return check_args(ap, ap.parse_args(argv), IMPLS)


def default_threads() -> list[int]:
    ncpu = len(os.sched_getaffinity(0))
    return sorted({1, ncpu})


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


def run_worker(python: str, impl: str, threads: int, a: argparse.Namespace, script: Path = WORKER) -> list[dict]:
    """One worker process (``script`` under ``python``) timing ``impl``: its JSON lines, one per configuration."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [python, str(script), "--impl", impl, "--threads", str(threads), "--numel", str(int(a.numel)),
           "--ntensors", str(a.ntensors), "--shapes", a.shapes, "--grads", a.grads, "--writes", a.writes,
           "--steps", str(a.steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def run_rounds(a: argparse.Namespace, workers: dict[str, tuple[str, Path]], threads: list[int]) -> list[Record]:
    """``a.rounds`` rounds of every implementation of ``workers`` (impl -> (python, worker script)) at each
    thread count, the order alternating between rounds; every raw record also goes to ``a.out``."""
    records: list[Record] = []
    with JsonLines(a.out) as out:
        for rnd in range(a.rounds):
            for t in threads:
                roof = measure_roofline(a.membw, a.membw_n, t) if a.membw else None
                if roof is not None:
                    print(f"round {rnd + 1}/{a.rounds} threads={t}: rw4w3 roofline {roof:.1f} GB/s", file=sys.stderr)
                for impl in round_order(list(workers), rnd):
                    python, script = workers[impl]
                    for raw in run_worker(python, impl, t, a, script):
                        raw.update(round=rnd, roofline_gbs=roof)
                        out.write(raw)
                        records.append(Record(impl=raw["impl"], threads=raw["threads"], shape=raw["shape"],
                                              grad=raw["grad"], write=raw["write"], round=rnd,
                                              mparam_s=raw["mparam_s"], roofline_gbs=roof))
                    done = [r for r in records if r.round == rnd and r.impl == impl and r.threads == t]
                    print(f"round {rnd + 1}/{a.rounds} threads={t} {impl}: "
                          + ", ".join(f"{r.shape}/{r.grad}/{r.write} {r.mparam_s:.0f}" for r in done)
                          + " Mparam/s", file=sys.stderr)
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
        speed = {impl: {rnd: r.mparam_s for rnd, r in per_round.items()} for impl, per_round in impls.items()}
        for impl, per_round in speed.items():
            row[impl] = round(median(per_round.values()))
        for num, den in pairs:
            put_ratio(row, f"{num}/{den}", paired_ratio(speed.get(num, {}), speed.get(den, {})))
        ours = impls.get("ours", {})
        roof = [r.mparam_s * BYTES_PER_PARAM[(grad, write)] / 1e3 / r.roofline_gbs
                for r in ours.values() if r.roofline_gbs]
        if roof:
            row["ours/roofline"] = round(median(roof), 3)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], impls: list[str], pairs: list[tuple[str, str]]) -> str:
    columns = ["shape", "grads", "bf16 copy", "threads"] + [f"{i} Mparam/s" for i in impls]
    columns += [f"{a} / {b}" for a, b in pairs] + ["ours / rw4w3 roofline"]
    cells = [[row["shape"], row["grad"], "fused" if row["write"] == "bf16" else "-", row["threads"]]
             + [row.get(i) for i in impls] + [ratio_cell(row, f"{a}/{b}") for a, b in pairs]
             + [f"{row['ours/roofline']:.2f}" if "ours/roofline" in row else None] for row in rows]
    return table(columns, cells, labels=4)


def comparison_pairs(impls: list[str]) -> list[tuple[str, str]]:
    """(ours, each baseline), and (ours_optim, torch_fused): the ratios the table shows."""
    pairs = [("ours", b) for b in impls if b not in OURS and "ours" in impls]
    if "ours_optim" in impls and "torch_fused" in impls:
        pairs.append(("ours_optim", "torch_fused"))
    return pairs


def run(a: argparse.Namespace, workers: dict[str, tuple[str, Path]]) -> int:
    """Runs the rounds of ``workers`` (impl -> (python, worker script)) and prints the summary's JSON lines and
    its table. bench/adam_ds.py calls it with DeepSpeed's worker added."""
    threads = [int(t) for t in a.threads.split(",")] if a.threads else default_threads()
    records = run_rounds(a, workers, threads)
    impls = list(workers)
    pairs = comparison_pairs(impls)
    rows = summarize(records, pairs)
    for row in rows:
        print(json.dumps(row))
    print()
    print(f"Medians of {a.rounds} interleaved rounds, {int(a.numel):,} parameters per step "
          f"('many' = {a.ntensors} tensors); ratios are medians of per-round ratios [min-max].")
    print(markdown_table(rows, impls, pairs))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return run(a, {impl: (sys.executable, WORKER) for impl in a.impls.split(",") if impl})


if __name__ == "__main__":
    sys.exit(main())
