"""CPUAdam: a drop-in ``torch.optim.Optimizer`` for CPU tensors, backed by the native SIMD Adam/AdamW kernel."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Callable, Iterable, NamedTuple

import torch

from offload import _C
from offload.optim.step_bank import StepBank

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must hold one value, got shape {tuple(value.shape)}")
        value = value.item()
    return float(value)


def _check_hyper(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Raises ValueError with torch's wording for a hyper-parameter torch would reject (and for NaN/inf)."""
    if not (0.0 <= lr and math.isfinite(lr)):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not (0.0 <= eps and math.isfinite(eps)):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not (0.0 <= weight_decay and math.isfinite(weight_decay)):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _name_params(message: str, group_index: int, members: list[tuple[int, Any, Any]]) -> str:
    """Rewrites 'grads[3]' in a native error as 'grads[3] (param_groups[g]['params'][i])'."""

    def located(match: re.Match) -> str:
        index = members[int(match.group(2))][0]
        return f"{match.group(0)} (param_groups[{group_index}]['params'][{index}])"

    return re.sub(r"(\w+)\[(\d+)\]", located, message)


class _Slot(NamedTuple):
    """What CPUAdam checked about one parameter and its state. Valid while every tensor and address matches."""

    group_index: int
    bank_slot: int
    step: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    param_ptr: int
    exp_avg_ptr: int
    exp_avg_sq_ptr: int
    numel: int


class _GroupHyper(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


class CPUAdam(torch.optim.Optimizer):
    """Adam / AdamW for fp32 parameters on the CPU, computed by one fused native pass per step.

    Same arithmetic as ``torch.optim.AdamW`` (``adamw=True``, decoupled weight decay, default 0.01) or
    ``torch.optim.Adam`` (``adamw=False``, L2 weight decay added to the gradient, default 0), with the same
    ``state_dict()`` layout (per parameter ``step``, ``exp_avg``, ``exp_avg_sq``; the group key
    ``decoupled_weight_decay`` says which of the two), so checkpoints move between this class and torch's in
    both directions. Gradients may be fp32, bf16 or fp16 (read as they are, never converted into a temporary).

    Parameters must be fp32, on the CPU and contiguous; a parameter that is not is rejected at ``step()`` with a
    message naming its group and index, before anything is updated. ``amsgrad`` is rejected; ``maximize`` works.

    Hyper-parameters live in ``param_groups`` as usual and may be changed between steps, by hand or by any
    ``torch.optim.lr_scheduler``. ``step(closure, grad_scale=s)`` multiplies every gradient by ``s`` inside the
    kernel, which unscales a loss scale or applies a clipping factor without an extra pass over the gradients.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        *,
        adamw: bool = True,
        maximize: bool = False,
        bias_correction: bool = True,
    ) -> None:
        if weight_decay is None:
            weight_decay = 1e-2 if adamw else 0.0  # torch.optim.AdamW's and torch.optim.Adam's defaults
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
        lr = _as_float("learning rate", lr)
        betas = (_as_float("beta parameter at index 0", betas[0]), _as_float("beta parameter at index 1", betas[1]))
        _check_hyper(lr, betas, eps, weight_decay)
        if amsgrad:
            raise ValueError(
                "CPUAdam does not support amsgrad=True (it would need a fourth state buffer); "
                "use torch.optim.AdamW(amsgrad=True) for that"
            )
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=False,
            maximize=maximize,
            decoupled_weight_decay=adamw,
            bias_correction=bias_correction,
        )
        super().__init__(params, defaults)
        self._init_caches()

    def _init_caches(self) -> None:
        # param -> its checked state and addresses (see _bind_slot).
        self._slots: dict[torch.Tensor, _Slot] = {}
        # group index -> the step counters of the group (Note [step bank]).
        self._banks: dict[int, StepBank] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also runs inside load_state_dict with the saved groups: fill in what a torch.optim.Adam/AdamW
        # checkpoint (or one from an older torch) lacks, keeping its own choice of weight decay where it has one.
        super().__setstate__(state)
        if "_slots" not in self.__dict__:
            self._init_caches()
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", self.defaults.get("decoupled_weight_decay", True))
            group.setdefault("bias_correction", True)

    def state_dict(self) -> dict[str, Any]:
        """torch's layout. The step counters are copies: the live ones share one tensor (Note [step bank]), and
        tensor formats such as safetensors refuse tensors that share memory."""
        sd = super().state_dict()
        sd["state"] = {
            key: {**entry, "step": entry["step"].clone()} if isinstance(entry.get("step"), torch.Tensor) else entry
            for key, entry in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._slots.clear()  # the loaded tensors are new objects: every slot is bound again on the next step
        self._banks.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: float = 1.0) -> Any:
        """One update of every parameter that has a gradient. Returns the closure's loss, if a closure is given.

        ``grad_scale`` multiplies every gradient first (loss-scale unscaling or a clipping factor). Blocks until
        the update is done; the native kernel runs without the GIL on ``offload.native.num_threads()`` threads.
        Everything is checked before the first parameter changes, and a step counter advances only with its
        parameter's update.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not math.isfinite(grad_scale):
            raise ValueError(f"Invalid grad_scale: {grad_scale} (must be finite)")
        for group_index, group in enumerate(self.param_groups):
            self._step_group(group_index, group, grad_scale)
        return loss

    def _step_group(self, group_index: int, group: dict[str, Any], grad_scale: float) -> None:
        """Updates the group's parameters that have a gradient, all checked (and their state bound) before the
        first one changes; raises ValueError naming the group (and the parameter) otherwise."""
        if group["amsgrad"]:
            raise ValueError(f"param_groups[{group_index}]: amsgrad=True is not supported by CPUAdam")
        hyper = self._group_hyper(group_index, group)
        params = group["params"]
        bank = self._bank(group_index, len(params))
        active = self._active(group_index, params, bank)
        if self._banks[group_index] is not bank:  # the bank grew while binding: collect against the new one
            return self._step_group(group_index, group, grad_scale)
        if not active:
            return
        self._update(group_index, group, hyper, bank, active, grad_scale)

    def _active(self, group_index: int, params: list[torch.Tensor],
                bank: StepBank) -> list[tuple[int, _Slot, torch.Tensor]]:
        """(index, slot, gradient) of each parameter with a gradient, in order: its slot bound again where the
        cached one no longer matches the tensors and addresses, its gradient checked. Changes no parameter or moment:
        binding creates a parameter's state on first use and moves its step into the bank, which it may replace
        with a larger one (Note [step bank])."""
        active: list[tuple[int, _Slot, torch.Tensor]] = []
        for index, param in enumerate(params):
            grad = param.grad
            if grad is None:
                continue
            slot = self._slots.get(param)
            state = self.state[param]
            if (
                slot is None
                or slot.group_index != group_index
                or slot.step is not state.get("step")
                or slot.exp_avg is not state.get("exp_avg")
                or slot.exp_avg_sq is not state.get("exp_avg_sq")
                or slot.param_ptr != param.data_ptr()
                or slot.exp_avg_ptr != slot.exp_avg.data_ptr()  # .data / set_() swaps keep the object
                or slot.exp_avg_sq_ptr != slot.exp_avg_sq.data_ptr()
            ):
                slot = self._bind_slot(group_index, index, param, state, bank)
            if (
                grad.layout is not torch.strided
                or not grad.is_contiguous()
                or grad.numel() != slot.numel
                or grad.dtype not in _DTYPE_NAMES
            ):
                self._reject_grad(group_index, index, slot, grad)
            active.append((index, slot, grad))
        return active

    def _update(self, group_index: int, group: dict[str, Any], hyper: _GroupHyper, bank: StepBank,
                active: list[tuple[int, _Slot, torch.Tensor]], grad_scale: float) -> None:
        """The native Adam over the ``active`` parameters (checked by ``_active``); their step counters advance
        only once every call has returned."""
        # One native call per (step count, gradient dtype): normally one call for the whole group. Tensors go by
        # address (see adam_step_ptrs); every one was checked by _active or when its slot was bound.
        steps = bank.read()
        batches: dict[tuple[int, torch.dtype], list[tuple[int, _Slot, torch.Tensor]]] = defaultdict(list)
        for entry in active:
            batches[(int(steps[entry[1].bank_slot]) + 1, entry[2].dtype)].append(entry)
        for (step, grad_dtype), members in batches.items():
            try:
                _C.adam_step_ptrs(
                    [slot.param_ptr for _, slot, _ in members],
                    [grad.data_ptr() for _, _, grad in members],
                    [slot.exp_avg_ptr for _, slot, _ in members],
                    [slot.exp_avg_sq_ptr for _, slot, _ in members],
                    [],
                    [slot.numel for _, slot, _ in members],
                    _DTYPE_NAMES[grad_dtype],
                    "none",
                    step=step,
                    lr=hyper.lr,
                    beta1=hyper.beta1,
                    beta2=hyper.beta2,
                    eps=hyper.eps,
                    weight_decay=hyper.weight_decay,
                    adamw=group["decoupled_weight_decay"],
                    bias_correction=group["bias_correction"],
                    grad_scale=-grad_scale if group["maximize"] else grad_scale,
                )
            except ValueError as error:  # name the parameters, not positions in this call
                raise ValueError("CPUAdam: " + _name_params(str(error), group_index, members)) from None
        bank.advance([slot.step for _, slot, _ in active])

    def _group_hyper(self, group_index: int, group: dict[str, Any]) -> _GroupHyper:
        try:
            beta1, beta2 = (_as_float("beta", b) for b in group["betas"])
            hyper = _GroupHyper(_as_float("learning rate", group["lr"]), beta1, beta2,
                                _as_float("epsilon value", group["eps"]), _as_float("weight_decay", group["weight_decay"]))
            _check_hyper(hyper.lr, (beta1, beta2), hyper.eps, hyper.weight_decay)
        except (ValueError, TypeError) as error:
            raise ValueError(f"CPUAdam: param_groups[{group_index}]: {error}") from None
        return hyper

    def _bank(self, group_index: int, nparams: int) -> StepBank:
        bank = self._banks.get(group_index)
        if bank is None:
            bank = self._banks[group_index] = StepBank(nparams)
        return bank

    def _bind_slot(
        self, group_index: int, index: int, param: torch.Tensor, state: dict[str, Any], bank: StepBank
    ) -> _Slot:
        """Checks a parameter and its state, creating the state on first use, and caches the result."""
        where = f"CPUAdam: param_groups[{group_index}]['params'][{index}]"
        if param.device.type != "cpu":
            raise ValueError(f"{where} is on {param.device}; CPUAdam updates CPU tensors only")
        if param.dtype != torch.float32:
            raise ValueError(f"{where} is {param.dtype}; CPUAdam keeps fp32 parameters (torch.float32)")
        if not param.is_contiguous():
            raise ValueError(f"{where} is not contiguous; CPUAdam never copies tensors behind your back")
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        for name in ("exp_avg", "exp_avg_sq"):
            tensor = state.get(name)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{where}: state has no tensor '{name}' (got {type(tensor).__name__})")
            if tensor.device.type != "cpu" or tensor.dtype != torch.float32:
                raise ValueError(f"{where}: state '{name}' must be a float32 CPU tensor; "
                                 f"got {tensor.dtype} on {tensor.device}")
            if tensor.shape != param.shape or not tensor.is_contiguous():
                raise ValueError(
                    f"{where}: state '{name}' must be contiguous with the parameter's shape {tuple(param.shape)}; "
                    f"got shape {tuple(tensor.shape)}, contiguous={tensor.is_contiguous()}"
                )
        if "step" not in state:
            raise ValueError(f"{where}: state has no 'step'")
        step = state["step"]
        if bank.holds(step):
            bank_slot = step.storage_offset()
        else:  # see Note [step bank]
            if bank.full:
                bank = self._banks[group_index] = StepBank(2 * bank.values.numel())
                self._slots = {p: s for p, s in self._slots.items() if s.group_index != group_index}
            bank_slot, step = bank.bind(state, _as_float("step", step))
        slot = _Slot(
            group_index=group_index,
            bank_slot=bank_slot,
            step=step,
            exp_avg=state["exp_avg"],
            exp_avg_sq=state["exp_avg_sq"],
            param_ptr=param.data_ptr(),
            exp_avg_ptr=state["exp_avg"].data_ptr(),
            exp_avg_sq_ptr=state["exp_avg_sq"].data_ptr(),
            numel=param.numel(),
        )
        self._slots[param] = slot
        return slot

    @staticmethod
    def _reject_grad(group_index: int, index: int, slot: _Slot, grad: torch.Tensor) -> None:
        where = f"CPUAdam: param_groups[{group_index}]['params'][{index}]"
        if grad.layout is not torch.strided:
            raise ValueError(f"{where} has a {grad.layout} gradient; CPUAdam supports dense gradients only")
        if grad.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{where} has a {grad.dtype} gradient; accepted: float32, bfloat16, float16")
        if grad.numel() != slot.numel:
            raise ValueError(f"{where} has {slot.numel} elements but its gradient {grad.numel()}")
        raise ValueError(f"{where}: the gradient is not contiguous; CPUAdam never copies tensors behind your back")
