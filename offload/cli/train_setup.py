"""What `offload train` builds: the model presets (byte-level tokens) and the engine config the flags describe."""

from __future__ import annotations

import argparse
import tomllib
from typing import Any

import torch

from offload.config import Config
from offload.data.encode import BYTE_VOCAB
from offload.errors import ConfigError

# Llama-style shapes (SwiGLU MLP of ~2.7x hidden, tied embeddings) and their approximate parameter counts.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),      # 3.3M
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),   # 25M
    "medium": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=24, num_attention_heads=16),  # 300M
    "large": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16),  # 1.2B
}


def preset_config(name: str, seq_len: int) -> Any:
    """The transformers config of preset ``name``: a Llama over byte-level tokens (a vocabulary of 256)."""
    try:
        from transformers import LlamaConfig
    except ImportError:
        raise ConfigError("--model: offload train needs transformers; install it with "
                          "pip install 'offload[train]'") from None
    shape = PRESETS[name]
    return LlamaConfig(vocab_size=BYTE_VOCAB, max_position_embeddings=max(512, seq_len),
                       num_key_value_heads=shape["num_attention_heads"], tie_word_embeddings=True,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None, **shape)


def make_config(args: argparse.Namespace, scratch_dir: str | None) -> Config:
    """The engine config: flags first, then what ``--config`` sets, then this command's defaults. Without a GPU
    the defaults put parameters and optimizer state on NVMe, in ``scratch_dir`` unless a directory is named;
    with a GPU, parameters stay on it (the fastest placement when they fit; --params offloads them) and the
    optimizer goes to NVMe. A file from ``offload tune`` (only ``[io]``) therefore changes the I/O settings and nothing else."""
    file_values: dict = {}
    base = Config()
    if args.config:
        base = Config.from_file(args.config)  # validates; raises naming the file
        with open(args.config, "rb") as f:
            file_values = tomllib.load(f)

    def pick(field: str, flag_value: object, default: object) -> object:
        if flag_value is not None:
            return flag_value
        return getattr(base, field) if field in file_values else default

    device = pick("device", args.device, "cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    params = pick("params", args.params, "device" if on_cuda else "nvme")
    optimizer = pick("optimizer", args.optimizer, "nvme")
    nvme_dir = pick("nvme_dir", args.nvme_dir, None)
    if nvme_dir is None and "nvme" in (params, optimizer):
        nvme_dir = scratch_dir
    changes = dict(device=device, params=params, optimizer=optimizer, nvme_dir=nvme_dir)
    for flag in ("dtype", "host_memory_limit", "device_memory_limit", "prefetch_layers"):
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag)
    return base.replace(**changes)


def enable_activation_checkpointing(model: torch.nn.Module, spec: str) -> None:
    """Turns on transformers' activation checkpointing of ``model`` (a Hugging Face model, or a peft model of
    one): each decoder layer keeps its input and is recomputed in backward. Non-reentrant
    (``torch.utils.checkpoint`` with ``use_reentrant=False``), which needs no input that requires grad, so a
    LoRA model's frozen embeddings are fine. Raises ConfigError for a model transformers cannot checkpoint."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # (under a peft model)
    if not getattr(hf_model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--activation-checkpointing: {spec}: {type(hf_model).__name__} does not support "
                          "activation checkpointing in transformers")
    kwargs = {"use_reentrant": False}
    if hasattr(hf_model, "activation_checkpointing_enable"):  # (transformers >= 5.x's name)
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()  # (transformers checkpoints only in training mode; evaluation switches to eval and back)
