"""TrainingState: the engine's training state as checkpointing, loading and export see it.

``Engine.training_state()`` hands it out with no update in flight; ``offload.engine.checkpointing``,
``checkpoint_load``, ``pretrained``, ``hf_save`` and ``gathered`` read and write the engine through it only
(never through the engine's own fields), so none of them imports the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from offload.config import Config
from offload.engine.parts import EngineParts
from offload.layout.flat_group import FlatGroup
from offload.optim.group_stepper import GroupStepper
from offload.optim.loss_scale import LossScaler
from offload.optim.state_store import OptimizerStateStore
from offload.ranks import Ranks
from offload.schedule.grad_stream import GradientStream
from offload.schedule.weights import Weights


@dataclass(eq=False)
class TrainingState:
    model: nn.Module
    config: Config
    ranks: Ranks
    device: torch.device
    groups: list[FlatGroup]  # the trainable parameters, one flat group per block
    # the offloaded frozen parameters, one flat group per block (indices after the trainable groups'; empty with
    # params="device": Note [frozen groups])
    frozen_groups: list[FlatGroup]
    param_groups: list[dict[str, Any]]  # the hyper-parameters (lr, betas, eps, weight_decay) of each param group
    parts: EngineParts  # what holds the weights, gradients and optimizer state
    scaler: LossScaler
    step: int = 0  # optimizer steps taken (a skipped step does not count)
    param_steps: list[list[int]] = field(default_factory=list)  # [group][slot]: Adam's step count of each param
    failed: str | None = None  # why the state is inconsistent (a step or a load failed part-way), or None
    gathered_contexts: int = 0  # open engine.gathered() contexts (Note [gathered weights])
    # the frozen base's fingerprint once computed, until the frozen values change (frozen_base.py)
    frozen_fingerprint: dict[str, list[Any]] | None = None

    def __post_init__(self) -> None:
        if not self.param_steps:
            self.param_steps = [[0] * len(g.slots) for g in self.groups]

    @property
    def store(self) -> OptimizerStateStore:
        return self.parts.store

    @property
    def grads(self) -> GradientStream:
        return self.parts.grads

    @property
    def weights(self) -> Weights:
        return self.parts.weights

    @property
    def stepper(self) -> GroupStepper:
        return self.parts.stepper

    def full_master(self, g: int) -> torch.Tensor:
        """Group g's whole fp32 master (a new CPU tensor); with several ranks an all-gather of the shards
        (collective: every rank calls it for the same groups in the same order)."""
        shard = self.store.read_master(self.store.states[g])
        if not self.ranks.many:
            return shard
        full = torch.empty(self.groups[g].numel, dtype=torch.float32, device=self.ranks.device)
        self.ranks.all_gather(full, shard.to(self.ranks.device))
        return full.cpu()

    def fail(self, reason: str) -> None:
        """The state is inconsistent: the engine refuses to go on, and fetches waiting for updates must not
        hang (they are told the updates will not come)."""
        self.failed = reason
        if self.parts.offloaded is not None:
            self.parts.offloaded.abort_updates(reason)

    def quiesce(self) -> None:
        """Before the homes are rewritten outside a step: no group on the device (its copy would go stale), no
        copy to the device still reading a home, no state read begun for the next step (it fills staging)."""
        self.stepper.discard_preload()
        self.weights.release_all()
        self.weights.drain_copies()
