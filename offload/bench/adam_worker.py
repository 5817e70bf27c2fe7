"""One benchmark process of `offload bench adam`: times one Adam implementation at one thread count.

Run by offload.bench.adam as a script (``python adam_worker.py ...``), possibly under another interpreter (an
environment with another build of offload, or a throwaway venv with a peer optimizer, whose worker in bench/ of
the source tree loads this file and adds its optimizer to OPTIMIZERS), so it imports nothing of offload at
module level: only the standard library and torch, and offload when the implementation under test needs it.
Prints one JSON line per configuration (shape x gradient dtype x low-precision write).

Implementations (``--impl``):
  ours         offload's native kernel: one fused pass, reading bf16 grads directly and writing the bf16 copy
  ours_optim   offload.CPUAdam.step() (fp32 grads, no copy: the drop-in optimizer, with its Python overhead)
  torch_fused  torch.optim.AdamW(fused=True); bf16 grads upcast into fp32 .grad first, bf16 copy by copy_ after;
               any optimizer of OPTIMIZERS is timed the same way
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import torch

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
# impl -> a function making a torch.optim.Optimizer with HYPER over the parameters it is given
OPTIMIZERS: dict[str, Callable[[list], torch.optim.Optimizer]] = {
    "torch_fused": lambda params: torch.optim.AdamW(params, fused=True, **HYPER),
}


class Buffers:
    """The tensors of one shape, allocated once and reused by every configuration (no allocation per step)."""

    def __init__(self, sizes: list[int]) -> None:
        gen = torch.Generator().manual_seed(0)
        self.params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]
        for p in self.params:
            p.grad = torch.randn(p.numel(), generator=gen) * 1e-3
        self.grads_bf16 = [p.grad.to(torch.bfloat16) for p in self.params]
        self.lowp = [torch.empty(p.numel(), dtype=torch.bfloat16) for p in self.params]
        self.exp_avg = [torch.zeros(p.numel()) for p in self.params]
        self.exp_avg_sq = [torch.zeros(p.numel()) for p in self.params]
        self.numel = sum(sizes)


def make_step(impl: str, buf: Buffers, grad: str, write: str, optimizers: dict = OPTIMIZERS):
    """Returns a zero-argument function doing one full step of `impl` for this configuration, or None if the
    implementation has no such configuration. Implementations other than ours are the optimizers of
    ``optimizers``."""
    if impl == "ours":
        from offload import _C

        state = {"step": 0}
        grads = buf.grads_bf16 if grad == "bf16" else [p.grad for p in buf.params]
        lowps = buf.lowp if write == "bf16" else None
        lr, (beta1, beta2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
        if len(buf.params) == 1:
            p, g, m, v = buf.params[0].data, grads[0], buf.exp_avg[0], buf.exp_avg_sq[0]
            lowp = lowps[0] if lowps else None

            def step():
                state["step"] += 1
                _C.adam_step(p, g, m, v, lowp, step=state["step"], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                             weight_decay=wd)
            return step

        def step():  # gathers addresses every step, as an optimizer over changing gradients must
            state["step"] += 1
            _C.adam_step_ptrs([p.data_ptr() for p in buf.params], [g.data_ptr() for g in grads],
                              [m.data_ptr() for m in buf.exp_avg], [v.data_ptr() for v in buf.exp_avg_sq],
                              [x.data_ptr() for x in lowps] if lowps else [], [p.numel() for p in buf.params],
                              "bfloat16" if grad == "bf16" else "float32", "bfloat16" if lowps else "none",
                              step=state["step"], lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd)
        return step

    if impl == "ours_optim":
        if grad != "fp32" or write != "none":
            return None
        import offload

        return offload.CPUAdam(buf.params, **HYPER).step

    if impl not in optimizers:
        raise SystemExit(f"adam_worker: unknown --impl {impl!r} (known: ours, ours_optim, {', '.join(optimizers)})")
    opt = optimizers[impl](buf.params)
    grads32 = [p.grad for p in buf.params]
    params = [p.data for p in buf.params]

    def step():
        if grad == "bf16":
            torch._foreach_copy_(grads32, buf.grads_bf16)
        opt.step()
        if write == "bf16":
            torch._foreach_copy_(buf.lowp, params)
    return step


def time_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main(optimizers: dict = OPTIMIZERS) -> None:
    """The worker's command line; ``optimizers`` are the implementations it times besides ours."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--numel", type=int, required=True)
    ap.add_argument("--ntensors", type=int, required=True, help="tensor count of the 'many' shape")
    ap.add_argument("--shapes", default="flat,many")
    ap.add_argument("--grads", default="fp32,bf16")
    ap.add_argument("--writes", default="none,bf16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    if a.impl.startswith("ours"):
        from offload import native

        native.set_num_threads(a.threads)
    for shape in a.shapes.split(","):
        sizes = [a.numel] if shape == "flat" else [a.numel // a.ntensors] * a.ntensors
        buf = Buffers(sizes)
        for grad in a.grads.split(","):
            for write in a.writes.split(","):
                step = make_step(a.impl, buf, grad, write, optimizers)
                if step is None:
                    continue
                cpu0 = time.process_time()
                wall0 = time.perf_counter()
                times = time_steps(step, a.warmup, a.steps)
                util = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
                med = statistics.median(times)
                print(json.dumps(dict(impl=a.impl, threads=a.threads, shape=shape, ntensors=len(sizes),
                                      numel=buf.numel, grad=grad, write=write, step_s_median=med,
                                      step_s=times, mparam_s=buf.numel / med / 1e6, cpu_util=round(util, 2))),
                      flush=True)
        del buf


if __name__ == "__main__":
    sys.exit(main())
