#!/usr/bin/env python3
"""A model larger than the host budget, end to end: write a random fp32 safetensors checkpoint (sharded, one
shard in memory at a time), then in a fresh process build the model with offload.init_empty, load the
checkpoint with offload.load_pretrained and train a few steps with params and optimizer state on NVMe; report
the peak RSS of that process (above its start, with torch and the model code imported) as JSON and a table.

    python3 bench/scale_pretrained.py --dir /path/on/nvme --out /tmp/scale-pretrained.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from offload.bench.harness import markdown_table, median

RUN = r'''
import json, resource, sys, time, psutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
import offload
cfg_dir, ckpt, swap, limit, steps, tokens = sys.argv[1:7]
config = AutoConfig.from_pretrained(cfg_dir)
with torch.device("meta"):
    AutoModelForCausalLM.from_config(config)
start = psutil.Process().memory_info().rss
t0 = time.perf_counter()
model = offload.init_empty(lambda: AutoModelForCausalLM.from_config(config))
engine = offload.Engine(model, offload.Config(device="cpu", dtype="bf16", params="nvme", optimizer="nvme",
                        nvme_dir=swap, host_memory_limit=int(limit), prefetch_layers=1), lr=1e-5)
t1 = time.perf_counter()
offload.load_pretrained(engine, ckpt)
t2 = time.perf_counter()
ids = torch.randint(0, config.vocab_size, (1, int(tokens)), generator=torch.Generator().manual_seed(0))
losses, step_s = [], []
for _ in range(int(steps)):
    s = time.perf_counter()
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    engine.synchronize()
    losses.append(loss.item())
    step_s.append(time.perf_counter() - s)
stats = engine.stats()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
engine.close()
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "peak_rss_above_start": peak - start,
                  "start_rss": start, "host_bytes_peak": stats.host_bytes_peak, "build_s": t1 - t0,
                  "load_s": t2 - t1, "step_s": step_s, "losses": losses,
                  "gradients_on_nvme": stats.gradients_on_nvme}))
'''


def write_checkpoint(config, out: Path, shard_bytes: int) -> int:
    """Random fp32 weights (std 0.02, norms 1) for every tensor of the model's state_dict, in shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    names = list(dict.fromkeys(model.state_dict().keys()))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    shard, size, index, files, total = {}, 0, {}, [], 0
    for i, name in enumerate(names):
        t = torch.ones(shapes[name]) if name.endswith("norm.weight") else torch.randn(shapes[name], generator=gen) * 0.02
        shard[name] = t
        size += t.numel() * 4
        total += t.numel() * 4
        if size >= shard_bytes or i == len(names) - 1:
            file = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, out / file, metadata={"format": "pt"})
            index.update({k: file for k in shard})
            files.append(file)
            print(f"  wrote {file} ({size / 1e9:.2f} GB)", file=sys.stderr, flush=True)
            shard, size = {}, 0
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}))
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="where the checkpoint and the swap files go")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=38)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--host-memory-limit", type=int, default=2 << 30)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="also write the JSON record here")
    a = ap.parse_args()
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.hidden // 128, tie_word_embeddings=False)
    root = Path(a.dir)
    ckpt = root / "scale-pretrained-ckpt"
    start = time.perf_counter()
    weights = write_checkpoint(config, ckpt, 1 << 30)
    print(f"checkpoint: {weights / 1e9:.2f} GB of fp32 weights in {time.perf_counter() - start:.0f} s",
          file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-c", RUN, str(ckpt), str(ckpt), str(root), str(a.host_memory_limit),
                           str(a.steps), str(a.tokens)], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return done.returncode
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(checkpoint_bytes=weights, host_memory_limit=a.host_memory_limit)
    print(json.dumps(result))
    print(markdown_table(
        ["fp32 weights", "host_memory_limit", "peak RSS above start", "host buffers peak", "build", "load", "step",
         "losses"],
        [[f"{weights / 1e9:.2f} GB", f"{a.host_memory_limit / 2**30:.1f} GiB",
          f"{result['peak_rss_above_start'] / 2**30:.2f} GiB", f"{result['host_bytes_peak'] / 2**30:.2f} GiB",
          f"{result['build_s']:.0f} s", f"{result['load_s']:.0f} s", f"{median(result['step_s']):.0f} s",
          ", ".join(f"{x:.2f}" for x in result["losses"])]], labels=0))
    if a.out:
        Path(a.out).write_text(json.dumps(result) + "\n")
    import shutil
    shutil.rmtree(ckpt, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
