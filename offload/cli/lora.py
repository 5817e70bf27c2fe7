"""LoraPlan: the LoRA adapter an `offload train --lora-r R` run trains, and the peft model it is built as.

The model is built as every `offload train` model is, under ``offload.init_empty`` on the meta device, with
``peft.get_peft_model`` applied inside the build: the adapters' creation and their random init (kaiming-uniform
A, zero B) are recorded in the same init log as the base model's. The engine then fills the model group by
group, the frozen base read from the model directory (``Engine(..., pretrained=DIR)``) and only the adapters
replayed from the log, drawing no random numbers for the base (as ``from_pretrained`` draws none for the
weights it loads: Note [values provided elsewhere]); the base never exists whole in RAM.

peft is an optional extra: it is imported only when a LoRA setting is given, and its absence is one error line.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from offload.errors import ConfigError

if TYPE_CHECKING:
    from offload.cli.model_source import ModelSource
    from offload.cli.train_settings import TrainSettings

ADAPTER = "default"  # the adapter's name inside the peft model (the name peft gives a single adapter)


def require_peft() -> None:
    """Raises ConfigError (one line, naming the extra) when peft cannot be imported."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("--lora-r: LoRA training needs peft, which is not installed; pip install "
                          "'offload[lora]'") from None


@dataclass(frozen=True)
class LoraPlan:
    r: int
    alpha: float
    targets: list[str] | str  # "all-linear" or layer names, as peft's LoraConfig takes target_modules
    dropout: float

    @staticmethod
    def of(settings: TrainSettings) -> LoraPlan | None:
        """The run's LoRA plan, None for a full fine-tune."""
        if settings.lora_r is None:
            return None
        alpha = settings.lora_r if settings.lora_alpha is None else settings.lora_alpha
        return LoraPlan(r=settings.lora_r, alpha=int(alpha) if float(alpha).is_integer() else float(alpha),
                        targets=parse_targets(settings.lora_targets or "all-linear"),
                        dropout=settings.lora_dropout or 0.0)

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=self.targets, lora_dropout=self.dropout,
                          bias="none", task_type="CAUSAL_LM")

    def check(self, source: ModelSource) -> None:
        """Refuses, before anything large is built, a model LoRA cannot adapt here: one without pretrained
        weights (an adapter of a random init is of no use), or ``targets`` naming no linear layer of it."""
        if not source.pretrained:
            raise ConfigError(f"--lora-r: LoRA adapts pretrained weights; give --model a Hugging Face model "
                              f"directory or a cached hub id (got {source.describe()})")
        if self.targets != "all-linear":
            with torch.device("meta"):
                self.check_targets(source.builder(0)(), source.spec)

    def check_targets(self, base: nn.Module, spec: str) -> None:
        """Refuses a target matching no linear layer of ``base`` (peft matches a name to the layers of that
        name or ending in ``.name``), listing the names it has."""
        if self.targets == "all-linear":
            return
        linear = linear_layer_names(base)
        for target in self.targets:
            if not any(name == target or name.endswith("." + target) for name in linear):
                raise ConfigError(f"--lora-targets: {target!r} names no linear layer of {spec}; its linear "
                                  f"layers are {', '.join(_leaf_names(linear))}")

    def builder(self, base: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        """``base`` (a function building the base model) followed by ``peft.get_peft_model``: the LoRA model,
        its base frozen. Run under ``offload.init_empty``, the adapters' init is logged with the base's."""
        from peft import get_peft_model  # (imported here, not under init_empty's meta device)

        config = self.peft_config()

        def build() -> nn.Module:
            model = base()
            with warnings.catch_warnings():  # (peft asks transformers a deprecated question on every wrap)
                warnings.simplefilter("ignore", FutureWarning)
                return get_peft_model(model, config, adapter_name=ADAPTER)
        return build

    def describe(self, model: nn.Module) -> str:
        """One line: rank, scale, what is adapted and how many parameters train."""
        from peft.tuners.lora import LoraLayer

        adapted = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        targets = self.targets if isinstance(self.targets, str) else ",".join(self.targets)
        return (f"LoRA r={self.r} alpha={self.alpha:g} dropout={self.dropout:g} on {len(adapted)} layers "
                f"({targets}): {trainable / 1e6:.2f}M trainable parameters ({100 * trainable / total:.2f}% of "
                f"{total / 1e6:.1f}M), the base frozen")


def parse_targets(value: object) -> list[str] | str:
    """--lora-targets as peft's LoraConfig takes it: "all-linear", or the list of layer names (dotted words,
    separated by commas). Raises ConfigError naming the flag."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else []
    if names == ["all-linear"]:
        return "all-linear"
    if not names or not all(re.fullmatch(r"\w+(\.\w+)*", n) for n in names):
        raise ConfigError(f"--lora-targets: expected layer names separated by commas (q_proj,v_proj) or all-linear; "
                          f"got {value!r}")
    return names


def linear_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules LoRA can adapt: torch Linear layers and transformers' Conv1D (GPT-2)."""
    kinds: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:
        pass
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]


def _leaf_names(names: list[str]) -> list[str]:
    """The distinct last components of ``names``, in order (q_proj, k_proj, ..., lm_head)."""
    return list(dict.fromkeys(name.rpartition(".")[2] for name in names))


def base_model_name(source: ModelSource) -> str:
    """What the adapter's config names as its base (``base_model_name_or_path``): the hub id, or the model
    directory's absolute path, so that ``AutoPeftModelForCausalLM.from_pretrained`` finds it."""
    return str(source.directory.resolve()) if Path(source.spec).exists() else source.spec
