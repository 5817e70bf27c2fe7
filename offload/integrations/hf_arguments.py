"""What OffloadTrainer takes from ``TrainingArguments``: the engine's hyper-parameters, and the settings it refuses.

Each refused setting names the argument, the value, and what to do instead, in one line (``ConfigError``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from offload.config import Config
from offload.errors import ConfigError

# the optimizers whose arithmetic is the engine's (torch.optim.AdamW; fused is the same update)
ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")


def resolve_config(offload_config: Config | str | os.PathLike | None) -> Config:
    """``offload_config`` as a Config: one, a path to a TOML file (``Config.from_file``), or None (defaults)."""
    if offload_config is None:
        return Config()
    if isinstance(offload_config, Config):
        return offload_config
    if isinstance(offload_config, (str, os.PathLike)):
        return Config.from_file(offload_config)
    raise ConfigError(f"OffloadTrainer: offload_config: expected an offload.Config or a path to a TOML file; got "
                      f"{type(offload_config).__name__}")


def _value(args: Any, name: str) -> Any:
    value = getattr(args, name, None)
    return getattr(value, "value", value)  # (an enum's string)


def check_arguments(args: Any, config: Config, trainer_kwargs: dict[str, Any]) -> None:
    """Raises ConfigError for a setting the engine cannot honour."""
    def refuse(what: str, instead: str) -> None:
        raise ConfigError(f"OffloadTrainer: {what}: {instead}")

    optim = _value(args, "optim")
    if optim not in ADAMW_OPTIMS:
        refuse(f"TrainingArguments.optim={optim!r}", f"the engine's optimizer is AdamW; use optim='adamw_torch' "
               f"(or leave it out)")
    if getattr(args, "optim_args", None):
        refuse(f"TrainingArguments.optim_args={args.optim_args!r}", "AdamW's settings are learning_rate, "
               "adam_beta1, adam_beta2, adam_epsilon and weight_decay")
    if getattr(args, "deepspeed", None):
        refuse("TrainingArguments.deepspeed", "offload replaces DeepSpeed here; the placement comes from "
               "offload_config (offload.Config or a TOML file)")
    if getattr(args, "fsdp", None):
        refuse(f"TrainingArguments.fsdp={args.fsdp!r}", "the engine partitions the model itself; leave fsdp out")
    if getattr(args, "torch_compile", False):
        refuse("TrainingArguments.torch_compile=True", "the engine's fetch and gradient hooks run in eager mode; "
               "leave torch_compile out")
    for flag in ("fp16_full_eval", "bf16_full_eval"):
        if getattr(args, flag, False):
            refuse(f"TrainingArguments.{flag}=True", f"evaluation runs in the engine's compute dtype "
                   f"(offload_config.dtype={config.dtype!r})")
    for flag, dtype in (("bf16", "bf16"), ("fp16", "fp16")):
        if getattr(args, flag, False) and config.dtype != dtype:
            refuse(f"TrainingArguments.{flag}=True with offload_config.dtype={config.dtype!r}",
                   f"the engine computes in offload_config.dtype; set dtype={dtype!r} there, or leave {flag} out")
    if getattr(args, "push_to_hub", False):
        refuse("TrainingArguments.push_to_hub=True", "a checkpoint here is the engine's state, not a model to "
               "publish; push the directory trainer.save_model(DIR) writes")
    if getattr(args, "auto_find_batch_size", False):
        refuse("TrainingArguments.auto_find_batch_size=True", "the engine is built (and its memory budgeted) once; "
               "set per_device_train_batch_size, and use `offload estimate` to size it")
    if getattr(args, "load_best_model_at_end", False) and getattr(args, "save_only_model", False):
        refuse("load_best_model_at_end with save_only_model", "the best model is loaded from the engine's "
               "checkpoint, which save_only_model leaves out")
    world = getattr(args, "world_size", 1)
    if world > 1 or getattr(args, "n_gpu", 1) > 1:
        refuse(f"{max(world, args.n_gpu)} processes or GPUs", "OffloadTrainer trains in one process on one "
               "device; set CUDA_VISIBLE_DEVICES to one GPU and run without torchrun/accelerate launch")
    device = getattr(args, "device", None)
    if device is not None and _normal(device) != _normal(config.device):
        refuse(f"offload_config.device={config.device!r} while TrainingArguments puts batches on {device}",
               "use Config(device=...) matching it (or TrainingArguments(use_cpu=True) for the CPU)")
    if trainer_kwargs.get("model_init") is not None:
        refuse("model_init", "the engine is built over one model; pass model= (built, or on the meta device)")
    optimizers = trainer_kwargs.get("optimizers") or (None, None)
    if any(o is not None for o in optimizers) or trainer_kwargs.get("optimizer_cls_and_kwargs") is not None:
        refuse("optimizers / optimizer_cls_and_kwargs", "the optimizer is the engine's (trainer.engine.optimizer); choose the schedule with lr_scheduler_type and lr_scheduler_kwargs")


def _normal(device: Any) -> torch.device:
    device = torch.device(device)
    return torch.device(device.type, 0) if device.type == "cuda" and device.index is None else device


def engine_kwargs(args: Any, decay_names: list[str], model: torch.nn.Module) -> dict[str, Any]:
    """offload.Engine's keyword arguments for ``args``: AdamW's hyper-parameters, clipping, and the Trainer's two
    groups (weight decay on ``decay_names``, none on the other trainable parameters)."""
    decay = set(decay_names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [n for n in trainable if n in decay], "weight_decay": float(args.weight_decay)},
              {"params": [n for n in trainable if n not in decay], "weight_decay": 0.0}]
    max_norm = args.max_grad_norm
    return {"lr": float(args.learning_rate), "betas": (float(args.adam_beta1), float(args.adam_beta2)),
            "eps": float(args.adam_epsilon), "weight_decay": float(args.weight_decay),
            "max_grad_norm": float(max_norm) if max_norm is not None and max_norm > 0 else None,
            "param_groups": [g for g in groups if g["params"]]}
