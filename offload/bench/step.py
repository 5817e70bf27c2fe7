"""`offload bench step`: the engine's optimizer step against its floor, with the optimizer state in RAM or on NVMe.

Each placement runs in its own process (a 1B-parameter state needs most of the RAM). A model of square
bias-free linear layers (one group each) is wrapped by the Engine on the CPU device in bf16; every round runs
one backward (not timed) and then, in alternating order:
- ``step``: ``engine.step()``, wall time;
- ``adam``: the bare native kernel over the same groups, state in RAM (for NVMe: in a staging slot), the same
  bf16 output: the Adam-only time;
- NVMe only, ``read`` / ``write`` / ``mixed``: our I/O engine reading / writing (or alternating) a scratch
  file set in the same directory, one file per chunk the engine moves, three in flight as in the pipeline:
  the disk bandwidths.
The floor is Adam-only time for RAM state and max(bytes read / read bandwidth, bytes written / write bandwidth,
Adam-only time) for NVMe state. Medians over rounds and the ratio step / floor are reported (JSON lines and a
table, offload.bench.harness).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil

from offload.bench.harness import JsonLines, Ratio, markdown_table, median, round_order
from offload.config import IOConfig

HIDDEN = 4096  # one group = one 4096 x 4096 linear layer: 16.8M parameters, 201 MB of fp32 state
STATE_BYTES_PER_PARAM = 12
RAM_BYTES_PER_PARAM = {"cpu": 12 + 4 + 2, "nvme": 4 + 2}  # state (cpu only), fp32 grads, bf16 weights


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="offload bench step", description=__doc__.splitlines()[0],
                                 epilog="With --params cpu|nvme it benchmarks whole training steps with offloaded "
                                        "parameters instead: see 'offload bench step --params nvme --help'.")
    ap.add_argument("--numel", type=float, default=1e9, help="parameters in the optimizer state (default 1e9)")
    ap.add_argument("--placements", default="cpu,nvme", help="optimizer placements to run (default cpu,nvme)")
    ap.add_argument("--dir", default=".", help="nvme_dir for the NVMe placement (default: .)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block-size", default="8MiB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queue-depth", type=int, default=32)
    ap.add_argument("--out", default=None, help="append every raw record as a JSON line to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.numel < HIDDEN * HIDDEN:
        ap.error(f"--rounds must be >= 1 and --numel >= {HIDDEN * HIDDEN}")
    return a


def layers_that_fit(params: float, placement: str) -> tuple[int, str]:
    """Layers for ``params`` parameters, fewer if the placement's host memory would exceed 75% of RAM."""
    layers = max(1, round(params / (HIDDEN * HIDDEN)))
    budget = 0.75 * psutil.virtual_memory().available
    fit = int(budget // (RAM_BYTES_PER_PARAM[placement] * HIDDEN * HIDDEN))
    if fit < layers:
        return max(1, fit), f"capped from {layers} to {fit} layers to stay within 75% of available RAM"
    return layers, ""


def _backward(engine) -> None:
    import torch

    x = torch.randn(8, HIDDEN)
    engine.backward(engine(x).float().square().mean())


def _adam_only(engine, placement: str) -> float:
    """Seconds for the bare kernel over every group (no I/O, no bookkeeping), bf16 written like the engine; for
    NVMe state over a staging slot, chunk by chunk as the engine moves it."""
    import torch

    from offload import _C
    from offload.optim.state_store import chunks, split_state

    start = time.perf_counter()
    for g, state in enumerate(engine.store.states):
        numel = state.group.numel
        grad, weights = engine.training_state().grads.grad_hosts[g], engine.weights.weight_device[g]
        if placement == "cpu":
            spans = [(0, numel, state.state_host.view(torch.float32))]
        else:
            slot = engine.store.staging[0].view(torch.float32)
            spans = [(a, b, slot[:3 * (b - a)]) for a, b in chunks(numel, engine.store.chunk_elements)]
        for a, b, flat in spans:
            master, m, v = split_state(flat, b - a)
            _C.adam_step(master, grad[a:b], m, v, weights[a:b],
                         step=10, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    return time.perf_counter() - start


def run_worker(a: argparse.Namespace) -> None:
    """One placement's rounds (``a.worker``), in this process: prints a setup record, then one JSON record per
    round (the step, the bare kernel and, for NVMe, the disk, in alternating order, with their floor and the
    ratio step / floor). The engine is closed at the end, the scratch files with it."""
    import torch

    import offload

    placement = a.worker
    layers, note = layers_that_fit(a.numel, placement)
    model = torch.nn.Sequential(*[torch.nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(layers)])
    io = IOConfig(block_size=a.block_size, threads=a.threads, queue_depth=a.queue_depth)
    config = offload.Config(device="cpu", dtype="bf16", optimizer=placement, nvme_dir=a.dir, io=io)
    built = time.perf_counter()
    engine = offload.Engine(model, config, lr=1e-4)
    built = time.perf_counter() - built
    numel = sum(g.numel for g in engine.groups)
    scratch = _scratch_files(engine) if placement == "nvme" else []
    header = dict(kind="setup", placement=placement, layers=layers, params=numel, note=note, build_s=built,
                  io=f"bs={io.block_size} threads={io.threads} qd={io.queue_depth}",
                  direct=engine.swap.direct if engine.swap else None)
    print(json.dumps(header), flush=True)
    try:
        if scratch:  # allocated but never written extents read back as zeros without touching the disk
            _disk(engine, scratch, "write")
        for r in range(a.rounds):
            print(json.dumps(_round(engine, placement, scratch, r, numel)), flush=True)
    finally:
        engine.close()


def _scratch_files(engine) -> list:
    """One scratch file per chunk the engine moves, the size of one staging slot's state (created, not written)."""
    from offload.optim.state_store import chunks

    chunk = engine.store.chunk_elements
    pieces = [(b - a) * 12 for s in engine.store.states for a, b in chunks(s.group.numel, chunk)]
    return [engine.swap.create(f"bench scratch {i}", nbytes) for i, nbytes in enumerate(pieces)]


def _disk(engine, scratch: list, op: str) -> float:
    """Seconds to move every scratch file through the staging slots, as many in flight as there are slots: ``op``
    "read" or "write" each file; "mixed": reads and writes alternating, file by file."""
    slots = engine.store.staging
    handles = []
    start = time.perf_counter()
    for k, swap in enumerate(scratch):
        if len(handles) == len(slots):
            engine.swap.wait(handles.pop(0))
        buffer = slots[k % len(slots)].tensor[:swap.capacity]
        reads = op == "read" or (op == "mixed" and k % 2 == 0)
        submit = engine.swap.read if reads else engine.swap.write
        handles.append(submit(swap, 0, buffer))
    for handle in handles:
        engine.swap.wait(handle)
    return time.perf_counter() - start


def _round(engine, placement: str, scratch: list, r: int, numel: int) -> dict:
    """Round ``r``'s record: one backward (not timed), then its parts in alternating order, their floor and the
    ratio step / floor (NVMe: also against the bandwidth of reads and writes sharing the disk)."""
    _backward(engine)
    parts = round_order(["adam", "step"] + (["read", "write", "mixed"] if placement == "nvme" else []), r)
    record = dict(kind="round", placement=placement, round=r, params=numel)
    for part in parts:
        if part == "step":
            info = engine.step()
            record.update(step_s=info.time_s, step_adam_s=info.adam_s, step_io_wait_s=info.io_wait_s,
                          bytes_read=info.nvme_bytes_read, bytes_written=info.nvme_bytes_written)
        elif part == "adam":
            record["adam_s"] = _adam_only(engine, placement)
        else:
            seconds = _disk(engine, scratch, part)
            record[f"{part}_gbs"] = sum(s.capacity for s in scratch) / seconds / 1e9
    if placement == "nvme":
        record["floor_s"] = max(record["bytes_read"] / (record["read_gbs"] * 1e9),
                                record["bytes_written"] / (record["write_gbs"] * 1e9), record["adam_s"])
        # The same bytes at the bandwidth the disk gives when reads and writes share it:
        moved = record["bytes_read"] + record["bytes_written"]
        record["shared_floor_s"] = max(moved / (record["mixed_gbs"] * 1e9), record["adam_s"])
        record["ratio_shared"] = record["step_s"] / record["shared_floor_s"]
    else:
        record["floor_s"] = record["adam_s"]
    record["ratio"] = record["step_s"] / record["floor_s"]
    return record


def summarize(records: list[dict]) -> list[dict]:
    """Per placement: the medians over its rounds, and the range of the per-round ratios step / floor."""
    rows = []
    for placement in dict.fromkeys(r["placement"] for r in records):
        rounds = [r for r in records if r["placement"] == placement and r["kind"] == "round"]
        if not rounds:
            continue
        row = dict(kind="summary", placement=placement, params=rounds[0]["params"], rounds=len(rounds))
        for key in ("step_s", "adam_s", "floor_s", "ratio", "read_gbs", "write_gbs", "mixed_gbs",
                    "shared_floor_s", "ratio_shared", "step_io_wait_s"):
            if key in rounds[0]:
                row[key] = median(r[key] for r in rounds)
        row["ratio_min"] = min(r["ratio"] for r in rounds)
        row["ratio_max"] = max(r["ratio"] for r in rounds)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def gbs(row: dict, key: str) -> str:
        return f"{row[key]:.2f}" if key in row else "-"

    columns = ["state", "params", "step s", "adam s", "read GB/s", "write GB/s", "floor s", "step/floor"]
    return markdown_table(columns, [[row["placement"], f"{row['params'] / 1e9:.2f}B", f"{row['step_s']:.3f}",
                                     f"{row['adam_s']:.3f}", gbs(row, "read_gbs"), gbs(row, "write_gbs"),
                                     f"{row['floor_s']:.3f}", Ratio(row["ratio"], row["ratio_min"],
                                                                    row["ratio_max"]).cell()] for row in rows])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg == "--params" or arg.startswith("--params=") for arg in argv) and \
            "--worker" not in argv:
        from offload.bench import train_step  # whole training steps with offloaded parameters

        return train_step.main(argv)
    a = parse_args(argv)
    if a.worker:
        run_worker(a)
        return 0
    records = []
    for placement in a.placements.split(","):
        if placement not in RAM_BYTES_PER_PARAM:
            print(f"offload bench step: unknown placement {placement!r} (cpu, nvme)", file=sys.stderr)
            return 2
        argv_worker = [sys.executable, "-m", "offload.bench.step", "--worker", placement,
                       "--numel", str(a.numel), "--dir", a.dir, "--rounds", str(a.rounds),
                       "--block-size", a.block_size, "--threads", str(a.threads),
                       "--queue-depth", str(a.queue_depth)]
        print(f"offload bench step: {placement} state, {a.rounds} rounds ...", file=sys.stderr, flush=True)
        proc = subprocess.run(argv_worker, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return proc.returncode
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            records.append(record)
            print(line)
            if record["kind"] == "setup" and record["note"]:
                print(f"offload bench step: {placement}: {record['note']}", file=sys.stderr)
    with JsonLines(a.out) as out:
        for record in records:
            out.write(record)
    rows = summarize(records)
    for row in rows:
        print(json.dumps(row))
    print(f"\nMedians of {a.rounds} rounds, the parts of each round in alternating order; step/floor: the median "
          "of per-round ratios [min-max].")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
