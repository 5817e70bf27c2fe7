#!/usr/bin/env python3
"""Run a few training steps of a small Llama with offloaded state and write a Chrome trace of what overlaps.

    python3 bench/step_timeline.py --params nvme --optimizer nvme --dir /tmp/swap --out /tmp/trace.json
    # then open /tmp/trace.json in https://ui.perfetto.dev (or chrome://tracing)

Tracks: compute (each group's forward), fetch (copies to the device), nvme read / nvme write (weights and
optimizer state, from issue to wait), gradients (each gradient added into the host accumulator), adam (each
group's update) and step (each forward and backward call of the loop); counters: disk busy %, disk MB/s (the
block device under the swap directory, from psutil's disk counters) and CPU cores (this process). At the end it
prints, per phase of the steps after the first, how long it took and how busy the disk and the CPU were
(exact means from the cumulative counters): "forward: compute" (the group forwards), "forward: waits" (the
rest of the forward calls: waiting for updates and fetches), "backward" (the backward calls, with the
updates that overlap them) and "rest" (step() calls, the final wait).

Steps follow one another as in training (an overlapped update runs into the next forward); ``--sync`` waits
for each step's update before the next one instead, which gives complete per-step NVMe byte counts.

With ``--device cuda`` the steps after the first also run under torch's profiler, whose trace (kernels, copies
and their streams, next to the host threads) goes to OUT with ``-cuda`` before the suffix: the engine's spans
say when the host issued and waited, the profiler's when the GPU copied and computed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

import offload
from offload.bench.harness import markdown_table


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
    ap.add_argument("--out", default=None,
                    help="the Chrome trace to write (default: offload-timeline-PID.json in the temp directory)")
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
    if a.out is None:
        a.out = os.path.join(tempfile.gettempdir(), f"offload-timeline-{os.getpid()}.json")
    from offload.bench.llama import bench_llama

    model = bench_llama(a.hidden, a.layers, a.seq, vocab=a.vocab)
    scratch = None if a.dir else tempfile.TemporaryDirectory(prefix="offload-timeline-")  # removed at exit
    nvme_dir = a.dir or scratch.name
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
                with timeline.span("step", f"backward {i + 1} (call)"):  # (with the updates it overlaps)
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
        print_phase_summary(timeline, sampler, first_timed, last, a.steps - 1)
    if profiler is not None:
        stem, dot, suffix = a.out.rpartition(".")
        cuda_out = f"{stem}-cuda.{suffix}" if dot else f"{a.out}-cuda"
        profiler.export_chrome_trace(cuda_out)
        print(f"wrote torch's profile of steps 2..{a.steps} to {cuda_out}", file=sys.stderr)
    return 0


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for s, t in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], t))
        else:
            merged.append((s, t))
    return merged


def _minus(whole: tuple[float, float], parts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The pieces of ``whole`` that no span of ``parts`` (a union: sorted, disjoint) covers."""
    out, cursor = [], whole[0]
    for s, t in parts:
        s, t = max(s, whole[0]), min(t, whole[1])
        if t <= s:
            continue
        if s > cursor:
            out.append((cursor, s))
        cursor = max(cursor, t)
    if whole[1] > cursor:
        out.append((cursor, whole[1]))
    return out


def phases_of(events: list[dict], origin: float, start: float, end: float) -> dict[str, list[tuple[float, float]]]:
    """The timed steps' time, [start, end], split into phases (perf_counter spans): the group forwards
    (the 'compute' spans) inside the loop's forward calls, the rest of those calls (waiting for updates and
    fetches, hooks), the loop's backward calls, and whatever is left (step() calls, the final wait). A forward
    call without group spans (parameters on the device) is one "forward (unsplit)" span."""
    def span_of(e: dict) -> tuple[float, float]:
        return origin + e["ts"] / 1e6, origin + (e["ts"] + e["dur"]) / 1e6
    spans = [e for e in events if e["ph"] == "X"]
    compute = _union([span_of(e) for e in spans if e["cat"] == "compute"])
    calls = {"forward": [], "backward": []}
    for e in spans:
        s, t = span_of(e)
        if e["cat"] == "step" and e["name"].endswith("(call)") and start <= s and t <= end:
            calls["forward" if e["name"].startswith("forward") else "backward"].append((s, t))
    phases: dict[str, list[tuple[float, float]]] = {"forward (unsplit)": [], "forward: compute": [],
                                                    "forward: waits": []}
    for call in calls["forward"]:
        inside = [(max(s, call[0]), min(t, call[1])) for s, t in compute if s < call[1] and t > call[0]]
        if not inside:  # parameters on the device: no group spans to tell compute from waits
            phases["forward (unsplit)"].append(call)
            continue
        phases["forward: compute"] += inside
        phases["forward: waits"] += _minus(call, inside)
    phases["backward"] = calls["backward"]
    phases["rest"] = _minus((start, end), _union(calls["forward"] + calls["backward"]))
    phases["whole step"] = [(start, end)]
    return phases


def print_phase_summary(timeline: offload.Timeline, sampler, start: float, end: float, steps: int) -> None:
    """Per phase of the timed steps (phases_of), the time per step and how busy the disk and the CPU were
    meanwhile (exact means from the sampler's cumulative counters)."""
    def fmt(value: float | None, scale: float) -> str:
        return "-" if value is None else f"{value * scale:.2f}"

    phases = phases_of(timeline.events(), timeline.origin, start, end)
    print(f"\n{steps} timed steps, {(end - start) / steps:.3f} s per step")
    rows = []
    for name, spans in phases.items():
        length = sum(t - s for s, t in spans)
        if length <= 0:
            continue
        use = sampler.usage(spans)
        rows.append([name, f"{length / steps:.3f}", fmt(use and use.disk_busy, 100),
                     fmt(use and use.read_bytes_per_s, 1e-9), fmt(use and use.write_bytes_per_s, 1e-9),
                     fmt(use and use.cpu_cores, 1)])
    print(markdown_table(["phase", "s/step", "disk busy %", "disk read GB/s", "disk write GB/s", "CPU cores"], rows))

if __name__ == "__main__":
    sys.exit(main())
