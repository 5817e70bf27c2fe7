"""TrainSettings: what one `offload train` job does (model, data, schedule, outputs), defined once.

Each field is a setting with its default and help; `add_flags` derives the command-line flags from the fields
(``grad_accum`` -> ``--grad-accum``), and the ``[train]`` table of the TOML file given with ``--config`` takes
the same names. ``resolve`` applies the order flag > file > default and validates the result, so a setting is
checked the same way wherever it came from. Where the engine lives (``params``, ``optimizer``, ``io``...)
is ``offload.Config``'s business, not this one's: the file's top level and ``[io]`` table.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from typing import Any

from offload.checkpoint.hf_directory import parse_max_shard_size
from offload.cli.lora import parse_targets
from offload.errors import ConfigError

LR_SCHEDULES = ("cosine", "linear", "constant")
OUTPUT_DTYPES = ("auto", "fp32", "bf16", "fp16")
LR_RANDOM_INIT = 3e-3  # --lr's default for a model trained from scratch (a preset or a config.json)
LR_PRETRAINED = 2e-5  # ... and for pretrained weights (a model directory), as fine-tuning recipes use


def _setting(default: Any, help: str, metavar: str | None = None, choices: tuple[str, ...] | None = None,
             group: str = "what to train") -> Any:
    return field(default=default, metadata={"help": help, "metavar": metavar, "choices": choices, "group": group})


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    model: str | None = _setting(None, "a Hugging Face model directory (config.json, safetensors, tokenizer), a "
                                       "hub id already in the local Hugging Face cache, a preset (tiny, small, "
                                       "medium, large: random init, byte tokens) or a config.json (random init); "
                                       "default tiny", "DIR|ID|PRESET|CONFIG")
    data: str | None = _setting(None, "training data: .txt, .jsonl (text, prompt+completion or chat messages), "
                                      ".parquet or a datasets.save_to_disk directory; default: text shipped with "
                                      "offload", "FILE|DIR")
    eval_data: str | None = _setting(None, "held-out data (same formats) for eval loss and perplexity", "FILE|DIR")
    steps: int = _setting(200, "optimizer steps (default 200)", "N")
    batch: int = _setting(8, "sequences per micro-batch (default 8); a step sees batch x grad-accum", "N")
    seq_len: int = _setting(128, "tokens per sequence; the data is packed into blocks of this length (default 128)",
                            "N")
    grad_accum: int = _setting(1, "micro-batches whose gradients add up into one step (default 1)", "N")
    lr: float | None = _setting(None, f"peak learning rate (default {LR_PRETRAINED:g} for pretrained weights, "
                                      f"{LR_RANDOM_INIT:g} from scratch)", "LR")
    lr_schedule: str = _setting("cosine", "decay after the warm-up, towards 0 after the last step (default cosine)",
                                choices=LR_SCHEDULES)
    warmup_steps: int | None = _setting(None, "steps of linear warm-up (default: a tenth of --steps, at most 100)",
                                        "N")
    weight_decay: float = _setting(0.0, "AdamW weight decay, not applied to biases and norms (default 0)", "WD")
    max_grad_norm: float = _setting(1.0, "clip the global gradient norm to this; 0 turns clipping off (default 1)",
                                    "NORM")
    seed: int = _setting(0, "seed of the random init and of the data order (default 0)", "N")
    activation_checkpointing: bool = _setting(False, "keep only each block's input in forward and recompute the "
                                                     "block in backward (transformers' activation checkpointing): "
                                                     "activation memory of one block instead of every block, for "
                                                     "about a third more compute")
    eval_every: int = _setting(0, "evaluate every N steps (default: before the first step and after the last)", "N")
    token_cache: str | None = _setting(None, "where tokenized data is kept for the next run (default: beside the "
                                             "data, or under --nvme-dir when one is given)", "DIR")
    output: str | None = _setting(None, "write a Hugging Face model directory here at the end", "DIR",
                                  group="checkpoints and output")
    save_every: int = _setting(0, "also write --output every N steps (default: only at the end)", "N",
                               group="checkpoints and output")
    output_dtype: str = _setting("auto", "dtype of the written weights (default auto: the input model's)",
                                 choices=OUTPUT_DTYPES, group="checkpoints and output")
    max_shard_size: str = _setting("5GB", "largest safetensors file of --output (default 5GB)", "SIZE",
                                   group="checkpoints and output")
    overwrite: bool = _setting(False, "replace a non-empty --output", group="checkpoints and output")
    checkpoint_dir: str | None = _setting(None, "save checkpoints here (atomic; the last one is kept)", "DIR",
                                          group="checkpoints and output")
    checkpoint_every: int = _setting(0, "save a checkpoint every N steps (default: only at the end)", "N",
                                     group="checkpoints and output")
    metrics: str | None = _setting(None, "append one JSON object per step (and per evaluation) to this file",
                                   "FILE.jsonl", group="checkpoints and output")
    tensorboard: str | None = _setting(None, "write TensorBoard scalars to this directory (needs tensorboard)",
                                       "DIR", group="checkpoints and output")
    log_every: int = _setting(10, "a plain log line every N steps when output is not a terminal (default 10)", "N",
                              group="checkpoints and output")
    lora_r: int | None = _setting(None, "train a LoRA adapter of rank R instead of every weight: the base model is "
                                        "frozen and offloaded like trainable weights (needs peft: pip install "
                                        "'offload[lora]')", "R", group="LoRA")
    lora_alpha: float | None = _setting(None, "LoRA scaling: the adapter's update is scaled by alpha / r (default: "
                                              "r, a scale of 1)", "A", group="LoRA")
    lora_targets: str | None = _setting(None, "the linear layers to adapt: names separated by commas (q_proj,v_proj; "
                                              "a name matches every layer of that name, or ending in it) or "
                                              "all-linear, every linear layer but the output head (default "
                                              "all-linear)", "NAMES", group="LoRA")
    lora_dropout: float | None = _setting(None, "dropout on the adapter's input, in training (default 0)", "P",
                                          group="LoRA")
    merge_lora: bool = _setting(False, "write --output as a full Hugging Face model with the adapter merged into "
                                       "the base weights, instead of a peft adapter directory", group="LoRA")

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq_len", "grad_accum", "log_every"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("eval_every", "save_every", "checkpoint_every", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.warmup_steps is not None:
            _check_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.lr is not None:
            _check_number("lr", self.lr, positive=True)
        _check_number("weight_decay", self.weight_decay, positive=False)
        _check_number("max_grad_norm", self.max_grad_norm, positive=False)
        for name in ("lr_schedule", "output_dtype"):
            allowed = _metadata(name)["choices"]
            if getattr(self, name) not in allowed:
                raise SettingError(name, f"{_label(name)}: expected one of {', '.join(allowed)}; got "
                                  f"{getattr(self, name)!r}")
        for name in ("model", "data", "eval_data", "token_cache", "output", "checkpoint_dir", "metrics",
                     "tensorboard", "max_shard_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise SettingError(name, f"{_label(name)}: expected a non-empty string; got {value!r}")
        for name in ("overwrite", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(name, f"{_label(name)}: expected true or false; got {getattr(self, name)!r}")
        if self.save_every and not self.output:
            raise SettingError("save_every", f"{_label('save_every')}: needs --output (where to write the model)")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise SettingError("checkpoint_every", f"{_label('checkpoint_every')}: needs --checkpoint-dir (where "
                                                   f"to save them)")
        try:
            parse_max_shard_size(self.max_shard_size)
        except ConfigError as e:
            raise SettingError("max_shard_size", f"{_label('max_shard_size')}: {str(e).split(': ', 1)[-1]}") \
                from None
        if self.eval_every and not self.eval_data:
            raise SettingError("eval_every", f"{_label('eval_every')}: needs --eval-data (what to evaluate on)")
        self._check_lora()

    def _check_lora(self) -> None:
        if self.lora_r is not None:
            _check_int("lora_r", self.lora_r, minimum=1)
        else:  # every other LoRA setting refines a LoRA run
            for name in ("lora_alpha", "lora_targets", "lora_dropout", "merge_lora"):
                if getattr(self, name) is not None and getattr(self, name) is not False:
                    raise SettingError(name, f"{_label(name)}: needs --lora-r (a LoRA run: the rank of its adapter)")
            return
        if self.lora_alpha is not None:
            _check_number("lora_alpha", self.lora_alpha, positive=True)
        if self.lora_dropout is not None:
            _check_number("lora_dropout", self.lora_dropout, positive=False)
            if self.lora_dropout >= 1:
                raise SettingError("lora_dropout", f"{_label('lora_dropout')}: expected a probability in [0, 1); "
                                                   f"got {self.lora_dropout!r}")
        if self.lora_targets is not None:
            try:
                parse_targets(self.lora_targets)
            except ConfigError as e:
                raise SettingError("lora_targets", str(e)) from None
        if not isinstance(self.merge_lora, bool):
            raise SettingError("merge_lora", f"{_label('merge_lora')}: expected true or false; got {self.merge_lora!r}")
        if self.merge_lora and not self.output:
            raise SettingError("merge_lora", f"{_label('merge_lora')}: needs --output (where to write the merged "
                                             f"model)")

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)

    def learning_rate(self, step: int, peak: float) -> float:
        """The learning rate of step ``step`` (0-based): linear warm-up to ``peak`` over ``warmup()`` steps
        (the first step already at peak / warmup), then ``lr_schedule`` down to 0 at ``steps``."""
        warmup = self.warmup()
        if step < warmup:
            return peak * (step + 1) / warmup
        if self.lr_schedule == "constant":
            return peak
        progress = min(1.0, (step - warmup) / max(1, self.steps - warmup))
        if self.lr_schedule == "linear":
            return peak * (1.0 - progress)
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.grad_accum * self.seq_len


def add_flags(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One flag per field of TrainSettings, in argument groups named by the fields' ``group``; every flag's
    parsed default is None (or False), so ``resolve`` can tell a flag that was given from one that was not."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainSettings):
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, action="store_true", default=None, help=meta["help"])
            continue
        kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(str(f.type), str)
        group.add_argument(flag, type=kind, default=None, metavar=meta["metavar"], choices=meta["choices"],
                           help=meta["help"])
    return groups


def resolve(args: argparse.Namespace, config_path: str | None) -> TrainSettings:
    """The settings of this run: each flag given on the command line, else the ``[train]`` table of
    ``config_path`` (a TOML file), else the default. Unknown keys in the table are refused, naming the closest."""
    table: dict[str, Any] = {}
    if config_path:
        try:
            with open(config_path, "rb") as f:
                table = tomllib.load(f).get("train", {})
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{config_path}: not valid TOML: {' '.join(str(e).split())}") from None
        if not isinstance(table, dict):
            raise ConfigError(f"{config_path}: train: expected a table ([train]); got {type(table).__name__}")
        names = [f.name for f in dataclasses.fields(TrainSettings)]
        for key in table:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean 'train.{close[0]}'?)" if close else ""
                raise ConfigError(f"{config_path}: train.{key}: unknown key{hint}")
    values = {}
    for f in dataclasses.fields(TrainSettings):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
        elif f.name in table:
            values[f.name] = table[f.name]
    try:
        return TrainSettings(**values)
    except SettingError as e:
        if e.name in table and getattr(args, e.name, None) is None:  # the file's value: say where it is
            raise ConfigError(f"{config_path}: " + str(e).replace(_label(e.name), f"train.{e.name}", 1)) from None
        raise


def _metadata(name: str) -> dict[str, Any]:
    return next(f.metadata for f in dataclasses.fields(TrainSettings) if f.name == name)


def _label(name: str) -> str:
    """How an error names a setting: by its flag (``resolve`` renames it ``train.NAME`` for a file's value)."""
    return f"--{name.replace('_', '-')}"


class SettingError(ConfigError):
    """A setting's value is refused; ``name`` is the setting's field name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise SettingError(name, f"{_label(name)}: expected {expected}; got {value!r}")


def _check_number(name: str, value: object, positive: bool) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > 0 if positive else value >= 0))
    if not ok:
        raise SettingError(name, f"{_label(name)}: expected a {'positive' if positive else 'non-negative'} number; "
                          f"got {value!r}")
