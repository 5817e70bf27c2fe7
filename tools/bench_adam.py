#!/usr/bin/env python3
"""Paired Adam benchmark (same as `offload bench adam`): ours vs torch fused AdamW vs DeepSpeedCPUAdam.

The reported run (README table):
    OFFLOAD_BENCH_DS_PYTHON=/path/to/ds-venv/bin/python OFFLOAD_BENCH_MEMBW=/path/to/membw \\
        python tools/bench_adam.py --rounds 7 --numel 100e6 --ntensors 1000 --out adam.jsonl
"""

import sys

from offload.bench.adam import main

if __name__ == "__main__":
    sys.exit(main())
