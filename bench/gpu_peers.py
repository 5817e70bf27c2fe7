#!/usr/bin/env python3
"""Training steps on a CUDA device, offload's placements against torch, torchao, DeepSpeed (once `offload bench gpu`).

One process builds every mode's model from the same seed and trains them in turn on the same batches: each
round runs ``--steps`` steps of every mode, in alternating order (A B C, then C B A, ...), after one warm-up
step each, so that drift of the machine hits all modes alike. Modes:
- ``torch``: plain torch with everything on the GPU: fp32 weights, bf16 autocast, fused AdamW (the ceiling);
- ``torchao``: torchao's CPUOffloadOptimizer (fused AdamW on the CPU, gradients offloaded), fp32 weights on
  the GPU and bf16 autocast: the same mixed precision as offload's (fp32 master, bf16 compute);
- ``opt-cpu``: offload, bf16 weights on the GPU, fp32 master and Adam state in pinned host RAM (ZeRO-Offload);
- ``params-cpu``: offload, weights and state in host RAM, ``device_memory_limit`` = weights / ``--shrink``;
- ``nvme``: offload, weights and state on NVMe (``--dir``), the same device limit;
- ``ds-offload``: DeepSpeed ZeRO-Offload (stage 2, optimizer in pinned host RAM, DeepSpeedCPUAdam, bf16);
- ``ds-infinity``: DeepSpeed ZeRO-3 with parameters and optimizer in pinned host RAM, at most as many live
  parameters on the GPU as ``params-cpu``'s device limit holds.
The DeepSpeed modes need ``deepspeed`` importable; each runs in a worker process of its own
(bench/gpu_ds_worker.py) that takes its turn in the rounds like the others, its peak RSS its own.
Every mode uses AdamW with the same hyper-parameters and no clipping, so the losses are comparable; offload's
modes call ``engine.backward_step(loss)``, which then overlaps each group's update with the rest of backward
(``--split-step``: ``backward(); step()``). Reported
per mode: median tokens/s over rounds; peak GPU memory of the mode (what it keeps allocated between steps plus
its peak above that during its steps); offload's host pool peak; the loss of the last step. The process's peak
RSS is reported once, since the modes share the process.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import resource
import os
import shutil
import subprocess
import sys
import tempfile
import time

from offload.bench.harness import markdown_table, median, round_order

DS_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_ds_worker.py")
MODES = ("torch", "torchao", "opt-cpu", "params-cpu", "nvme", "ds-offload", "ds-infinity")
DEEPSPEED_MODES = ("ds-offload", "ds-infinity")
LR = 1e-4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/gpu_peers.py", description=__doc__.splitlines()[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[3:]))
    ap.add_argument("--modes", default="torch,torchao,opt-cpu,params-cpu",
                    help=f"comma-separated, from {','.join(MODES)} (default: torch,torchao,opt-cpu,params-cpu)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    ap.add_argument("--shrink", type=float, default=10.0,
                    help="device_memory_limit = bf16 weight bytes / SHRINK for params-cpu and nvme (default 10)")
    ap.add_argument("--prefetch", type=int, default=2, help="prefetch_layers for params-cpu and nvme")
    ap.add_argument("--split-step", action="store_true",
                    help="offload modes call backward() then step() instead of backward_step() (which overlaps "
                         "the updates with backward when nothing depends on the global gradient norm)")
    ap.add_argument("--dir", default=None, help="nvme_dir for the nvme mode (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="write the result record to this file")
    a = ap.parse_args(argv)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in a.modes if m not in MODES]
    if unknown or not a.modes:
        ap.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    if a.rounds < 1 or a.steps < 1 or a.shrink < 1:
        ap.error("--rounds and --steps must be >= 1 and --shrink >= 1")
    return a


class _HostTimes:
    """Host seconds spent in the forward, backward and optimizer-step calls (the device runs asynchronously,
    so for GPU-bound work these are launch times; for CPU-bound work they say where the step goes)."""

    def __init__(self) -> None:
        self.forward = self.backward = self.step = 0.0
        self.count = 0

    def add(self, t0: float, t1: float, t2: float, t3: float) -> None:
        self.forward += t1 - t0
        self.backward += t2 - t1
        self.step += t3 - t2
        self.count += 1

    def snapshot(self) -> tuple[float, float, float, int]:
        return self.forward, self.backward, self.step, self.count


class _TorchTrainer:
    """Plain torch (``offload_optimizer=False``) or torchao's CPU-offload optimizer, bf16 autocast."""

    def __init__(self, model, offload_optimizer: bool) -> None:
        import torch

        self.model = model.cuda()
        if offload_optimizer:
            from torchao.optim import CPUOffloadOptimizer

            self.opt = CPUOffloadOptimizer(self.model.parameters(), torch.optim.AdamW, offload_gradients=True,
                                           lr=LR, weight_decay=0.0)
        else:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0, fused=True)
        self.host_pool_peak = None
        self.device_limit = None
        self.host_s = _HostTimes()

    def step(self, ids):
        import torch

        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = self.model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.host_s.add(t0, t1, t2, time.perf_counter())
        return loss.detach()

    def engine_totals(self) -> dict[str, float]:
        return {}

    def sync(self) -> None:
        import torch

        torch.cuda.synchronize()

    def close(self) -> None:
        pass


class _OffloadTrainer:
    def __init__(self, model, params: str, optimizer: str, device_limit: int | None, prefetch: int,
                 nvme_dir: str | None, split_step: bool) -> None:
        import offload

        config = offload.Config(device="cuda", dtype="bf16", params=params, optimizer=optimizer, nvme_dir=nvme_dir,
                                device_memory_limit=device_limit, prefetch_layers=prefetch)
        self.engine = offload.Engine(model, config, lr=LR, weight_decay=0.0)
        self.device_limit = device_limit
        self.split_step = split_step
        self.host_s = _HostTimes()

    @property
    def host_pool_peak(self) -> int:
        return self.engine.stats().host_bytes_peak

    def step(self, ids):
        t0 = time.perf_counter()
        loss = self.engine(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        if self.split_step:
            self.engine.backward(loss)
            t2 = time.perf_counter()
            self.engine.step()
        else:  # the updates overlap backward (no clipping here); the step's host time is then in backward's
            self.engine.backward_step(loss)
            t2 = time.perf_counter()
        self.host_s.add(t0, t1, t2, time.perf_counter())
        return loss.detach()

    def engine_totals(self) -> dict[str, float]:
        """Totals since the start: seconds in the native Adam, waiting for NVMe, waiting for fetches; bytes read
        from and written to NVMe."""
        stats = self.engine.stats()
        return {"adam_s": stats.optimizer_adam_s, "io_wait_s": stats.optimizer_io_wait_s,
                "fetch_wait_s": stats.fetch_wait_s, "nvme_read_bytes": stats.nvme_bytes_read,
                "nvme_written_bytes": stats.nvme_bytes_written}

    def sync(self) -> None:
        self.engine.synchronize()

    def close(self) -> None:
        self.engine.close()


class _DeepSpeedWorker:
    """The bench's handle on a gpu_ds_worker process: ``run(n)`` trains its next n batches there."""

    def __init__(self, mode: str, a: argparse.Namespace, total_steps: int, live_params: int) -> None:
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, DS_WORKER, "--mode", mode, "--hidden", str(a.hidden),
               "--layers", str(a.layers), "--vocab", str(a.vocab), "--batch", str(a.batch), "--seq", str(a.seq),
               "--total-steps", str(total_steps), "--live-params", str(live_params), "--reply-fd", str(write_fd)]
        # DeepSpeed's own output goes to our stderr; the replies come over the pipe.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=sys.stderr, text=True,
                                     pass_fds=(write_fd,))
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)
        self.mode = mode
        self.device_limit = 2 * live_params if mode == "ds-infinity" else None
        self.ready: dict | None = None

    def _answer(self) -> dict:
        line = self.replies.readline()
        if not line:
            raise RuntimeError(f"{self.mode}: the DeepSpeed worker exited (rc {self.proc.wait()}) without answering")
        return json.loads(line)

    def wait_ready(self) -> dict:
        self.ready = self._answer()
        if not self.ready.get("ready"):
            raise RuntimeError(f"{self.mode}: the DeepSpeed worker failed: {self.ready.get('error')}")
        return self.ready

    def run(self, steps: int) -> dict:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.replies.close()


def _make(mode: str, model, a: argparse.Namespace, weight_bytes: int, nvme_dir: str):
    limit = int(weight_bytes / a.shrink)
    if mode == "torch":
        return _TorchTrainer(model, offload_optimizer=False)
    if mode == "torchao":
        return _TorchTrainer(model, offload_optimizer=True)
    if mode == "opt-cpu":
        return _OffloadTrainer(model, "device", "cpu", None, a.prefetch, None, a.split_step)
    if mode == "params-cpu":
        return _OffloadTrainer(model, "cpu", "cpu", limit, a.prefetch, None, a.split_step)
    return _OffloadTrainer(model, "nvme", "nvme", limit, a.prefetch, nvme_dir, a.split_step)


def run(a: argparse.Namespace) -> dict:
    import torch

    from offload.bench.llama import bench_llama

    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_peers.py: error: needs a CUDA device (torch.cuda.is_available() is False)")
    for mode, module in (("torchao", "torchao"), ("ds-offload", "deepspeed"), ("ds-infinity", "deepspeed")):
        if mode in a.modes and importlib.util.find_spec(module) is None:
            print(f"bench/gpu_peers.py: {module} is not installed; leaving out the {mode} mode", file=sys.stderr)
            a.modes = [m for m in a.modes if m != mode]
    base = bench_llama(a.hidden, a.layers, a.seq, vocab=a.vocab)
    nparams = sum(p.numel() for p in base.parameters())
    weight_bytes = 2 * nparams
    tokens = a.batch * a.seq
    total_steps = 1 + a.rounds * a.steps
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen).cuda() for _ in range(total_steps)]
    nvme_dir = a.dir or tempfile.mkdtemp(prefix="offload-bench-gpu-")  # removed at the end when ours
    trainers, persistent, done, losses, failed = {}, {}, {}, {}, {}
    print(f"bench/gpu_peers.py: {torch.cuda.get_device_name()}, {nparams / 1e6:.0f}M parameters, {tokens} tokens "
          f"per step, modes {', '.join(a.modes)}", file=sys.stderr, flush=True)
    try:
        # The DeepSpeed workers start first: their CPU Adam build and set-up overlap the building of ours.
        for mode in a.modes:
            if mode in DEEPSPEED_MODES:
                trainers[mode] = _DeepSpeedWorker(mode, a, total_steps, int(nparams / a.shrink))
        for mode in a.modes:
            if mode in DEEPSPEED_MODES:
                continue
            start = time.perf_counter()
            before = torch.cuda.memory_allocated()
            trainers[mode] = _make(mode, copy.deepcopy(base), a, weight_bytes, nvme_dir)
            losses[mode] = [trainers[mode].step(batches[0])]  # warm-up: traces, autotuning, state creation
            trainers[mode].sync()
            persistent[mode] = torch.cuda.memory_allocated() - before
            done[mode] = 1
            print(f"  {mode}: built and warmed up in {time.perf_counter() - start:.1f} s", file=sys.stderr,
                  flush=True)
        for mode in [m for m in a.modes if m in DEEPSPEED_MODES]:
            try:
                ready = trainers[mode].wait_ready()
            except RuntimeError as e:  # reported, and the comparison goes on without it
                print(f"bench/gpu_peers.py: {e}", file=sys.stderr, flush=True)
                failed[mode] = str(e)
                trainers.pop(mode).close()
                a.modes = [m for m in a.modes if m != mode]
                continue
            losses[mode], done[mode], persistent[mode] = [ready["loss_first"]], 1, ready["persistent_bytes"]
            print(f"  {mode}: ready in {ready['init_s']:.1f} s (DeepSpeed {ready['deepspeed']}, "
                  f"{ready['optimizer']})", file=sys.stderr, flush=True)
        del base
        local = [m for m in a.modes if m not in DEEPSPEED_MODES]
        host_before = {m: trainers[m].host_s.snapshot() for m in local}
        engine_before = {m: trainers[m].engine_totals() for m in local}
        remote: dict[str, dict] = {}
        rounds: dict[str, list[float]] = {m: [] for m in a.modes}
        peaks: dict[str, int] = {m: 0 for m in a.modes}
        for r in range(a.rounds):
            for mode in round_order(a.modes, r):
                trainer = trainers[mode]
                if mode in DEEPSPEED_MODES:  # its own process: it times itself, synchronised, the same way
                    answer = trainer.run(a.steps)
                    rounds[mode].append(answer["step_s"])
                    peaks[mode] = max(peaks[mode], answer["gpu_peak_bytes"])
                    losses[mode].append(answer["loss"])
                    done[mode] = answer["steps_trained"]
                    remote[mode] = answer
                    continue
                start_bytes = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(a.steps):
                    losses[mode].append(trainer.step(batches[done[mode]]))
                    done[mode] += 1
                trainer.sync()
                rounds[mode].append((time.perf_counter() - start) / a.steps)
                peaks[mode] = max(peaks[mode], torch.cuda.max_memory_allocated() - start_bytes + persistent[mode])
            print(f"  round {r + 1}/{a.rounds}: " + ", ".join(f"{m} {rounds[m][-1]:.3f} s/step" for m in a.modes),
                  file=sys.stderr, flush=True)
        result = {
            "bench": "gpu", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "params": nparams, "hidden": a.hidden, "layers": a.layers, "vocab": a.vocab, "batch": a.batch,
            "seq": a.seq, "rounds": a.rounds, "steps": a.steps, "shrink": a.shrink, "split_step": a.split_step,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "modes": {},
        }
        if failed:
            result["failed"] = failed
        for mode in a.modes:
            step_s = median(rounds[mode])
            record = {
                "step_s": step_s, "step_s_rounds": rounds[mode], "tokens_per_s": tokens / step_s,
                "gpu_peak_bytes": peaks[mode], "host_pool_peak_bytes": None,
                "device_memory_limit": trainers[mode].device_limit,
                "loss_first": float(losses[mode][0]), "loss_last": float(losses[mode][-1]), "steps_trained": done[mode],
            }
            if mode in DEEPSPEED_MODES:
                record.update(per_step=remote[mode]["per_step"], peak_rss_bytes=remote[mode]["peak_rss_bytes"],
                              optimizer=trainers[mode].ready["optimizer"])
            else:
                timed = a.rounds * a.steps
                now = trainers[mode].host_s.snapshot()
                split = {f"host_{k}_s": (now[i] - host_before[mode][i]) / timed
                         for i, k in enumerate(("forward", "backward", "step"))}
                engine_now = trainers[mode].engine_totals()
                split.update({k: (v - engine_before[mode][k]) / timed for k, v in engine_now.items()})
                record.update(per_step=split, host_pool_peak_bytes=trainers[mode].host_pool_peak)
            result["modes"][mode] = record
        return result
    finally:
        for trainer in trainers.values():
            trainer.close()
        if a.dir is None:
            shutil.rmtree(nvme_dir, ignore_errors=True)


def print_table(result: dict) -> None:
    modes = result["modes"]
    print(f"\n{result['device']}: {result['params'] / 1e6:.0f}M-parameter Llama, {result['batch']}x{result['seq']} "
          f"tokens/step, {result['rounds']} rounds x {result['steps']} steps (medians); process peak RSS "
          f"{result['peak_rss_bytes'] / 2**30:.1f} GiB")
    refs = [r for r in ("torchao", "ds-offload") if r in modes]
    columns = ["mode", "s/step", "tokens/s"] + [f"vs {r}" for r in refs] + ["GPU peak GiB", "host pool GiB", "loss"]
    print(markdown_table(columns, [
        [mode, f"{m['step_s']:.3f}", f"{m['tokens_per_s']:.0f}"]
        + [f"{m['tokens_per_s'] / modes[r]['tokens_per_s']:.2f}x" for r in refs]
        + [f"{m['gpu_peak_bytes'] / 2**30:.2f}",
           f"{m['host_pool_peak_bytes'] / 2**30:.2f}" if m["host_pool_peak_bytes"] is not None else "-",
           f"{m['loss_last']:.4f}"] for mode, m in modes.items()]))
    for mode, m in modes.items():
        if "optimizer" in m:
            print(f"{mode}: {m['optimizer']}, its process's peak RSS {m['peak_rss_bytes'] / 2**30:.1f} GiB")
    for mode, error in result.get("failed", {}).items():
        print(f"{mode}: did not run: {error}")
    print("\nper step, seconds (host time in each call; adam / I/O / fetch waits and NVMe bytes from engine.stats()):")
    for mode, m in modes.items():
        print(f"{mode:<11} " + " ".join(f"{k[:-6]}={v / 1e9:.2f}GB" if k.endswith("_bytes") else f"{k}={v:.4f}"
                                        for k, v in m["per_step"].items()))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    result = run(a)
    print(json.dumps(result))
    print_table(result)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
