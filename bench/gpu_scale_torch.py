#!/usr/bin/env python3
"""Plain torch on bench/gpu_scale.py's job, as the reference trajectory: the same weights (a normal build with
seed 0, which is what ``offload.init_empty`` replays), batches, loss, schedule and accumulation, with the whole
training state on the GPU: fp32 weights, bf16 autocast, ``torch.optim.AdamW(fused=True)``. No memory budget (a
7B model's state is 108 GB: this needs a card of about 140 GB). The record's losses are what offload's are
compared with in the report (bf16 rounding differs between the two, so they agree to about 1e-2, not exactly).

    python3 bench/gpu_scale_torch.py --steps 4 --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch  # noqa: E402

from gpu_scale import (_commit, add_job_args, check_job_args, device_name, lr_at, record_gpu_peaks,  # noqa: E402
                       summarise)
from scale_model import TokenBatches, causal_lm_loss, count_params, llama_config, matmul_tflops  # noqa: E402


def train(a: argparse.Namespace, record: dict) -> None:
    from transformers import LlamaForCausalLM

    config = llama_config(a.hidden, a.layers, a.intermediate, a.heads, a.vocab, a.seq)
    nparams = count_params(config)
    tokens_per_step = a.micro_batch * a.seq * a.accum
    record.update(params=nparams, tokens_per_step=tokens_per_step,
                  matmul_tflops=matmul_tflops(a.device, 8192 if a.device == "cuda" else 1024))
    start = time.perf_counter()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(a.device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=a.device == "cuda")
    record["init_s"] = time.perf_counter() - start
    batches = TokenBatches(a.micro_batch, a.seq)
    losses, step_s = [], []
    t_timed = time.perf_counter()
    for step in range(a.warmup_steps + a.steps):
        if step == a.warmup_steps:
            if a.device == "cuda":
                torch.cuda.synchronize()
            t_timed = time.perf_counter()
        t_step = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(a, step)
        micro = []
        for k in range(a.accum):
            ids = batches.get(step * a.accum + k).to(a.device)
            with torch.autocast(a.device, dtype=torch.bfloat16):
                logits = model(input_ids=ids, use_cache=False).logits
            loss = causal_lm_loss(logits, ids)
            del logits
            (loss / a.accum).backward()
            micro.append(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(torch.stack(micro).mean()))
        step_s.append(time.perf_counter() - t_step)
        print(f"  step {step + 1}/{a.warmup_steps + a.steps}: loss {losses[-1]:.4f}, {step_s[-1]:.2f} s",
              file=sys.stderr, flush=True)
    if a.device == "cuda":
        torch.cuda.synchronize()
    summarise(record, losses, step_s, a.warmup_steps, time.perf_counter() - t_timed, a.device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_job_args(ap)
    a = ap.parse_args(argv)
    check_job_args(ap, a)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"bench": "gpu_scale", "runner": "torch", "label": a.label, "gpu": device_name(a.device),
              "device": a.device, "torch": torch.__version__, "budget_bytes": None, "micro_batch": a.micro_batch,
              "seq": a.seq, "accum": a.accum, "steps": a.steps, "lr": a.lr, "lr_warmup": a.lr_warmup,
              "date": datetime.date.today().isoformat(), "commit": _commit(), "status": "failed"}
    status = 0
    try:
        train(a, record)
    except Exception as e:  # the record says what went wrong; the report goes on without a reference
        import traceback

        traceback.print_exc()
        record.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
        status = 3 if isinstance(e, torch.OutOfMemoryError) else 1
    if "gpu_peak_reserved_bytes" not in record:
        record_gpu_peaks(record, a.device)
    (out / "torch-reference.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"gpu_scale_torch: {record['status']}; record in {out / 'torch-reference.json'}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
