"""`offload train`: the main job. Fine-tunes a Hugging Face model directory (or trains a preset from scratch) on
the user's data with its parameters and optimizer state offloaded, shows what the engine does on every step
(loss, lr, tokens/s, where the time goes, host RAM, bytes moved), evaluates, and writes a Hugging Face model
directory. The parts: TrainSettings (the job's settings, flags and [train] table), ModelSource (what --model
names), TrainData (tokenized, packed data), TrainLoop (the steps), Saver (checkpoints and --output)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from offload.cli.launch import Launch, start
from offload.cli.lora import LoraPlan, require_peft
from offload.cli.model_source import ModelSource, resolve_model
from offload.cli.outputs import check_writable_dir, check_writable_file
from offload.cli.run_log import RunLog
from offload.cli.train_data import TrainData
from offload.cli.train_loop import TrainLoop, evaluating
from offload.cli.train_output import Saver, check_output
from offload.cli.train_settings import LR_PRETRAINED, LR_RANDOM_INIT, TrainSettings, add_flags
from offload.cli.train_settings import resolve as resolve_settings
from offload.cli.train_setup import enable_activation_checkpointing, make_config
from offload.checkpoint.directory import CheckpointDir
from offload.config import Config
from offload.errors import CheckpointError, ConfigError
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
  offload train --model path/to/llama-dir --data train.jsonl --lora-r 16 --lora-alpha 32 --params nvme \\
                --output adapter/                  # LoRA: the base frozen on NVMe, a peft adapter directory out
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
    runs.add_argument("--sample", action=argparse.BooleanOptionalAction, default=None,
                      help="print a greedy continuation of 'The ' at the end (default: from scratch only; with an "
                           "offloaded pretrained model each generated token reads every weight)")


def _settings(args: argparse.Namespace) -> TrainSettings:
    if args.init_from:  # the old spelling of --model DIR
        if args.model and Path(args.model) != Path(args.init_from):
            raise ConfigError("--init-from: give the model directory once, with --model DIR")
        args.model = args.init_from
    settings = resolve_settings(args, args.config)
    if settings.lora_r is not None:
        require_peft()
    for flag in ("resume", "resume_if_exists"):
        if getattr(args, flag) and not settings.checkpoint_dir:
            raise ConfigError(f"--{flag.replace('_', '-')}: needs --checkpoint-dir (where to resume from)")
    if args.resume and not _has_checkpoint(settings.checkpoint_dir):
        raise ConfigError(f"--resume: no checkpoint in {settings.checkpoint_dir} (no CURRENT file); drop --resume to "
                          "start at step 0, or use --resume-if-exists")
    # Outputs are checked now, not when the run has trained for hours (nothing is left behind by the check).
    if settings.checkpoint_dir:
        check_writable_dir("--checkpoint-dir", settings.checkpoint_dir)
    if args.timeline:
        check_writable_file("--timeline", args.timeline)
    if settings.output:
        check_output(settings, args, resuming=_resuming(args, settings))
    RunLog.check(settings.metrics, settings.tensorboard)
    return settings


def _resuming(args: argparse.Namespace, settings: TrainSettings) -> bool:
    return bool(args.resume or (args.resume_if_exists and _has_checkpoint(settings.checkpoint_dir)))


def run(args: argparse.Namespace) -> int:
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
        source = resolve_model(settings.model, settings.seq_len)
        source.check_seq_len(settings.seq_len)
        lora = LoraPlan.of(settings)
        if lora is not None:
            lora.check(source)  # (before the data is tokenized: a wrong target name fails at once)
        # (rank 0 tokenizes, the others then read its cache: Note [one rank tokenizes])
        job = launch.first_on_main(lambda: TrainData.load(settings, source, config, scratch, _user_nvme_dir(args)))
        resumed = _checkpoint_extra(settings, job) if _resuming(args, settings) else None
        engine, timeline, peak_lr = _build_engine(args, settings, source, config, launch, lora)
        _header(engine, settings, source, job, config, launch, lora)
        first = _resume(engine, settings, resumed, peak_lr)
        log = RunLog(settings.metrics, settings.tensorboard, resumed_at=first if resumed else None, write=launch.main)
        saver = Saver(engine, settings, source, job, launch, first, schedule=_schedule(settings, peak_lr))
        loop = TrainLoop(engine, settings, job.train, job.evaluation, launch, log, peak_lr, saver.after_step)
        # With --timeline, the disk under nvme_dir and the CPU are sampled next to the spans (counter tracks),
        # every 0.1 s: a whole run's trace stays small (the timeline keeps everything in memory until saved).
        with engine.timeline.sampling(config.nvme_dir if "nvme" in (config.params, config.optimizer) else None,
                                      interval=0.1):
            loop.run(first)
        saver.finish()
        _summary(engine, settings, source, loop, sample_at_end=args.sample if args.sample is not None
                 else not source.pretrained)
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
                # The model is not used after the run (its weights are in --output and the checkpoints): bringing
                # them back into it would only cost host RAM (the whole model) and, with several ranks, gathers.
                engine.close(keep_weights=False)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            if scratch_owner is not None:
                scratch_owner.release()
            launch.stop()
            if not launch.main:
                sys.stdout.close()
                sys.stdout = sys.__stdout__


def _build_engine(args: argparse.Namespace, settings: TrainSettings, source: ModelSource, config: Config,
                  launch: Launch, lora: LoraPlan | None):
    """The model, built on the meta device, and its engine, which gives every group its initial weights
    straight in its home, so the whole model is never in RAM: a pretrained model's from its checkpoint (also
    when resuming: a LoRA checkpoint holds no base), what the checkpoint lacks and a model from a config from
    the replay of a normal build with this seed. With ``lora``: the peft LoRA model of the base (see
    LoraPlan.builder), its base frozen."""
    import offload

    build = source.builder(settings.seed)
    if lora is not None:
        build = lora.builder(build)
    model = offload.init_empty(build)
    if settings.activation_checkpointing:
        enable_activation_checkpointing(model, source.spec)
    timeline = offload.Timeline() if args.timeline and launch.main else None  # (only rank 0 writes it)
    peak_lr = settings.lr or (LR_PRETRAINED if source.pretrained else LR_RANDOM_INIT)
    engine = offload.Engine(model, config, lr=peak_lr, weight_decay=settings.weight_decay,
                            max_grad_norm=settings.max_grad_norm or None,
                            param_groups=[{"params": [p for p in model.parameters() if p.ndim < 2],
                                           "weight_decay": 0.0}], timeline=timeline,
                            pretrained=source.directory if source.pretrained else None)
    return engine, timeline, peak_lr


def _checkpoint_extra(settings: TrainSettings, job: TrainData) -> dict:
    """What the checkpoint to resume from says about its run, checked against this run before anything large
    is built or loaded: its step, data position and learning-rate schedule."""
    meta = Path(CheckpointDir(settings.checkpoint_dir).current()[0]) / "meta.json"
    try:
        extra = json.loads(meta.read_text()).get("extra") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"--resume: {meta}: not readable ({e})") from None
    step = extra.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"--resume: the checkpoint in {settings.checkpoint_dir} has no step of an offload train "
                          f"run (written by engine.save without extra={{'step': N}}?)")
    if step > settings.steps:
        raise ConfigError(f"--resume: the checkpoint in {settings.checkpoint_dir} is at step {step}, past --steps "
                          f"{settings.steps}; raise --steps to train further")
    job.check_resume(extra.get("data"), settings.checkpoint_dir)
    return extra


def _schedule(settings: TrainSettings, peak_lr: float) -> dict:
    return {"steps": settings.steps, "lr": peak_lr, "lr_schedule": settings.lr_schedule,
            "warmup_steps": settings.warmup()}


def _resume(engine, settings: TrainSettings, resumed: dict | None, peak_lr: float) -> int:
    """The run's starting step: the checkpoint's, its state loaded, or 0 (the engine holds the weights to
    start from)."""
    if resumed is not None:
        first = int(engine.load(settings.checkpoint_dir)["step"])
        print(f"  resumed from {settings.checkpoint_dir} at step {first}")
        now = _schedule(settings, peak_lr)
        was = resumed.get("schedule")
        if was is not None and was != now:
            changed = ", ".join(f"{k} {was.get(k)} -> {now[k]}" for k in now if was.get(k) != now[k])
            log.warning("  the learning-rate schedule differs from the checkpoint's run (%s): from here on the "
                        "run is not the one that was interrupted", changed)
        return first
    return 0


def _user_nvme_dir(args: argparse.Namespace) -> str | None:
    """The swap directory the user named (flag or config file), where tokenized data may be cached; None when
    the swap files go to this run's temporary directory."""
    if args.nvme_dir:
        return args.nvme_dir
    if args.config:
        return Config.from_file(args.config).nvme_dir
    return None


def _header(engine, settings: TrainSettings, source: ModelSource, job: TrainData, config: Config,
            launch: Launch, lora: LoraPlan | None) -> None:
    stats = engine.stats()
    numel = sum(p.numel() for p in engine.model.parameters())
    print(f"offload train: {source.describe()}, {numel / 1e6:.1f}M parameters, {config.dtype} on {config.device}")
    if lora is not None:
        print(f"  {lora.describe(engine.model)}")
    print(f"  data: {job.train_data.describe()}; {job.train.num_blocks} blocks of {settings.seq_len} tokens, "
          f"{settings.tokens_per_step} tokens per step ({settings.batch} x {settings.grad_accum} sequences)"
          + ("; activation checkpointing: each block recomputed in backward" if settings.activation_checkpointing
             else ""))
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
    if source.pretrained:
        print(f"  weights from {source.directory}")


def _has_checkpoint(path: str) -> bool:
    return (Path(path) / "CURRENT").exists()


def _summary(engine, settings: TrainSettings, source: ModelSource, loop: TrainLoop, sample_at_end: bool) -> None:
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
    if settings.output and settings.lora_r is not None and not settings.merge_lora:
        print(f"adapter: {settings.output} (load it with peft.PeftModel.from_pretrained(base, "
              f"{str(settings.output)!r}) on the base model {source.spec})")
    elif settings.output:
        print(f"model: {settings.output} (load it with AutoModelForCausalLM.from_pretrained"
              f"{' and AutoTokenizer.from_pretrained' if source.tokenizer is not None else ''})")
    if sample_at_end:
        print(f"sample: {sample(engine, source.tokenizer)!r}")


def sample(engine, tokenizer, prompt: str = "The ", tokens: int = 40) -> str:
    """A greedy continuation of ``prompt`` by the trained model (through the engine's hooks)."""
    if tokenizer is None:
        ids = torch.tensor([list(prompt.encode())])
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), evaluating(engine.model):
        out = engine.model.generate(ids.to(engine.device), attention_mask=torch.ones_like(ids).to(engine.device),
                                    max_new_tokens=tokens, do_sample=False,
                                    pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0)
    if tokenizer is None:
        text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    else:
        text = tokenizer.decode(out[0], skip_special_tokens=True)
    return text.replace("\n", " ")
