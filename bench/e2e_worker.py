"""One end-to-end training run in a fresh process, for bench/e2e.py and bench/finetune.py; prints one
``RESULT {json}`` line.

Runs under offload's Python (modes ``torch``, ``ours-*``) or a DeepSpeed venv's (``ds-*``), so it imports
nothing of offload at module level. What is measured, per measured step: forward / backward / optimizer wall
time; the peak RSS from a sampler thread (every 10 ms, reset after the warm-up); the bytes the process read and
wrote on block devices (psutil's ``io_counters``, the kernel's ``/proc/self/io`` read_bytes and write_bytes; the
swap files use O_DIRECT in every mode, so these are real disk bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time

SIZES = {  # the anchors' models (../shared/anchors/ds_e2e): untied Llama, sdpa attention
    "30m": dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1376, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=8192),
    "300m": dict(hidden_size=1024, num_hidden_layers=18, intermediate_size=2816, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256),  # for the tests of the tool itself
}
HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)  # every mode, no clipping
MODES = ("torch", "ours-cpu", "ours-nvme", "ours-inf", "ds-cpu", "ds-nvme", "ds-inf")


class _PeakRSS(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def reset(self) -> None:
        self.peak = self._proc.memory_info().rss

    def run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()


def _io() -> dict[str, int]:
    """Bytes this process has read from and written to block devices so far."""
    import psutil

    counters = psutil.Process().io_counters()
    return {"read_bytes": counters.read_bytes, "write_bytes": counters.write_bytes}


def _ds_config(mode: str, swap: str, dtype: str) -> dict:
    """DeepSpeed ZeRO-3 as the anchors ran it (the ZeRO-Infinity settings that work in 0.19.8: no NVMe
    parameter prefetch, max_live 5e7, reuse 0)."""
    zero = {"stage": 3, "contiguous_gradients": True, "overlap_comm": False, "reduce_bucket_size": 5e7,
            "stage3_prefetch_bucket_size": 0 if mode == "ds-inf" else 5e7,
            "stage3_param_persistence_threshold": 1e5,
            "stage3_max_live_parameters": 5e7 if mode == "ds-inf" else 1e9,
            "stage3_max_reuse_distance": 0 if mode == "ds-inf" else 1e9, "sub_group_size": 1e8}
    if mode == "ds-cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    else:
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": swap, "pin_memory": False, "buffer_count": 4,
                                     "fast_init": False}
    if mode == "ds-inf":
        zero["offload_param"] = {"device": "nvme", "nvme_path": swap, "pin_memory": False, "buffer_count": 5,
                                 "buffer_size": 1e8, "max_in_cpu": 0}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {**HYPER, "betas": list(HYPER["betas"])}},
              "zero_optimization": zero,
              "aio": {"block_size": 8 << 20, "queue_depth": 32, "intra_op_parallelism": 1, "single_submit": False,
                      "overlap_events": True, "use_gds": False},
              "gradient_clipping": 0.0, "wall_clock_breakdown": False}
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, choices=MODES)
    ap.add_argument("--size", default="300m", choices=list(SIZES))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--swap", required=True, help="swap directory (a subdirectory per run is made and removed)")
    ap.add_argument("--host-memory-limit", default=None)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511").items():
        os.environ.setdefault(k, v)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(a.threads)
    sampler = _PeakRSS()
    sampler.start()
    swap = os.path.join(a.swap, f"{a.mode}-{os.getpid()}")
    os.makedirs(swap, exist_ok=True)
    config = LlamaConfig(max_position_embeddings=max(2048, a.seq), tie_word_embeddings=False,
                         attn_implementation="sdpa", **SIZES[a.size])
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (1, a.seq), generator=gen) for _ in range(4)]
    torch.manual_seed(0)
    started = time.perf_counter()
    autocast = a.dtype == "bf16" and a.mode == "torch"
    if a.mode == "torch":
        model = LlamaForCausalLM(config)
        opt = torch.optim.AdamW(model.parameters(), fused=True, **HYPER)

        def step(x):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # fp32 params, bf16 compute
                loss = model(input_ids=x, labels=x).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss, t0, t1, t2
    elif a.mode.startswith("ours"):
        import offload

        params, optimizer = {"ours-cpu": ("device", "cpu"), "ours-nvme": ("device", "nvme"),
                             "ours-inf": ("nvme", "nvme")}[a.mode]
        model = offload.init_empty(lambda: LlamaForCausalLM(config))
        engine = offload.Engine(model, offload.Config(device="cpu", dtype=a.dtype, params=params,
                                                      optimizer=optimizer, nvme_dir=swap,
                                                      host_memory_limit=a.host_memory_limit), **HYPER)

        def step(x):
            t0 = time.perf_counter()
            loss = engine(input_ids=x, labels=x).loss
            t1 = time.perf_counter()
            engine.backward_step(loss)  # no clipping: updates overlap backward where the placement allows
            t2 = time.perf_counter()
            return loss, t0, t1, t2
    else:
        import logging

        import deepspeed
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend="gloo")
        ds_config = _ds_config(a.mode, swap, a.dtype)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = LlamaForCausalLM(config)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

        def step(x):
            t0 = time.perf_counter()
            loss = engine(input_ids=x, labels=x).loss
            t1 = time.perf_counter()
            engine.backward(loss)
            t2 = time.perf_counter()
            engine.step()
            return loss, t0, t1, t2
    init_s = time.perf_counter() - started
    records, losses = [], []
    io_before = None
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            sampler.reset()
            io_before = _io()
        loss, t0, t1, t2 = step(batches[i % len(batches)])
        if a.mode.startswith("ours"):
            engine.synchronize()  # an overlapped update belongs to this step's time
        t3 = time.perf_counter()
        losses.append(float(loss.detach().float()))
        records.append({"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2, "step_s": t3 - t0})
        print(f"[{a.mode} {a.size} {a.dtype}] step {i}: {t3 - t0:.2f} s, loss {losses[-1]:.4f}", file=sys.stderr,
              flush=True)
    io_after = _io()
    sampler.stop()
    measured = records[a.warmup:]
    median = {k: statistics.median(r[k] for r in measured) for k in measured[0]}
    result = {"mode": a.mode, "size": a.size, "dtype": a.dtype, "tokens": a.seq, "threads": a.threads,
              "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
              **median, "tokens_per_s": a.seq / median["step_s"], "peak_rss_bytes": sampler.peak,
              "read_bytes_per_step": (io_after["read_bytes"] - io_before["read_bytes"]) / a.steps,
              "written_bytes_per_step": (io_after["write_bytes"] - io_before["write_bytes"]) / a.steps,
              "init_s": init_s, "losses": losses, "host_memory_limit": a.host_memory_limit}
    print("RESULT " + json.dumps(result), flush=True)
    shutil.rmtree(swap, ignore_errors=True)
    os._exit(0)  # DeepSpeed's and the engine's threads need not be joined


if __name__ == "__main__":
    sys.exit(main())
