"""save_adapter: a LoRA run's result as a peft adapter directory (``adapter_config.json``,
``adapter_model.safetensors``), the form ``peft.PeftModel.from_pretrained(base, DIR)`` loads, written without
bringing the frozen base into memory: only the trainable weights are read from the engine."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch

from offload.checkpoint.hf_directory import StagedDirectory

log = logging.getLogger("offload")

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the names peft reads
ADAPTER_CONFIG = "adapter_config.json"


def save_adapter(engine: Any, out_dir: str | Path, *, dtype: torch.dtype | None = None, base_model: str | None = None,
                 tokenizer: Any = None, extra_files: dict[str, bytes] | None = None, overwrite: bool = False,
                 write: bool = True, adapter_name: str | None = None) -> Path:
    """Writes the adapter of the engine's peft model to ``out_dir``: its trainable weights (the fp32 masters,
    in ``dtype`` when given) under peft's names (``get_peft_model_state_dict``: the adapter's name taken out),
    its ``LoraConfig`` (``adapter_name``'s; default: the model's active adapter) (in inference mode, as peft saves it; ``base_model`` as its base_model_name_or_path, what
    ``AutoPeftModelForCausalLM`` loads the base from), the tokenizer's files and ``extra_files``.
    Atomic (Note [atomic model directory], checkpoint/hf_directory.py); a non-empty ``out_dir`` is replaced
    only with ``overwrite``. Collective with several ranks (reading the weights); only where ``write`` (rank 0)
    is anything written."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    start = time.perf_counter()
    model = engine.model
    adapter = adapter_name if adapter_name is not None else model.active_adapter
    trainable = engine.state_dict(trainable_only=True)  # fp32 CPU tensors of our own, the model's keys
    if not write:
        return Path(out_dir)
    weights = get_peft_model_state_dict(model, state_dict=trainable, adapter_name=adapter,
                                        save_embedding_layers=False)
    if len(weights) != len(trainable):  # (only LoRA layers train in an offload train run: every tensor has a name)
        missing = [key for key in trainable if _saved_name(key, adapter) not in weights]
        raise RuntimeError(f"save_adapter: peft names only {len(weights)} of the {len(trainable)} trainable "
                           f"tensors (not {', '.join(missing[:3])}); the adapter would be incomplete")
    weights = {name: (t if dtype is None else t.to(dtype)).contiguous() for name, t in weights.items()}
    config = copy.deepcopy(model.peft_config[adapter])
    config.inference_mode = True  # (as PeftModel.save_pretrained saves it)
    if base_model is not None:
        config.base_model_name_or_path = base_model
    directory = StagedDirectory(out_dir, overwrite)
    try:
        save_file(weights, str(directory.path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(str(directory.path))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory.path))
        for name, data in (extra_files or {}).items():
            directory.write_file(name, data)
        directory.commit()  # (fsyncs every file first)
    except BaseException:
        directory.abandon()
        raise
    log.info("offload: adapter of %d tensors (%.1f MB) written to %s in %.1f s", len(weights),
             sum(t.nbytes for t in weights.values()) / 1e6, out_dir, time.perf_counter() - start)
    return Path(out_dir)


def _saved_name(key: str, adapter: str) -> str:
    """The name peft saves a trainable tensor under: the adapter's name taken out of the model's key."""
    return key.replace(f".{adapter}.", ".")
