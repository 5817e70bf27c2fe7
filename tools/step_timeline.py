#!/usr/bin/env python3
"""Run a few training steps of a small Llama with offloaded state and write a Chrome trace of what overlaps.

    python3 tools/step_timeline.py --params nvme --optimizer nvme --dir /tmp/swap --out trace.json
    # then open trace.json in https://ui.perfetto.dev (or chrome://tracing)

Tracks: compute (each group's forward), fetch (copies to the device), nvme read / nvme write (weights and
optimizer state, from issue to wait), gradients (each gradient added into the host accumulator), adam (each
group's update) and step.

With ``--device cuda`` the steps after the first also run under torch's profiler, whose trace (kernels, copies
and their streams, next to the host threads) goes to OUT with ``-cuda`` before the suffix: the engine's spans
say when the host issued and waited, the profiler's when the GPU copied and computed.
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
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--backward-step", action="store_true",
                    help="engine.backward_step(loss) (updates overlap backward; no clipping) instead of "
                         "backward(); step() with max_grad_norm=1")
    a = ap.parse_args(argv)
    from offload.bench.llama import bench_llama

    model = bench_llama(a.hidden, a.layers, a.seq, vocab=a.vocab)
    nvme_dir = a.dir or tempfile.mkdtemp(prefix="offload-timeline-")
    config = offload.Config(device=a.device, dtype=a.dtype, params=a.params, optimizer=a.optimizer, nvme_dir=nvme_dir,
                            prefetch_layers=a.prefetch)
    timeline = offload.Timeline()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device)
    profiler = None
    clip = None if a.backward_step else 1.0
    with offload.Engine(model, config, lr=1e-4, max_grad_norm=clip, timeline=timeline) as engine:
        for i in range(a.steps):
            if i == 1 and a.device == "cuda":  # the first step (trace, state creation) stays out of it
                from torch.profiler import ProfilerActivity, profile

                profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                profiler.__enter__()
            loss = engine(input_ids=ids, labels=ids).loss
            if a.backward_step:
                info = engine.backward_step(loss)
            else:
                engine.backward(loss)
                info = engine.step()
            engine.synchronize()
            print(json.dumps({"step": info.step, "time_s": round(info.time_s, 4), "adam_s": round(info.adam_s, 4),
                              "io_wait_s": round(info.io_wait_s, 4), "nvme_read": info.nvme_bytes_read,
                              "nvme_written": info.nvme_bytes_written}))
        if profiler is not None:
            profiler.__exit__(None, None, None)
    timeline.save(a.out)
    print(f"wrote {len(timeline.events())} spans to {a.out}; open it in https://ui.perfetto.dev", file=sys.stderr)
    if profiler is not None:
        stem, dot, suffix = a.out.rpartition(".")
        cuda_out = f"{stem}-cuda.{suffix}" if dot else f"{a.out}-cuda"
        profiler.export_chrome_trace(cuda_out)
        print(f"wrote torch's profile of steps 2..{a.steps} to {cuda_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
