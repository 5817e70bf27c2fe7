#!/usr/bin/env python3
"""Paired I/O benchmark (same as `offload bench io`): our I/O engine vs fio vs DeepSpeed aio_handle.

The reported run (README table):
    OFFLOAD_BENCH_DS_PYTHON=/path/to/ds-venv/bin/python python tools/bench_io.py --dir /path/on/nvme \\
        --size 4GiB --rounds 5 --out io.jsonl
"""

import sys

from offload.bench.io import main

if __name__ == "__main__":
    sys.exit(main())
