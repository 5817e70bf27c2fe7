#!/usr/bin/env python3
"""The cost of the Hugging Face Trainer around the engine: an OffloadTrainer step against the engine's own loop
on the same model, placement and data. Prints JSON lines and a markdown table; ``--out DIR`` writes
``trainer.json`` and ``trainer.md``.

    python3 bench/trainer.py step --rounds 5 --dir /scratch --out bench/results/NAME

The 300M Llama of the e2e anchors (bench/finetune.py's bf16 Hugging Face directory) loaded with
``from_pretrained``, params and optimizer on NVMe under ``--dir``, bf16 compute, batch 1 x ``--seq`` random
token ids (the same rows for both), AdamW lr 1e-4 weight decay 0.1 (the Trainer's decay groups in both),
``max_grad_norm`` 1.0 (the Trainer's default), a linear schedule with warm-up, the loss read every step:
- "trainer": ``OffloadTrainer(...).train()``, ``logging_steps=1``, no checkpoints, no progress bar;
- "engine": ``offload.Engine`` over the same model with ``engine.optimizer``, the same scheduler, and
  ``engine(**batch).loss``, ``engine.backward``, ``engine.optimizer.step()``, ``scheduler.step()``.
Every run is a fresh process, A B then B A. Per run: the median time between the ends of consecutive measured
steps (a step's update overlaps the next forward, so this is the steady state of both), and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import finetune
from finetune import Child, contention, log, make_model_dir

MODES = ("trainer", "engine")


def worker(a) -> int:
    """One run in this process: prints ``STEP <n> <t>`` when each step ends and ``RESULT {...}`` at the end."""
    import torch
    import transformers

    import offload

    torch.set_num_threads(a.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (a.warmup + a.steps, a.seq),
                        generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    config = offload.Config(device="cpu", dtype="bf16", params="nvme", optimizer="nvme", nvme_dir=a.swap)
    ends: list[float] = []
    losses: list[float] = []
    args = transformers.TrainingArguments(
        output_dir=os.path.join(a.swap, "out"), per_device_train_batch_size=1, max_steps=len(rows),
        learning_rate=1e-4, weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, train_sampling_strategy="sequential")  # (the engine loop's order)
    start = time.perf_counter()
    if a.mode == "trainer":
        from offload.integrations.hf import OffloadTrainer

        class StepEnds(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())
                print(f"STEP {len(ends)} {ends[-1]:.4f}", flush=True)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    losses.append(logs["loss"])

        trainer = OffloadTrainer(model=model, args=args, train_dataset=rows, offload_config=config,
                                 callbacks=[StepEnds()])
        ready = time.perf_counter() - start
        trainer.train()
        engine = trainer.engine
    else:
        decay = transformers.Trainer.get_decay_parameter_names(None, model)
        groups = [{"params": [n for n, _ in model.named_parameters() if n in decay], "weight_decay": 0.1},
                  {"params": [n for n, _ in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
        engine = offload.Engine(model, config, lr=1e-4, weight_decay=0.1, max_grad_norm=1.0, param_groups=groups)
        optimizer = engine.optimizer
        scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 2, len(rows))
        ready = time.perf_counter() - start
        model.train()
        for row in rows:
            loss = engine(input_ids=row["input_ids"][None], labels=row["labels"][None]).loss
            engine.backward(loss)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            ends.append(time.perf_counter())
            print(f"STEP {len(ends)} {ends[-1]:.4f}", flush=True)
    engine.close(keep_weights=False)
    cycle = [b - e for e, b in zip(ends[a.warmup - 1:], ends[a.warmup:])]
    print("RESULT " + json.dumps({"cycle_s": cycle, "losses": losses, "ready_s": ready}), flush=True)
    return 0


def run(a, model: Path, mode: str, tag: str) -> dict:
    swap = Path(a.dir) / f"swap-{tag}"
    shutil.rmtree(swap, ignore_errors=True)
    swap.mkdir(parents=True)
    cmd = [sys.executable, os.path.abspath(__file__), "_worker", "--mode", mode, "--model", str(model), "--swap", str(swap),
           "--warmup", str(a.warmup), "--steps", str(a.steps), "--seq", str(a.seq), "--threads", str(a.threads)]
    child = Child(cmd, env={"OMP_NUM_THREADS": str(a.threads)}, rss_every=0.5)
    done = child.wait()
    shutil.rmtree(swap, ignore_errors=True)
    result = child.result()
    if done["rc"] != 0 or result is None or len(result["cycle_s"]) != a.steps:
        return {"mode": mode, "failed": child.text("err")[-3000:]}
    return {"mode": mode, **result, "step_s_median": statistics.median(result["cycle_s"]),
            "peak_rss_bytes": child.peak_rss, "ru_maxrss_bytes": done["ru_maxrss_bytes"], **contention(done),
            "wall_s": done["wall_s"]}


def bench(a) -> tuple[dict, str]:
    model = make_model_dir(Path(a.dir) / f"model-{a.size}", a.size)
    runs = []
    for r in range(a.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            log(f"round {r + 1}/{a.rounds}: {mode} ...")
            result = run(a, model, mode, f"{mode}-{r}")
            result["round"] = r
            runs.append(result)
            if "failed" in result:
                log(f"{mode} failed:\n{result['failed']}")
                return {"runs": runs, "failed": True}, f"{mode} failed"
            log(f"  {mode}: {result['step_s_median']:.3f} s/step")
            print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    return summarize(runs)


def summarize(runs: list[dict]) -> tuple[dict, str]:
    med = {m: statistics.median(r["step_s_median"] for r in runs if r["mode"] == m) for m in MODES}
    rounds = sorted({(r.get("record", ""), r["round"]) for r in runs})
    per_round = [next(r for r in runs if (r.get("record", ""), r["round"]) == k and r["mode"] == "trainer")
                 ["step_s_median"] /
                 next(r for r in runs if (r.get("record", ""), r["round"]) == k and r["mode"] == "engine")
                 ["step_s_median"] for k in rounds]
    rss = {m: max(r["peak_rss_bytes"] for r in runs if r["mode"] == m) for m in MODES}
    # every run trains the same rows in the same order: the losses repeat across runs, and across loops
    # (within each record: pooled records may have run schedules of other lengths)
    same_losses = all(r["losses"] == next(q for q in runs if q.get("record") == r.get("record"))["losses"]
                      for r in runs)
    ratio = med["trainer"] / med["engine"]
    record = {"runs": runs, "step_s_median": med, "ratio_trainer_over_engine": ratio,
              "ratio_per_round": per_round, "ratio_per_round_median": statistics.median(per_round), "peak_rss_bytes": rss, "losses_equal_in_every_run": same_losses,
              "losses_first_step": {m: next(r["losses"][0] for r in runs if r["mode"] == m) for m in MODES}}
    table = ("| loop | s/step (median of runs) | peak RSS |\n|---|---|---|\n"
             f"| engine's own loop | {med['engine']:.3f} | {rss['engine'] / 2**30:.2f} GiB |\n"
             f"| OffloadTrainer | {med['trainer']:.3f} | {rss['trainer'] / 2**30:.2f} GiB |\n\n"
             f"OffloadTrainer / engine over {len(rounds)} rounds: **{ratio:.3f}x** the median step (goal <= 1.03); "
             f"median of the per-round ratios {statistics.median(per_round):.3f} [{min(per_round):.3f}-"
             f"{max(per_round):.3f}]; per round: " + ", ".join(f"{x:.3f}" for x in per_round))
    return record, table


def pool(a) -> int:
    """The runs of several records, summarized as one (rounds told apart by their record)."""
    records = [json.loads(Path(path).read_text()) for path in a.records]
    runs = [{**run, "record": path} for path, rec in zip(a.records, records) for run in rec["runs"]]
    record, table = summarize(runs)
    record.update(machine=records[-1]["machine"], pooled=a.records,
                  command="python3 bench/trainer.py pool " + " ".join(a.records))
    return finetune.publish(a.out, a.name, record, table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="bench", required=True)
    step = sub.add_parser("step", parents=[finetune.common_args("/tmp/offload-bench-trainer")],
                          help="OffloadTrainer against the engine's own loop, interleaved")
    finetune.add_step_args(step)
    pool = sub.add_parser("pool", help="one summary over the runs of several records (their trainer.json)")
    pool.add_argument("records", nargs="+")
    pool.add_argument("--out", help="write <name>.json and <name>.md into this directory")
    pool.add_argument("--name", default="pooled")
    child = sub.add_parser("_worker")
    child.add_argument("--mode", choices=MODES, required=True)
    for flag in ("--model", "--swap"):
        child.add_argument(flag, required=True)
    for flag in ("--warmup", "--steps", "--seq", "--threads"):
        child.add_argument(flag, type=int, required=True)
    a = ap.parse_args(argv)
    if a.bench == "step" and (a.rounds < 1 or a.steps < 2 or a.warmup < 1):
        ap.error("step: --rounds and --warmup must be >= 1, --steps >= 2")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.bench == "_worker":
        return worker(a)
    if a.bench == "pool":
        return pool(a)
    return finetune.run_recorded(a, __file__, bench, argv, a.name or "trainer")


if __name__ == "__main__":
    sys.exit(main())
