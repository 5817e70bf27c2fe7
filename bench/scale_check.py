#!/usr/bin/env python3
"""Train a model whose training state is several times the host budget, with parameters, gradients and optimizer
state on NVMe, and report sizes, peak memory and step times as JSON.

    python3 bench/scale_check.py --dir /path/on/nvme --hidden 1536 --layers 10 --budget-ratio 4 --steps 4
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time

import torch


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="nvme_dir (default: a temporary directory)")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--budget-ratio", type=float, default=4.0, help="training state (16 B/param) / host budget")
    a = ap.parse_args(argv)
    import offload
    from offload.bench.llama import bench_llama  # (imports transformers before the baseline is taken)

    baseline = _status("VmRSS")
    model = bench_llama(a.hidden, a.layers, a.tokens, vocab=a.vocab)
    nparams = sum(p.numel() for p in model.parameters())
    state = 16 * nparams
    host_limit = int(state / a.budget_ratio)
    # a quarter of the bf16 parameters, or the largest group (the embedding) twice over if that is more
    from offload.layout.partition import partition_model

    largest = max(sum(p.numel() for p in g.params) for g in partition_model(model).groups)
    device_limit = max(nparams * 2 // 4, 4 * largest + (1 << 20))
    config = offload.Config(device="cpu", dtype="bf16", params="nvme", optimizer="nvme",
                            nvme_dir=a.dir or tempfile.mkdtemp(prefix="offload-scale-"),
                            host_memory_limit=host_limit, device_memory_limit=device_limit, prefetch_layers=1)
    built = time.perf_counter()
    engine = offload.Engine(model, config, lr=3e-4, max_grad_norm=1.0)
    built = time.perf_counter() - built
    gc.collect()
    after_build = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark: from here on it measures training
    ids = torch.randint(0, a.vocab, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    losses, times = [], []
    with engine:
        for _ in range(a.steps):
            start = time.perf_counter()
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            times.append(time.perf_counter() - start)
            losses.append(round(loss.item(), 4))
            print(json.dumps({"step": len(losses), "loss": losses[-1], "seconds": round(times[-1], 2)}),
                  file=sys.stderr, flush=True)
        stats = engine.stats()
    peak = _status("VmHWM")
    print(json.dumps({
        "params": nparams, "training_state_bytes": state, "host_memory_limit": host_limit,
        "device_memory_limit": device_limit, "state_over_budget": round(state / host_limit, 2),
        "host_bytes_peak": stats.host_bytes_peak, "device_param_bytes_peak": stats.device_param_bytes_peak,
        "gradients_on_nvme": stats.gradients_on_nvme, "rss_baseline": baseline, "rss_after_build": after_build,
        "rss_peak_training": peak, "rss_peak_over_baseline": peak - baseline, "build_s": round(built, 1),
        "step_s": [round(t, 2) for t in times], "losses": losses,
        "nvme_bytes_per_step": (stats.nvme_bytes_read + stats.nvme_bytes_written) // a.steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
