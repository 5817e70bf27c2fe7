"""OffloadTrainer: the Hugging Face ``Trainer`` with the model's training state held by an ``offload.Engine``.

    from offload.integrations.hf import OffloadTrainer
    trainer = OffloadTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                             offload_config=offload.Config(params="nvme", optimizer="nvme", nvme_dir="/nvme"))
    trainer.train(); trainer.save_model("out/")

Note [what OffloadTrainer replaces]: the Trainer keeps its loop (batches, accumulation, the lr schedule,
logging, evaluation, callbacks, checkpoint rotation, resuming); the engine takes the parts that touch the
weights and their state:
- the optimizer is ``engine.optimizer`` (optimizer_view.py), built from the TrainingArguments' AdamW settings
  with the Trainer's weight-decay groups; the Trainer's scheduler drives its learning rate;
- ``training_step`` ends in ``engine.backward(loss)`` (after the Trainer's own loss scaling for gradient
  accumulation), not ``accelerator.backward``; ``max_grad_norm`` clips inside the engine's step (torch's
  clip_grad_norm_ arithmetic), and the logged grad_norm is the step's;
- the model is never moved by the Trainer or accelerate (``device_placement`` off): the engine places it;
- a checkpoint-N directory holds the engine's checkpoint (``engine.save``: fp32 masters, Adam state, also
  from NVMe) in ``offload/``, with the Trainer's scheduler, RNG and trainer state beside it; resuming loads
  it back; ``save_model`` writes a Hugging Face model directory (or a peft adapter) streamed from the engine.
Everything else is the Trainer's own code, so its behaviour (and a transformers upgrade) carries over; the
methods overridden here are checked to exist at import, so an incompatible transformers fails loudly.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

try:
    import transformers
    from transformers import Trainer
    from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME
except ImportError as e:  # (transformers is an optional extra)
    raise ImportError(f"offload.integrations.hf needs transformers and accelerate ({e}); install them with "
                      "pip install 'offload[trainer]'") from None

from offload.checkpoint.hf_directory import fsync_dir
from offload.config import Config
from offload.engine import Engine
from offload.engine.hf_save import save_pretrained
from offload.engine.peft_adapter import save_adapter
from offload.integrations.hf_arguments import check_arguments, engine_kwargs, resolve_config

log = logging.getLogger("offload")

ENGINE_CHECKPOINT = "offload"  # the engine's checkpoint inside checkpoint-N
# the Trainer's methods overridden below: a transformers without one of them would run its own code there
_OVERRIDDEN = ("training_step", "create_optimizer", "create_accelerator_and_postprocess", "_move_model_to_device",
               "_clip_grad_norm", "_get_grad_norm", "_maybe_log_save_evaluate", "_save_optimizer_and_scheduler",
               "_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_best_model", "save_model")
_missing = [name for name in _OVERRIDDEN if not hasattr(Trainer, name)]
if _missing:
    raise ImportError(f"offload.integrations.hf: transformers {transformers.__version__}'s Trainer has no "
                      f"{', '.join(_missing)}, which OffloadTrainer replaces; it is tested with transformers 5.25")


class OffloadTrainer(Trainer):
    """A ``transformers.Trainer`` whose model is trained by an ``offload.Engine`` (Note [what OffloadTrainer
    replaces]). ``offload_config``: an ``offload.Config`` or the path of a TOML file (``offload tune`` writes
    one); every other argument is the Trainer's. The engine is built here (``trainer.engine``), so a budget
    or disk too small for the model fails now. Settings the engine cannot honour (another ``optim``,
    DeepSpeed, FSDP, ``torch_compile``, several processes, ``model_init``, a custom optimizer) raise
    ``offload.ConfigError``."""

    def __init__(self, model: torch.nn.Module | None = None, args: Any = None, *trainer_args: Any,
                 offload_config: Config | str | os.PathLike | None = None, **trainer_kwargs: Any) -> None:
        if trainer_args:
            raise TypeError("OffloadTrainer: pass the Trainer's arguments after args by keyword "
                            "(data_collator=..., train_dataset=...)")
        if model is None:
            raise TypeError("OffloadTrainer: model= is required")
        config = resolve_config(offload_config)
        if args is None:
            args = transformers.TrainingArguments(output_dir="trainer_output")
        check_arguments(args, config, trainer_kwargs)
        if args.bf16 or args.fp16 or getattr(args, "mixed_precision", "no") != "no":
            # (the same dtype as the engine's: check_arguments made sure) the engine computes in config.dtype
            # and scales fp16 losses itself: the Trainer's autocast and GradScaler would do it a second time
            args = dataclasses.replace(args, bf16=False, fp16=False)
            args.mixed_precision = "no"  # (__post_init__ takes it from ACCELERATE_MIXED_PRECISION too)
        self.offload_config = config
        self.engine: Engine | None = None
        self._restored_groups: list[dict[str, Any]] | None = None
        super().__init__(model=model, args=args, **trainer_kwargs)
        self.engine = Engine(model, config, **engine_kwargs(self.args, self.get_decay_parameter_names(model), model))

    # ---- the optimizer and the step -------------------------------------------------------------------------

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        self.optimizer = self.engine.optimizer
        return self.optimizer

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # accelerate would move the model (and copy the optimizer's state) to its device on prepare(): the
        # engine owns where every weight and state lives
        self.accelerator.device_placement = False

    def _move_model_to_device(self, model: torch.nn.Module, device: Any) -> None:
        pass  # the engine places the model (Note [what OffloadTrainer replaces])

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """The Trainer's forward and loss, and ``engine.backward``. Gradient accumulation scales the loss as
        the Trainer does: by the number of micro-batches, unless the loss was already normalised by the
        step's item count (``num_items_in_batch``) or computed by ``compute_loss_func``."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        every = self.args.torch_empty_cache_steps
        if every and self.state.global_step % every == 0 and self.engine.device.type == "cuda":
            torch.cuda.empty_cache()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) \
                or getattr(self, "compute_loss_func", None) is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        self.engine.backward(loss)
        return loss.detach()

    def _clip_grad_norm(self, model: torch.nn.Module) -> None:
        return None  # the engine clips to max_grad_norm in its step (the gradients are not in param.grad)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        return grad_norm  # known once the step ran: _maybe_log_save_evaluate reports the step's

    def _maybe_log_save_evaluate(self, tr_loss: Any, grad_norm: Any, *args: Any, **kwargs: Any) -> None:
        last = self.engine.optimizer.last_step
        grad_norm = last.grad_norm if last is not None else grad_norm
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``output_dir`` (default ``args.output_dir``) gets the model as a Hugging Face model directory (a
        peft adapter for a peft model), streamed from the engine, with the tokenizer and training_args.bin.
        Inside a checkpoint (``_internal_call``) the engine's checkpoint is written instead, unless
        ``save_only_model``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _internal_call and not self.args.save_only_model:
            self.engine.save(os.path.join(output_dir, ENGINE_CHECKPOINT))
            return
        if self.args.should_save:
            _write_beside(Path(output_dir), self._write_model)

    def _write_model(self, directory: Path, overwrite: bool) -> None:
        buffer = io.BytesIO()
        torch.save(self.args, buffer)
        extra = {TRAINING_ARGS_NAME: buffer.getvalue()}
        if hasattr(self.engine.model, "peft_config"):
            save_adapter(self.engine, directory, tokenizer=self.processing_class, extra_files=extra,
                         overwrite=overwrite)
        else:
            save_pretrained(self.engine, directory, tokenizer=self.processing_class, extra_files=extra,
                            overwrite=overwrite)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # (the optimizer's state is in the engine's checkpoint, written by save_model just before)
        if self.args.should_save and self.lr_scheduler is not None:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        self.engine.load(_engine_checkpoint(resume_from_checkpoint), restore_rng=False)  # (the Trainer's RNG)
        # the Trainer builds its scheduler after this, which sets every group's lr (and maybe more) to the
        # schedule's first values: what the checkpoint holds is put back once the scheduler's state is loaded
        self._restored_groups = [{k: v for k, v in group.items() if k not in ("params", "names")}
                                 for group in self.engine.param_groups]

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(path) and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(torch.load(path, weights_only=True))
        if self._restored_groups is not None:
            for group, saved in zip(self.engine.param_groups, self._restored_groups):
                group.update(saved)  # (as torch's optimizer.load_state_dict, which follows there, would)
            self._restored_groups = None

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        log.info("offload: loading the best model from %s (%s %s)", best, self.args.metric_for_best_model,
                 self.state.best_metric)
        self.engine.load(_engine_checkpoint(best), restore_rng=False)


def _engine_checkpoint(checkpoint: str) -> str:
    path = os.path.join(checkpoint, ENGINE_CHECKPOINT)
    if not os.path.isdir(path):
        raise ValueError(f"{checkpoint}: no {ENGINE_CHECKPOINT}/ in it: not a checkpoint of OffloadTrainer (or "
                         "saved with save_only_model, which cannot be resumed)")
    return path


def _write_beside(target: Path, write: Any) -> None:
    """``write(directory, overwrite)`` into ``target``, which may already hold checkpoint-N directories and other
    files (the Trainer's output_dir). A missing or empty ``target`` is written atomically as a whole; otherwise
    the model is staged in a hidden directory inside it and each file moved into place (each one atomically),
    after the weight files of an earlier save that the new one does not have are removed; nothing else in
    ``target`` is touched."""
    if not target.exists() or not any(target.iterdir()):
        write(target, True)
        return
    staged = target / f".offload-save-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    try:
        write(staged, False)
        new = {p.name for p in staged.iterdir()}
        for old in target.iterdir():
            if old.is_file() and old.name not in new and _is_weights_file(old.name):
                old.unlink()  # a shard of an earlier save that would otherwise sit beside the new index
        for name in sorted(new):
            os.replace(staged / name, target / name)
        fsync_dir(target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _is_weights_file(name: str) -> bool:
    return (name.startswith(("model-", "model.safetensors", "adapter_model.")) and
            (name.endswith(".safetensors") or name.endswith(".index.json")))
