"""Saver: what an `offload train` job writes as it goes: checkpoints (``--checkpoint-dir``, to resume exactly)
and the Hugging Face model directory (``--output``, to use the model), each every N steps and at the end. A LoRA
run's ``--output`` is a peft adapter directory (offload/engine/peft_adapter.py), or with ``--merge-lora`` the merged model
(lora_merge.py).

The model directory also holds ``offload_run.json``: which model and data it came from, at which step, with
which settings. It is how a resumed run recognises its own output (which it may replace without --overwrite).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from offload.cli.launch import Launch
from offload.cli.lora import base_model_name
from offload.engine.peft_adapter import save_adapter
from offload.cli.lora_merge import save_merged
from offload.cli.model_source import ModelSource
from offload.cli.outputs import check_writable_dir
from offload.cli.train_data import TrainData
from offload.cli.train_settings import TrainSettings
from offload.errors import ConfigError

RUN_FILE = "offload_run.json"


class Saver:
    def __init__(self, engine, settings: TrainSettings, source: ModelSource, job: TrainData, launch: Launch,
                 first: int, schedule: dict) -> None:
        self.engine = engine
        self.schedule = schedule  # the learning-rate schedule, saved with checkpoints (a resume compares it)
        self.settings = settings
        self.source = source
        self.job = job
        self.launch = launch
        self.checkpointed = self.written = first  # the step of the last checkpoint / output

    def after_step(self, step: int) -> None:
        s = self.settings
        if s.checkpoint_dir and s.checkpoint_every and step % s.checkpoint_every == 0:
            self.checkpoint(step)
        if s.output and s.save_every and step % s.save_every == 0:
            self.output(step)

    def finish(self) -> None:
        """The end of the run: a checkpoint and the model directory of the last step, unless already written."""
        step = self.settings.steps
        if self.settings.checkpoint_dir and self.checkpointed != step:
            self.checkpoint(step)
        if self.settings.output and self.written != step:
            self.output(step)

    def checkpoint(self, step: int) -> None:
        self.engine.save(self.settings.checkpoint_dir, extra={"step": step, "data": self.job.position(),
                                                              "schedule": self.schedule})
        self.checkpointed = step

    def output(self, step: int) -> None:
        """Writes --output (atomically replacing the previous one; collective with several ranks)."""
        import offload

        start = time.perf_counter()
        s, source, launch = self.settings, self.source, self.launch
        extra = {RUN_FILE: self._run_record(step)}
        dtype = source.output_dtype(s.output_dtype)
        what = "model"
        if s.lora_r is None:
            offload.save_pretrained(self.engine, s.output, dtype=dtype, max_shard_size=s.max_shard_size,
                                    tokenizer=source.tokenizer, generation_config=source.generation_config,
                                    overwrite=True, extra_files=extra)
        elif s.merge_lora:
            what = "merged model"
            save_merged(self.engine, s.output, dtype=dtype, max_shard_size=s.max_shard_size, tokenizer=source.tokenizer,
                        generation_config=source.generation_config, extra_files=extra, overwrite=True,
                        write=launch.main, collective=launch.world > 1)
        else:  # the adapter keeps its fp32 masters unless a dtype is named (it is small; peft trains it in fp32)
            what = "LoRA adapter"
            dtype = torch.float32 if s.output_dtype == "auto" else dtype
            save_adapter(self.engine, s.output, dtype=dtype, base_model=base_model_name(source),
                         tokenizer=source.tokenizer, extra_files=extra, overwrite=True, write=launch.main)
        self.written = step
        if launch.main:
            print(f"  {what} written to {s.output} at step {step} ({str(dtype).removeprefix('torch.')}, "
                  f"{time.perf_counter() - start:.1f} s)", flush=True)

    def _run_record(self, step: int) -> bytes:
        record = {"step": step, "model": self.source.spec, "data": self.settings.data, "content": self.job.content(),
                  "settings": dataclasses.asdict(self.settings), "data_position": self.job.position()}
        return (json.dumps(record, indent=2) + "\n").encode()


def check_output(settings: TrainSettings, args: argparse.Namespace, resuming: bool) -> None:
    """``--output`` must be new, empty, replaceable (``--overwrite``) or, when resuming, this job's own output
    (its ``offload_run.json`` names the same model and data). It must not contain, or lie inside, anything else
    the run reads or writes: the whole directory is replaced when the model is written (Note [atomic model
    directory]), which would delete a checkpoint, metrics or the data kept in it."""
    out = Path(settings.output).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output: {settings.output} exists and is not a directory")
    others = {"--model": settings.model, "--data": settings.data, "--eval-data": settings.eval_data,
              "--token-cache": settings.token_cache, "--checkpoint-dir": settings.checkpoint_dir,
              "--metrics": settings.metrics, "--tensorboard": settings.tensorboard, "--nvme-dir": args.nvme_dir,
              "--timeline": args.timeline}
    for flag, value in others.items():
        if value is None or (flag == "--model" and not Path(value).exists()):
            continue
        other = Path(value).resolve()
        if other == out or other.is_relative_to(out) or out.is_relative_to(other):
            raise ConfigError(f"--output: {settings.output} overlaps {flag} {value}; writing the model replaces the "
                              f"whole directory, so give --output a directory of its own")
    if out.is_dir() and any(out.iterdir()) and not settings.overwrite and not (resuming and _own(out, settings)):
        raise ConfigError(f"--output: {settings.output} exists and is not empty; pass --overwrite to replace it")
    check_writable_dir("--output", out.parent)


def _own(out: Path, settings: TrainSettings) -> bool:
    """Whether ``out`` was written by this job (same model and data), so a resumed run may replace it."""
    try:
        record = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("model") == settings.model and record.get("data") == settings.data
