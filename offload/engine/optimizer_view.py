"""EngineOptimizer: ``engine.optimizer``, the engine seen as a ``torch.optim.Optimizer``.

Note [the optimizer view]: the engine's Adam runs on flat fp32 state in RAM or on NVMe, not on the parameters, so
it cannot be a torch optimizer over them; but everything around an optimizer in a training script (lr
schedulers, the Hugging Face Trainer, code that reads or sets ``param_groups[i]["lr"]``) only needs the
``Optimizer`` interface. The view's ``param_groups`` are the engine's own group dicts (``lr``, ``betas``,
``eps``, ``weight_decay``, ``params``, and ``names``): a scheduler writing ``lr`` (or ``betas``, as OneCycleLR
does) writes the value the engine's next step reads, and keys it adds (``initial_lr``...) stay in the group
and are saved with ``engine.save``. ``step()`` is ``engine.step()``: the values in force when it is called
are the step's, for every group, also where the update continues in the background while the next forward
runs (offloaded parameters). ``zero_grad()`` drops gradients accumulated since the last step (torch's
meaning); after a step it has nothing to do. ``state_dict()`` / ``load_state_dict()`` use torch.optim.AdamW's
format (optimizer_state.py). The engine holds its view (one per engine, so schedulers and hooks attached to
it stay attached); the view holds only a weak reference back, so a dropped engine is still collected at once
(and its finalizer removes the swap files) instead of waiting in a reference cycle for the collector.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

from offload.engine import optimizer_state
from offload.engine.types import StepInfo


class EngineOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` over the engine's parameter groups; see Note [the optimizer view]. Obtain it
    as ``engine.optimizer`` (one per engine)."""

    def __init__(self, engine: Any, defaults: dict[str, Any]) -> None:
        self._engine_ref = weakref.ref(engine)
        self._building = True
        super().__init__(engine.param_groups, defaults)  # (adds the engine's dicts themselves, Note above)
        self._building = False
        self.last_step: StepInfo | None = None  # what the last step() returned

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """``engine.step()`` (after ``closure()``, evaluated with gradients enabled, if given; it must call
        ``engine.backward(loss)``). Returns the closure's result, as torch's optimizers do; the step's
        ``StepInfo`` is in ``last_step``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_step = self._engine().step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drops the gradients accumulated since the last step (``engine.zero_grad()``); ``set_to_none`` is
        accepted for torch's signature (the engine's gradients are never in ``param.grad``)."""
        self._engine().zero_grad()

    def _engine(self) -> Any:
        engine = self._engine_ref()
        if engine is None:
            raise RuntimeError("engine.optimizer: its offload.Engine is gone (dropped and collected); keep a "
                               "reference to the engine while training")
        return engine

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._building:
            raise RuntimeError("engine.optimizer.add_param_group: the engine's parameter groups are fixed when it "
                               "is built; pass param_groups=[...] to offload.Engine")
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The Adam state in torch.optim.AdamW's format: per parameter ``step``, ``exp_avg``, ``exp_avg_sq``
        (new fp32 CPU tensors: 8 bytes per trainable parameter in RAM, read one group at a time), and the
        groups' hyper-parameters. The master weights are not in it (as in torch): to checkpoint, use
        ``engine.save(path)``, which also streams the state from NVMe instead of building it in RAM."""
        return optimizer_state.state_dict(self._engine().training_state())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Sets the moments, step counts and hyper-parameters from ``state_dict`` (this view's, or a
        torch.optim.AdamW's over the same parameters in the same groups); checked before anything changes.
        Gradients accumulated since the last step are dropped."""
        optimizer_state.load_state_dict(self._engine().training_state(), state_dict)

    def __repr__(self) -> str:
        groups = ", ".join(f"[{len(g['params'])} params lr={float(g['lr']):.3g} weight_decay={float(g['weight_decay']):.3g}]"
                           for g in self.param_groups)
        return f"EngineOptimizer(offload.Engine: {groups})"
