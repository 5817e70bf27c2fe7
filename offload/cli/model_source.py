"""ModelSource: what `offload train --model` names, resolved before anything large is built.

Four kinds, tried in this order:
- a preset (``tiny``, ``small``, ``medium``, ``large``): a Llama of that shape, random init, byte tokens;
- a ``config.json`` file: that architecture, random init, byte tokens (its vocabulary must hold 256);
- a Hugging Face model directory (``config.json``, ``model.safetensors`` or a sharded index, tokenizer files):
  pretrained weights (read by the engine as it fills each group: ``Engine(..., pretrained=DIR)``), its
  tokenizer, its generation config;
- a hub id (``org/name``) whose snapshot is already in the local Hugging Face cache: that directory. Nothing
  is downloaded: a run that needs the network should not start one behind the user's back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from offload.cli.train_setup import PRESETS, preset_config
from offload.data.encode import BYTE_VOCAB
from offload.engine.pretrained import INDEX_FILE, SINGLE_FILE
from offload.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "preset" | "config" | "pretrained"
    spec: str  # what the user named
    config: Any  # the transformers PretrainedConfig
    directory: Path | None = None  # the model directory (pretrained): weights, tokenizer, generation config
    tokenizer: Any = None  # None: byte-level tokens (a directory without tokenizer files: see byte_level)
    generation_config: Any = None  # when the directory has generation_config.json
    weights_dtype: torch.dtype | None = None  # the dtype the pretrained weights are stored in

    @property
    def pretrained(self) -> bool:
        return self.kind == "pretrained"

    @property
    def byte_level(self) -> bool:
        """Whether its tokens are UTF-8 bytes: the presets, a config.json, and a model directory without a
        tokenizer whose vocabulary is exactly the 256 bytes (what ``offload train`` from scratch writes)."""
        return self.tokenizer is None and (not self.pretrained or getattr(self.config, "vocab_size", 0) == BYTE_VOCAB)

    def builder(self, seed: int) -> Callable[[], torch.nn.Module]:
        """A function building the model (under ``offload.init_empty``, on the meta device); its random init
        (what a preset or a config.json trains from) is that of ``seed``."""
        def build() -> torch.nn.Module:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(seed)
            try:
                return AutoModelForCausalLM.from_config(self.config)
            except ValueError as e:  # e.g. an encoder-decoder config: not a causal LM
                raise ConfigError(f"--model: {self.spec}: not a causal language model "
                                  f"({' '.join(str(e).split())[:200]})") from None
        return build

    def check_seq_len(self, seq_len: int) -> None:
        """Refuses sequences longer than the model's positions (learned position embeddings would fail)."""
        limit = getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)
        if isinstance(limit, int) and seq_len > limit:
            raise ConfigError(f"--seq-len: {seq_len} is longer than the model's {limit} positions "
                              f"(max_position_embeddings in {self.spec}'s config)")

    def describe(self) -> str:
        if self.kind == "preset":
            return f"the {self.spec} preset (random init, byte tokens)"
        if self.kind == "config":
            return f"{self.spec} (config.json model, random init, byte tokens)"
        tokens = f"its tokenizer ({len(self.tokenizer)} tokens)" if self.tokenizer is not None else "byte tokens"
        stored = str(self.weights_dtype).removeprefix("torch.") if self.weights_dtype else "?"
        where = self.spec if Path(self.spec).exists() else f"{self.spec} (cached at {self.directory})"
        return f"{where} ({type(self.config).__name__.removesuffix('Config')}, {stored} weights, {tokens})"

    def output_dtype(self, requested: str) -> torch.dtype:
        """``--output-dtype``: a named dtype, or (auto) the dtype the input weights were stored in; fp32 for a
        model trained from scratch."""
        named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if requested != "auto":
            return named[requested]
        return self.weights_dtype or torch.float32


def resolve_model(spec: str | None, seq_len: int) -> ModelSource:
    """The model ``--model`` names (default: the tiny preset), for sequences of ``seq_len`` tokens. Raises
    ConfigError with one line naming the flag and what is missing."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConfigError("--model: offload train needs transformers; pip install 'offload[train]'") from None
    spec = spec or "tiny"
    if spec in PRESETS:
        return ModelSource("preset", spec, config=preset_config(spec, seq_len))
    path = Path(spec)
    if path.is_file():
        config = _read_config(AutoConfig, path)
        if getattr(config, "vocab_size", 0) < BYTE_VOCAB:
            raise ConfigError(f"--model: {path} has vocab_size {getattr(config, 'vocab_size', None)}; the byte-level "
                              f"data needs at least {BYTE_VOCAB}")
        return ModelSource("config", spec, config=config)
    if path.is_dir():
        return _pretrained(spec, path, AutoConfig)
    cached = _cached_snapshot(spec)
    if cached is None:
        looks_like_id = "/" in spec and not spec.startswith((".", "/")) and len(spec.split("/")) == 2
        if looks_like_id:
            raise ConfigError(f"--model: {spec!r} is not in the local Hugging Face cache ({_hub_cache()}) and "
                              f"offload train does not download; fetch it first (hf download {spec}) or give its "
                              f"directory")
        raise ConfigError(f"--model: {spec!r} is neither a preset ({', '.join(PRESETS)}), a config file, a model "
                          f"directory, nor a hub id in the local Hugging Face cache")
    return _pretrained(spec, cached, AutoConfig)


def _pretrained(spec: str, directory: Path, auto_config: Any) -> ModelSource:
    if not (directory / "config.json").is_file():
        raise ConfigError(f"--model: {directory} has no config.json; not a Hugging Face model directory")
    weights = _first_weights_file(directory)
    config = _read_config(auto_config, directory / "config.json", directory)
    tokenizer = _tokenizer(directory)
    vocab = getattr(config, "vocab_size", None)
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(f"--model: {directory}: the tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocab_size is {vocab}; they do not belong together")
    generation_config = None
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(directory)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--model: {directory / 'generation_config.json'}: not usable ({_one_line(e)})") \
                from None
    return ModelSource("pretrained", spec, config=config, directory=directory, tokenizer=tokenizer,
                       generation_config=generation_config, weights_dtype=_stored_dtype(weights))


def _read_config(auto_config: Any, file: Path, directory: Path | None = None) -> Any:
    try:
        return auto_config.from_pretrained(str(directory if directory is not None else file))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ConfigError(f"--model: {file} is not a usable Hugging Face config ({_one_line(e)})") from None


def _first_weights_file(directory: Path) -> Path:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            first = directory / next(iter(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
            raise ConfigError(f"--model: {index}: not a usable safetensors index ({_one_line(e)})") from None
        if not first.is_file():
            raise ConfigError(f"--model: {index} names {first.name}, which is missing")
        return first
    if (directory / SINGLE_FILE).is_file():
        return directory / SINGLE_FILE
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
    hint = (f" (it has {others[0]}: offload reads safetensors; convert the weights with transformers' "
            f"save_pretrained(..., safe_serialization=True))") if others else ""
    raise ConfigError(f"--model: {directory} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def _stored_dtype(file: Path) -> torch.dtype | None:
    """The dtype of the first floating-point tensor of a safetensors file (its header only is read)."""
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= 100 << 20:
                raise ValueError(f"header length {length}")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model: {file}: not a safetensors file ({_one_line(e)})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"--model: {file}: not a safetensors file (its header is not a JSON object)")
    for name, entry in header.items():
        if name != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[entry["dtype"]]
    return None


def _tokenizer(directory: Path) -> Any:
    """The directory's tokenizer (fast, as ``AutoTokenizer`` gives it), or None when it has no tokenizer files."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--model: {directory}: its tokenizer does not load ({_one_line(e)})") from None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _cached_snapshot(spec: str) -> Path | None:
    """The local snapshot directory of hub id ``spec``, without any network access; None when not cached."""
    if spec.count("/") > 1 or spec.startswith((".", "/")) or os.sep + os.sep in spec:
        return None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]
