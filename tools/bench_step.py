#!/usr/bin/env python3
"""Optimizer-step benchmark (same as `offload bench step`): engine.step() against its floor, state in RAM and on NVMe;
with --params cpu|nvme, whole training steps with offloaded parameters against max(compute-only step, I/O floor).

The reported run (README table):
    python tools/bench_step.py --numel 1e9 --dir /path/on/nvme --rounds 5 --out step.jsonl
"""

import sys

from offload.bench.step import main

if __name__ == "__main__":
    sys.exit(main())
