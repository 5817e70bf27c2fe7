"""CPUAdam: a drop-in ``torch.optim.Optimizer`` for CPU tensors, backed by the native SIMD Adam/AdamW kernel."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, NamedTuple

import torch

from offload import _C

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must hold one value, got shape {tuple(value.shape)}")
        value = value.item()
    return float(value)


class _Slot(NamedTuple):
    """What CPUAdam checked about one parameter and its state, keyed by tensor identity."""

    step: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    param_ptr: int
    exp_avg_ptr: int
    exp_avg_sq_ptr: int
    numel: int


class CPUAdam(torch.optim.Optimizer):
    """Adam / AdamW for fp32 parameters on the CPU, computed by one fused native pass per step.

    Same arithmetic as ``torch.optim.AdamW`` (``adamw=True``, decoupled weight decay) or ``torch.optim.Adam``
    (``adamw=False``, L2 weight decay added to the gradient), with the same ``state_dict()`` layout (per
    parameter ``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints move between this class and torch's in both
    directions. Gradients may be fp32, bf16 or fp16 (read as they are, never converted into a temporary).

    Parameters must be fp32, on the CPU and contiguous; a parameter that is not is rejected at ``step()`` with a
    message naming its group and index. ``amsgrad`` is not supported and is rejected; ``maximize`` is.

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
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        adamw: bool = True,
        maximize: bool = False,
        bias_correction: bool = True,
    ) -> None:
        lr = _as_float("learning rate", lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
        betas = (_as_float("beta parameter at index 0", betas[0]), _as_float("beta parameter at index 1", betas[1]))
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
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
            adamw=adamw,
            bias_correction=bias_correction,
        )
        super().__init__(params, defaults)
        self._init_caches()

    def _init_caches(self) -> None:
        # param -> its checked state and addresses (see _bind_slot); rebuilt whenever a tensor object changes.
        self._slots: dict[torch.Tensor, _Slot] = {}
        # group index -> the float32 tensor behind every state["step"] of the group (Note [step bank]).
        self._banks: dict[int, torch.Tensor] = {}
        # group index -> indices of the group's params whose step lives in the bank.
        self._bound: dict[int, set[int]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A state_dict saved by torch.optim.AdamW / Adam lacks our keys: fill in the defaults.
        super().__setstate__(state)
        if "_slots" not in self.__dict__:
            self._init_caches()
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("adamw", True)
            group.setdefault("bias_correction", True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: float = 1.0) -> Any:
        """One update of every parameter that has a gradient. Returns the closure's loss, if a closure is given.

        ``grad_scale`` multiplies every gradient first (loss-scale unscaling or a clipping factor). Blocks until
        the update is done; the native kernel runs without the GIL on ``offload.native.num_threads()`` threads.
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
        if group["amsgrad"]:
            raise ValueError(f"param_groups[{group_index}]: amsgrad=True is not supported by CPUAdam")
        params = group["params"]
        bank = self._step_bank(group_index, len(params))
        active: list[tuple[int, _Slot, torch.Tensor]] = []
        for index, param in enumerate(params):
            grad = param.grad
            if grad is None:
                continue
            slot = self._slots.get(param)
            state = self.state[param]
            if (
                slot is None
                or slot.step is not state.get("step")
                or slot.exp_avg is not state.get("exp_avg")
                or slot.exp_avg_sq is not state.get("exp_avg_sq")
                or slot.param_ptr != param.data_ptr()
            ):
                slot = self._bind_slot(group_index, index, param, state, bank)
            if grad.layout is not torch.strided or not grad.is_contiguous() or grad.numel() != slot.numel:
                self._reject_grad(group_index, index, param, grad)
            active.append((index, slot, grad))
        if not active:
            return

        # Note [step bank]: every state["step"] of a group is a 0-dim view into one float32 tensor, so one
        # add_ advances all of them (1000 separate scalar increments cost ~1.5 ms a step). The views keep torch's
        # state_dict layout: each parameter still has its own "step" tensor.
        if len(active) == len(self._bound[group_index]):
            bank.add_(1.0)
        else:
            torch._foreach_add_([slot.step for _, slot, _ in active], 1.0)
        step_values = bank.tolist()

        # One native call per (step count, gradient dtype): normally one call for the whole group. Tensors go by
        # address (see adam_step_ptrs); every one was checked above or when its slot was bound.
        batches: dict[tuple[int, torch.dtype], list[tuple[_Slot, torch.Tensor]]] = defaultdict(list)
        for index, slot, grad in active:
            batches[(int(step_values[index]), grad.dtype)].append((slot, grad))
        beta1, beta2 = group["betas"]
        for (step, grad_dtype), members in batches.items():
            if grad_dtype not in _DTYPE_NAMES:
                raise ValueError(f"CPUAdam: param_groups[{group_index}] has a {grad_dtype} gradient; "
                                 "accepted: float32, bfloat16, float16")
            _C.adam_step_ptrs(
                [slot.param_ptr for slot, _ in members],
                [grad.data_ptr() for _, grad in members],
                [slot.exp_avg_ptr for slot, _ in members],
                [slot.exp_avg_sq_ptr for slot, _ in members],
                [],
                [slot.numel for slot, _ in members],
                _DTYPE_NAMES[grad_dtype],
                "none",
                step=step,
                lr=_as_float("learning rate", group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                adamw=group["adamw"],
                bias_correction=group["bias_correction"],
                grad_scale=-grad_scale if group["maximize"] else grad_scale,
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._slots.clear()  # the loaded tensors are new objects: every slot is bound again on the next step

    def _step_bank(self, group_index: int, nparams: int) -> torch.Tensor:
        bank = self._banks.get(group_index)
        if bank is None or bank.numel() < nparams:  # new group, or params were appended to it
            bank = torch.zeros(nparams, dtype=torch.float32)
            self._banks[group_index] = bank
            self._bound[group_index] = set()
            self._slots.clear()
        return bank

    def _bind_slot(
        self, group_index: int, index: int, param: torch.Tensor, state: dict[str, Any], bank: torch.Tensor
    ) -> _Slot:
        """Checks a parameter and its state once, creating the state on first use, and caches the result."""
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
        step_view = bank[index]  # see Note [step bank]
        if state["step"] is not step_view:
            step_view.fill_(_as_float("step", state["step"]))
            state["step"] = step_view
        self._bound[group_index].add(index)
        slot = _Slot(
            step=step_view,
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
    def _reject_grad(group_index: int, index: int, param: torch.Tensor, grad: torch.Tensor) -> None:
        where = f"CPUAdam: param_groups[{group_index}]['params'][{index}]"
        if grad.layout is not torch.strided:
            raise ValueError(f"{where} has a {grad.layout} gradient; CPUAdam supports dense gradients only")
        if grad.numel() != param.numel():
            raise ValueError(f"{where} has {param.numel()} elements but its gradient {grad.numel()}")
        raise ValueError(f"{where}: the gradient is not contiguous; CPUAdam never copies tensors behind your back")
