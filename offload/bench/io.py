"""`offload bench io`: our I/O engine against fio on one directory, interleaved.

Each round runs every implementation's small sweep back to back (the order alternates between rounds): write the
whole file, then read it back, with O_DIRECT and a page-aligned buffer (ours is page-locked when CUDA is present).
"ours" is our engine with its default backend (io_uring where the kernel allows it), "ours-threads" the same engine
on worker threads. The best configuration of each implementation in a round is compared with the others' best in
the same round; the table reports medians over rounds (offload.bench.harness). Files are removed at the end.
bench/io_ds.py of the source tree runs this same benchmark with DeepSpeed's aio_handle added.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from offload.bench.harness import JsonLines, markdown_table as table, median, paired_ratio, put_ratio, ratio_cell, \
    round_order
from offload.config import IOConfig, parse_bytes

IMPLS = ("ours", "ours-threads", "fio")
OURS_CONFIGS = [("8MiB", 1, 8), ("8MiB", 1, 32), ("2MiB", 2, 32), ("1MiB", 1, 32)]  # block, threads, queue depth
FIO_CONFIGS = [(1, 32), (2, 32)]                                   # jobs, iodepth (8 MiB blocks, libaio)
# impl -> a function of (work directory, bytes per pass) that runs one sweep and returns its records
Runner = Callable[[Path, int], list[dict]]


def argument_parser(prog: str, description: str, impls: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options of this benchmark, with ``impls`` the implementations --impls accepts (all by default)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--dir", default=".", help="directory on the disk to measure (files are removed afterwards)")
    ap.add_argument("--size", default="1GiB", help="bytes per file and pass (default 1GiB; the issue uses 4GiB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--impls", default=",".join(impls),
                    help="ours (default I/O backend: io_uring where the kernel allows it), ours-threads (worker "
                         f"threads), fio (default: all of {','.join(impls)})")
    ap.add_argument("--out", default=None, help="append every raw record as a JSON line to this file")
    return ap


def check_args(ap: argparse.ArgumentParser, a: argparse.Namespace, impls: tuple[str, ...]) -> argparse.Namespace:
    """Refuses (through ``ap.error``) an implementation it does not run and a size it cannot split; sets
    ``a.nbytes``."""
    bad = [i for i in a.impls.split(",") if i and i not in impls]
    if bad:
        ap.error(f"--impls: {', '.join(bad)} not in {', '.join(impls)}" + _peer_hint(bad))
    a.nbytes = parse_bytes("--size", a.size)
    if a.nbytes < 1 << 20 or a.nbytes % (8 << 20):
        ap.error("--size must be a multiple of 8 MiB")
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    return a


def _peer_hint(bad: list[str]) -> str:
    return " (DeepSpeed's is in bench/io_ds.py of the source tree)" if "ds" in bad else ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argument_parser("offload bench io", __doc__.splitlines()[0], IMPLS)
    return check_args(ap, ap.parse_args(argv), IMPLS)


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
        per_round = {impl: {rnd: gbs for (o, i, rnd), gbs in best.items() if o == op and i == impl}
                     for impl in impls}
        for impl in impls:
            if per_round[impl]:
                row[impl] = round(median(per_round[impl].values()), 2)
                winners = [configs[(op, impl, rnd)] for rnd in per_round[impl]]
                row[f"{impl} best config"] = max(set(winners), key=winners.count)
            if impl != "ours":
                put_ratio(row, f"ours/{impl}", paired_ratio(per_round.get("ours", {}), per_round[impl]))
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], impls: list[str]) -> str:
    others = [i for i in impls if i != "ours"]
    columns = ["op"] + [f"{i} GB/s (best config)" for i in impls] + [f"ours / {o}" for o in others]
    cells = [[row["op"]] + [f"{row[i]:.2f} ({row[f'{i} best config']})" if i in row else None for i in impls]
             + [ratio_cell(row, f"ours/{o}") for o in others] for row in rows]
    return table(columns, cells)


def runners(a: argparse.Namespace) -> dict[str, Runner]:
    """The library's implementations that ``a.impls`` names and this machine has (fio only where installed)."""
    known: dict[str, Runner] = {"ours": lambda work, nbytes: run_ours(work / "ours.bin", nbytes),
                                "ours-threads": lambda work, nbytes: run_ours(work / "ours.bin", nbytes, "threads"),
                                "fio": run_fio}
    chosen = {impl: known[impl] for impl in a.impls.split(",") if impl in known}
    if "fio" in chosen and shutil.which("fio") is None:
        print("fio is not installed: skipping the fio baseline", file=sys.stderr)
        del chosen["fio"]
    return chosen


def run(a: argparse.Namespace, impls: dict[str, Runner]) -> int:
    """Runs the rounds of ``impls`` (impl -> its sweep) in a work directory under ``a.dir`` (removed at the end)
    and prints the summary's JSON lines and its table. bench/io_ds.py calls it with DeepSpeed's sweep added."""
    work = Path(a.dir) / f"offload-bench-io-{os.getpid()}"
    work.mkdir(parents=True)
    records: list[dict] = []
    try:
        with JsonLines(a.out) as out:
            for rnd in range(a.rounds):
                for impl in round_order(list(impls), rnd):
                    got = impls[impl](work, a.nbytes)
                    for r in got:
                        r.update(round=rnd, nbytes=a.nbytes)
                        out.write(r)
                    records.extend(got)
                    print(f"round {rnd + 1}/{a.rounds} {impl}: " + ", ".join(
                        f"{r['op']} {r['config']} {r['gbs']:.2f}" for r in got) + " GB/s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = summarize(records, list(impls))
    for row in rows:
        print(json.dumps(row))
    print()
    print(f"Medians of {a.rounds} interleaved rounds, {a.nbytes / 2**30:.2f} GiB per pass, O_DIRECT, in {a.dir}; "
          "each implementation's best configuration per round; ratios are medians of per-round ratios [min-max].")
    print(markdown_table(rows, list(impls)))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return run(a, runners(a))


if __name__ == "__main__":
    sys.exit(main())
