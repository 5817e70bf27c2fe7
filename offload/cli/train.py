"""`offload train`: the main job. Trains a causal LM with its parameters and optimizer state offloaded and shows
what the engine does on every step (loss, tokens/s, where the time goes, host RAM, bytes moved)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from offload.cli.launch import Launch, start
from offload.cli.outputs import check_writable_dir, check_writable_file
from offload.cli.train_setup import PRESETS, batch_at, build_model, load_text, make_config
from offload.errors import ConfigError
from offload.exit_signals import Terminated, terminate_on_signals
from offload.storage.ownership import DirectoryOwner
from offload.storage.swap_store import clean_stale_runs

log = logging.getLogger("offload")

SCRATCH_PREFIX = "offload-train-"

EXAMPLES = """examples:
  offload train                                  # tiny Llama, shipped text, params + optimizer on NVMe (temp dir)
  offload train --model small --steps 500 --nvme-dir /mnt/nvme/swap
  offload train --model path/to/config.json --data corpus.txt --seq-len 512 --batch 8
  offload train --config offload.toml            # the I/O settings `offload tune` wrote
  offload train --checkpoint-dir runs/ckpt --checkpoint-every 100   # then: --resume to continue exactly
  offload train --init-from runs/exported --lr 3e-4   # fine-tune: weights of a safetensors checkpoint
  torchrun --nproc-per-node 2 -m offload train --batch 8   # 2 ranks, each 4 of every 8 sequences, each
                                                           # holding half of the offloaded state
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    what = parser.add_argument_group("what to train")
    what.add_argument("--model", default=None, metavar="PRESET|CONFIG",
                      help=f"a preset ({', '.join(PRESETS)}; default tiny, or the --init-from checkpoint's "
                           "config.json) or a Hugging Face config.json")
    what.add_argument("--init-from", metavar="DIR", help="start from the weights of a Hugging Face safetensors "
                                                         "checkpoint (e.g. what offload export wrote)")
    what.add_argument("--data", metavar="FILE", help="a text file (bytes are the tokens); default: text shipped "
                                                     "with offload")
    what.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    what.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    what.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    what.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3; 10-step warm-up, "
                                                             "cosine decay to 10%%)")
    what.add_argument("--seed", type=int, default=0, help="seed of the model init and the batches")
    where = parser.add_argument_group("where the state lives (flags override --config)")
    where.add_argument("--config", metavar="TOML", help="an offload config file (e.g. written by offload tune)")
    where.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    where.add_argument("--params", choices=["device", "cpu", "nvme"],
                       help="where parameters live between uses (default: nvme without a GPU, device with one)")
    where.add_argument("--optimizer", choices=["cpu", "nvme"], help="where fp32 master, m and v live (default nvme)")
    where.add_argument("--nvme-dir", metavar="DIR", help="swap directory (default: a temporary directory, removed "
                                                         "at the end)")
    where.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="compute dtype (default bf16)")
    where.add_argument("--host-memory-limit", metavar="BYTES", help="bound on the engine's host buffers, e.g. 8GiB")
    where.add_argument("--device-memory-limit", metavar="BYTES", help="bound on parameter bytes on the device")
    where.add_argument("--prefetch-layers", type=int, help="groups fetched ahead (default 2)")
    runs = parser.add_argument_group("checkpoints and output")
    runs.add_argument("--checkpoint-dir", metavar="DIR", help="save checkpoints here (atomic; the last one is kept)")
    runs.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                      help="save every N steps (default: only at the end)")
    resume = runs.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue exactly from the checkpoint in "
                                                              "--checkpoint-dir (an error if there is none)")
    resume.add_argument("--resume-if-exists", action="store_true",
                        help="continue from the checkpoint in --checkpoint-dir if there is one, else start at step 0")
    runs.add_argument("--timeline", metavar="FILE", help="write a Chrome trace (chrome://tracing, Perfetto)")
    runs.add_argument("--log-every", type=int, default=10, metavar="N",
                      help="a plain log line every N steps when output is not a terminal (default 10)")
    runs.add_argument("--no-sample", action="store_true", help="skip the text sample at the end")


def _check(args: argparse.Namespace) -> None:
    for flag in ("steps", "batch", "seq_len", "log_every"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: expected a positive integer; got {getattr(args, flag)}")
    if args.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every: expected >= 0; got {args.checkpoint_every}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr: expected a positive number; got {args.lr}")
    for flag in ("resume", "resume_if_exists"):
        if getattr(args, flag) and not args.checkpoint_dir:
            raise ConfigError(f"--{flag.replace('_', '-')}: needs --checkpoint-dir (where to resume from)")
    if args.resume and not _has_checkpoint(args.checkpoint_dir):
        raise ConfigError(f"--resume: no checkpoint in {args.checkpoint_dir} (no CURRENT file); drop --resume to "
                          "start at step 0, or use --resume-if-exists")
    # Outputs are checked now, not when the run has trained for hours (nothing is left behind by the check).
    if args.checkpoint_dir:
        check_writable_dir("--checkpoint-dir", args.checkpoint_dir)
    if args.timeline:
        check_writable_file("--timeline", args.timeline)


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 10 steps, then cosine decay to 10% of ``peak`` at ``steps``."""
    warmup = min(10, max(1, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class StepReport:
    step: int
    loss: float
    tokens_per_s: float
    step_s: float
    fetch_wait_s: float
    optimizer_s: float
    rss_bytes: int
    nvme_read: int
    nvme_written: int

    def line(self) -> str:
        return (f"step={self.step} loss={self.loss:.4f} tok/s={self.tokens_per_s:.0f} step_s={self.step_s:.3f} "
                f"fetch_wait_s={self.fetch_wait_s:.3f} optimizer_s={self.optimizer_s:.3f} "
                f"rss_gib={self.rss_bytes / 2**30:.2f} nvme_read_mb={self.nvme_read / 1e6:.1f} "
                f"nvme_written_mb={self.nvme_written / 1e6:.1f}")

    def postfix(self) -> str:
        return (f"loss {self.loss:.3f} | {self.tokens_per_s:.0f} tok/s | step {self.step_s:.2f}s (fetch wait "
                f"{self.fetch_wait_s:.2f}s, optimizer {self.optimizer_s:.2f}s) | RAM {self.rss_bytes / 2**30:.2f} GiB "
                f"| NVMe {self.nvme_read / 1e6:.0f}/{self.nvme_written / 1e6:.0f} MB r/w")


def run(args: argparse.Namespace) -> int:
    import offload

    _check(args)
    terminate_on_signals()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    scratch = scratch_owner = None
    engine = None
    launch = Launch()
    try:
        # Everything this run puts in the temp dir goes in one directory, removed at the end: the swap files
        # (without --nvme-dir) and torch's compile cache, which importing transformers creates (empty).
        clean_stale_runs(tempfile.gettempdir(), prefix=SCRATCH_PREFIX)  # from runs killed with SIGKILL
        scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
        scratch_owner = DirectoryOwner.claim(scratch, "scratch directory")
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(scratch, "torch-cache"))
        config = make_config(args, scratch)
        launch = start(config.device, args.batch)  # under torchrun: join the other ranks
        if not launch.main:  # one rank speaks for all (the others' errors still reach stderr)
            sys.stdout = open(os.devnull, "w")
            logging.getLogger().setLevel(logging.WARNING)
        tokens, source = load_text(args.data)
        batch_at(tokens, 0, 1, args.seq_len, args.seed)  # checks the data is long enough before anything big
        if args.model is None:
            args.model = str(Path(args.init_from, "config.json")) if args.init_from else "tiny"
        # Built on the meta device: the engine gives every group its initial weights (those of a normal
        # build with this seed) straight in its home, so the whole model is never in RAM.
        model = offload.init_empty(lambda: build_model(args.model, args.seq_len, args.seed))
        numel = sum(p.numel() for p in model.parameters())
        timeline = offload.Timeline() if args.timeline and launch.main else None  # (only rank 0 writes it)
        engine = offload.Engine(model, config, lr=args.lr, weight_decay=0.1, max_grad_norm=1.0,
                                param_groups=[{"params": [p for p in model.parameters() if p.ndim < 2],
                                               "weight_decay": 0.0}], timeline=timeline)
        stats = engine.stats()
        print(f"offload train: {args.model} model, {numel / 1e6:.1f}M parameters, {config.dtype} on {config.device}; "
              f"data: {source}")
        if launch.world > 1:
            print(f"  {launch.world} ranks: each trains on {args.batch // launch.world} of the {args.batch} sequences "
                  f"of every step and holds 1/{launch.world} of the offloaded state (figures below: rank 0's)")
        print(f"  parameters: {config.params}; optimizer state: {stats.optimizer_groups_on_host} groups in RAM, "
              f"{stats.optimizer_groups_on_nvme} on NVMe{f' ({config.nvme_dir})' if config.nvme_dir else ''}; "
              f"host buffers {stats.host_bytes_in_use / 2**20:.0f} MiB")
        if "nvme" in (config.params, config.optimizer):
            print(f"  io: {config.io.block_size / 2**20:g} MiB blocks, {config.io.threads} x {config.io.queue_depth} in "
                  f"flight, direct={config.io.direct}")
        first = 0
        if (args.resume or args.resume_if_exists) and _has_checkpoint(args.checkpoint_dir):
            first = int(engine.load(args.checkpoint_dir)["step"])
            print(f"  resumed from {args.checkpoint_dir} at step {first}")
        elif args.init_from:
            offload.load_pretrained(engine, args.init_from)
            print(f"  weights from {args.init_from}")
        # With --timeline, the disk under nvme_dir and the CPU are sampled next to the spans (counter tracks),
        # every 0.1 s: a whole run's trace stays small (the timeline keeps everything in memory until saved).
        with engine.timeline.sampling(config.nvme_dir if "nvme" in (config.params, config.optimizer) else None,
                                      interval=0.1):
            losses = _train(engine, args, tokens, first, launch)
        if args.checkpoint_dir and (not args.checkpoint_every or args.steps % args.checkpoint_every):
            engine.save(args.checkpoint_dir, extra={"step": args.steps})
        _summary(engine, args, losses)
        if timeline is not None and launch.main:
            timeline.save(args.timeline)
            print(f"timeline written to {args.timeline}")
        return 0
    except (KeyboardInterrupt, Terminated) as stop:  # Ctrl-C, SIGTERM, SIGHUP (Note [termination signals])
        # A save in progress has removed its partial version already (Note [atomic checkpoints]); closing the
        # engine below removes the swap files.
        interrupted = isinstance(stop, KeyboardInterrupt)
        print(f"\noffload train: {'interrupted' if interrupted else stop}; swap files removed" +
              (f", the last checkpoint in {args.checkpoint_dir} is intact" if args.checkpoint_dir else ""),
              file=sys.stderr)
        return 130 if interrupted else stop.code
    finally:
        try:
            if engine is not None:
                engine.close()  # (collective with several ranks: the weights come back into every rank's model)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            if scratch_owner is not None:
                scratch_owner.release()
            launch.stop()
            if not launch.main:
                sys.stdout.close()
                sys.stdout = sys.__stdout__


def _has_checkpoint(path: str) -> bool:
    return (Path(path) / "CURRENT").exists()


def _train(engine, args: argparse.Namespace, tokens: torch.Tensor, first: int, launch: Launch) -> list[float]:
    from tqdm import tqdm

    interactive = sys.stdout.isatty() and launch.main
    process = psutil.Process()
    bar = tqdm(total=args.steps, initial=first, disable=not interactive, unit="step", dynamic_ncols=True)
    losses = []
    before = engine.stats()
    try:
        for step in range(first, args.steps):
            start = time.perf_counter()
            engine.lr = learning_rate(step, args.steps, args.lr)
            ids = launch.share(batch_at(tokens, step, args.batch, args.seq_len, args.seed))
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            info = engine.step()
            losses.append(launch.mean(loss.item()))  # the loss of the global batch
            elapsed = time.perf_counter() - start
            now = engine.stats()
            # Engine totals, not StepInfo: an overlapped step's optimizer time and NVMe bytes are added to the
            # totals when it completes (during the next step), so in steady state each line shows one step's.
            report = StepReport(
                step=info.step, loss=losses[-1], tokens_per_s=ids.numel() * launch.world / elapsed, step_s=elapsed,
                fetch_wait_s=now.fetch_wait_s - before.fetch_wait_s,
                optimizer_s=(now.optimizer_adam_s + now.optimizer_io_wait_s
                             - before.optimizer_adam_s - before.optimizer_io_wait_s),
                rss_bytes=process.memory_info().rss, nvme_read=now.nvme_bytes_read - before.nvme_bytes_read,
                nvme_written=now.nvme_bytes_written - before.nvme_bytes_written)
            before = now
            if interactive:
                bar.set_postfix_str(report.postfix(), refresh=False)
                bar.update(1)
            elif (step + 1) % args.log_every == 0 or step == first or step + 1 == args.steps:
                print(report.line(), flush=True)
            if args.checkpoint_dir and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                engine.save(args.checkpoint_dir, extra={"step": step + 1})
    finally:
        bar.close()
    return losses


def _summary(engine, args: argparse.Namespace, losses: list[float]) -> None:
    stats = engine.stats()
    if losses:
        k = max(1, min(10, len(losses) // 4))
        head, tail = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"loss {head:.3f} -> {tail:.3f} (mean of the first and last {k} steps)")
    print(f"peak host buffers {stats.host_bytes_peak / 2**20:.0f} MiB, peak device parameters "
          f"{stats.device_param_bytes_peak / 2**20:.0f} MiB, NVMe read {stats.nvme_bytes_read / 1e9:.2f} GB, "
          f"written {stats.nvme_bytes_written / 1e9:.2f} GB")
    if args.checkpoint_dir:
        print(f"checkpoint: {args.checkpoint_dir} (export with: offload export {args.checkpoint_dir} --out DIR)")
    if not args.no_sample:
        prompt = torch.tensor([list(b"The ")])
        with torch.no_grad():
            out = engine.model.generate(prompt.to(engine.device), max_new_tokens=80, do_sample=False,
                                        pad_token_id=0)
        text = bytes(out[0].tolist()).decode("utf-8", errors="replace").replace("\n", " ")
        print(f"sample: {text!r}")
