"""`offload tune`: measures the swap directory's disk with our I/O engine and writes the best IOConfig.

The sweep covers block size x transfers in flight (threads x queue depth; only their product matters to the engine)
x backend (io_uring where the kernel allows it, and worker threads) with O_DIRECT, then buffered I/O at the best
O_DIRECT setting. Each configuration writes the whole test file and reads it back; the sweep runs ``--rounds``
times, in alternating order, and each configuration's score is the median over rounds of the rate at which it moves
equal amounts both ways (the engine's workload: every byte of state read is written back), i.e. the harmonic mean of
read and write GB/s. Buffered reads are made to come from the disk: the file is fsynced and dropped from the page
cache before it is read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

from offload.cli.outputs import check_writable_file
from offload.config import Config, IOConfig, parse_bytes, write_atomic
from offload.errors import ConfigError

BLOCK_SIZES = ["1MiB", "4MiB", "8MiB", "16MiB"]
IN_FLIGHT = [(1, 4), (1, 16), (2, 16), (2, 32)]  # (threads, queue depth)
EXAMPLES = """examples:
  offload tune --dir /mnt/nvme/swap                 # writes ./offload.toml
  offload tune --dir /mnt/nvme/swap --size 4GiB --out runs/offload.toml
  offload train --config offload.toml --nvme-dir /mnt/nvme/swap
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--dir", required=True, metavar="PATH", help="the swap directory to measure (a test file is "
                                                                     "made there and removed)")
    parser.add_argument("--size", default="1GiB", help="test file size (default 1GiB; larger than the disk's cache "
                                                       "is better)")
    parser.add_argument("--rounds", type=int, default=2, help="sweeps, in alternating order (default 2)")
    parser.add_argument("--out", default="offload.toml", metavar="FILE",
                        help="config file to write the best [io] settings into (default offload.toml; other "
                             "settings in it are kept)")


@dataclass(frozen=True)
class Trial:
    io: IOConfig
    write_gbs: float
    read_gbs: float

    @property
    def score(self) -> float:
        return 2 / (1 / self.write_gbs + 1 / self.read_gbs)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from offload.storage import HostPool, IoEngine

    nbytes = parse_bytes("--size", args.size)
    if nbytes < 64 << 20 or nbytes % (16 << 20):
        raise ConfigError(f"--size: must be a multiple of 16 MiB, at least 64 MiB; got {nbytes} bytes")
    if args.rounds <= 0:
        raise ConfigError(f"--rounds: expected a positive integer; got {args.rounds}")
    check_writable_file("--out", args.out)  # now, not after the sweep
    root = Path(args.dir)
    if not root.is_dir():
        raise OSError(2, f"--dir: {root} is not a directory", str(root))
    free = shutil.disk_usage(root).free
    if free < nbytes + (64 << 20):
        raise OSError(28, f"--dir: the test file needs {nbytes / 2**30:.2f} GiB and {free / 2**30:.2f} GiB are "
                          f"free in {root}; use a smaller --size", str(root))
    from offload.storage.io_engine import resolve_backend

    backends = ["io_uring", "threads"] if resolve_backend("auto") == "io_uring" else ["threads"]
    configs = [IOConfig(block_size=b, threads=t, queue_depth=q, direct=True, backend=k) for b in BLOCK_SIZES
               for t, q in IN_FLIGHT for k in backends]
    workdir = Path(tempfile.mkdtemp(prefix="offload-tune-", dir=root))
    pool = HostPool()
    results: dict[tuple, list[tuple[float, float]]] = {}
    try:
        buffer = pool.allocate(nbytes, "tune buffer")
        buffer.tensor.random_(0, 256, generator=torch.Generator().manual_seed(0))
        path = workdir / "test.bin"
        total = args.rounds * (len(configs) + 1)
        with tqdm(total=total, desc="offload tune", unit="config", disable=None) as bar:
            for r in range(args.rounds):
                for io in (configs if r % 2 == 0 else configs[::-1]):
                    results.setdefault(_key(io), []).append(measure_throughput(path, buffer.tensor, io, IoEngine))
                    bar.update(1)
                best = max(configs, key=lambda io: _median_trial(io, results).score)
                buffered = IOConfig(block_size=best.block_size, threads=best.threads, queue_depth=best.queue_depth,
                                    direct=False, backend=best.backend)
                results.setdefault(_key(buffered), []).append(
                    measure_throughput(path, buffer.tensor, buffered, IoEngine))
                bar.update(1)
    finally:
        pool.close()
        shutil.rmtree(workdir, ignore_errors=True)  # nothing is left in --dir, on Ctrl-C or errors too
    trials = sorted((_median_trial(io, results) for io in _all_configs(results)), key=lambda t: -t.score)
    _print_table(trials, root, nbytes, args.rounds)
    best = trials[0]
    _write_config(Path(args.out), best.io, f"# offload tune, {time.strftime('%Y-%m-%d')}, {root}: "
                  f"write_gbs={best.write_gbs:.3f} read_gbs={best.read_gbs:.3f}\n")
    _plot(trials, Path(args.out).with_suffix(".png"))
    print(f"best: block_size={best.io.block_size >> 20}MiB threads={best.io.threads} queue_depth={best.io.queue_depth} "
          f"direct={best.io.direct} backend={best.io.backend} (write {best.write_gbs:.2f} GB/s, "
          f"read {best.read_gbs:.2f} GB/s); "
          f"written to [io] of {args.out}")
    print(json.dumps({"dir": str(root), "size": nbytes, "rounds": args.rounds, "best": asdict(best.io),
                      "write_gbs": best.write_gbs, "read_gbs": best.read_gbs}))
    return 0


def _key(io: IOConfig) -> tuple:
    return (io.block_size, io.threads, io.queue_depth, io.direct, io.backend)


def _all_configs(results: dict[tuple, list]) -> list[IOConfig]:
    return [IOConfig(block_size=b, threads=t, queue_depth=q, direct=d, backend=k) for b, t, q, d, k in results]


def _median_trial(io: IOConfig, results: dict[tuple, list[tuple[float, float]]]) -> Trial:
    runs = results[_key(io)]
    return Trial(io, statistics.median(w for w, _ in runs), statistics.median(r for _, r in runs))


def measure_throughput(path: Path, buffer, io: IOConfig, engine_cls) -> tuple[float, float]:
    """(write GB/s, read GB/s) of the whole buffer to and from a fresh file at ``path`` with ``io``."""
    nbytes = buffer.numel()
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if io.direct else 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        engine = engine_cls(io)
        start = time.perf_counter()
        engine.wait(engine.write(fd, 0, buffer, str(path)))
        os.fsync(fd)  # buffered writes count only once they are on the disk
        write_s = time.perf_counter() - start
        os.posix_fadvise(fd, 0, nbytes, os.POSIX_FADV_DONTNEED)  # buffered reads must come from the disk
        start = time.perf_counter()
        engine.wait(engine.read(fd, 0, buffer, str(path)))
        read_s = time.perf_counter() - start
        engine.close()  # (its threads or ring go now, not when the garbage collector gets to them)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return nbytes / write_s / 1e9, nbytes / read_s / 1e9


def _print_table(trials: list[Trial], root: Path, nbytes: int, rounds: int) -> None:
    print(f"\n{root}: {nbytes / 2**30:.2f} GiB written and read per configuration, median of {rounds} rounds\n")
    print("| block | threads x qd | direct | backend | write GB/s | read GB/s | both ways GB/s |")
    print("|---|---|---|---|---|---|---|")
    for t in trials:
        print(f"| {t.io.block_size >> 20} MiB | {t.io.threads} x {t.io.queue_depth} | {t.io.direct} | {t.io.backend} | "
              f"{t.write_gbs:.2f} | {t.read_gbs:.2f} | {t.score:.2f} |")
    print()


def _write_config(out: Path, io: IOConfig, comment: str = "") -> None:
    """Sets the [io] table of ``out`` to ``io``, atomically; a new file holds only that table, an existing one
    keeps its other settings exactly as written (a device left out stays chosen at run time). ``comment``
    (the measured bandwidths, which `offload estimate` reads) goes on top; earlier comments are not kept."""
    data: dict = {}
    if out.exists():
        Config.from_file(out)  # refuses a file that is not a valid config, before it is changed
        with open(out, "rb") as f:
            data = tomllib.load(f)
    data["io"] = asdict(io)
    write_atomic(str(out), comment + tomli_w.dumps(data))
    if Config.from_file(out).io != io:  # the file must say exactly what was measured
        raise RuntimeError(f"{out}: the [io] settings read back differ from the ones written")


def _plot(trials: list[Trial], png: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{t.io.block_size >> 20}M {t.io.threads}x{t.io.queue_depth} {t.io.backend[:2]}"
              f"{'' if t.io.direct else ' buf'}"
              for t in trials]
    fig, ax = plt.subplots(figsize=(max(6, len(trials) * 0.45), 4))
    x = range(len(trials))
    ax.bar([i - 0.2 for i in x], [t.write_gbs for t in trials], width=0.4, label="write")
    ax.bar([i + 0.2 for i in x], [t.read_gbs for t in trials], width=0.4, label="read")
    ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("GB/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"plot: {png}")
