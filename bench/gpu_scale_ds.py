#!/usr/bin/env python3
"""DeepSpeed on bench/gpu_scale.py's job: the same model shape, batches, loss, budget and schedule, trained with
ZeRO-3 (parameters and optimizer offloaded to pinned host RAM, DeepSpeedCPUAdam), or ZeRO-Offload (stage 2:
optimizer offloaded, bf16 weights and gradients on the GPU) with ``--stage 2``.

    python3 bench/gpu_scale_ds.py --budget 24GiB --micro-batch 16 --accum 2 --steps 3 --out DIR

It runs in a process of its own, after offload's run and not beside it: each needs most of the host's RAM for
the 7B model's optimizer state, so the two cannot be resident at once, and the runs alternate by process, not
by step. The GPU budget is enforced the same way (torch's allocator capped at ``--budget``);
``stage3_max_live_parameters`` is ``--device-limit`` in bf16 elements. The model is built under
``deepspeed.zero.Init``, so each layer is partitioned to the host as it is constructed. ``--time-limit`` stops
after the step that crosses it (the record says how many steps were timed). The record is written first with
status "did not finish", so a run killed by the host's out-of-memory killer still leaves one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import socket
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch  # noqa: E402

from gpu_scale import (_commit, add_job_args, check_job_args, device_name, lr_at, record_gpu_peaks,  # noqa: E402
                       rss_peak_bytes, summarise)
from scale_model import TokenBatches, causal_lm_loss, count_params, llama_config, matmul_tflops  # noqa: E402


def ds_config(a: argparse.Namespace, pin: bool) -> dict:
    """AdamW with the bench's hyper-parameters, no weight decay, no clipping, bf16."""
    if a.stage == 2:
        zero = {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": pin}, "overlap_comm": True,
                "contiguous_gradients": True, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    else:
        live = a.device_limit_bytes // 2  # bf16 elements
        zero = {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": pin},
                "offload_optimizer": {"device": "cpu", "pin_memory": pin}, "overlap_comm": True,
                "contiguous_gradients": True, "reduce_bucket_size": 5e8, "stage3_max_live_parameters": live,
                "stage3_max_reuse_distance": live, "stage3_prefetch_bucket_size": live // 4,
                "stage3_param_persistence_threshold": 1e4, "sub_group_size": 1e9}
    return {"train_micro_batch_size_per_gpu": a.micro_batch, "gradient_accumulation_steps": a.accum,
            "steps_per_print": 10**9, "bf16": {"enabled": True}, "zero_optimization": zero,
            "gradient_clipping": 0.0, "wall_clock_breakdown": False,
            "optimizer": {"type": "AdamW", "params": {"lr": a.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                      "weight_decay": 0.0}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(a: argparse.Namespace, record: dict, path: pathlib.Path) -> None:
    cuda = a.device == "cuda"
    os.environ.setdefault("DS_ACCELERATOR", a.device)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        os.environ.setdefault(k, v)
    import logging

    import deepspeed
    from deepspeed.utils import logger
    from transformers import LlamaForCausalLM

    logger.setLevel(logging.WARNING)
    record["deepspeed"] = deepspeed.__version__
    config = llama_config(a.hidden, a.layers, a.intermediate, a.heads, a.vocab, a.seq)
    nparams = count_params(config)
    tokens_per_step = a.micro_batch * a.seq * a.accum
    record.update(params=nparams, tokens_per_step=tokens_per_step,
                  matmul_tflops=matmul_tflops(a.device, 8192 if cuda else 1024))
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.budget_bytes / total))
    started = time.perf_counter()
    conf = ds_config(a, pin=cuda)
    optimizer, record["optimizer"] = None, "DeepSpeedCPUAdam"
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
    except Exception as e:  # no compiler or headers: torch's AdamW on the CPU, said in the record
        del conf["optimizer"]
        conf["zero_force_ds_cpu_optimizer"] = False
        optimizer = lambda params: torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)  # noqa: E731
        record["optimizer"] = f"torch.optim.AdamW on the CPU (DeepSpeedCPUAdam did not build: {e})"
    record["op_build_s"] = time.perf_counter() - started
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    start = time.perf_counter()
    if a.stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=conf, remote_device="cpu", pin_memory=cuda):
            model = LlamaForCausalLM(config)
    else:
        model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=optimizer,
                                           config=conf)
    record["init_s"] = time.perf_counter() - start
    print(f"gpu_scale_ds: DeepSpeed {deepspeed.__version__} ZeRO-{a.stage} ready in {record['init_s']:.1f} s "
          f"({record['optimizer']}; op build {record['op_build_s']:.1f} s)", file=sys.stderr, flush=True)
    batches = TokenBatches(a.micro_batch, a.seq)
    losses, step_s = [], []
    t_timed = None
    for step in range(a.warmup_steps + a.steps):
        if step == a.warmup_steps:
            if cuda:
                torch.cuda.synchronize()
            t_timed = time.perf_counter()
        t_step = time.perf_counter()
        for group in engine.optimizer.param_groups:  # the same schedule as offload's run
            group["lr"] = lr_at(a, step)
        micro = []
        for k in range(a.accum):
            ids = batches.get(step * a.accum + k).to(a.device)
            loss = causal_lm_loss(engine(input_ids=ids, use_cache=False).logits, ids)
            engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
            engine.step()          # an optimizer step at the accumulation boundary only
            micro.append(loss.detach())
        losses.append(float(torch.stack(micro).mean()))  # (waits for the step's GPU work)
        step_s.append(time.perf_counter() - t_step)
        print(f"  step {step + 1}/{a.warmup_steps + a.steps}{' (warm-up)' if step < a.warmup_steps else ''}: "
              f"loss {losses[-1]:.4f}, {step_s[-1]:.2f} s", file=sys.stderr, flush=True)
        if t_timed is not None:  # a record after every timed step: a kill later keeps what was measured
            summarise(record, losses, step_s, a.warmup_steps, time.perf_counter() - t_timed, a.device)
            path.write_text(json.dumps(record, indent=1) + "\n")
            if time.perf_counter() - t_timed > a.time_limit:
                break
    if t_timed is None:
        raise RuntimeError("no timed step (the warm-up took the whole --time-limit?)")
    if cuda:
        torch.cuda.synchronize()
    summarise(record, losses, step_s, a.warmup_steps, time.perf_counter() - t_timed, a.device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_job_args(ap)
    ap.add_argument("--stage", type=int, default=3, choices=[2, 3])
    ap.add_argument("--time-limit", type=float, default=240.0, help="seconds of timed steps at most (default 240)")
    a = ap.parse_args(argv)
    check_job_args(ap, a)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ds-zero{a.stage}-{a.label}.json"
    record = {"bench": "gpu_scale", "runner": f"deepspeed-zero{a.stage}", "label": a.label,
              "gpu": device_name(a.device), "device": a.device, "torch": torch.__version__,
              "budget_bytes": a.budget_bytes, "device_limit_bytes": a.device_limit_bytes,
              "micro_batch": a.micro_batch, "seq": a.seq, "accum": a.accum, "steps": a.steps, "lr": a.lr,
              "lr_warmup": a.lr_warmup,
              "date": datetime.date.today().isoformat(), "commit": _commit(),
              "status": "did not finish (killed, e.g. by the host's out-of-memory killer)"}
    path.write_text(json.dumps(record, indent=1) + "\n")
    status = 0
    try:
        train(a, record, path)
    except torch.OutOfMemoryError as e:
        record.update(status="device out of memory", error=str(e).splitlines()[0])
        status = 3
    except Exception as e:
        import traceback

        traceback.print_exc()
        record.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
        status = 1
    if "gpu_peak_reserved_bytes" not in record:
        record_gpu_peaks(record, a.device)
    record.setdefault("peak_rss_bytes", rss_peak_bytes())
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"gpu_scale_ds: {record['status']}; record in {path}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)  # DeepSpeed's threads and process group need not be torn down


if __name__ == "__main__":
    main()
