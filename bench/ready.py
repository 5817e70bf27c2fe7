#!/usr/bin/env python3
"""Time to a ready engine on a pretrained model: built from the checkpoint, or built then loaded.
Prints JSON lines and a markdown table; ``--out DIR`` writes ``<name>.json`` and ``<name>.md`` records.

    python3 bench/ready.py --rounds 5 --sizes 300m --kinds full,lora --dir /scratch --out bench/results/NAME
    python3 bench/ready.py --rounds 3 --sizes 7b --kinds lora --dir /scratch --out bench/results/NAME

A bf16 Hugging Face Llama directory (bench/finetune.py's shapes, made once under ``--dir``) is built as
`offload train --model DIR` builds it (under ``offload.init_empty``, on the meta device; "lora": peft LoRA r=16
on every linear layer, the base frozen), bf16 compute on the CPU, params and optimizer state on NVMe under
``--dir``, ``--host-memory-limit``. Two ways to a ready engine, each run a fresh process, interleaved (A B then
B A): "load" builds the engine (every group filled by the ``init_empty`` replay: the model's random init) and
then ``offload.load_pretrained`` overwrites it, as offload did up to this benchmark; "pretrained" builds it
with ``Engine(..., pretrained=DIR)``, filling each group from the checkpoint (no random init computed for it).
Per run: seconds from the start of the build to the ready engine, the process's peak RSS (ru_maxrss) and the
bytes it wrote (/proc/self/io ``write_bytes``: the swap files). The checkpoint is read through the page cache,
so a round's second reader may find it there: the order alternates.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import finetune
from finetune import Child, log, make_model_dir

WAYS = ("load", "pretrained")


def worker(a) -> int:
    """One build, in its own process: prints RESULT {ready_s, ru_maxrss_bytes, written_bytes, ...}."""
    import resource

    import torch

    import offload
    from offload.cli.lora import LoraPlan
    from offload.cli.model_source import resolve_model

    torch.set_num_threads(a.threads)
    source = resolve_model(a.model, 128)
    build = source.builder(0)
    if a.kind == "lora":
        build = LoraPlan(r=16, alpha=32, targets="all-linear", dropout=0.0).builder(build)
    config = offload.Config(device="cpu", dtype="bf16", params="nvme", optimizer="nvme", nvme_dir=a.swap,
                            host_memory_limit=a.host_memory_limit)
    written_before = _io("write_bytes")
    start = time.perf_counter()
    model = offload.init_empty(build)
    if a.way == "pretrained":
        engine = offload.Engine(model, config, lr=1e-4, pretrained=source.directory)
    else:
        engine = offload.Engine(model, config, lr=1e-4)
        offload.load_pretrained(engine, source.directory)
    ready = time.perf_counter() - start
    written = _io("write_bytes") - written_before
    with engine.gathered(engine.model.get_output_embeddings()):  # (a weight to compare the two ways by)
        head = engine.model.get_output_embeddings().weight
        checksum = float(head.double().sum())
    engine.close(keep_weights=False)
    print("RESULT " + json.dumps({"ready_s": ready, "written_bytes": written, "head_checksum": checksum,
                                  "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def _io(field: str) -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_one(a, model: Path, kind: str, way: str) -> dict:
    swap = Path(a.dir) / f"swap-ready-{way}"
    shutil.rmtree(swap, ignore_errors=True)
    swap.mkdir(parents=True)
    child = Child([sys.executable, __file__, "_worker", "--model", str(model), "--kind", kind, "--way", way,
                   "--swap", str(swap), "--host-memory-limit", a.host_memory_limit, "--threads", str(a.threads)],
                  env={"OMP_NUM_THREADS": str(a.threads)})
    done = child.wait()
    shutil.rmtree(swap, ignore_errors=True)
    result = child.result() or {}
    run = {"kind": kind, "way": way, "rc": done["rc"], **result, "wall_s": done["wall_s"], **finetune.contention(done)}
    if done["rc"] != 0 or not result:
        run["failed"] = child.text("err")[-3000:]
    log(f"{kind} {way}: {json.dumps({k: v for k, v in run.items() if k != 'failed'})}")
    return run


def bench(a) -> tuple[dict, str]:
    runs, rows = [], ["| model | ready: built then loaded (s) | ready: built from the checkpoint (s) | ratio "
                      "| peak RSS GiB (loaded / built from) | written GB (loaded / built from) |",
                      "|---|---:|---:|---:|---:|---:|"]
    summary = {}
    for size in a.sizes.split(","):
        model = make_model_dir(Path(a.dir) / f"model-{size}", size)
        for kind in a.kinds.split(","):
            mine = []
            for r in range(a.rounds):
                for way in (WAYS if r % 2 == 0 else WAYS[::-1]):
                    mine.append(run_one(a, model, kind, way))
            runs += mine
            if any("failed" in run for run in mine):
                continue
            by = {way: [run for run in mine if run["way"] == way] for way in WAYS}
            med = {way: {key: statistics.median(run[key] for run in by[way])
                         for key in ("ready_s", "ru_maxrss_bytes", "written_bytes")} for way in WAYS}
            ratios = [p["ready_s"] / ld["ready_s"] for ld, p in zip(by["load"], by["pretrained"])]
            same = len({round(run["head_checksum"], 3) for run in mine}) == 1
            summary[f"{size}-{kind}"] = {"load": med["load"], "pretrained": med["pretrained"],
                                         "ratio": med["pretrained"]["ready_s"] / med["load"]["ready_s"],
                                         "per_round": ratios, "same_weights": same}
            rows.append(f"| {size} {kind}{'' if same else ' (WEIGHTS DIFFER)'} | {med['load']['ready_s']:.1f} | "
                        f"{med['pretrained']['ready_s']:.1f} | **{summary[f'{size}-{kind}']['ratio']:.3f}x** "
                        f"({min(ratios):.3f}-{max(ratios):.3f}) | "
                        f"{med['load']['ru_maxrss_bytes'] / 2**30:.2f} / {med['pretrained']['ru_maxrss_bytes'] / 2**30:.2f} "
                        f"| {med['load']['written_bytes'] / 1e9:.2f} / {med['pretrained']['written_bytes'] / 1e9:.2f} |")
    if not a.keep:
        for size in a.sizes.split(","):
            shutil.rmtree(Path(a.dir) / f"model-{size}", ignore_errors=True)
    record = {"bench": "ready", "rounds": a.rounds, "host_memory_limit": a.host_memory_limit, "summary": summary,
              "runs": runs}
    failed = [run for run in runs if "failed" in run]
    if failed:
        record["failed"] = failed[0]["failed"]
    return record, "\n".join(rows + [f"\n{a.rounds} rounds, medians; ratio: built from the checkpoint / built "
                                     f"then loaded (per round in brackets)"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:  # (one build, in a process of its own)
        w = argparse.ArgumentParser(prog="ready.py _worker")
        for flag in ("--model", "--kind", "--way", "--swap", "--host-memory-limit"):
            w.add_argument(flag, required=True)
        w.add_argument("--threads", type=int, default=2)
        return argparse.Namespace(**vars(w.parse_args(argv[1:])), bench="_worker")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[finetune.common_args(
        "/tmp/offload-bench-ready")], epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default="300m", help="bench/finetune.py model sizes, separated by commas")
    ap.add_argument("--kinds", default="full,lora", help="full, lora or both, separated by commas")
    ap.add_argument("--host-memory-limit", default="4GiB")
    a = ap.parse_args(argv)
    a.bench = "ready"
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    if any(s not in finetune.SHAPES for s in a.sizes.split(",")):
        ap.error(f"--sizes: each one of {', '.join(finetune.SHAPES)}")
    if any(k not in ("full", "lora") for k in a.kinds.split(",")):
        ap.error("--kinds: full, lora or both")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.bench == "_worker":
        return worker(a)
    return finetune.run_recorded(a, __file__, bench, argv, a.name or "ready")


if __name__ == "__main__":
    sys.exit(main())
