"""Checks `offload tune`'s choice against fio: the tuned [io] settings (our engine) and fio's best of its two
standard settings, interleaved round by round on the same directory. Prints JSON lines and a table of medians.

    python3 bench/tune_vs_fio.py --dir /mnt/nvme/swap --config offload.toml --rounds 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from offload.bench.harness import markdown_table, median, paired_ratio, round_order
from offload.bench.io import run_fio
from offload.cli.tune import measure_throughput
from offload.config import Config, parse_bytes
from offload.storage import HostPool, IoEngine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--config", default="offload.toml", help="the file offload tune wrote")
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    io = Config.from_file(a.config).io
    nbytes = parse_bytes("--size", a.size)
    work = Path(tempfile.mkdtemp(prefix="offload-tune-vs-fio-", dir=a.dir))
    pool = HostPool()
    rows = []
    try:
        buffer = pool.allocate(nbytes, "tune-vs-fio")
        buffer.tensor.random_(0, 256)
        for r in range(a.rounds):
            for impl in round_order(("ours", "fio"), r):
                if impl == "ours":
                    write, read = measure_throughput(work / "ours.bin", buffer.tensor, io, IoEngine)
                else:
                    records = run_fio(work, nbytes)
                    write = max(x["gbs"] for x in records if x["op"] == "write")
                    read = max(x["gbs"] for x in records if x["op"] == "read")
                    for f in work.iterdir():
                        f.unlink()
                row = dict(round=r, impl=impl, write_gbs=write, read_gbs=read)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        pool.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{a.dir}, {nbytes >> 20} MiB, {a.rounds} rounds interleaved; ours = {io}\n")
    cells = []
    for op in ("write", "read"):
        speed = {impl: {x["round"]: x[f"{op}_gbs"] for x in rows if x["impl"] == impl} for impl in ("ours", "fio")}
        cells.append([op, f"{median(speed['ours'].values()):.2f}", f"{median(speed['fio'].values()):.2f}",
                      paired_ratio(speed["ours"], speed["fio"]).cell()])
    print(markdown_table(["op", "tuned offload GB/s", "fio best GB/s", "ratio (per round) [min-max]"], cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
