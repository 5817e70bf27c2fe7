#!/usr/bin/env python3
"""Run a few training steps of a small Llama with offloaded state and write a Chrome trace of what overlaps.

    python3 tools/step_timeline.py --params nvme --optimizer nvme --dir /tmp/swap --out trace.json
    # then open trace.json in https://ui.perfetto.dev (or chrome://tracing)

Tracks: compute (each group's forward), fetch (copies to the device), nvme read / nvme write (weights and
optimizer state, from issue to wait), gradients (each gradient added into the host accumulator), adam (each
group's update) and step (each forward and backward call of the loop); counters: disk busy %, disk MB/s (the
block device under the swap directory, from /proc/diskstats) and CPU cores (this process). At the end it
prints, per phase of the steps after the first, how long it took and how busy the disk and the CPU were.

Steps follow one another as in training (an overlapped update runs into the next forward); ``--sync`` waits
for each step's update before the next one instead, which gives complete per-step NVMe byte counts.

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
    ap.add_argument("--device-memory-limit", default=None,
                    help="Config.device_memory_limit, e.g. 128MiB (default: none)")
    ap.add_argument("--sync", action="store_true",
                    help="wait for each step's update before the next forward (per-step byte counts complete)")
    ap.add_argument("--sample-interval", type=float, default=0.005, help="seconds between resource samples")
    a = ap.parse_args(argv)
    from offload.bench.llama import bench_llama

    model = bench_llama(a.hidden, a.layers, a.seq, vocab=a.vocab)
    nvme_dir = a.dir or tempfile.mkdtemp(prefix="offload-timeline-")
    config = offload.Config(device=a.device, dtype=a.dtype, params=a.params, optimizer=a.optimizer, nvme_dir=nvme_dir,
                            prefetch_layers=a.prefetch, device_memory_limit=a.device_memory_limit)
    timeline = offload.Timeline()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device)
    profiler = None
    clip = None if a.backward_step else 1.0
    with offload.Engine(model, config, lr=1e-4, max_grad_norm=clip, timeline=timeline) as engine, \
            timeline.sampling(nvme_dir, a.sample_interval) as sampler:
        if sampler.disk_note:
            print(f"step_timeline: {sampler.disk_note}", file=sys.stderr)
        first_timed = None
        for i in range(a.steps):
            if i == 1:  # the first step (trace, state creation) stays out of the summary and the profile
                engine.synchronize()
                first_timed = timeline.now()
                if a.device == "cuda":
                    from torch.profiler import ProfilerActivity, profile

                    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                    profiler.__enter__()
            with timeline.span("step", f"forward {i + 1} (call)"):
                loss = engine(input_ids=ids, labels=ids).loss
            if a.backward_step:
                info = engine.backward_step(loss)
            else:
                with timeline.span("step", f"backward {i + 1} (call)"):
                    engine.backward(loss)
                info = engine.step()
            if a.sync:
                engine.synchronize()
            print(json.dumps({"step": info.step, "time_s": round(info.time_s, 4), "adam_s": round(info.adam_s, 4),
                              "io_wait_s": round(info.io_wait_s, 4), "nvme_read": info.nvme_bytes_read,
                              "nvme_written": info.nvme_bytes_written, "overlapped": info.overlapped}))
        engine.synchronize()
        last = timeline.now()
        if profiler is not None:
            profiler.__exit__(None, None, None)
    timeline.save(a.out)
    print(f"wrote {len(timeline.events())} events to {a.out}; open it in https://ui.perfetto.dev", file=sys.stderr)
    if first_timed is not None:
        print_phase_summary(timeline, first_timed, last, a.steps - 1)
    if profiler is not None:
        stem, dot, suffix = a.out.rpartition(".")
        cuda_out = f"{stem}-cuda.{suffix}" if dot else f"{a.out}-cuda"
        profiler.export_chrome_trace(cuda_out)
        print(f"wrote torch's profile of steps 2..{a.steps} to {cuda_out}", file=sys.stderr)
    return 0


def _counter_mean(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """Time-weighted mean over [start, end] of a counter whose value holds from each sample to the next."""
    total = weight = 0.0
    for (t, value), nxt in zip(samples, samples[1:] + [(float("inf"), 0.0)]):
        overlap = min(end, nxt[0]) - max(start, t)
        if overlap > 0:
            total += value * overlap
            weight += overlap
    return total / weight if weight > 0 else None


def print_phase_summary(timeline: offload.Timeline, start: float, end: float, steps: int) -> None:
    """Per phase of the timed steps (the loop's forward calls, its backward calls or the rest), the time per step
    and how busy the disk and the CPU were meanwhile (counter tracks)."""
    origin = timeline._origin
    events = timeline.events()
    counters: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e["ph"] == "C":
            for key, value in e["args"].items():
                counters.setdefault(f"{e['name']}:{key}", []).append((origin + e["ts"] / 1e6, float(value)))
    def span_of(e: dict) -> tuple[float, float]:
        return origin + e["ts"] / 1e6, origin + (e["ts"] + e["dur"]) / 1e6
    compute_starts = sorted(span_of(e)[0] for e in events if e["ph"] == "X" and e["cat"] == "compute")
    # A forward call first waits for the groups it needs (their updates, their fetches), then computes: the
    # wait ends where the call's first group forward begins.
    phases: dict[str, list[tuple[float, float]]] = {"forward: wait": [], "forward: compute": [], "backward": []}
    for e in events:
        if e["ph"] != "X" or e["cat"] != "step":
            continue
        s, t = span_of(e)
        if s < start or t > end:
            continue
        if e["name"].startswith("forward"):
            # (no group spans with parameters on the device: the whole call computes)
            first = next((c for c in compute_starts if s <= c <= t), s)
            phases["forward: wait"].append((s, first))
            phases["forward: compute"].append((first, t))
        elif e["name"].startswith("backward") or "during backward" in e["name"]:
            phases["backward"].append((s, t))
    covered = sorted(phases["forward: wait"] + phases["forward: compute"] + phases["backward"])
    rest, cursor = [], start  # the gaps: step() calls, the final synchronize
    for s, t in covered:
        if s > cursor:
            rest.append((cursor, s))
        cursor = max(cursor, t)
    if end > cursor:
        rest.append((cursor, end))
    phases["rest"] = rest
    phases["whole step"] = [(start, end)]
    print(f"\n{steps} timed steps, {(end - start) / steps:.3f} s per step")
    print(f"{'phase':<17} {'s/step':>7} {'disk busy %':>12} {'disk read GB/s':>15} {'disk write GB/s':>16} {'CPU cores':>10}")
    for name, spans in phases.items():
        length = sum(t - s for s, t in spans)
        if length <= 0:
            continue

        def mean(key: str) -> str:
            samples = counters.get(key)
            if not samples:
                return "-"
            values = [(m, t - s) for s, t in spans if (m := _counter_mean(samples, s, t)) is not None]
            return f"{sum(m * w for m, w in values) / sum(w for _, w in values):.2f}" if values else "-"
        read, write = mean("disk MB/s:read"), mean("disk MB/s:write")
        read = f"{float(read) / 1e3:.2f}" if read != "-" else read
        write = f"{float(write) / 1e3:.2f}" if write != "-" else write
        busy = mean("disk busy %:busy")
        print(f"{name:<17} {length / steps:7.3f} {busy:>12} {read:>15} {write:>16} {mean('CPU cores:process'):>10}")


if __name__ == "__main__":
    sys.exit(main())
