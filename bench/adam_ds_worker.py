#!/usr/bin/env python3
"""The worker of offload/bench/adam_worker.py with DeepSpeedCPUAdam added as ``--impl ds``, for bench/adam_ds.py.

Runs under the interpreter of a venv with DeepSpeed (tools/setup_ds_venv.sh), which need not have offload: the
library's worker is loaded from this source tree by path. DeepSpeedCPUAdam (adamw_mode) is timed as the worker
times torch fused AdamW: bf16 gradients upcast into the fp32 ``.grad`` first, the bf16 copy written by copy_ after.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

LIBRARY_WORKER = Path(__file__).resolve().parent.parent / "offload" / "bench" / "adam_worker.py"


def _library_worker():
    spec = importlib.util.spec_from_file_location("adam_worker", LIBRARY_WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    worker = _library_worker()

    def deepspeed_cpu_adam(params: list):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **worker.HYPER)

    worker.main({**worker.OPTIMIZERS, "ds": deepspeed_cpu_adam})


if __name__ == "__main__":
    sys.exit(main())
