"""Private native core of offload. Buffers are DLPack-capable CPU arrays (torch tensors, numpy arrays).

Every buffer is checked (CPU, dtype, C-contiguous, element-aligned, equal lengths, no overlap) and rejected
with ValueError naming the argument; nothing is copied. Calls block until done and release the GIL.
"""

from typing import Any, Sequence

Buffer = Any

def adam_step(
    param: Buffer,
    grad: Buffer,
    exp_avg: Buffer,
    exp_avg_sq: Buffer,
    param_lowp: Buffer | None = None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw: bool = True,
    bias_correction: bool = True,
    grad_scale: float = 1.0,
) -> None:
    """Update fp32 ``param``, ``exp_avg``, ``exp_avg_sq`` in place from ``grad`` (fp32, bf16 or fp16), scaled
    by ``grad_scale`` first. If ``param_lowp`` (bf16 or fp16) is given, it receives the updated parameters
    rounded to nearest even, in the same pass."""

def adam_step_many(
    params: Sequence[Buffer],
    grads: Sequence[Buffer],
    exp_avgs: Sequence[Buffer],
    exp_avg_sqs: Sequence[Buffer],
    param_lowps: Sequence[Buffer] | None = None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw: bool = True,
    bias_correction: bool = True,
    grad_scale: float = 1.0,
) -> None:
    """:func:`adam_step` over many tensors with shared hyper-parameters and one gradient dtype, in one call
    split across the thread pool."""

def simd_variant() -> str: ...
def supported_simd_variants() -> list[str]: ...
def force_simd_variant(name: str) -> None: ...
def num_threads() -> int: ...
def set_num_threads(nthreads: int) -> None: ...
