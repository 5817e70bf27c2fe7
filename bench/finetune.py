#!/usr/bin/env python3
"""Fine-tuning benchmarks of `offload train --model DIR --data JSONL`: the step against pre-tokenized training,
tokenizing a large JSONL file, and a 2B model end to end. Prints JSON lines and a markdown table; ``--out DIR``
writes ``<bench>.json`` and ``<bench>.md`` records.

    python3 bench/finetune.py step --rounds 5 --dir /scratch --out bench/results/NAME
    python3 bench/finetune.py tokenize --mb 1000 --dir /scratch --out bench/results/NAME
    python3 bench/finetune.py scale --dir /scratch --out bench/results/NAME

``step``: the 300M Llama of the e2e anchors (hidden 1024, 18 layers, MLP 2816, 16 heads, vocab 32000, untied) as a
Hugging Face directory (tools/hf_model_dir.py, bf16 weights) trained by `offload train` on a JSONL of the shipped
corpus ("cli"), against the same model trained on random token tensors by bench/e2e_worker.py's
``ours-inf`` mode ("worker"): params and optimizer on NVMe under ``--dir``, bf16 compute, batch 1 x 512, AdamW
lr 1e-4 wd 0.1, no clipping, ``--threads`` threads, every run a fresh process, A B then B A. Per run: the median
over the measured steps of each side's own step time (the CLI's metrics ``step_s``: no synchronize, the
overlapped update of a step finishes in the next one; the worker's ``step_s``: synchronize included), and the
median "cycle": the time between consecutive step lines as they reach this process (the same clock for both).

``tokenize``: a JSONL of ~``--mb`` MB (text and prompt/completion records recombined from the corpus' sentences
with substituted words and numbers), written streaming, then tokenized in a fresh process by
``offload.data.tokenize`` with the model's tokenizer: MB/s, tokens/s, peak RSS growth, and the cache-hit call.

``scale``: a 2.1B Llama (hidden 2048, 38 layers, MLP 5632) in bf16 safetensors fine-tuned for 3 steps with
params + optimizer on NVMe under an 8 GiB host budget, written as a bf16 directory, then loaded back with
transformers in a fresh process (finite logits). The big directories are removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "bench" / "e2e_worker.py"
MODEL_TOOL = REPO / "tools" / "hf_model_dir.py"
CORPUS = REPO / "offload" / "data" / "corpus.txt"
# Model shapes for tools/hf_model_dir.py: (hidden, layers, intermediate, heads, vocab, tokenizer vocab). "tiny" is
# the e2e worker's tiny size, for the tests of this tool.
SHAPES = {"300m": (1024, 18, 2816, 16, 32000, 4096), "2b": (2048, 38, 5632, 16, 32000, 4096),
          "7b": (4096, 32, 11008, 32, 32000, 4096), "tiny": (64, 2, 128, 4, 256, 300)}
HYPER_FLAGS = ["--lr", "1e-4", "--weight-decay", "0.1", "--max-grad-norm", "0", "--lr-schedule", "constant",
               "--warmup-steps", "0"]  # the worker's AdamW (its betas 0.9/0.95 are not a flag: same cost)


class Child:
    """A subprocess whose stdout and stderr lines are kept with the time each arrived; optionally samples its RSS
    (psutil, every ``rss_every`` s). ``wait`` reaps it with wait4, which gives its own ru_maxrss."""

    def __init__(self, cmd: list[str], env: dict | None = None, rss_every: float | None = None) -> None:
        self.start = time.monotonic()
        self._cpu_before = machine_cpu_s(), resource.getrusage(resource.RUSAGE_SELF)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: dict[str, list[tuple[float, str]]] = {"out": [], "err": []}
        self.peak_rss, self.peak_rss_at = 0, 0.0
        self.rss_trace: list[tuple[float, int]] = []  # (s since start, RSS bytes), one per sample
        self._threads = [threading.Thread(target=self._read, args=(s, k), daemon=True)
                         for s, k in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        if rss_every:
            self._threads.append(threading.Thread(target=self._sample, args=(rss_every,), daemon=True))
        for t in self._threads:
            t.start()

    def _read(self, stream, key: str) -> None:
        for line in stream:
            self.lines[key].append((time.monotonic() - self.start, line.rstrip("\n")))

    def _sample(self, every: float) -> None:
        import psutil

        try:
            proc = psutil.Process(self.proc.pid)
            while self.proc.returncode is None:
                t, rss = time.monotonic() - self.start, proc.memory_info().rss
                self.rss_trace.append((t, rss))
                if rss > self.peak_rss:
                    self.peak_rss, self.peak_rss_at = rss, t
                time.sleep(every)
        except psutil.Error:
            return  # the process is gone

    def wait(self) -> dict:
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        for t in self._threads[:2]:
            t.join()
        (busy0, steal0), me0 = self._cpu_before
        (busy1, steal1), me1 = machine_cpu_s(), resource.getrusage(resource.RUSAGE_SELF)
        mine = usage.ru_utime + usage.ru_stime + me1.ru_utime + me1.ru_stime - me0.ru_utime - me0.ru_stime
        return {"rc": self.proc.returncode, "wall_s": time.monotonic() - self.start,
                "ru_maxrss_bytes": usage.ru_maxrss * 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
                "other_cpu_s": busy1 - busy0 - mine, "steal_s": steal1 - steal0}

    def last_line_before(self, t: float) -> str | None:
        """The last stdout line that arrived before ``t`` (what the child was doing then)."""
        before = [line for at, line in self.lines["out"] if at <= t]
        return before[-1] if before else None

    def text(self, key: str) -> str:
        return "\n".join(line for _, line in self.lines[key])

    def result(self) -> dict | None:
        """The JSON of the last ``RESULT {...}`` line on stdout, if any."""
        found = [line for _, line in self.lines["out"] if line.startswith("RESULT ")]
        return json.loads(found[-1][len("RESULT "):]) if found else None


def make_model_dir(out: Path, size: str, dtype: str = "bfloat16") -> Path:
    """The model directory of ``size`` (made once under ``out``; reused when complete)."""
    hidden, layers, inter, heads, vocab, tok_vocab = SHAPES[size]
    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(MODEL_TOOL), str(out), "--hidden", str(hidden), "--layers", str(layers),
           "--intermediate", str(inter), "--heads", str(heads), "--vocab", str(vocab),
           "--tokenizer-vocab", str(tok_vocab), "--dtype", dtype]
    log(f"making {size} model directory {out} ...")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (out / ".complete").write_text("")
    return out


def write_text_jsonl(path: Path, copies: int) -> Path:
    """The shipped corpus repeated ``copies`` times, one ``{"text": paragraph}`` line per paragraph."""
    paragraphs = [p.replace("\n", " ") for p in CORPUS.read_text().split("\n\n") if p.strip()]
    with open(path, "w") as f:
        for _ in range(copies):
            f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs)
    return path


def write_mixed_jsonl(path: Path, target_bytes: int, seed: int = 0) -> dict:
    """Streams ~``target_bytes`` of JSONL: 2 of 3 records ``{"text"}``, 1 of 3 ``{"prompt", "completion"}``, each
    3-30 of the corpus' sentences drawn at random, a third of them with one word replaced by another corpus word
    and some with a number inserted. Returns the record counts."""
    corpus = CORPUS.read_text().replace("\n", " ")
    sentences = [s.strip() for s in re.split(r"(?<=[.?!])\s+", corpus) if len(s.split()) > 3]
    words = sorted(set(re.findall(r"[A-Za-z]+", corpus)))
    rng = random.Random(seed)

    def vary(sentence: str) -> str:
        r = rng.random()
        if r < 0.33:
            tokens = sentence.split()
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
            return " ".join(tokens)
        if r < 0.45:
            return f"{sentence[:-1]} {rng.randint(2, 99999)} times{sentence[-1]}"
        return sentence

    counts, written = {"text": 0, "prompt_completion": 0}, 0
    with open(path, "w", buffering=1 << 20) as f:
        while written < target_bytes:
            chosen = [vary(s) for s in rng.choices(sentences, k=rng.randint(3, 30))]
            if rng.random() < 1 / 3:
                cut = rng.randint(1, len(chosen) - 1)
                record = {"prompt": f"Request {rng.randint(1, 10**6)}: " + " ".join(chosen[:cut]) + "\n",
                          "completion": " ".join(chosen[cut:])}
                counts["prompt_completion"] += 1
            else:
                record = {"text": " ".join(chosen)}
                counts["text"] += 1
            line = json.dumps(record) + "\n"  # ASCII (json escapes the rest): characters are bytes
            f.write(line)
            written += len(line)
    return {**counts, "bytes": written}


def cli_train(model: Path, data: Path, steps: int, swap: Path, metrics: Path, extra: list[str],
              env: dict | None = None, rss_every: float | None = None) -> Child:
    cmd = [sys.executable, "-m", "offload", "train", "--model", str(model), "--data", str(data), "--steps",
           str(steps), "--batch", "1", "--params", "nvme", "--optimizer", "nvme", "--nvme-dir", str(swap),
           "--dtype", "bf16", "--metrics", str(metrics), "--no-sample", "--log-every", "1", *extra]
    return Child(cmd, env=env, rss_every=rss_every)


def step_metrics(metrics: Path) -> list[dict]:
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r] if metrics.exists() else []


def cycles(child: Child, key: str, pattern: str, warmup: int) -> list[float]:
    """Times between consecutive step lines from the last warm-up step's on: one per measured step."""
    times = [t for t, line in child.lines[key] if re.search(pattern, line)]
    return [b - a for a, b in zip(times[warmup - 1:], times[warmup:])] if warmup >= 1 else []


def contention(done: dict) -> dict:
    """What else ran during a run: CPU seconds of other processes, and the hypervisor's steal."""
    return {"other_cpu_s": done["other_cpu_s"], "steal_s": done["steal_s"], "cpu_s": done["cpu_s"]}


def run_step_cli(a, model: Path, data: Path, tag: str) -> dict:
    swap, metrics = Path(a.dir) / f"swap-{tag}", Path(a.dir) / f"metrics-{tag}.jsonl"
    shutil.rmtree(swap, ignore_errors=True)
    metrics.unlink(missing_ok=True)
    child = cli_train(model, data, a.warmup + a.steps, swap, metrics,
                      ["--seq-len", str(a.seq), "--token-cache", str(Path(a.dir) / "token-cache"), *HYPER_FLAGS],
                      env={"OMP_NUM_THREADS": str(a.threads)})
    done = child.wait()
    shutil.rmtree(swap, ignore_errors=True)
    steps = step_metrics(metrics)
    if done["rc"] != 0 or len(steps) != a.warmup + a.steps:
        return {"mode": "cli", "failed": child.text("err")[-3000:]}
    measured = [r["step_s"] for r in steps[a.warmup:]]
    header = next((t for t, line in child.lines["out"] if line.startswith("offload train:")), None)
    return {"mode": "cli", "step_s": measured, "step_s_median": statistics.median(measured), **contention(done),
            "cycle_s": cycles(child, "out", r"^step=\d+ ", a.warmup),
            "losses": [r["loss"] for r in steps], "rss_bytes_max": max(r["rss_bytes"] for r in steps),
            "ready_s": header, "wall_s": done["wall_s"]}


def run_step_worker(a, tag: str) -> dict:
    swap = Path(a.dir) / f"swap-{tag}"
    cmd = [sys.executable, str(WORKER), "--mode", "ours-inf", "--size", a.size, "--dtype", "bf16", "--seq",
           str(a.seq), "--warmup", str(a.warmup), "--steps", str(a.steps), "--threads", str(a.threads),
           "--swap", str(swap)]
    child = Child(cmd, env={"OMP_NUM_THREADS": str(a.threads)})
    done = child.wait()
    shutil.rmtree(swap, ignore_errors=True)
    result = child.result()
    if done["rc"] != 0 or result is None:
        return {"mode": "worker", "failed": child.text("err")[-3000:]}
    pattern = r"\] step (\d+): ([\d.]+) s"
    per_step = [float(m.group(2)) for _, line in child.lines["err"] if (m := re.search(pattern, line))]
    return {"mode": "worker", "step_s": per_step[a.warmup:], "step_s_median": result["step_s"], **contention(done),
            **{f"{k}_median": result[k] for k in ("forward_s", "backward_s", "optimizer_s")},
            "cycle_s": cycles(child, "err", pattern, a.warmup), "losses": result["losses"],
            "rss_bytes_max": result["peak_rss_bytes"], "ready_s": result["init_s"], "wall_s": done["wall_s"]}


def bench_step(a) -> tuple[dict, str]:
    model = make_model_dir(Path(a.dir) / f"model-{a.size}", a.size)
    data = write_text_jsonl(Path(a.dir) / "corpus.jsonl", copies=max(4, (a.warmup + a.steps) * a.seq // 400))
    runs = []
    for r in range(a.rounds):
        for mode in ("cli", "worker") if r % 2 == 0 else ("worker", "cli"):
            log(f"step: round {r + 1}/{a.rounds}: {mode} ...")
            tag = f"{mode}-{r}"
            run = run_step_cli(a, model, data, tag) if mode == "cli" else run_step_worker(a, tag)
            run.update(round=r, order=len(runs), loadavg_1m=os.getloadavg()[0])
            runs.append(run)
            print(json.dumps(run), flush=True)
            log(f"  {mode}: " + (f"{run['step_s_median']:.3f} s/step (cycle {median(run['cycle_s'])}, other "
                                 f"processes' CPU {run['other_cpu_s']:.1f} s)"
                                 if "failed" not in run else "FAILED\n" + run["failed"]))
    summary, table = summarize_step(runs, a.seq)
    return {"bench": "finetune-step", "size": a.size, "seq": a.seq, "warmup": a.warmup, "steps": a.steps,
            "threads": a.threads, "rounds": a.rounds, "summary": summary, "runs": runs,
            "failed": sum("failed" in r for r in runs)}, table


def summarize_step(runs: list[dict], seq: int) -> tuple[dict, str]:
    """Per mode the median of the runs' medians; the ratio CLI / worker of those, and per round."""
    ok = [r for r in runs if "failed" not in r]
    summary = {}
    for mode in ("cli", "worker"):
        mine = [r for r in ok if r["mode"] == mode]
        if mine:
            med = statistics.median(r["step_s_median"] for r in mine)
            summary[mode] = {"runs": len(mine), "step_s": med, "tokens_per_s": seq / med,
                             "cycle_s": statistics.median(statistics.median(r["cycle_s"]) for r in mine),
                             "per_run_step_s": [r["step_s_median"] for r in mine],
                             "other_cpu_s_max": max(r["other_cpu_s"] for r in mine)}
    pairs = [(c["step_s_median"] / w["step_s_median"]) for c in ok for w in ok
             if c["mode"] == "cli" and w["mode"] == "worker" and c["round"] == w["round"]]
    if len(summary) == 2:
        summary["ratio_cli_over_worker"] = summary["cli"]["step_s"] / summary["worker"]["step_s"]
        summary["cycle_ratio_cli_over_worker"] = summary["cli"]["cycle_s"] / summary["worker"]["cycle_s"]
        summary["per_round_ratio"] = pairs
    table = ["| mode | runs | s/step (median of run medians) | tokens/s | per-run medians | cycle s (median) | "
             "others' CPU s (max run) |", "|---|---:|---:|---:|---|---:|---:|"]
    for mode in ("cli", "worker"):
        if mode in summary:
            s = summary[mode]
            table.append(f"| {mode} | {s['runs']} | {s['step_s']:.3f} | {s['tokens_per_s']:.1f} | "
                         f"{', '.join(f'{x:.3f}' for x in s['per_run_step_s'])} | {s['cycle_s']:.3f} | "
                         f"{s['other_cpu_s_max']:.1f} |")
    if "ratio_cli_over_worker" in summary:
        table.append(f"\nCLI / worker s/step: **{summary['ratio_cli_over_worker']:.3f}** (goal <= 1.03); cycle "
                     f"ratio {summary['cycle_ratio_cli_over_worker']:.3f}; per round "
                     f"{', '.join(f'{x:.3f}' for x in pairs)}")
    return summary, "\n".join(table)


def tokenize_worker(a) -> int:
    """In a fresh process: the tokenizer loaded, then two ``tokenize`` calls (the second a cache hit)."""
    import logging

    from transformers import AutoTokenizer

    from offload.data import Encoder, tokenize

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    encoder = Encoder(AutoTokenizer.from_pretrained(a.model))
    rss_before, maxrss_before = proc_bytes("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:  # resets VmHWM to the current RSS, so that it is the peak of tokenizing alone
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    data = tokenize(a.data, encoder, Path(a.cache), scratch_dir=Path(a.scratch), progress=False)
    t1 = time.perf_counter()
    maxrss_after, hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, proc_bytes("VmHWM")
    again = tokenize(a.data, encoder, Path(a.cache), scratch_dir=Path(a.scratch), progress=False)
    t2 = time.perf_counter()
    size = os.path.getsize(a.data)
    print("RESULT " + json.dumps({
        "bytes": size, "tokens": data.num_tokens, "trained": data.num_trained, "records": data.records,
        "tokenize_s": t1 - t0, "mb_per_s": size / (t1 - t0) / 1e6, "tokens_per_s": data.num_tokens / (t1 - t0),
        "rss_before_bytes": rss_before, "ru_maxrss_before_bytes": maxrss_before, "ru_maxrss_after_bytes": maxrss_after,
        "rss_growth_bytes": maxrss_after - rss_before, "vmhwm_growth_bytes": hwm - rss_before,
        "cache_hit_s": t2 - t1, "cache_hit": again.from_cache, "same_tokens": again.num_tokens == data.num_tokens}))
    return 0


def bench_tokenize(a) -> tuple[dict, str]:
    model = make_model_dir(Path(a.dir) / f"model-{a.size}", a.size)
    work = Path(a.dir) / "tokenize"
    shutil.rmtree(work, ignore_errors=True)
    (work / "scratch").mkdir(parents=True)
    data = work / "mixed.jsonl"
    t0 = time.perf_counter()
    counts = write_mixed_jsonl(data, int(a.mb * 1e6))
    gen_s = time.perf_counter() - t0
    log(f"tokenize: wrote {counts['bytes'] / 1e6:.0f} MB in {gen_s:.0f} s; tokenizing in a fresh process ...")
    child = Child([sys.executable, __file__, "_tokenize-worker", "--model", str(model), "--data", str(data),
                   "--cache", str(work / "cache"), "--scratch", str(work / "scratch")],
                  env={"OMP_NUM_THREADS": str(a.threads), "RAYON_NUM_THREADS": str(a.threads)}, rss_every=0.2)
    done = child.wait()
    result = child.result()
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    if done["rc"] != 0 or result is None:
        return {"bench": "finetune-tokenize", "failed": child.text("err")[-3000:]}, "tokenize FAILED"
    result.update(file=counts, generate_s=gen_s, process_peak_rss_sampled_bytes=child.peak_rss,
                  process_ru_maxrss_bytes=done["ru_maxrss_bytes"], **contention(done))
    table = "\n".join([
        "| MB | tokens | tokenize s | MB/s | tokens/s | RSS before MB | peak RSS growth MB (ru_maxrss / VmHWM) "
        "| cache hit s |", "|---:|---:|---:|---:|---:|---:|---|---:|",
        f"| {result['bytes'] / 1e6:.0f} | {result['tokens']:,} | {result['tokenize_s']:.1f} | "
        f"{result['mb_per_s']:.2f} | {result['tokens_per_s']:,.0f} | {result['rss_before_bytes'] / 1e6:.0f} | "
        f"{result['rss_growth_bytes'] / 1e6:.0f} / {result['vmhwm_growth_bytes'] / 1e6:.0f} | "
        f"{result['cache_hit_s']:.3f} |"])
    return {"bench": "finetune-tokenize", "size": a.size, "threads": a.threads, **result}, table


def load_check(a) -> int:
    """In a fresh process: the written directory loads with transformers and gives finite logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    load_s = time.perf_counter() - t0
    ids = tokenizer("The clock in the workshop", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    print("RESULT " + json.dumps({"load_s": load_s, "params": sum(p.numel() for p in model.parameters()),
                                  "dtype": str(next(model.parameters()).dtype), "logits_shape": list(logits.shape),
                                  "finite": bool(torch.isfinite(logits).all()),
                                  "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def bench_scale(a) -> tuple[dict, str]:
    work = Path(a.dir) / "scale"
    t0 = time.perf_counter()
    model = make_model_dir(work / "model", a.size)
    make_s = time.perf_counter() - t0
    data = write_text_jsonl(work / "corpus.jsonl", copies=20)
    out, swap, metrics = work / "out", work / "swap", work / "metrics.jsonl"
    for stale in (out, swap):
        shutil.rmtree(stale, ignore_errors=True)
    metrics.unlink(missing_ok=True)
    log(f"scale: model made in {make_s:.0f} s; training ...")
    child = cli_train(model, data, a.steps, swap, metrics,
                      ["--seq-len", str(a.seq), "--host-memory-limit", a.host_memory_limit, "--output", str(out),
                       "--output-dtype", "bf16"], rss_every=0.2)
    done = child.wait()
    steps = step_metrics(metrics)
    at = {key: next((t for t, line in child.lines["out"] if line.startswith(key)), None)
          for key in ("offload train:", "  weights from", "step=", "  model written")}
    last_line = child.lines["out"][-1][0] if child.lines["out"] else 0.0  # then the engine closes, and exit
    written = re.search(r"model written to .* \(\w+, ([\d.]+) s\)", child.text("out"))
    result = {"bench": "finetune-scale", "size": a.size, "rc": done["rc"], "model_dir_s": make_s,
              "peak_rss_sampled_bytes": child.peak_rss, "ru_maxrss_bytes": done["ru_maxrss_bytes"],
              "peak_rss_at_s": child.peak_rss_at, "peak_rss_after_line": child.last_line_before(child.peak_rss_at),
              "peak_rss_to_summary_bytes": max((rss for t, rss in child.rss_trace if t <= last_line), default=0),
              "rss_trace": [(round(t, 1), rss) for t, rss in child.rss_trace[::5]],
              "stdout_times": [(round(t, 1), line[:60]) for t, line in child.lines["out"]],
              "metrics_rss_bytes": [r["rss_bytes"] for r in steps], "step_s": [r["step_s"] for r in steps],
              "losses": [r["loss"] for r in steps], "cycle_s": cycles(child, "out", r"^step=\d+ ", 1),
              "engine_ready_s": at["offload train:"], "wall_s": done["wall_s"], **contention(done),
              "load_s": at["  weights from"] - at["offload train:"] if at["  weights from"] else None,
              "output_write_s": float(written.group(1)) if written else None,
              "stdout": child.text("out")[-4000:]}
    if done["rc"] != 0:
        result["failed"] = child.text("err")[-3000:]
    else:
        log("scale: loading the output with transformers in a fresh process ...")
        check = Child([sys.executable, __file__, "_load-check", "--model", str(out)])
        check_done = check.wait()
        result["load_check"] = check.result() or {"failed": check.text("err")[-3000:], **check_done}
    shutil.rmtree(swap, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    lc = result.get("load_check", {})
    table = "\n".join([
        "| params | peak RSS GiB (sampled / ru_maxrss / until the summary / metrics max) | s/step | engine ready s "
        "| load s | output write s | output loads, finite logits |", "|---|---|---|---:|---:|---:|---|",
        f"| {lc.get('params', '?')} | {result['peak_rss_sampled_bytes'] / 2**30:.2f} / "
        f"{result['ru_maxrss_bytes'] / 2**30:.2f} / {result['peak_rss_to_summary_bytes'] / 2**30:.2f} / "
        f"{max(result['metrics_rss_bytes'] or [0]) / 2**30:.2f} | "
        f"{', '.join(f'{s:.1f}' for s in result['step_s'])} | {fmt(result['engine_ready_s'])} | "
        f"{fmt(result['load_s'])} | {fmt(result['output_write_s'])} | {lc.get('finite', 'FAILED')} |"])
    return result, table


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def median(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f}" if xs else "-"


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot (/proc/stat: user + nice + system + irq +
    softirq; steal apart), to tell how much CPU other processes took during a run."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / hz, fields[7] / hz


def proc_bytes(field: str, path: str = "/proc/self/status") -> int:
    """A ``kB`` field of a /proc file (/proc/self/status, /proc/meminfo), in bytes."""
    line = next(x for x in Path(path).read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def machine(directory: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = proc_bytes("MemTotal", "/proc/meminfo")
    disk = shutil.disk_usage(directory)
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_total_gib": mem / 2**30, "kernel": platform.release(),
            "python": platform.python_version(), "torch": importlib.metadata.version("torch"),
            "transformers": importlib.metadata.version("transformers"), "commit": commit,
            "dirty": bool(dirty), "repo": str(REPO), "dir": directory, "disk_free_gb": disk.free / 1e9,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def write_record(out: str, name: str, record: dict, table: str, command: str) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    m = record["machine"]
    (Path(out) / f"{name}.md").write_text(
        f"# {Path(sys.argv[0]).name} {name}\n\n- command: `{command}`\n- machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['mem_total_gib']:.1f} GiB RAM, kernel {m['kernel']}; Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}; offload imported from {m['repo']}; --dir {m['dir']} "
        f"({m['disk_free_gb']:.0f} GB free at the start)\n"
        f"- commit {m['commit']}{' (with uncommitted changes)' if m['dirty'] else ''}, {m['date']}; "
        f"raw records: `{name}.json`\n\n{table}\n")


BULKY = ("runs", "stdout", "rss_trace", "stdout_times")  # record fields the printed summary leaves out


def run_recorded(a, script: str, bench, argv: list[str] | None, name: str) -> int:
    """Runs ``bench(a)`` (which returns a record and its table) in ``a.dir``, stamps the record with the
    machine, the wall time and the command (``script`` and ``argv``), and publishes it under ``name``."""
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    about = machine(a.dir)
    record, table = bench(a)
    record.update(machine=about, bench_wall_s=time.perf_counter() - started,
                  command="python3 " + " ".join([os.path.relpath(script, REPO), *(argv or sys.argv[1:])]))
    return publish(a.out, name, record, table)


def publish(out: str | None, name: str, record: dict, table: str) -> int:
    """Prints the record's summary (without its bulky fields) and table, writes ``<name>.json`` and
    ``<name>.md`` into ``out`` when given; returns the exit status (1 when the record says it failed)."""
    print(json.dumps({k: v for k, v in record.items() if k not in BULKY}))
    print(table)
    if out:
        write_record(out, name, record, table, record["command"])
    return 1 if record.get("failed") else 0


def common_args(default_dir: str) -> argparse.ArgumentParser:
    """The flags every benchmark of this script (and of bench/lora.py) takes, as a parent parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=default_dir, help="scratch directory (models, swap)")
    common.add_argument("--out", help="write <bench>.json and <bench>.md records into this directory")
    common.add_argument("--threads", type=int, default=2)
    common.add_argument("--keep", action="store_true", help="keep the big files under --dir")
    common.add_argument("--name", help="the records' file name (default: the benchmark's)")
    return common


def add_step_args(step: argparse.ArgumentParser) -> None:
    """The flags of an interleaved step benchmark: model size, rounds, warm-up and measured steps, tokens."""
    step.add_argument("--size", choices=["300m", "tiny"], default="300m")
    step.add_argument("--rounds", type=int, default=5)
    step.add_argument("--warmup", type=int, default=2)
    step.add_argument("--steps", type=int, default=4, help="measured steps per run")
    step.add_argument("--seq", type=int, default=512)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="bench", required=True)
    common = common_args("/tmp/offload-bench-finetune")
    add_step_args(sub.add_parser("step", parents=[common], help="offload train vs pre-tokenized training, "
                                                                  "interleaved"))
    tok = sub.add_parser("tokenize", parents=[common], help="tokenizing a large JSONL file")
    tok.add_argument("--size", choices=["300m", "tiny"], default="300m", help="whose tokenizer")
    tok.add_argument("--mb", type=float, default=1000)
    scale = sub.add_parser("scale", parents=[common], help="a 2B model fine-tuned end to end")
    scale.add_argument("--size", choices=["2b", "tiny"], default="2b")
    scale.add_argument("--steps", type=int, default=3)
    scale.add_argument("--seq", type=int, default=128)
    scale.add_argument("--host-memory-limit", default="8GiB")
    worker = sub.add_parser("_tokenize-worker")
    for flag in ("--model", "--data", "--cache", "--scratch"):
        worker.add_argument(flag, required=True)
    check = sub.add_parser("_load-check")
    check.add_argument("--model", required=True)
    a = ap.parse_args(argv)
    if a.bench == "step" and (a.rounds < 1 or a.steps < 1 or a.warmup < 1):
        ap.error("step: --rounds, --steps and --warmup must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.bench == "_tokenize-worker":
        return tokenize_worker(a)
    if a.bench == "_load-check":
        return load_check(a)
    bench = {"step": bench_step, "tokenize": bench_tokenize, "scale": bench_scale}[a.bench]
    return run_recorded(a, __file__, bench, argv, a.name or a.bench)


if __name__ == "__main__":
    sys.exit(main())
