#!/usr/bin/env python3
"""A 7B Llama trained on one GPU under a consumer card's memory budget, with offload; `report` sets it beside
DeepSpeed's run of the same job (bench/gpu_scale_ds.py) and writes the JSON + markdown report.

    python3 bench/gpu_scale.py run --budget 24GiB --micro-batch 16 --accum 2 --steps 10 --out DIR
    python3 bench/gpu_scale.py report DIR/run-*.json DIR/ds-*.json --out bench/results

`run` builds Llama-2-7B's shape (hidden 4096, 32 layers, MLP 11008, 32k vocabulary) on the meta device with
``offload.init_empty``; the engine initialises it group by group into host RAM (weights, fp32 master, Adam's
moments and gradient accumulators; what does not fit in ``--host-memory-limit`` goes to ``--nvme-dir``). The
budget is enforced, not only reported: torch's allocator is capped at ``--budget`` of the GPU's memory
(``set_per_process_memory_fraction``), so an allocation beyond it fails as it would on a card of that size.
Parameters are streamed (``params="cpu"``) with ``--device-limit`` of them resident; the rest of the budget is
for activations (checkpointed per layer) and the loss. Each optimizer step sees ``micro_batch x seq x accum``
tokens; the last micro-batch's backward runs the Adam updates as each layer's gradients complete
(``engine.backward_step``), the rest of them overlap the next forward.

Reported: tokens/s over the timed steps (GPU synchronised at both ends), MFU = 6 * parameters * tokens/s
against the bf16 matrix-product rate measured at the start of the same run, the split of the step (host time
in forward/backward calls, CPU Adam seconds, waits for fetches and NVMe, GPU kernel-busy % and PCIe MB/s from
NVML), peak GPU memory (allocated and reserved by torch; NVML's, which adds the CUDA context), peak RSS, NVMe
bytes per step, and the time to build, initialise and page-lock the state. ``--device cpu`` runs the same code
on the CPU (the dry run of a small model: ``--hidden 256 --layers 2 ...``); exit status 3 means the budget ran
out (an out-of-memory error on the GPU), 4 the host budget.

``--lora-r R`` adapts the same model with a peft LoRA adapter of rank R (alpha 2R) on every linear layer
instead: the base is frozen and streamed from host RAM like trainable weights (Note [frozen groups]), only the
adapters have Adam state. Its model FLOPs count 4 * parameters per token (forward, and the gradients of the
activations through the frozen weights; none for the weights themselves; the adapters' own are negligible)
instead of 6.
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch  # noqa: E402

from scale_model import (GpuSampler, TokenBatches, causal_lm_loss, count_params, llama_config,  # noqa: E402
                         matmul_tflops, parse_bytes)

EXIT_DEVICE_OOM = 3
EXIT_HOST_BUDGET = 4


def add_job_args(ap: argparse.ArgumentParser) -> None:
    """The job's shape and schedule: the same flags for offload's run and DeepSpeed's."""
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch (default 16)")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step (default 2)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lr-warmup", type=int, default=0,
                    help="optimizer steps of linear learning-rate warm-up, lr * (step + 1) / N (default 0)")
    ap.add_argument("--budget", default="24GiB", help="GPU memory the run may use, enforced (default 24GiB)")
    ap.add_argument("--device-limit", default="3GiB",
                    help="parameter bytes resident on the GPU at once (default 3GiB; DeepSpeed: its "
                         "stage3_max_live_parameters)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", required=True, help="directory for the run's JSON record")
    ap.add_argument("--label", default=None, help="name of the record (default: from the budget)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train with offload and write one record")
    add_job_args(run)
    run.add_argument("--host-memory-limit", default="auto",
                     help="host buffers the engine may allocate; the state beyond it goes to --nvme-dir "
                          "(default auto: RAM - 12 GiB)")
    run.add_argument("--nvme-dir", default=None, help="swap directory (default: a temporary directory)")
    run.add_argument("--prefetch", type=int, default=2)
    run.add_argument("--lora-r", type=int, default=0,
                     help="train a LoRA adapter of this rank on every linear layer (base frozen) instead")
    run.add_argument("--split-step", action="store_true",
                     help="backward(); step() after the last micro-batch instead of backward_step()")
    report = sub.add_parser("report", help="combine records into the JSON + markdown report")
    report.add_argument("records", nargs="+")
    report.add_argument("--out", required=True, help="directory for gpu-scale-<gpu>-<date>.json and .md")
    report.add_argument("--command", default="", help="the command line that produced the records")
    a = ap.parse_args(argv)
    if a.command == "run":
        check_job_args(ap, a)
    return a


def check_job_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for name in ("hidden", "layers", "intermediate", "heads", "vocab", "seq", "micro_batch", "accum", "steps"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: must be >= 1; got {getattr(a, name)}")
    if a.warmup_steps < 0:
        ap.error(f"--warmup-steps: must be >= 0; got {a.warmup_steps}")
    a.budget_bytes = parse_bytes("--budget", a.budget)
    a.device_limit_bytes = parse_bytes("--device-limit", a.device_limit)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu for a dry run)")
    if getattr(a, "lora_r", 0) < 0:
        ap.error(f"--lora-r: must be >= 0; got {a.lora_r}")
    a.label = a.label or f"{a.budget.replace(' ', '')}" + (f"-lora{a.lora_r}" if getattr(a, "lora_r", 0) else "")
    from offload.cli.outputs import check_writable_dir
    from offload.errors import ConfigError

    try:  # now, not after minutes of initialising and training a 7B
        check_writable_dir("--out", a.out)
    except ConfigError as e:
        ap.error(str(e))


def lr_at(a: argparse.Namespace, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based, warm-up steps included)."""
    return a.lr * min(1.0, (step + 1) / a.lr_warmup) if a.lr_warmup > 0 else a.lr


def summarise(record: dict, losses: list[float], step_s: list[float], warmup_steps: int, elapsed: float,
              device: str) -> None:
    """The step figures of a run over its timed steps (those after the warm-up), the same for every runner:
    losses, step times, tokens/s over ``elapsed``, model TFLOP/s and MFU against the rate ``record`` measured,
    peak RSS and GPU memory. ``record`` holds ``tokens_per_step``, ``params`` and ``matmul_tflops``."""
    timed = step_s[warmup_steps:]
    record.update(status="ok", losses=losses, loss_first=losses[0], loss_last=losses[-1], step_s=timed,
                  step_s_median=statistics.median(timed), steps_timed=len(timed), timed_s=elapsed,
                  tokens_per_s=len(timed) * record["tokens_per_step"] / elapsed, peak_rss_bytes=rss_peak_bytes())
    flops = record.get("flops_per_param_token", 6)  # 4 for LoRA: no weight gradients of the frozen base
    record["model_tflops"] = flops * record["params"] * record["tokens_per_s"] / 1e12
    record["mfu"] = record["model_tflops"] / record["matmul_tflops"]
    record_gpu_peaks(record, device)


def record_gpu_peaks(record: dict, device: str) -> None:
    if device == "cuda":
        record.update(gpu_peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                      gpu_peak_reserved_bytes=torch.cuda.max_memory_reserved())


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return "CPU " + (re.sub(r"\s+", " ", _cpu_model()) or "unknown")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def pinning_rate(device: str, nbytes: int = 2 << 30) -> dict:
    """GB/s of faulting in fresh anonymous memory and of page-locking it (cudaHostRegister): the two costs the
    engine's host buffers pay once at construction."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    t = torch.frombuffer(m, dtype=torch.uint8)
    start = time.perf_counter()
    m.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
    populate_s = time.perf_counter() - start
    result = {"populate_gb_s": nbytes / populate_s / 1e9}
    if device == "cuda":
        cudart = torch.cuda.cudart()
        start = time.perf_counter()
        err = cudart.cudaHostRegister(t.data_ptr(), nbytes, 1)
        register_s = time.perf_counter() - start
        if int(err) == 0:
            cudart.cudaHostUnregister(t.data_ptr())
            result["register_gb_s"] = nbytes / register_s / 1e9
    del t
    m.close()
    return result


def host_limit(a: argparse.Namespace) -> int | None:
    if a.host_memory_limit == "none":
        return None
    if a.host_memory_limit != "auto":
        return parse_bytes("--host-memory-limit", a.host_memory_limit)
    import psutil

    return psutil.virtual_memory().total - (12 << 30)


class StepClock:
    """Host seconds inside the engine's forward / backward / step calls over the timed steps."""

    def __init__(self) -> None:
        self.forward = self.backward = 0.0

    def time(self, kind: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        setattr(self, kind, getattr(self, kind) + time.perf_counter() - start)
        return result


def lora_wrap(model: torch.nn.Module, r: int) -> torch.nn.Module:
    """``model`` with a peft LoRA adapter of rank ``r`` (alpha 2r) on every linear layer; ``model`` if r is 0."""
    if not r:
        return model
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                      lora_dropout=0.0))


def train(a: argparse.Namespace, record: dict) -> None:
    import offload
    from transformers import LlamaForCausalLM

    device = a.device
    config = llama_config(a.hidden, a.layers, a.intermediate, a.heads, a.vocab, a.seq)
    nparams = count_params(config)
    tokens_per_step = a.micro_batch * a.seq * a.accum
    record.update(params=nparams, tokens_per_step=tokens_per_step)
    print(f"gpu_scale: {device_name(device)}, Llama {nparams / 1e9:.2f}B parameters, budget {a.budget}, "
          f"{a.micro_batch}x{a.seq} tokens x {a.accum} micro-batches = {tokens_per_step} tokens per step",
          file=sys.stderr, flush=True)
    record["matmul_tflops"] = matmul_tflops(device, 8192 if device == "cuda" else 1024)
    # (2 GiB on a GPU machine; a CPU dry run takes 64 MiB: a test process that grew by 2 GiB would hand that
    # peak RSS on to every child it forks, whose own peak is then wrong)
    record["pinning"] = pinning_rate(device, (2 << 30) if device == "cuda" else (64 << 20))
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.budget_bytes / total))
    nvme_dir = a.nvme_dir or tempfile.mkdtemp(prefix="offload-gpu-scale-")
    if a.nvme_dir is None:  # the engine removes its own run directory inside it at close
        import atexit
        import shutil

        atexit.register(shutil.rmtree, nvme_dir, True)
    limit = host_limit(a)
    record["host_memory_limit"] = limit

    start = time.perf_counter()
    torch.manual_seed(0)  # the weights of a normal build with this seed (the torch reference's, too)
    model = offload.init_empty(lambda: lora_wrap(LlamaForCausalLM(config), a.lora_r))
    base = model.get_base_model() if a.lora_r else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    model.train()  # transformers checkpoints activations in training mode only
    if a.lora_r:
        record.update(lora_r=a.lora_r, flops_per_param_token=4,
                      trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    record["build_meta_s"] = time.perf_counter() - start
    cfg = offload.Config(device=device, dtype="bf16", params="cpu", optimizer="nvme", nvme_dir=nvme_dir,
                         host_memory_limit=limit, device_memory_limit=a.device_limit_bytes,
                         prefetch_layers=a.prefetch)
    start = time.perf_counter()
    engine = offload.Engine(model, cfg, lr=a.lr, weight_decay=0.0)
    record["engine_init_s"] = time.perf_counter() - start
    stats = engine.stats()
    record.update(host_bytes_after_init=stats.host_bytes_in_use, optimizer_groups_on_host=stats.optimizer_groups_on_host,
                  optimizer_groups_on_nvme=stats.optimizer_groups_on_nvme, rss_after_init=rss_peak_bytes())
    print(f"gpu_scale: built on meta in {record['build_meta_s']:.1f} s, engine initialised in "
          f"{record['engine_init_s']:.1f} s ({stats.host_bytes_in_use / 2**30:.1f} GiB host buffers, optimizer "
          f"state of {stats.optimizer_groups_on_host} groups in RAM, {stats.optimizer_groups_on_nvme} on NVMe)",
          file=sys.stderr, flush=True)

    batches = TokenBatches(a.micro_batch, a.seq)
    clock = StepClock()
    sampler = GpuSampler() if device == "cuda" else None
    losses, step_s, grad_bytes = [], [], 0
    try:
        if sampler:
            sampler.start()
        for step in range(a.warmup_steps + a.steps):
            if step == a.warmup_steps:  # the timed window starts with nothing in flight
                engine.synchronize()
                if device == "cuda":
                    torch.cuda.synchronize()
                before = engine.stats()
                clock = StepClock()
                t_timed = time.perf_counter()
                grad_bytes = 0
            t_step = time.perf_counter()
            engine.lr = lr_at(a, step)
            micro_losses = []
            for k in range(a.accum):
                ids = batches.get(step * a.accum + k)
                logits = clock.time("forward", lambda: engine(input_ids=ids, use_cache=False).logits)
                loss = causal_lm_loss(logits, ids.to(logits.device))
                del logits
                micro_losses.append(loss.detach())
                if k < a.accum - 1:
                    clock.time("backward", engine.backward, loss / a.accum)
                elif a.split_step:
                    clock.time("backward", engine.backward, loss / a.accum)
                    info = clock.time("backward", engine.step)
                else:
                    info = clock.time("backward", engine.backward_step, loss / a.accum)
            grad_bytes += info.grad_bytes_to_host
            losses.append(float(torch.stack(micro_losses).mean()))
            step_s.append(time.perf_counter() - t_step)
            if step == a.warmup_steps - 1:
                record["first_steps_s"] = time.perf_counter() - start - record["engine_init_s"]
            print(f"  step {step + 1}/{a.warmup_steps + a.steps}{' (warm-up)' if step < a.warmup_steps else ''}: "
                  f"loss {losses[-1]:.4f}, {step_s[-1]:.2f} s", file=sys.stderr, flush=True)
        engine.synchronize()
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t_timed
    finally:
        if sampler:
            sampler.stop()
    after = engine.stats()
    summarise(record, losses, step_s, a.warmup_steps, elapsed, device)
    record.update(
        per_step={
            "host_forward_s": clock.forward / a.steps,
            "host_backward_and_step_s": clock.backward / a.steps,
            "cpu_adam_s": (after.optimizer_adam_s - before.optimizer_adam_s) / a.steps,
            "fetch_wait_s": (after.fetch_wait_s - before.fetch_wait_s) / a.steps,
            "nvme_wait_s": (after.optimizer_io_wait_s - before.optimizer_io_wait_s) / a.steps,
            "grad_bytes_to_host": grad_bytes / a.steps,
            "nvme_bytes_read": (after.nvme_bytes_read - before.nvme_bytes_read) / a.steps,
            "nvme_bytes_written": (after.nvme_bytes_written - before.nvme_bytes_written) / a.steps,
        },
        device_param_bytes_peak=after.device_param_bytes_peak, host_bytes_peak=after.host_bytes_peak)
    if device == "cuda":
        record.update(nvml=sampler.summary(t_timed, t_timed + elapsed))
    engine.close()


def run(a: argparse.Namespace) -> int:
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"bench": "gpu_scale", "runner": "offload", "label": a.label, "gpu": device_name(a.device),
              "device": a.device, "torch": torch.__version__, "budget_bytes": a.budget_bytes,
              "device_limit_bytes": a.device_limit_bytes, "micro_batch": a.micro_batch, "seq": a.seq,
              "accum": a.accum, "steps": a.steps, "split_step": a.split_step, "lr": a.lr, "lr_warmup": a.lr_warmup,
              "shape": {k: getattr(a, k) for k in ("hidden", "layers", "intermediate", "heads", "vocab")},
              "date": datetime.date.today().isoformat(), "commit": _commit(), "status": "failed"}
    status = 1
    try:
        train(a, record)
        status = 0
    except torch.OutOfMemoryError as e:
        record.update(status="device out of memory", error=str(e).splitlines()[0])
        status = EXIT_DEVICE_OOM
    except Exception as e:
        import offload

        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        status = EXIT_HOST_BUDGET if isinstance(e, offload.MemoryBudgetError) else 1
        import traceback

        traceback.print_exc()
    finally:
        if "gpu_peak_reserved_bytes" not in record:
            record_gpu_peaks(record, a.device)
        record.setdefault("peak_rss_bytes", rss_peak_bytes())
        path = out / f"run-{a.label}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"gpu_scale: {record['status']}; record in {path}", file=sys.stderr, flush=True)
    if status == 0:
        print(json.dumps({k: record[k] for k in ("label", "tokens_per_s", "mfu", "loss_first", "loss_last")}))
    return status


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=pathlib.Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


# ---- the report ---------------------------------------------------------------------------------------------

def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def report(a: argparse.Namespace) -> int:
    records = [json.loads(pathlib.Path(p).read_text()) for p in a.records]
    ours = [r for r in records if r["runner"] == "offload"]
    peers = [r for r in records if r["runner"].startswith("deepspeed")]
    reference = next((r for r in records if r["runner"] == "torch" and r["status"] == "ok"), None)
    if not ours:
        raise SystemExit("gpu_scale report: no offload record among the records given")
    gpu = ours[0]["gpu"]
    # the headline: the largest model at the largest budget
    first = max((r for r in ours if r["status"] == "ok"), key=lambda r: (r.get("params", 0), r["budget_bytes"]),
                default=ours[0])
    pair = _deepspeed_pair(ours, peers)
    summary = {
        "bench": "gpu_scale", "gpu": gpu, "date": first["date"], "commit": first["commit"],
        "params": first.get("params"), "budget_bytes": first["budget_bytes"],
        "tokens_per_s": first.get("tokens_per_s"), "mfu": first.get("mfu"),
        "vs_deepspeed": pair and pair["ratio"], "vs_deepspeed_at": pair,
        "loss_vs_torch": _loss_vs_reference(ours, reference),
        "command": a.command, "runs": records,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu-scale-{slug}-{first['date']}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"gpu_scale report: {stem}.json and .md", file=sys.stderr)
    return 0


def _deepspeed_pair(ours: list[dict], peers: list[dict]) -> dict | None:
    """offload's tokens/s over DeepSpeed's, for the largest model both ran with the same budget and tokens per
    step (DeepSpeed may not hold the largest model's state in the host's RAM at all: its record says so)."""
    pairs = [(o, p) for o in ours for p in peers if o["status"] == "ok" and p["status"] == "ok"
             and all(o.get(k) == p.get(k) for k in ("params", "budget_bytes", "tokens_per_step"))]
    if not pairs:
        return None
    o, p = max(pairs, key=lambda pair: (pair[0]["params"], pair[1]["tokens_per_s"]))
    return {"ratio": o["tokens_per_s"] / p["tokens_per_s"], "params": o["params"], "budget_bytes": o["budget_bytes"],
            "offload": o["label"], "deepspeed": f"{p['runner']} {p['label']}"}


def _loss_vs_reference(ours: list[dict], reference: dict | None) -> dict | None:
    """Per offload run of the reference's schedule: the largest relative difference of the step losses over the
    steps both ran (the reference is plain torch on the whole card, bench/gpu_scale_torch.py)."""
    if reference is None:
        return None
    same = ("params", "tokens_per_step", "lr", "lr_warmup", "micro_batch", "seq")
    return {r["label"]: max(abs(x - y) / abs(y) for x, y in zip(r["losses"], reference["losses"]))
            for r in ours if r["status"] == "ok" and all(r.get(k) == reference.get(k) for k in same)}


def markdown(s: dict) -> str:
    lines = [f"# {s['params'] / 1e9:.2f}B Llama on one {s['gpu']} under a GPU memory budget",
             "", f"{s['date']}, commit {s['commit']}. Command: `{s['command']}`", "",
             "| runner, label | params | budget GiB | tokens/step | s/step (median) | tokens/s | MFU | loss first -> last | "
             "GPU peak GiB (alloc / reserved) | peak RSS GiB | NVMe GB/step (r+w) | status |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in s["runs"]:
        ok = r["status"] == "ok"
        per = r.get("per_step", {})
        nvme = (f"{per.get('nvme_bytes_read', 0) / 1e9:.1f}+{per.get('nvme_bytes_written', 0) / 1e9:.1f}"
                if ok and "nvme_bytes_read" in per else "-")
        lines.append(
            f"| {r['runner']} {r['label']} | {r.get('params', 0) / 1e9:.2f}B | {_gib(r['budget_bytes'])} | {r.get('tokens_per_step', '-')} | "
            + (f"{r['step_s_median']:.2f} | {r['tokens_per_s']:.0f} | {r['mfu'] * 100:.1f}% | "
               f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} | " if ok else "- | - | - | - | ")
            + f"{_gib(r.get('gpu_peak_allocated_bytes'))} / {_gib(r.get('gpu_peak_reserved_bytes'))} | "
            f"{_gib(r.get('peak_rss_bytes'))} | {nvme} | {r['status']}{': ' + r['error'] if r.get('error') else ''} |")
    at = s.get("vs_deepspeed_at")
    lines += ["", "vs DeepSpeed (offload's tokens/s over DeepSpeed's, same model, budget and tokens per step): "
              + (f"{at['ratio']:.2f}x at {at['params'] / 1e9:.2f}B, {_gib(at['budget_bytes'])} GiB ({at['offload']} "
                 f"against {at['deepspeed']})" if at else "no pair of completed runs"), ""]
    if s.get("loss_vs_torch") is not None:
        lines += ["Step losses against plain torch on the whole card (same weights, batches and schedule), largest "
                  "relative difference: " + (", ".join(f"{k} {v:.2e}" for k, v in s["loss_vs_torch"].items())
                                             or "no run with the reference's schedule"), ""]
    for r in s["runs"]:
        if r["status"] != "ok":
            continue
        lines.append(f"**{r['runner']} {r['params'] / 1e9:.2f}B, {_gib(r['budget_bytes'])} GiB**: matmul {r['matmul_tflops']:.1f} TFLOP/s "
                     f"measured; model {r['model_tflops']:.1f} TFLOP/s; micro-batch {r['micro_batch']}x{r['seq']}, "
                     f"accumulation {r['accum']}")
        per = ", ".join(f"{k} {v / 1e9:.2f} GB" if k.endswith("bytes") or "bytes_" in k else f"{k} {v:.2f} s"
                        for k, v in r.get("per_step", {}).items())
        lines.append(f"- per step: {per}")
        if r.get("nvml"):
            n = r["nvml"]
            lines.append(f"- NVML over the timed steps: GPU busy {n['gpu_busy_pct']:.0f}%, host->GPU "
                         f"{n['h2d_mb_s'] / 1e3:.1f} GB/s, GPU->host {n['d2h_mb_s'] / 1e3:.1f} GB/s, "
                         f"used (with the CUDA context) at most {n['nvml_used_gib_max']:.1f} GiB")
        init = {k: r[k] for k in ("build_meta_s", "engine_init_s", "init_s", "first_steps_s") if k in r}
        lines.append("- start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in init.items())
                     + (f"; host memory faulted in at {r['pinning']['populate_gb_s']:.1f} GB/s" if r.get("pinning")
                        else "")
                     + (f", page-locked at {r['pinning']['register_gb_s']:.1f} GB/s"
                        if "register_gb_s" in r.get("pinning", {}) else ""))
        lines.append(f"- losses: {', '.join(f'{x:.3f}' for x in r['losses'])}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return run(a) if a.command == "run" else report(a)


if __name__ == "__main__":
    sys.exit(main())
