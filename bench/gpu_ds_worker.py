"""A DeepSpeed trainer for bench/gpu_peers.py, in a process of its own, stepped by the bench over a pipe.

DeepSpeed needs ``torch.distributed`` initialised and patches the model it wraps, so it does not share the
bench's process; it does share its turns: the bench starts this worker, the worker builds the same model (same
seed) and the same batches as the bench's own modes, trains one warm-up step, answers ``{"ready": ...}`` and
then waits. Each ``run N`` line on stdin trains the next N batches and answers one JSON line with the seconds per
step (GPU synchronised), the GPU peak and the last loss; ``quit`` ends it. While one side trains the other
blocks on a pipe, so the modes' turns interleave exactly as the in-process modes' do.

Replies go to the file descriptor ``--reply-fd`` (DeepSpeed prints to stdout). Modes:
- ``ds-offload``: ZeRO-Offload, i.e. ZeRO stage 2 with the optimizer (fp32 master, Adam moments) in pinned host
  RAM and DeepSpeedCPUAdam; bf16 weights on the GPU;
- ``ds-infinity``: ZeRO stage 3 with parameters and optimizer in pinned host RAM; ``--live-params`` caps the
  parameters resident on the GPU (``stage3_max_live_parameters``), the bench sets it to offload's
  ``device_memory_limit`` in elements.
If DeepSpeed's CPU Adam cannot be built on the machine, the worker falls back to torch's AdamW on the CPU and
says so in its ready reply (``optimizer``). ``--device cpu`` (DeepSpeed's CPU accelerator, gloo, nothing
pinned) exists to try the worker on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time

LR = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_config(mode: str, batch: int, live_params: int, pin: bool = True) -> dict:
    """AdamW with torch's defaults and no weight decay or clipping, as the bench's other modes."""
    if mode == "ds-offload":
        zero = {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": pin}, "overlap_comm": True,
                "contiguous_gradients": True, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    else:
        zero = {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": pin},
                "offload_optimizer": {"device": "cpu", "pin_memory": pin}, "overlap_comm": True,
                "contiguous_gradients": True, "reduce_bucket_size": 5e7,
                "stage3_max_live_parameters": live_params, "stage3_max_reuse_distance": live_params,
                "stage3_prefetch_bucket_size": live_params // 2, "stage3_param_persistence_threshold": 1e4,
                "sub_group_size": 1e9}
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
            "bf16": {"enabled": True}, "zero_optimization": zero, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                      "weight_decay": 0.0}},
            "wall_clock_breakdown": False}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", required=True, choices=["ds-offload", "ds-infinity"])
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--total-steps", type=int, required=True, help="batches to draw (the bench's warm-up + timed)")
    ap.add_argument("--live-params", type=int, default=0)
    ap.add_argument("--reply-fd", type=int, required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = ap.parse_args()
    cuda = a.device == "cuda"
    replies = os.fdopen(a.reply_fd, "w", buffering=1)

    def reply(**fields) -> None:
        replies.write(json.dumps(fields) + "\n")

    started = time.perf_counter()
    os.environ.setdefault("DS_ACCELERATOR", a.device)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        os.environ.setdefault(k, v)
    try:
        import logging

        import deepspeed
        import torch
        from deepspeed.utils import logger

        from offload.bench.llama import bench_llama

        logger.setLevel(logging.WARNING)
        model = bench_llama(a.hidden, a.layers, a.seq, vocab=a.vocab)  # the bench's base model, same seed
        gen = torch.Generator().manual_seed(0)  # the bench's batches, same order
        batches = [torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen) for _ in range(a.total_steps)]
        config = ds_config(a.mode, a.batch, a.live_params, pin=cuda)

        def synchronize() -> None:
            if cuda:
                torch.cuda.synchronize()

        def allocated(peak: bool) -> int:
            if not cuda:
                return 0
            return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()

        optimizer, optimizer_name = None, "DeepSpeedCPUAdam"
        try:
            from deepspeed.ops.op_builder import CPUAdamBuilder

            CPUAdamBuilder().load(verbose=False)
        except Exception as e:  # a machine without a compiler or headers: torch's CPU AdamW instead
            del config["optimizer"]
            config["zero_force_ds_cpu_optimizer"] = False
            optimizer = lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.0)  # noqa: E731
            optimizer_name = f"torch.optim.AdamW on the CPU (DeepSpeedCPUAdam did not build: {e})"
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               optimizer=optimizer, config=config)
        done = 0
        host = {"host_forward_s": 0.0, "host_backward_s": 0.0, "host_step_s": 0.0}

        def train(n: int) -> float:
            nonlocal done
            loss = None
            for _ in range(n):
                ids = batches[done].to(a.device)
                t0 = time.perf_counter()
                loss = engine(input_ids=ids, labels=ids).loss
                t1 = time.perf_counter()
                engine.backward(loss)
                t2 = time.perf_counter()
                engine.step()
                t3 = time.perf_counter()
                for k, dt in zip(host, (t1 - t0, t2 - t1, t3 - t2)):
                    host[k] += dt
                done += 1
            return float(loss.detach())

        first = train(1)  # warm-up: DeepSpeed builds its buckets and the optimizer state here
        synchronize()
        host = dict.fromkeys(host, 0.0)
        reply(ready=True, init_s=time.perf_counter() - started, optimizer=optimizer_name, loss_first=first,
              persistent_bytes=allocated(peak=False), deepspeed=deepspeed.__version__)
    except Exception as e:
        reply(ready=False, error=f"{type(e).__name__}: {e}")
        return 1
    timed = 0
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        n = int(words[1])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = train(n)
        synchronize()
        timed += n
        reply(step_s=(time.perf_counter() - start) / n, gpu_peak_bytes=allocated(peak=True),
              loss=loss, steps_trained=done, per_step={k: v / timed for k, v in host.items()},
              peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    replies.close()
    os._exit(0)  # DeepSpeed's threads and process group need not be torn down


if __name__ == "__main__":
    sys.exit(main())
