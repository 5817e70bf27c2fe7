#!/usr/bin/env python3
"""LoRA benchmarks of `offload train --lora-r ...`: the step against a full fine-tune, and a 7B base end to end.
Prints JSON lines and a markdown table; ``--out DIR`` writes ``<bench>.json`` and ``<bench>.md`` records.

    python3 bench/lora.py step --rounds 5 --dir /scratch --out bench/results/NAME
    python3 bench/lora.py scale --dir /scratch --out bench/results/NAME

``step``: the 300M Llama of the e2e anchors (bench/finetune.py's, a bf16 Hugging Face directory) trained by
`offload train` on a JSONL of the shipped corpus, params and optimizer on NVMe under ``--dir``, bf16 compute,
batch 1 x 512, AdamW lr 1e-4: a full fine-tune ("full") against LoRA r=16 (alpha 32) on every linear layer with
the frozen base on NVMe ("lora"), every run a fresh process, A B then B A. Per run: the median of the measured
steps' ``step_s`` (the CLI's metrics), the process's peak RSS (ru_maxrss) and the NVMe bytes read and written
per measured step (the CLI's step lines). Goal: the base costs only reads, and a LoRA step <= 0.6x a full one.
``--modes full,lora,torch`` adds "torch": the same LoRA model with peft and torch.optim.AdamW, all in RAM, no
offload (the compute floor of a LoRA step on this machine), on random token ids.

``scale``: a Llama of Llama-2-7B's shape (hidden 4096, 32 layers, MLP 11008, 32 heads, vocab 32000; 6.7B
parameters, 13.5 GB of bf16 safetensors made by tools/hf_model_dir.py) adapted with LoRA r=16 on every linear
layer for ``--steps`` steps, base on NVMe, ``--host-memory-limit 4GiB``, batch 1 x 128, the adapter written
to an output directory. Reports the peak RSS (sampled every 0.2 s, and ru_maxrss), s/step, when the engine
was ready and the NVMe traffic per step. The big directories are removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import finetune
from finetune import Child, cli_train, contention, log, make_model_dir, step_metrics, write_text_jsonl

LORA_FLAGS = ["--lora-r", "16", "--lora-alpha", "32", "--lora-targets", "all-linear"]
STEP_LINE = re.compile(r"^step=(\d+) .*nvme_read_mb=([\d.]+) nvme_written_mb=([\d.]+)")


def nvme_per_step(child: Child, warmup: int) -> tuple[list[float], list[float]]:
    """MB read and written per measured step, from the CLI's step lines."""
    found = [(int(m.group(1)), float(m.group(2)), float(m.group(3)))
             for _, line in child.lines["out"] if (m := STEP_LINE.match(line))]
    measured = [f for f in found if f[0] > warmup]
    return [r for _, r, _ in measured], [w for _, _, w in measured]


def torch_worker(a) -> int:
    """The "torch" mode, in its own process: peft LoRA on the model loaded whole in bf16, AdamW, batch 1 x seq."""
    import resource

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                       lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, model.config.vocab_size, (1, a.seq))
    times = []
    for _ in range(a.warmup + a.steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    print("RESULT " + json.dumps({"step_s": times[a.warmup:], "ru_maxrss_bytes":
                                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def run_torch(a, model: Path) -> dict:
    child = Child([sys.executable, __file__, "_torch-worker", "--model", str(model), "--seq", str(a.seq),
                   "--warmup", str(a.warmup), "--steps", str(a.steps)], env={"OMP_NUM_THREADS": str(a.threads)})
    done = child.wait()
    result = child.result()
    if done["rc"] != 0 or result is None:
        return {"mode": "torch", "failed": child.text("err")[-3000:]}
    return {"mode": "torch", "step_s": result["step_s"], "step_s_median": statistics.median(result["step_s"]),
            "ru_maxrss_bytes": done["ru_maxrss_bytes"], "nvme_read_mb": 0.0, "nvme_written_mb": 0.0,
            "wall_s": done["wall_s"], **contention(done)}


def run_step(a, model: Path, data: Path, mode: str, tag: str) -> dict:
    if mode == "torch":
        return run_torch(a, model)
    swap, metrics = Path(a.dir) / f"swap-{tag}", Path(a.dir) / f"metrics-{tag}.jsonl"
    shutil.rmtree(swap, ignore_errors=True)
    metrics.unlink(missing_ok=True)
    extra = ["--seq-len", str(a.seq), "--token-cache", str(Path(a.dir) / "token-cache"), *finetune.HYPER_FLAGS]
    child = cli_train(model, data, a.warmup + a.steps, swap, metrics, extra + (LORA_FLAGS if mode == "lora" else []),
                      env={"OMP_NUM_THREADS": str(a.threads)})
    done = child.wait()
    shutil.rmtree(swap, ignore_errors=True)
    steps = step_metrics(metrics)
    if done["rc"] != 0 or len(steps) != a.warmup + a.steps:
        return {"mode": mode, "failed": child.text("err")[-3000:]}
    measured = [r["step_s"] for r in steps[a.warmup:]]
    read, written = nvme_per_step(child, a.warmup)
    return {"mode": mode, "step_s": measured, "step_s_median": statistics.median(measured),
            "ru_maxrss_bytes": done["ru_maxrss_bytes"], "nvme_read_mb": read, "nvme_written_mb": written,
            "losses": [r["loss"] for r in steps], "wall_s": done["wall_s"], **contention(done)}


def bench_step(a) -> tuple[dict, str]:
    model = make_model_dir(Path(a.dir) / f"model-{a.size}", a.size)
    data = write_text_jsonl(Path(a.dir) / "corpus.jsonl", copies=max(4, (a.warmup + a.steps) * a.seq // 400))
    runs = []
    modes = a.modes.split(",")
    for r in range(a.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            log(f"step: round {r + 1}/{a.rounds}: {mode} ...")
            run = run_step(a, model, data, mode, f"{mode}-{r}")
            run.update(round=r, order=len(runs), loadavg_1m=os.getloadavg()[0])
            runs.append(run)
            print(json.dumps(run), flush=True)
            log(f"  {mode}: " + (f"{run['step_s_median']:.3f} s/step, other processes' CPU {run['other_cpu_s']:.1f} s"
                                 if "failed" not in run else "FAILED\n" + run["failed"]))
    summary, table = summarize_step(runs)
    return {"bench": "lora-step", "size": a.size, "seq": a.seq, "warmup": a.warmup, "steps": a.steps,
            "threads": a.threads, "rounds": a.rounds, "summary": summary, "runs": runs,
            "failed": sum("failed" in r for r in runs)}, table


def summarize_step(runs: list[dict]) -> tuple[dict, str]:
    ok = [r for r in runs if "failed" not in r]
    side = {mode: [r for r in ok if r["mode"] == mode] for mode in ("full", "lora", "torch")}
    side = {mode: runs for mode, runs in side.items() if runs}
    if "full" not in side or "lora" not in side:
        return {}, "(no complete pair)"

    def med(mode: str, key: str) -> float:
        values = [v for r in side[mode] for v in (r[key] if isinstance(r[key], list) else [r[key]])]
        return statistics.median(values)

    pairs = [(f["step_s_median"], l["step_s_median"]) for f in side["full"] for l in side["lora"]
             if f["round"] == l["round"]]
    ratios = [l / f for f, l in pairs]
    summary = {mode: {"step_s": med(mode, "step_s_median"), "peak_rss_gib": max(r["ru_maxrss_bytes"]
               for r in side[mode]) / 2**30, "nvme_read_mb_per_step": med(mode, "nvme_read_mb"),
               "nvme_written_mb_per_step": med(mode, "nvme_written_mb")} for mode in side}
    summary["lora_over_full"] = summary["lora"]["step_s"] / summary["full"]["step_s"]
    summary["per_round"] = ratios
    rows = ["| run | median s/step | peak RSS GiB | NVMe read MB/step | NVMe written MB/step |",
            "|---|---:|---:|---:|---:|"]
    for mode, label in (("full", "full fine-tune, params + optimizer on NVMe"),
                        ("lora", "LoRA r=16 all-linear, base on NVMe"),
                        ("torch", "the same LoRA in plain torch + peft, all in RAM (random ids)")):
        if mode not in summary:
            continue
        s = summary[mode]
        rows.append(f"| {label} | {s['step_s']:.3f} | {s['peak_rss_gib']:.2f} | {s['nvme_read_mb_per_step']:.0f} "
                    f"| {s['nvme_written_mb_per_step']:.1f} |")
    rows.append(f"\nLoRA / full (medians): **{summary['lora_over_full']:.3f}x**; per round "
                f"{min(ratios):.3f}-{max(ratios):.3f} ({len(ratios)} rounds)")
    if "torch" in summary:
        summary["lora_over_torch"] = summary["lora"]["step_s"] / summary["torch"]["step_s"]
        rows.append(f"LoRA with the base on NVMe / plain torch LoRA in RAM (medians): "
                    f"**{summary['lora_over_torch']:.3f}x**")
    return summary, "\n".join(rows)


def bench_scale(a) -> tuple[dict, str]:
    work = Path(a.dir) / "lora-scale"
    t0 = time.perf_counter()
    model = make_model_dir(work / "model", a.size)
    make_s = time.perf_counter() - t0
    data = write_text_jsonl(work / "corpus.jsonl", copies=20)
    out, swap, metrics = work / "adapter", work / "swap", work / "metrics.jsonl"
    for stale in (out, swap):
        shutil.rmtree(stale, ignore_errors=True)
    metrics.unlink(missing_ok=True)
    log(f"scale: model made in {make_s:.0f} s; training ...")
    child = cli_train(model, data, a.steps, swap, metrics,
                      ["--seq-len", str(a.seq), "--host-memory-limit", a.host_memory_limit, "--output", str(out),
                       *LORA_FLAGS], rss_every=0.2, env={"OMP_NUM_THREADS": str(a.threads)})
    done = child.wait()
    steps = step_metrics(metrics)
    read, written = nvme_per_step(child, 0)
    ready = next((t for t, line in child.lines["out"] if line.startswith("offload train:")), None)
    adapter = {p.name: p.stat().st_size for p in out.iterdir()} if out.is_dir() else {}
    result = {"bench": "lora-scale", "size": a.size, "rc": done["rc"], "model_dir_s": make_s,
              "peak_rss_sampled_bytes": child.peak_rss, "ru_maxrss_bytes": done["ru_maxrss_bytes"],
              "peak_rss_after_line": child.last_line_before(child.peak_rss_at),
              "step_s": [r["step_s"] for r in steps], "losses": [r["loss"] for r in steps],
              "nvme_read_mb": read, "nvme_written_mb": written, "engine_ready_s": ready, "wall_s": done["wall_s"],
              "adapter_files": adapter, "stdout": child.text("out")[-4000:], **contention(done)}
    if done["rc"] != 0:
        result["failed"] = child.text("err")[-3000:]
    shutil.rmtree(swap, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    table = "\n".join([
        "| base | host limit | peak RSS GiB (sampled / ru_maxrss) | s/step | NVMe read / written MB per step "
        "| engine ready s | adapter written |", "|---|---|---|---|---|---:|---|",
        f"| {a.size} bf16 on NVMe | {a.host_memory_limit} | {child.peak_rss / 2**30:.2f} / "
        f"{done['ru_maxrss_bytes'] / 2**30:.2f} | {', '.join(f'{s:.1f}' for s in result['step_s'])} | "
        f"{statistics.median(read) if read else 0:.0f} / {statistics.median(written) if written else 0:.1f} | "
        f"{finetune.fmt(ready)} | {', '.join(f'{k} ({v / 1e6:.1f} MB)' for k, v in adapter.items()) or 'FAILED'} |"])
    return result, table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="bench", required=True)
    common = finetune.common_args("/tmp/offload-bench-lora")
    step = sub.add_parser("step", parents=[common], help="LoRA vs a full fine-tune, interleaved")
    finetune.add_step_args(step)
    step.add_argument("--modes", default="full,lora", help="full, lora and torch, separated by commas")
    worker = sub.add_parser("_torch-worker")
    worker.add_argument("--model", required=True)
    for flag in ("--seq", "--warmup", "--steps"):
        worker.add_argument(flag, type=int, required=True)
    scale = sub.add_parser("scale", parents=[common], help="LoRA on a 7B base end to end")
    scale.add_argument("--size", choices=["7b", "tiny"], default="7b")
    scale.add_argument("--steps", type=int, default=5)
    scale.add_argument("--seq", type=int, default=128)
    scale.add_argument("--host-memory-limit", default="4GiB")
    a = ap.parse_args(argv)
    if a.bench == "step" and (a.rounds < 1 or a.steps < 1 or a.warmup < 1):
        ap.error("step: --rounds, --steps and --warmup must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.bench == "_torch-worker":
        return torch_worker(a)
    return finetune.run_recorded(a, __file__, {"step": bench_step, "scale": bench_scale}[a.bench], argv,
                                 a.name or a.bench)


if __name__ == "__main__":
    sys.exit(main())
