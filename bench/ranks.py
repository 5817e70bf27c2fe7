#!/usr/bin/env python3
"""Per-rank memory and step time of one process against N ranks (gloo, CPU), the runs interleaved.

Each run spawns its ranks (``torch.multiprocessing``, gloo on 127.0.0.1), trains the same Llama on the same
global batch (each of N ranks takes 1/N of it, with 1/N of the cores) and reports per rank: the engine's host
buffers at their peak, the RSS the engine adds once built (its state), the peak RSS, NVMe bytes per step, and
the median step time. Rounds alternate 1 rank and N ranks; the table shows medians and the N-rank / 1-rank
ratios. JSON lines go to stdout (and ``--out``), the table to stderr.

    python3 bench/ranks.py --ranks 2 --hidden 512 --layers 8 --params nvme --optimizer nvme --dir /mnt/nvme
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from offload.bench.harness import JsonLines, markdown_table, median, round_order


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, a: argparse.Namespace, out_dir: str) -> None:
    import offload
    import offload.native
    from offload.bench.llama import bench_llama

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    offload.native.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        process = psutil.Process()
        model = bench_llama(a.hidden, a.layers, a.tokens, vocab=a.vocab)
        rss_before = process.memory_info().rss
        config = offload.Config(device="cpu", dtype=a.dtype, params=a.params, optimizer=a.optimizer,
                                nvme_dir=a.dir, prefetch_layers=2)
        gen = torch.Generator().manual_seed(1)
        rows = a.batch // world
        times = []
        with offload.Engine(model, config, lr=1e-4) as engine:
            rss_state = process.memory_info().rss
            for step in range(a.warmup + a.steps):
                if step == a.warmup:  # (the previous step is complete: each step ends with synchronize)
                    before = engine.stats()
                ids = torch.randint(0, a.vocab, (a.batch, a.tokens), generator=gen)[rank * rows:(rank + 1) * rows]
                dist.barrier()
                start = time.perf_counter()
                engine.backward_step(engine(input_ids=ids, labels=ids).loss)
                engine.synchronize()
                dist.barrier()
                if step >= a.warmup:
                    times.append(time.perf_counter() - start)
            stats = engine.stats()
        measured = max(1, len(times))
        record = {"world": world, "rank": rank, "step_s": median(times),
                  "host_buffers_peak": stats.host_bytes_peak, "state_rss": rss_state - rss_before,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "nvme_read_per_step": (stats.nvme_bytes_read - before.nvme_bytes_read) / measured,
                  "nvme_written_per_step": (stats.nvme_bytes_written - before.nvme_bytes_written) / measured}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


def _run(world: int, a: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank, args=(world, _free_port(), a, out_dir), nprocs=world)
        records = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                records.append(json.load(f))
        return records


FIELDS = ("step_s", "host_buffers_peak", "state_rss", "peak_rss", "nvme_read_per_step", "nvme_written_per_step")
# each field's table column: its unit and decimals
COLUMNS = {"step_s": ("step s", 1, 3), "host_buffers_peak": ("host buffers MiB", 2**20, 0),
           "state_rss": ("state RSS MiB", 2**20, 0), "peak_rss": ("peak RSS MiB", 2**20, 0),
           "nvme_read_per_step": ("NVMe read MB/step", 1e6, 1),
           "nvme_written_per_step": ("NVMe written MB/step", 1e6, 1)}


def _table(medians: dict[int, dict[str, float]], ranks: int) -> str:
    """The medians per rank of 1 and of N ranks, and their ratios N / 1 (none for zero NVMe bytes)."""
    def cells(m: dict[str, float]) -> list[str]:
        return [f"{m[k] / unit:.{digits}f}" for k, (_, unit, digits) in COLUMNS.items()]

    one, many = medians[1], medians[ranks]
    ratios = [f"{many[k] / one[k]:.2f}" if one[k] else "-" for k in FIELDS]
    rows = [[str(world)] + cells(m) for world, m in medians.items()] + [[f"{ranks} / 1"] + ratios]
    return markdown_table(["ranks"] + [name for name, _, _ in COLUMNS.values()], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=128, help="sequence length")
    ap.add_argument("--batch", type=int, default=4, help="global batch (sequences), split over the ranks")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--params", default="cpu", choices=["device", "cpu", "nvme"])
    ap.add_argument("--optimizer", default="cpu", choices=["cpu", "nvme"])
    ap.add_argument("--dir", default=None, help="nvme_dir (default: a temporary directory)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", help="also append the JSON lines to this file")
    a = ap.parse_args(argv)
    if a.batch % a.ranks:
        ap.error(f"--batch {a.batch} does not split over --ranks {a.ranks}")
    scratch = None
    if a.dir is None and "nvme" in (a.params, a.optimizer):
        scratch = tempfile.TemporaryDirectory(prefix="bench-ranks-")
        a.dir = scratch.name
    per_world: dict[int, list[dict]] = {1: [], a.ranks: []}
    try:
        with JsonLines(a.out) as out:
            for round_index in range(a.rounds):
                for world in round_order((1, a.ranks), round_index):  # interleaved: 1, N, then N, 1, ...
                    for record in _run(world, a):
                        record.update(round=round_index, hidden=a.hidden, layers=a.layers, params=a.params,
                                      optimizer=a.optimizer, dtype=a.dtype)
                        print(json.dumps(record), flush=True)
                        out.write(record)
                        per_world[world].append(record)
    finally:
        if scratch is not None:
            scratch.cleanup()
    medians = {w: {k: median(r[k] for r in recs) for k in FIELDS} for w, recs in per_world.items()}
    print(f"\n{a.layers} layers x {a.hidden}, params={a.params} optimizer={a.optimizer} {a.dtype}, global batch "
          f"{a.batch} x {a.tokens}, {a.rounds} rounds, medians (per rank)", file=sys.stderr)
    print(_table(medians, a.ranks), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
