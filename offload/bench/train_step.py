"""`offload bench step --params cpu|nvme`: whole training steps with offloaded parameters against their floor.

Each round runs, in alternating order and each in its own process, the same Llama-style model (bf16, CPU
device, one micro-batch) for a few steps:
- ``compute``: ``params="device"``, ``optimizer="cpu"``: nothing offloaded; the compute-only step;
- ``offload``: the placement under test (``--params``; ``--optimizer``, by default ``cpu`` as in Config, so
  that the parameters' offload is what is measured; ``--host-memory-limit``), ``device_memory_limit`` a quarter
  of the parameter bytes (raised to the largest group plus ``--prefetch`` average groups when a large
  embedding makes a quarter too small).
The offload worker also measures our I/O engine's bandwidth in the same directory, reading and writing
alternately (the disk here shares one bandwidth between reads and writes), and the I/O floor is the step's
NVMe bytes at that bandwidth. Reported: medians over rounds and ratio = offload step / max(compute step, floor).
A process's step time is the time of its timed steps, from the first one's start to the end of the last one's
overlapped update (``engine.synchronize()``), over their number. By default each step is ``backward(loss);
step()`` with clipping at 1.0 (the update then needs the global norm and starts after backward);
``--backward-step`` trains without clipping through ``engine.backward_step(loss)``, whose updates run during
backward, in both processes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from offload.bench.harness import JsonLines, Ratio, markdown_table, median, round_order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="offload bench step --params", description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True, choices=["cpu", "nvme"])
    ap.add_argument("--optimizer", default="cpu", choices=["cpu", "nvme"],
                    help="where the offloaded run's optimizer state lives (default: cpu, Config's default)")
    ap.add_argument("--dir", default=".", help="nvme_dir (default: .)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per step (batch 1)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up step")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--backward-step", action="store_true",
                    help="no clipping, engine.backward_step(loss) (updates overlap backward) in both processes")
    ap.add_argument("--host-memory-limit", default=None,
                    help="Config.host_memory_limit of the offloaded run, e.g. 2GiB: with --optimizer nvme the groups "
                         "whose state fits stay in RAM, the embedding's first (default: none; with --optimizer "
                         "nvme all state is then on NVMe)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _mixed_bandwidth(engine, nbytes: int) -> float:
    """GB/s of our I/O engine alternately writing and reading scratch files (64 MiB requests, 3 in flight)."""
    from offload.storage.host_pool import HostPool

    request = 64 << 20
    count = max(4, nbytes // request)
    pool = HostPool()
    buffers = [pool.allocate(request, f"scratch {i}") for i in range(3)]
    files = [engine.swap.create(f"bench scratch {i}", request) for i in range(count)]
    try:
        for f in files:  # extents never written read back as zeros without touching the disk
            engine.swap.wait(engine.swap.write(f, 0, buffers[0].tensor))
        handles = []
        start = time.perf_counter()
        for k, f in enumerate(files):
            if len(handles) == 3:
                engine.swap.wait(handles.pop(0))
            submit = engine.swap.read if k % 2 == 0 else engine.swap.write
            handles.append(submit(f, 0, buffers[k % 3].tensor))
        for h in handles:
            engine.swap.wait(h)
        return count * request / (time.perf_counter() - start) / 1e9
    finally:
        for b in buffers:
            pool.release(b)
        pool.close()


def run_worker(a: argparse.Namespace) -> None:
    import torch

    import offload
    from offload.layout.partition import partition_model

    kind = a.worker
    from offload.bench.llama import bench_llama

    model = bench_llama(a.hidden, a.layers, a.tokens)
    nparams = sum(p.numel() for p in model.parameters())
    groups = [sum(p.numel() for p in g.params) for g in partition_model(model).groups]
    device_limit = max(nparams * 2 // 4, 2 * (max(groups) + a.prefetch * nparams // len(groups)) + (8 << 20))
    if kind == "compute":
        config = offload.Config(device="cpu", dtype="bf16")
    else:
        config = offload.Config(device="cpu", dtype="bf16", params=a.params, optimizer=a.optimizer,
                                nvme_dir=a.dir, prefetch_layers=a.prefetch,  # (the swap files: a run dir of their own)
                                device_memory_limit=device_limit, host_memory_limit=a.host_memory_limit)
    ids = torch.randint(0, 32000, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    with offload.Engine(model, config, lr=1e-4, max_grad_norm=None if a.backward_step else 1.0) as engine:
        def step() -> None:
            loss = engine(input_ids=ids, labels=ids).loss
            if a.backward_step:
                engine.backward_step(loss)
            else:
                engine.backward(loss)
                engine.step()

        step()  # the first step warms caches and traces the order
        engine.synchronize()
        before = engine.stats()
        start = time.perf_counter()
        for _ in range(a.steps):
            step()
        engine.synchronize()  # the last step's overlapped update belongs to the timed steps
        elapsed = time.perf_counter() - start
        after = engine.stats()
        moved = (after.nvme_bytes_read - before.nvme_bytes_read
                 + after.nvme_bytes_written - before.nvme_bytes_written) / a.steps
        record = dict(kind=kind, params=nparams, step_s=elapsed / a.steps, device_limit=device_limit,
                      nvme_bytes=moved, device_peak=after.device_param_bytes_peak,
                      host_peak=after.host_bytes_peak, host_memory_limit=a.host_memory_limit,
                      state_groups_in_ram=after.optimizer_groups_on_host, backward_step=a.backward_step)
        if kind == "offload" and engine.swap is not None:
            record["mixed_gbs"] = _mixed_bandwidth(engine, max(1 << 30, int(record["nvme_bytes"])))
    print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        run_worker(a)
        return 0
    common = ["--params", a.params, "--optimizer", a.optimizer, "--dir", a.dir, "--layers", str(a.layers),
              "--hidden", str(a.hidden), "--tokens", str(a.tokens), "--steps", str(a.steps),
              "--prefetch", str(a.prefetch)] + (["--backward-step"] if a.backward_step else []) \
        + (["--host-memory-limit", a.host_memory_limit] if a.host_memory_limit else [])
    rounds = []
    for r in range(a.rounds):
        record = {"round": r}
        for kind in round_order(["compute", "offload"], r):
            print(f"offload bench step: round {r + 1}/{a.rounds}: {kind} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, "-m", "offload.bench.train_step", "--worker", kind, *common],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            record[kind] = result
        off = record["offload"]
        floor_io = off["nvme_bytes"] / (off["mixed_gbs"] * 1e9) if off.get("mixed_gbs") else 0.0
        record.update(compute_s=record["compute"]["step_s"], offload_s=off["step_s"], io_floor_s=floor_io,
                      ratio=off["step_s"] / max(record["compute"]["step_s"], floor_io))
        rounds.append(record)
        print(json.dumps(record), flush=True)
    with JsonLines(a.out) as out:
        for record in rounds:
            out.write(dict(record, placement=f"params={a.params} optimizer={a.optimizer}",
                           host_memory_limit=a.host_memory_limit, backward_step=a.backward_step))
    med = {k: median(r[k] for r in rounds) for k in ("compute_s", "offload_s", "io_floor_s", "ratio")}
    ratio = Ratio(med["ratio"], min(r["ratio"] for r in rounds), max(r["ratio"] for r in rounds))
    params = rounds[0]["offload"]["params"]
    how = "backward_step, no clipping" if a.backward_step else "backward + step, clipping at 1.0"
    budget = f", host_memory_limit={a.host_memory_limit}" if a.host_memory_limit else ""
    print(json.dumps(dict(kind="summary", params=params, rounds=len(rounds), **med, ratio_min=ratio.low,
                          ratio_max=ratio.high)))
    print(f"\nparams={a.params} optimizer={a.optimizer}{budget} ({how}): {params / 1e6:.0f}M parameters, {a.tokens} "
          f"tokens/step, {a.rounds} rounds (medians; the ratio: the median of per-round ratios [min-max])")
    print(markdown_table(["compute-only s", "offload s", "I/O floor s", "offload / max(compute, I/O)"],
                         [[f"{med['compute_s']:.3f}", f"{med['offload_s']:.3f}", f"{med['io_floor_s']:.3f}",
                           ratio.cell()]], labels=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
