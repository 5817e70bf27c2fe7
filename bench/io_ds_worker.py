"""DeepSpeed's async I/O (aio_handle, O_DIRECT + libaio, page-locked buffer) for bench/io_ds.py.

Run by bench/io_ds.py as a script under the interpreter of a throwaway venv with DeepSpeed (its op must be
JIT-built there); imports nothing of offload. Prints one JSON line per (op, config): the seconds of one pass
over the whole file.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", required=True)
    ap.add_argument("--nbytes", type=int, required=True)
    ap.add_argument("--configs", required=True, help="comma list of BLOCK_BYTES:QUEUE_DEPTH:INTRA_OP")
    ap.add_argument("--ops", default="write,read")
    a = ap.parse_args()

    from deepspeed.ops.op_builder import AsyncIOBuilder

    aio = AsyncIOBuilder().load(verbose=False)
    buffer = None
    for spec in a.configs.split(","):
        block, depth, intra = (int(x) for x in spec.split(":"))
        handle = aio.aio_handle(block, depth, False, True, intra)
        if buffer is None:
            buffer = handle.new_cpu_locked_tensor(a.nbytes, torch.empty(0, dtype=torch.uint8))
            buffer.random_(0, 256)
        for op in a.ops.split(","):
            start = time.perf_counter()
            result = handle.sync_pwrite(buffer, a.path) if op == "write" else handle.sync_pread(buffer, a.path)
            seconds = time.perf_counter() - start
            print(json.dumps(dict(impl="ds", op=op, config=f"bs={block >> 20}MiB qd={depth} intra_op={intra}",
                                  seconds=seconds, gbs=a.nbytes / seconds / 1e9, result=int(result))), flush=True)
    if buffer is not None:
        handle.free_cpu_locked_tensor(buffer)


if __name__ == "__main__":
    main()
