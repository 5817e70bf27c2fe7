#!/usr/bin/env python3
"""Whole training steps against plain torch and DeepSpeed ZeRO-3 / ZeRO-Infinity, paired (once `offload bench e2e`).

Trains the same Llama (the anchors' 30m / 300m configs: random init, random tokens, batch 1 x 512, AdamW lr 1e-4
betas (0.9, 0.95) wd 0.1, no clipping, 2 threads) under each mode, every run in a fresh process, the modes
interleaved (A B C, then C B A, ...) over ``--rounds`` rounds:
- ``torch``: plain torch, AdamW(fused=True), everything in RAM (bf16: autocast over fp32 parameters);
- ``ours-cpu`` / ``ours-nvme``: offload, parameters in RAM as the compute copy, optimizer state in RAM / on NVMe;
- ``ours-inf``: offload, parameters and optimizer state on NVMe;
- ``ds-cpu`` / ``ds-nvme`` / ``ds-inf``: DeepSpeed's equivalents, run with ``--ds-python`` (a venv from
  ``tools/setup_ds_venv.sh``; DeepSpeed is never a dependency of offload).
Offload's modes call ``engine.backward_step`` (no clipping here, so updates overlap backward where the placement
allows). Per run: median step time over the measured steps, its forward / backward / optimizer split, tokens/s,
peak RSS (sampled every 10 ms), disk bytes read and written per step. Reported: the median of the runs' medians
per mode, "x torch", and the ratios the issue asks for (offload.bench.harness); raw records as JSON lines
(``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from e2e_worker import MODES  # (the worker beside this script: it imports nothing of offload)

from offload.bench.harness import JsonLines, markdown_table, median, round_order

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e_worker.py")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/e2e.py", description=__doc__.splitlines()[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[3:]) + "\n\nexample:\n  python3 bench/e2e.py "
                                        "--sizes 300m --dtypes fp32,bf16 --rounds 2 --dir /nvme/bench "
                                        "--ds-python ds/bin/python --out /tmp/e2e.jsonl")
    ap.add_argument("--sizes", default="300m", help="30m and/or 300m (default 300m; tiny: a smoke test)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default=None, help=f"comma-separated from {','.join(MODES)} (default: all ours "
                                                  "and torch, and DeepSpeed's with --ds-python)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dir", default=None, help="swap directory for the NVMe modes (default: the temp dir)")
    ap.add_argument("--ds-python", default=os.environ.get("OFFLOAD_BENCH_DS_PYTHON"),
                    help="python of a DeepSpeed venv (or OFFLOAD_BENCH_DS_PYTHON)")
    ap.add_argument("--host-memory-limit", default=None, help="host_memory_limit for ours-nvme and ours-inf")
    ap.add_argument("--out", default=None, help="append every run's record as a JSON line to this file")
    a = ap.parse_args(argv)
    a.sizes = [s for s in a.sizes.split(",") if s]
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    default = [m for m in MODES if not m.startswith("ds") or a.ds_python]
    a.modes = [m for m in (a.modes.split(",") if a.modes else default) if m]
    bad = [m for m in a.modes if m not in MODES] + \
        [s for s in a.sizes if s not in ("30m", "300m", "tiny")] + [d for d in a.dtypes if d not in ("fp32", "bf16")]
    if bad:
        ap.error(f"unknown mode, size or dtype: {', '.join(bad)}")
    if any(m.startswith("ds") for m in a.modes) and not a.ds_python:
        ap.error("the ds-* modes need --ds-python (a venv made by tools/setup_ds_venv.sh)")
    if a.rounds < 1 or a.steps < 1:
        ap.error("--rounds and --steps must be >= 1")
    return a


def run_one(a: argparse.Namespace, mode: str, size: str, dtype: str, swap: str) -> dict:
    python = a.ds_python if mode.startswith("ds") else sys.executable
    cmd = [python, WORKER, "--mode", mode, "--size", size, "--dtype", dtype, "--warmup", str(a.warmup),
           "--steps", str(a.steps), "--swap", swap]
    if a.host_memory_limit and mode in ("ours-nvme", "ours-inf"):
        cmd += ["--host-memory-limit", a.host_memory_limit]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    if mode.startswith("ds"):
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(python)), "..",
                                                            "torch_ext"))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        return {"mode": mode, "size": size, "dtype": dtype, "failed": done.stderr[-2000:]}
    return json.loads(line[len("RESULT "):])


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["size"], r["dtype"]) for r in records}, key=lambda k: (k[0], k[1]))
    for size, dtype in keys:
        runs = [r for r in records if r["size"] == size and r["dtype"] == dtype and "failed" not in r]
        by_mode = {}
        for r in runs:
            by_mode.setdefault(r["mode"], []).append(r)
        torch_s = median(r["step_s"] for r in by_mode["torch"]) if "torch" in by_mode else None
        for mode in MODES:
            if mode not in by_mode:
                continue
            rs = by_mode[mode]
            med = {k: median(r[k] for r in rs) for k in
                   ("step_s", "forward_s", "backward_s", "optimizer_s", "peak_rss_bytes", "read_bytes_per_step",
                    "written_bytes_per_step")}
            rows.append({"size": size, "dtype": dtype, "mode": mode, "runs": len(rs), **med,
                         "per_run_step_s": [r["step_s"] for r in rs], "tokens_per_s": rs[0]["tokens"] / med["step_s"],
                         "x_torch": med["step_s"] / torch_s if torch_s else None})
    return rows


def _cells(r: dict) -> list[str]:
    return [r["size"], r["dtype"], r["mode"], str(r["runs"]), f"{r['step_s']:.2f}",
            ", ".join(f"{s:.2f}" for s in r["per_run_step_s"]),
            f"{r['forward_s']:.2f} / {r['backward_s']:.2f} / {r['optimizer_s']:.2f}", f"{r['tokens_per_s']:.0f}",
            f"{r['x_torch']:.2f}" if r["x_torch"] else "-", f"{r['peak_rss_bytes'] / 2**30:.2f}",
            f"{r['read_bytes_per_step'] / 1e9:.2f} + {r['written_bytes_per_step'] / 1e9:.2f}"]


def print_table(rows: list[dict]) -> None:
    columns = ["size", "dtype", "mode", "runs", "s/step (median)", "per-run medians", "fwd / bwd / opt s", "tokens/s",
               "x torch", "peak RSS GiB", "disk read + write GB/step"]
    print(markdown_table(columns, [_cells(r) for r in rows], labels=3))
    for size, dtype in sorted({(r["size"], r["dtype"]) for r in rows}):
        got = {r["mode"]: r for r in rows if r["size"] == size and r["dtype"] == dtype}
        ratios = []
        if "ours-cpu" in got and "torch" in got:
            ratios.append(f"ours-cpu step / torch = {got['ours-cpu']['step_s'] / got['torch']['step_s']:.2f}")
        for ours, ds in (("ours-cpu", "ds-cpu"), ("ours-nvme", "ds-nvme"), ("ours-inf", "ds-inf")):
            if ours in got and ds in got:
                ratios.append(f"{ours} / {ds} tokens/s = {got[ours]['tokens_per_s'] / got[ds]['tokens_per_s']:.2f} "
                              f"(peak RSS {got[ours]['peak_rss_bytes'] / 2**30:.2f} vs "
                              f"{got[ds]['peak_rss_bytes'] / 2**30:.2f} GiB)")
        if ratios:
            print(f"\n{size} {dtype}: " + "; ".join(ratios))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    swap = a.dir or tempfile.gettempdir()
    records = []
    with JsonLines(a.out) as out:
        for size in a.sizes:
            for dtype in a.dtypes:
                for r in range(a.rounds):
                    for mode in round_order(a.modes, r):
                        print(f"bench/e2e.py: {size} {dtype} round {r + 1}/{a.rounds}: {mode} ...", file=sys.stderr,
                              flush=True)
                        record = dict(run_one(a, mode, size, dtype, swap), round=r)
                        records.append(record)
                        if "failed" in record:
                            print(f"  {mode} failed:\n{record['failed']}", file=sys.stderr, flush=True)
                        else:
                            print(f"  {record['step_s']:.2f} s/step, peak RSS "
                                  f"{record['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
                        out.write(record)
    rows = summarize(records)
    print(json.dumps({"bench": "e2e", "rows": rows}))
    print_table(rows)
    return 1 if any("failed" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
