#!/usr/bin/env python3
"""Run a few training steps of a small Llama with offloaded state and write a Chrome trace of what overlaps.

    python3 tools/step_timeline.py --params nvme --optimizer nvme --dir /tmp/swap --out trace.json
    # then open trace.json in https://ui.perfetto.dev (or chrome://tracing)

Tracks: compute (each group's forward), fetch (copies to the device), nvme read / nvme write (weights and
optimizer state, from issue to wait), gradients (each gradient added into the host accumulator), adam (each
group's update) and step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch

import offload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="nvme", choices=["device", "cpu", "nvme"])
    ap.add_argument("--optimizer", default="nvme", choices=["cpu", "nvme"])
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--dir", default=None, help="nvme_dir (default: a temporary directory)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--out", default="trace.json")
    a = ap.parse_args(argv)
    from offload.bench.llama import bench_llama

    model = bench_llama(a.hidden, a.layers, a.seq)
    nvme_dir = a.dir or tempfile.mkdtemp(prefix="offload-timeline-")
    config = offload.Config(device="cpu", dtype=a.dtype, params=a.params, optimizer=a.optimizer, nvme_dir=nvme_dir,
                            prefetch_layers=a.prefetch)
    timeline = offload.Timeline()
    ids = torch.randint(0, 32000, (a.batch, a.seq))
    with offload.Engine(model, config, lr=1e-4, max_grad_norm=1.0, timeline=timeline) as engine:
        for _ in range(a.steps):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            info = engine.step()
            print(json.dumps({"step": info.step, "time_s": round(info.time_s, 4), "adam_s": round(info.adam_s, 4),
                              "io_wait_s": round(info.io_wait_s, 4), "nvme_read": info.nvme_bytes_read,
                              "nvme_written": info.nvme_bytes_written}))
    timeline.save(a.out)
    print(f"wrote {len(timeline.events())} spans to {a.out}; open it in https://ui.perfetto.dev", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
