#!/usr/bin/env python3
"""`offload bench adam` with DeepSpeedCPUAdam added: ours vs torch fused AdamW vs DeepSpeed, interleaved.

The same rounds, records and table as `offload bench adam` (offload/bench/adam.py); the ``ds`` implementation
runs in bench/adam_ds_worker.py under the python of a DeepSpeed venv (tools/setup_ds_venv.sh; DeepSpeed is never
a dependency of offload). The README's Adam table:

    OFFLOAD_BENCH_DS_PYTHON=/path/to/ds-venv/bin/python OFFLOAD_BENCH_MEMBW=/path/to/membw \\
        python3 bench/adam_ds.py --rounds 7 --numel 100e6 --ntensors 1000 --threads 1,2 --out /tmp/adam.jsonl
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from offload.bench import adam

DS_WORKER = Path(__file__).resolve().with_name("adam_ds_worker.py")
IMPLS = adam.IMPLS + ("ds",)


def deepspeed_python(requested: str | None) -> str | None:
    """``requested``, else this python if it can import deepspeed, else None."""
    if requested:
        return requested
    probe = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True)
    return sys.executable if probe.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    ap = adam.argument_parser("bench/adam_ds.py", __doc__.splitlines()[0], IMPLS)
    ap.add_argument("--ds-python", default=os.environ.get("OFFLOAD_BENCH_DS_PYTHON"),
                    help="python of a venv with deepspeed (default: $OFFLOAD_BENCH_DS_PYTHON, else this python "
                         "if it can import deepspeed, else DeepSpeed is skipped)")
    a = adam.check_args(ap, ap.parse_args(argv), IMPLS)
    workers = {impl: (sys.executable, adam.WORKER) for impl in a.impls.split(",") if impl}
    if "ds" in workers:
        ds = deepspeed_python(a.ds_python)
        if ds is None:
            print("DeepSpeed is not importable here and no --ds-python was given: skipping the 'ds' baseline",
                  file=sys.stderr)
            del workers["ds"]
        else:
            workers["ds"] = (ds, DS_WORKER)
    return adam.run(a, workers)


if __name__ == "__main__":
    sys.exit(main())
