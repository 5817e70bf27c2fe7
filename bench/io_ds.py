#!/usr/bin/env python3
"""`offload bench io` with DeepSpeed's aio_handle added: our I/O engine vs fio vs DeepSpeed, interleaved.

The same rounds, records and table as `offload bench io` (offload/bench/io.py); the ``ds`` sweep runs in
bench/io_ds_worker.py under the python of a DeepSpeed venv (tools/setup_ds_venv.sh; its async_io op is JIT-built
there on first use), with a page-locked buffer. The README's I/O table:

    OFFLOAD_BENCH_DS_PYTHON=/path/to/ds-venv/bin/python python3 bench/io_ds.py --dir /path/on/nvme \\
        --size 4GiB --rounds 5 --out /tmp/io.jsonl
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from offload.bench import io

DS_WORKER = Path(__file__).resolve().with_name("io_ds_worker.py")
DS_CONFIGS = ["1048576:8:1", "8388608:32:2", "1048576:32:2"]  # block bytes : queue depth : intra-op threads
IMPLS = io.IMPLS + ("ds",)


def run_ds(python: str, path: Path, nbytes: int) -> list[dict]:
    """DeepSpeed's sweep over ``path`` (written, then read back, per configuration of DS_CONFIGS)."""
    cmd = [python, str(DS_WORKER), "--path", str(path), "--nbytes", str(nbytes), "--configs", ",".join(DS_CONFIGS)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"DeepSpeed worker failed: {proc.stderr.strip()[-500:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    ap = io.argument_parser("bench/io_ds.py", __doc__.splitlines()[0], IMPLS)
    ap.add_argument("--ds-python", default=os.environ.get("OFFLOAD_BENCH_DS_PYTHON"),
                    help="python of a venv with deepspeed and its async_io op (default: $OFFLOAD_BENCH_DS_PYTHON)")
    a = io.check_args(ap, ap.parse_args(argv), IMPLS)
    runners = io.runners(a)
    if "ds" in a.impls.split(","):
        if a.ds_python:
            runners["ds"] = lambda work, nbytes: run_ds(a.ds_python, work / "ds.bin", nbytes)
        else:
            print("no --ds-python (venv with deepspeed) given: skipping the DeepSpeed baseline", file=sys.stderr)
    return io.run(a, {impl: runners[impl] for impl in a.impls.split(",") if impl in runners})


if __name__ == "__main__":
    sys.exit(main())
