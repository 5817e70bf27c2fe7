"""`offload train`: the main job. Fine-tunes a Hugging Face model directory (or trains a preset from scratch) on
the user's data with its parameters and optimizer state offloaded, shows what the engine does on every step
(loss, lr, tokens/s, where the time goes, host RAM, bytes moved), evaluates, and writes a Hugging Face model
directory. The parts: TrainSettings (the job's settings, flags and [train] table), ModelSource (what --model
names), TrainData (tokenized, packed data), TrainLoop (the steps), Saver (checkpoints and --output)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from offload.cli.launch import Launch, start
from offload.cli.model_source import ModelSource, resolve_model
from offload.cli.outputs import check_writable_dir, check_writable_file
from offload.cli.run_log import RunLog
from offload.cli.train_data import TrainData
from offload.cli.train_loop import TrainLoop
from offload.cli.train_output import RUN_FILE, Saver
from offload.cli.train_settings import LR_PRETRAINED, LR_RANDOM_INIT, TrainSettings, add_flags
from offload.cli.train_settings import resolve as resolve_settings
from offload.cli.train_setup import make_config
from offload.config import Config, parse_bytes
from offload.errors import ConfigError
from offload.exit_signals import Terminated, terminate_on_signals
from offload.storage.ownership import DirectoryOwner
from offload.storage.swap_store import clean_stale_runs

log = logging.getLogger("offload")

SCRATCH_PREFIX = "offload-train-"

EXAMPLES = """examples:
  offload train                                  # tiny Llama, shipped text, params + optimizer on NVMe (temp dir)
  offload train --model path/to/llama-dir --data chat.jsonl --output tuned/      # fine-tune, HF directory out
  offload train --model org/name --data train.jsonl --eval-data val.jsonl --eval-every 50 --grad-accum 4 \\
                --metrics metrics.jsonl --output tuned/ --output-dtype bf16    # a hub id already in the cache
  offload train --model small --steps 500 --nvme-dir /mnt/nvme/swap
  offload train --config offload.toml            # [io] from `offload tune`, [train] with these settings
  offload train --checkpoint-dir runs/ckpt --checkpoint-every 100   # then: --resume to continue exactly
  torchrun --nproc-per-node 2 -m offload train --batch 8   # 2 ranks, each 4 of every 8 sequences, each
                                                           # holding half of the offloaded state
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    groups = add_flags(parser)
    groups["what to train"].add_argument("--init-from", metavar="DIR", help=argparse.SUPPRESS)  # old --model DIR
    where = parser.add_argument_group("where the state lives (flags override --config)")
    where.add_argument("--config", metavar="TOML", help="an offload config file: placement and [io] (e.g. written "
                                                        "by offload tune) and a [train] table of the settings here")
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
    runs = groups["checkpoints and output"]
    resume = runs.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue exactly (weights, optimizer, data position) "
                                                              "from the checkpoint in --checkpoint-dir")
    resume.add_argument("--resume-if-exists", action="store_true",
                        help="continue from the checkpoint in --checkpoint-dir if there is one, else start at step 0")
    runs.add_argument("--timeline", metavar="FILE", help="write a Chrome trace (chrome://tracing, Perfetto)")
    runs.add_argument("--no-sample", action="store_true", help="skip the text sample at the end")


def _settings(args: argparse.Namespace) -> TrainSettings:
    if args.init_from:  # the old spelling of --model DIR
        if args.model and Path(args.model) != Path(args.init_from):
            raise ConfigError("--init-from: give the model directory once, with --model DIR")
        args.model = args.init_from
    settings = resolve_settings(args, args.config)
    for flag in ("resume", "resume_if_exists"):
        if getattr(args, flag) and not settings.checkpoint_dir:
            raise ConfigError(f"--{flag.replace('_', '-')}: needs --checkpoint-dir (where to resume from)")
    if args.resume and not _has_checkpoint(settings.checkpoint_dir):
        raise ConfigError(f"--resume: no checkpoint in {settings.checkpoint_dir} (no CURRENT file); drop --resume to "
                          "start at step 0, or use --resume-if-exists")
    parse_bytes("--max-shard-size", settings.max_shard_size)
    # Outputs are checked now, not when the run has trained for hours (nothing is left behind by the check).
    if settings.checkpoint_dir:
        check_writable_dir("--checkpoint-dir", settings.checkpoint_dir)
    if args.timeline:
        check_writable_file("--timeline", args.timeline)
    if settings.output:
        _check_output(settings, resuming=args.resume or (args.resume_if_exists and
                                                         _has_checkpoint(settings.checkpoint_dir)))
    RunLog.check(settings.metrics, settings.tensorboard)
    return settings


def _check_output(settings: TrainSettings, resuming: bool) -> None:
    """``--output`` must be new, empty, replaceable (--overwrite) or, when resuming, this job's own output."""
    out = Path(settings.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output: {out} exists and is not a directory")
    own = resuming and (out / RUN_FILE).is_file()
    if out.is_dir() and any(out.iterdir()) and not settings.overwrite and not own:
        raise ConfigError(f"--output: {out} exists and is not empty; pass --overwrite to replace it")
    check_writable_dir("--output", out.parent if str(out.parent) else ".")


def run(args: argparse.Namespace) -> int:
    import offload

    settings = _settings(args)
    terminate_on_signals()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    scratch = scratch_owner = None
    engine = None
    log = None
    launch = Launch()
    try:
        # Everything this run puts in the temp dir goes in one directory, removed at the end: the swap files
        # (without --nvme-dir), data tokenized without a cache, and torch's compile cache, which importing
        # transformers creates (empty).
        clean_stale_runs(tempfile.gettempdir(), prefix=SCRATCH_PREFIX)  # from runs killed with SIGKILL
        scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
        scratch_owner = DirectoryOwner.claim(scratch, "scratch directory")
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(scratch, "torch-cache"))
        config = make_config(args, scratch)
        launch = start(config.device, settings.batch)  # under torchrun: join the other ranks
        if not launch.main:  # one rank speaks for all (the others' errors still reach stderr)
            sys.stdout = open(os.devnull, "w")
            logging.getLogger().setLevel(logging.WARNING)
        source = resolve_model(settings.model)
        job = TrainData.load(settings, source, config, scratch, user_nvme_dir=_user_nvme_dir(args))
        # Built on the meta device: the engine gives every group its initial weights (those of a normal
        # build with this seed) straight in its home, so the whole model is never in RAM.
        model = offload.init_empty(source.builder(settings.seq_len, settings.seed))
        numel = sum(p.numel() for p in model.parameters())
        timeline = offload.Timeline() if args.timeline and launch.main else None  # (only rank 0 writes it)
        peak_lr = settings.lr or (LR_PRETRAINED if source.pretrained else LR_RANDOM_INIT)
        engine = offload.Engine(model, config, lr=peak_lr, weight_decay=settings.weight_decay,
                                max_grad_norm=settings.max_grad_norm or None,
                                param_groups=[{"params": [p for p in model.parameters() if p.ndim < 2],
                                               "weight_decay": 0.0}], timeline=timeline)
        _header(engine, settings, source, job, config, numel, launch)
        first = 0
        if (args.resume or args.resume_if_exists) and _has_checkpoint(settings.checkpoint_dir):
            extra = engine.load(settings.checkpoint_dir)
            first = int(extra["step"])
            job.check_resume(extra.get("data"), settings.checkpoint_dir)
            print(f"  resumed from {settings.checkpoint_dir} at step {first}")
        elif source.pretrained:
            offload.load_pretrained(engine, source.directory)
            print(f"  weights from {source.directory}")
        log = RunLog(settings.metrics, settings.tensorboard, resumed_at=first if first else None, write=launch.main)
        saver = Saver(engine, settings, source, job, launch, first)
        loop = TrainLoop(engine, settings, job.train, job.evaluation, launch, log, peak_lr, saver.after_step)
        # With --timeline, the disk under nvme_dir and the CPU are sampled next to the spans (counter tracks),
        # every 0.1 s: a whole run's trace stays small (the timeline keeps everything in memory until saved).
        with engine.timeline.sampling(config.nvme_dir if "nvme" in (config.params, config.optimizer) else None,
                                      interval=0.1):
            loop.run(first)
        saver.finish()
        _summary(engine, settings, source, loop, args.no_sample)
        if timeline is not None and launch.main:
            timeline.save(args.timeline)
            print(f"timeline written to {args.timeline}")
        return 0
    except (KeyboardInterrupt, Terminated) as stop:  # Ctrl-C, SIGTERM, SIGHUP (Note [termination signals])
        # A save in progress has removed its partial version already (Note [atomic checkpoints]); closing the
        # engine below removes the swap files.
        interrupted = isinstance(stop, KeyboardInterrupt)
        kept = [f"the last checkpoint in {settings.checkpoint_dir}"] if settings.checkpoint_dir else []
        kept += [f"the last output in {settings.output}"] if settings.output and Path(settings.output).is_dir() else []
        print(f"\noffload train: {'interrupted' if interrupted else stop}; swap files removed" +
              (f", {' and '.join(kept)} intact" if kept else ""), file=sys.stderr)
        return 130 if interrupted else stop.code
    finally:
        try:
            if log is not None:
                log.close()
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


def _user_nvme_dir(args: argparse.Namespace) -> str | None:
    """The swap directory the user named (flag or config file), where tokenized data may be cached; None when
    the swap files go to this run's temporary directory."""
    if args.nvme_dir:
        return args.nvme_dir
    if args.config:
        return Config.from_file(args.config).nvme_dir
    return None


def _header(engine, settings: TrainSettings, source: ModelSource, job: TrainData, config: Config, numel: int,
            launch: Launch) -> None:
    stats = engine.stats()
    print(f"offload train: {source.describe()}, {numel / 1e6:.1f}M parameters, {config.dtype} on {config.device}")
    print(f"  data: {job.train_data.describe()}; {job.train.num_blocks} blocks of {settings.seq_len} tokens, "
          f"{settings.tokens_per_step} tokens per step ({settings.batch} x {settings.grad_accum} sequences)")
    if job.evaluation is not None:
        print(f"  eval: {job.eval_data.describe()}; {job.evaluation.num_blocks} blocks")
    if launch.world > 1:
        print(f"  {launch.world} ranks: each trains on {settings.batch // launch.world} of the {settings.batch} "
              f"sequences of every micro-batch and holds 1/{launch.world} of the offloaded state (figures below: "
              f"rank 0's)")
    print(f"  parameters: {config.params}; optimizer state: {stats.optimizer_groups_on_host} groups in RAM, "
          f"{stats.optimizer_groups_on_nvme} on NVMe{f' ({config.nvme_dir})' if config.nvme_dir else ''}; "
          f"host buffers {stats.host_bytes_in_use / 2**20:.0f} MiB")
    if "nvme" in (config.params, config.optimizer):
        print(f"  io: {config.io.block_size / 2**20:g} MiB blocks, {config.io.threads} x {config.io.queue_depth} in "
              f"flight, direct={config.io.direct}")


def _has_checkpoint(path: str) -> bool:
    return (Path(path) / "CURRENT").exists()


def _summary(engine, settings: TrainSettings, source: ModelSource, loop: TrainLoop, no_sample: bool) -> None:
    stats = engine.stats()
    losses = loop.losses
    if losses:
        k = max(1, min(10, len(losses) // 4))
        head, tail = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"loss {head:.3f} -> {tail:.3f} (mean of the first and last {k} steps)")
    if len(loop.evals) >= 2:
        print(f"eval loss {loop.evals[0].loss:.3f} -> {loop.evals[-1].loss:.3f} (perplexity "
              f"{loop.evals[0].perplexity:.2f} -> {loop.evals[-1].perplexity:.2f}, steps {loop.evals[0].step} -> "
              f"{loop.evals[-1].step})")
    print(f"peak host buffers {stats.host_bytes_peak / 2**20:.0f} MiB, peak device parameters "
          f"{stats.device_param_bytes_peak / 2**20:.0f} MiB, NVMe read {stats.nvme_bytes_read / 1e9:.2f} GB, "
          f"written {stats.nvme_bytes_written / 1e9:.2f} GB")
    if settings.checkpoint_dir:
        print(f"checkpoint: {settings.checkpoint_dir} (export with: offload export {settings.checkpoint_dir} --out DIR)")
    if settings.output:
        print(f"model: {settings.output} (load it with AutoModelForCausalLM.from_pretrained"
              f"{' and AutoTokenizer.from_pretrained' if source.tokenizer is not None else ''})")
    if not no_sample:
        print(f"sample: {sample(engine, source.tokenizer)!r}")


def sample(engine, tokenizer, prompt: str = "The ", tokens: int = 40) -> str:
    """A greedy continuation of ``prompt`` by the trained model (through the engine's hooks)."""
    if tokenizer is None:
        ids = torch.tensor([list(prompt.encode())])
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = engine.model.generate(ids.to(engine.device), attention_mask=torch.ones_like(ids).to(engine.device),
                                    max_new_tokens=tokens, do_sample=False,
                                    pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0)
    if tokenizer is None:
        text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    else:
        text = tokenizer.decode(out[0], skip_special_tokens=True)
    return text.replace("\n", " ")
