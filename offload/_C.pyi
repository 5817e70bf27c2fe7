"""Private native core of offload. Buffers are DLPack-capable CPU arrays (torch tensors, numpy arrays) or,
for adam_step_ptrs, addresses.

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

def adam_step_ptrs(
    params: Sequence[int],
    grads: Sequence[int],
    exp_avgs: Sequence[int],
    exp_avg_sqs: Sequence[int],
    param_lowps: Sequence[int],
    numels: Sequence[int],
    grad_dtype: str,
    lowp_dtype: str,
    **hyper: float | int | bool,
) -> None:
    """:func:`adam_step` over many tensors given by address (``data_ptr()``), with shared hyper-parameters
    (the keyword arguments of :func:`adam_step`), one ``grad_dtype`` ("float32", "bfloat16", "float16") and
    one ``lowp_dtype`` ("none", "bfloat16", "float16"; ``param_lowps`` is empty for "none"). Trusted caller:
    it must have checked that every tensor is a contiguous CPU tensor of that dtype with ``numels[i]``
    elements. This call checks counts, null pointers, alignment and overlap between any two buffers."""

def accumulate_grad(accum: Buffer, grad: Buffer, *, overwrite: bool = False) -> float:
    """``accum`` (fp32) = ``grad`` if ``overwrite`` else ``accum + grad`` (``grad`` fp32, bf16 or fp16, the same
    number of elements), in place, in one pass over both; returns the sum of squares of the new ``accum`` in
    double, summed in an order fixed by the element positions (the same bits for every SIMD variant and thread
    count)."""

def simd_variant() -> str: ...
def supported_simd_variants() -> list[str]: ...
def force_simd_variant(name: str) -> None: ...
def num_threads() -> int: ...
def set_num_threads(nthreads: int) -> None: ...
def protect_pages(address: int, nbytes: int, writable: bool) -> None: ...
