"""`offload bench io`: our I/O engine against fio and DeepSpeed's aio_handle on one directory, interleaved.

Each round runs every implementation's small sweep back to back (the order alternates between rounds): write the
whole file, then read it back, with O_DIRECT and a page-aligned buffer (page-locked for DeepSpeed; ours is
page-locked too when CUDA is present). "ours" is our engine with its default backend (io_uring where the kernel
allows it), "ours-threads" the same engine on worker threads. The best configuration of each implementation in a
round is compared with the others' best in the same round; the table reports medians over rounds. Files are removed
at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from offload.config import IOConfig, parse_bytes

DS_WORKER = Path(__file__).with_name("io_worker_ds.py")
OURS_CONFIGS = [("8MiB", 1, 8), ("8MiB", 1, 32), ("2MiB", 2, 32), ("1MiB", 1, 32)]  # block, threads, queue depth
DS_CONFIGS = ["1048576:8:1", "8388608:32:2", "1048576:32:2"]       # block bytes : queue depth : intra-op threads
FIO_CONFIGS = [(1, 32), (2, 32)]                                   # jobs, iodepth (8 MiB blocks, libaio)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="offload bench io", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".", help="directory on the disk to measure (files are removed afterwards)")
    ap.add_argument("--size", default="1GiB", help="bytes per file and pass (default 1GiB; the issue uses 4GiB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--impls", default="ours,ours-threads,fio,ds",
                    help="ours (default I/O backend: io_uring where the kernel allows it), ours-threads (worker "
                         "threads), fio, ds (default: all)")
    ap.add_argument("--ds-python", default=os.environ.get("OFFLOAD_BENCH_DS_PYTHON"),
                    help="python of a venv with deepspeed and its async_io op (default: $OFFLOAD_BENCH_DS_PYTHON)")
    ap.add_argument("--out", default=None, help="append every raw record as a JSON line to this file")
    a = ap.parse_args(argv)
    a.nbytes = parse_bytes("--size", a.size)
    if a.nbytes < 1 << 20 or a.nbytes % (8 << 20):
        ap.error("--size must be a multiple of 8 MiB")
    return a


def run_ours(path: Path, nbytes: int, backend: str = "auto") -> list[dict]:
    """Our engine's sweep; impl "ours" with the default backend (io_uring where available), "ours-threads"
    with worker threads."""
    from offload.storage import HostPool, IoEngine

    pool = HostPool()
    buffer = pool.allocate(nbytes, "bench-io")
    buffer.tensor.random_(0, 256)
    records = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        for block, threads, depth in OURS_CONFIGS:
            engine = IoEngine(IOConfig(block_size=block, threads=threads, queue_depth=depth, backend=backend))
            for op in ("write", "read"):
                submit = engine.write if op == "write" else engine.read
                start = time.perf_counter()
                engine.wait(submit(fd, 0, buffer.tensor, str(path)))
                seconds = time.perf_counter() - start
                impl = "ours" if backend == "auto" else "ours-threads"
                records.append(dict(impl=impl, op=op, config=f"bs={block} threads={threads} qd={depth}",
                                    seconds=seconds, gbs=nbytes / seconds / 1e9))
            engine.close()
    finally:
        os.close(fd)
        pool.close()
    return records


def run_fio(directory: Path, nbytes: int) -> list[dict]:
    records = []
    for jobs, depth in FIO_CONFIGS:
        for op in ("write", "read"):
            cmd = ["fio", "--name=offload-bench", f"--directory={directory}", f"--rw={op}", "--bs=8m", "--direct=1",
                   "--ioengine=libaio", f"--iodepth={depth}", f"--numjobs={jobs}", f"--size={nbytes // jobs}",
                   "--group_reporting", "--output-format=json"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"fio failed: {proc.stderr.strip()[-300:]}")
            job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
            gbs = job[op]["bw_bytes"] / 1e9
            records.append(dict(impl="fio", op=op, config=f"libaio bs=8m iodepth={depth} jobs={jobs}",
                                seconds=nbytes / 1e9 / gbs, gbs=gbs))
    return records


def run_ds(python: str, path: Path, nbytes: int) -> list[dict]:
    cmd = [python, str(DS_WORKER), "--path", str(path), "--nbytes", str(nbytes), "--configs", ",".join(DS_CONFIGS)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"DeepSpeed worker failed: {proc.stderr.strip()[-500:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def summarize(records: list[dict], impls: list[str]) -> list[dict]:
    """Per op: each implementation's best GB/s per round (median over rounds), and ours' ratio to each other
    implementation's best, taken within each round (median [min-max])."""
    best: dict[tuple[str, str, int], float] = {}
    configs: dict[tuple[str, str, int], str] = {}
    for r in records:
        key = (r["op"], r["impl"], r["round"])
        if r["gbs"] > best.get(key, 0.0):
            best[key], configs[key] = r["gbs"], r["config"]
    rows = []
    for op in ("write", "read"):
        row: dict = dict(op=op)
        rounds = sorted({k[2] for k in best if k[0] == op})
        for impl in impls:
            values = [best[(op, impl, rnd)] for rnd in rounds if (op, impl, rnd) in best]
            if values:
                row[impl] = round(statistics.median(values), 2)
                winners = [configs[(op, impl, rnd)] for rnd in rounds if (op, impl, rnd) in configs]
                row[f"{impl} best config"] = max(set(winners), key=winners.count)
            if impl != "ours":
                ratios = [best[(op, "ours", rnd)] / best[(op, impl, rnd)] for rnd in rounds
                          if (op, "ours", rnd) in best and (op, impl, rnd) in best]
                if ratios:
                    row[f"ours/{impl}"] = round(statistics.median(ratios), 3)
                    row[f"ours/{impl} range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], impls: list[str]) -> str:
    others = [i for i in impls if i != "ours"]
    cols = ["op"] + [f"{i} GB/s (best config)" for i in impls] + [f"ours / {o}" for o in others]
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for row in rows:
        cells = [row["op"]] + [f"{row[i]:.2f} ({row[f'{i} best config']})" if i in row else "" for i in impls]
        for o in others:
            cells.append(f"{row[f'ours/{o}']:.2f} [{row[f'ours/{o} range'][0]:.2f}-{row[f'ours/{o} range'][1]:.2f}]"
                         if f"ours/{o}" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    impls = [i for i in a.impls.split(",") if i]
    if "fio" in impls and shutil.which("fio") is None:
        print("fio is not installed: skipping the fio baseline", file=sys.stderr)
        impls.remove("fio")
    if "ds" in impls and not a.ds_python:
        print("no --ds-python (venv with deepspeed) given: skipping the DeepSpeed baseline", file=sys.stderr)
        impls.remove("ds")
    work = Path(a.dir) / f"offload-bench-io-{os.getpid()}"
    work.mkdir(parents=True)
    records: list[dict] = []
    out = open(a.out, "a") if a.out else None
    try:
        for rnd in range(a.rounds):
            for impl in impls if rnd % 2 == 0 else impls[::-1]:
                if impl == "ours":
                    got = run_ours(work / "ours.bin", a.nbytes)
                elif impl == "ours-threads":
                    got = run_ours(work / "ours.bin", a.nbytes, backend="threads")
                elif impl == "fio":
                    got = run_fio(work, a.nbytes)
                else:
                    got = run_ds(a.ds_python, work / "ds.bin", a.nbytes)
                for r in got:
                    r.update(round=rnd, nbytes=a.nbytes)
                    if out:
                        out.write(json.dumps(r) + "\n")
                records.extend(got)
                print(f"round {rnd + 1}/{a.rounds} {impl}: " + ", ".join(
                    f"{r['op']} {r['config']} {r['gbs']:.2f}" for r in got) + " GB/s", file=sys.stderr)
    finally:
        if out:
            out.close()
        shutil.rmtree(work, ignore_errors=True)
    rows = summarize(records, impls)
    for row in rows:
        print(json.dumps(row))
    print()
    print(f"Medians of {a.rounds} interleaved rounds, {a.nbytes / 2**30:.2f} GiB per pass, O_DIRECT, in {a.dir}; "
          "each implementation's best configuration per round; ratios are medians of per-round ratios [min-max].")
    print(markdown_table(rows, impls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
