"""The staged gradient addition on this CPU: torch's add_ + vector_norm (what GradientStream did) against the
native one-pass _C.accumulate_grad, on 100M bf16 gradients into fp32, interleaved A B A B over 7 rounds; prints
JSON and the medians. Run: python3 bench/results/notes/accumulate-cpu-2026-12-04.py"""
import json
import statistics
import time

import torch

from offload import _C, native

n = 100_000_000
accum, grad = torch.randn(n), torch.randn(n).bfloat16()


def torch_way():
    accum.add_(grad)
    return torch.linalg.vector_norm(accum)


def native_way():
    return _C.accumulate_grad(accum, grad)


times = {"torch": [], "native": []}
torch_way(), native_way()  # warm both
for _ in range(7):
    for name, fn in (("torch", torch_way), ("native", native_way)):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
med = {k: statistics.median(v) for k, v in times.items()}
print(json.dumps({"n": n, "threads": native.num_threads(), "torch_threads": torch.get_num_threads(),
                  "simd": native.simd_variant(), "times_s": times, "median_s": med,
                  "torch_over_native": med["torch"] / med["native"]}))
print(f"| torch add_+norm | native | ratio |\n|---:|---:|---:|\n| {med['torch']:.4f} s | {med['native']:.4f} s | "
      f"{med['torch'] / med['native']:.1f}x |")
