"""Process-wide controls of the native kernels: SIMD variant and thread count.

The kernels pick the widest SIMD variant the CPU supports (AVX-512, AVX2, or scalar) on first use. Set
``OFFLOAD_SIMD=scalar|avx2|avx512`` before the first call, or call :func:`force_simd_variant`, to choose one;
``OFFLOAD_NUM_THREADS`` or :func:`set_num_threads` sets how many threads each call may use (default: the CPUs
this process may run on).
"""

from __future__ import annotations

from offload import _C


def simd_variant() -> str:
    """The variant the kernels use now: ``"scalar"``, ``"avx2"`` or ``"avx512"``."""
    return _C.simd_variant()


def supported_simd_variants() -> list[str]:
    """The variants this CPU and this build can run, narrowest first."""
    return list(_C.supported_simd_variants())


def force_simd_variant(name: str) -> None:
    """Make every later kernel call use ``name``. Raises ``ValueError`` for an unknown name and
    ``RuntimeError`` for a variant this CPU cannot run."""
    _C.force_simd_variant(name)


def num_threads() -> int:
    """Threads, including the caller, that each kernel call may use."""
    return _C.num_threads()


def set_num_threads(nthreads: int) -> None:
    """Set the kernel thread count (>= 1, including the calling thread). Takes effect on the next call."""
    _C.set_num_threads(int(nthreads))
