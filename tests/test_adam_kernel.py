"""The native Adam/AdamW kernel: every SIMD variant against the scalar reference and plain torch, the fused
low-precision copy, threading, and the checks at the boundary."""

import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from adam_reference import HYPER, kernel_step, make_state, torch_adam_step
from offload import _C, native

VARIANTS = ["scalar", "avx2", "avx512"]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOWP_DTYPES = [None, torch.bfloat16, torch.float16]


def run_variant(variant, n, grad_dtype, lowp_dtype, **overrides):
    native.force_simd_variant(variant)
    p, g, m, v = make_state(n, grad_dtype)
    lowp = None if lowp_dtype is None else torch.empty(n, dtype=lowp_dtype)
    hyper = dict(HYPER, step=3, **overrides)
    kernel_step(p, g, m, v, lowp, **hyper)
    return p, m, v, lowp


def test_widest_variant_is_picked_by_default():
    out = subprocess.run(
        [sys.executable, "-c", "from offload import native; print(native.simd_variant(), native.supported_simd_variants()[-1])"],
        capture_output=True, text=True, check=True, env={k: v for k, v in os.environ.items() if k != "OFFLOAD_SIMD"},
    ).stdout.split()
    assert out[0] == out[1]


def test_avx512_runs_on_this_cpu_when_it_has_avx512():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512bw " not in flags or " avx512vl " not in flags:
        pytest.skip("CPU without AVX-512 BW/VL")
    assert "avx512" in native.supported_simd_variants()


@pytest.mark.parametrize("simd_variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("lowp_dtype", LOWP_DTYPES)
@pytest.mark.parametrize("adamw", [True, False])
def test_variant_matches_scalar_bit_for_bit_on_odd_lengths(simd_variant, grad_dtype, lowp_dtype, adamw):
    # Note [bit-identical variants] in native/adam_kernel.inc: all variants evaluate the same fp32 expression.
    for n in list(range(1, 68)) + [1000, 4099]:
        got = run_variant(simd_variant, n, grad_dtype, lowp_dtype, adamw=adamw, grad_scale=0.5)
        ref = run_variant("scalar", n, grad_dtype, lowp_dtype, adamw=adamw, grad_scale=0.5)
        for a, b in zip(got, ref):
            if a is not None:
                assert torch.equal(a.view(torch.int16) if a.dtype != torch.float32 else a.view(torch.int32),
                                   b.view(torch.int16) if b.dtype != torch.float32 else b.view(torch.int32)), n


@pytest.mark.parametrize("simd_variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("adamw", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_variant_matches_torch_formula(simd_variant, grad_dtype, adamw, bias_correction):
    n = 3 * 65536 + 7
    p, g, m, v = make_state(n, grad_dtype)
    rp, rm, rv = p.clone(), m.clone(), v.clone()
    hyper = dict(HYPER, step=5, adamw=adamw, bias_correction=bias_correction, grad_scale=0.25)
    kernel_step(p, g, m, v, **hyper)
    torch_adam_step(rp, g, rm, rv, **hyper)
    # The kernel performs torch's operations in torch's order: the moments are the same bits. The parameters
    # differ by at most an ulp here and there, because torch's vectorised sqrt (SLEEF) is not always correctly
    # rounded and the kernel's (the hardware's) is.
    assert torch.equal(m, rm) and torch.equal(v, rv)
    assert (p != rp).float().mean() < 0.01
    assert ((p - rp).abs() <= 2 * torch.finfo(torch.float32).eps * rp.abs() + 1e-7).all()


@pytest.mark.slow
@pytest.mark.parametrize("simd_variant", VARIANTS, indirect=True)
def test_large_span_matches_scalar(simd_variant):
    n = 10_000_019
    got = run_variant(simd_variant, n, torch.bfloat16, torch.bfloat16)
    ref = run_variant("scalar", n, torch.bfloat16, torch.bfloat16)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("simd_variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("lowp_dtype", [torch.bfloat16, torch.float16])
def test_fused_copy_equals_torch_cast_bit_for_bit(simd_variant, lowp_dtype):
    # Values across the whole fp32 range, fp16 and bf16 subnormals, overflow to inf, ties: the fused write must
    # round exactly as p.to(dtype) does. With lr = 0 and no decay the update leaves p unchanged.
    gen = torch.Generator().manual_seed(1)
    mags = torch.cat([
        torch.randn(20000, generator=gen),
        torch.randn(20000, generator=gen) * 1e-6,
        torch.randn(20000, generator=gen) * 6e-8,     # fp16 subnormals
        torch.randn(20000, generator=gen) * 1e-39,    # fp32 / bf16 subnormals
        torch.randn(20000, generator=gen) * 7e4,      # around fp16 max 65504 (overflow to inf)
        torch.randn(20000, generator=gen) * 1e30,
        torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65520.0, 65519.99, 1.0 + 2**-8, 1.0 + 3 * 2**-8]),
    ])
    # Exact ties for bf16 rounding (low 16 bits = 0x8000), both signs, finite exponents only (NaN is tested apart:
    # torch itself writes different NaN patterns from its scalar and vector paths).
    high = torch.randint(0, 0x7F80, (2000,), generator=gen, dtype=torch.int32) | (torch.arange(2000) % 2 << 15)
    ties = (high << 16 | 0x8000).view(torch.float32)
    p = torch.cat([mags, ties]).contiguous()
    n = p.numel()
    g, m, v = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    expected = p.to(lowp_dtype)
    # An aligned destination takes the streaming-store path, one offset by an element the ordinary stores
    # (Note [streaming the low-precision copy]); both must write the same bits.
    for lowp in (torch.empty(n, dtype=lowp_dtype), torch.empty(n + 1, dtype=lowp_dtype)[1:]):
        _C.adam_step(p, g, m, v, lowp, step=1, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        assert torch.equal(lowp.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("simd_variant", VARIANTS, indirect=True)
def test_nan_parameters_give_quiet_nan_copies(simd_variant):
    # NaNs whose naive rounding would carry into the sign or exponent (0xFFFFFFFF -> +0.0) or lose the NaN
    # (0x7F800001 -> inf): bf16 must be exactly the canonical 0x7FC0; fp16 a quiet NaN, same bits everywhere.
    patterns = [0x7FC00000, 0xFFFFFFFF, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFC00000, 0x7FBFFFFF] * 5
    nan_bits = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in patterns], dtype=torch.int32)
    p = nan_bits.view(torch.float32).clone()
    n = p.numel()
    g, m, v = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    bf16 = torch.zeros(n, dtype=torch.bfloat16)
    _C.adam_step(p, g, m, v, bf16, step=1, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    assert (bf16.view(torch.int16) == 0x7FC0).all()
    f16 = torch.zeros(n, dtype=torch.float16)
    _C.adam_step(p, g, m, v, f16, step=1, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    assert torch.isnan(f16.float()).all()
    assert ((f16.view(torch.int16) & 0x0200) != 0).all()  # quiet
    native.force_simd_variant("scalar")
    f16_scalar = torch.zeros(n, dtype=torch.float16)
    _C.adam_step(p, g, m, v, f16_scalar, step=1, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    assert torch.equal(f16.view(torch.int16), f16_scalar.view(torch.int16))


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_result_does_not_depend_on_thread_count(kernel_threads, threads, grad_dtype):
    n = 1_000_003
    ref = make_state(n, grad_dtype)
    ref_copy = torch.empty(n, dtype=torch.bfloat16)
    kernel_threads(1)
    kernel_step(*ref, ref_copy, **HYPER, step=2)
    got = make_state(n, grad_dtype)
    got_copy = torch.empty(n, dtype=torch.bfloat16)
    kernel_threads(threads)
    assert native.num_threads() == threads
    kernel_step(*got, got_copy, **HYPER, step=2)
    for a, b in zip(got + (got_copy,), ref + (ref_copy,)):
        assert torch.equal(a, b)


def test_workers_use_the_callers_flush_denormal_mode(kernel_threads):
    # With flush-to-zero on the calling thread only, worker threads must flush too, or results would depend on
    # which thread updated an element. Gradients of ~1e-20 from zero state make v = (1 - b2) g^2 ~ 1e-43, a
    # denormal that FTZ flushes to zero.
    def tiny_state():
        p, g, m, v = make_state(n)
        g.mul_(1e-19)
        m.zero_()
        v.zero_()
        return p, g, m, v

    n = 1_000_000
    kernel_threads(2)
    kernel_step(*make_state(n), step=1, **HYPER)  # start the workers first: new threads inherit the mode
    torch.set_flush_denormal(True)
    try:
        a = tiny_state()
        kernel_step(*a, step=1, **HYPER)
        kernel_threads(1)
        b = tiny_state()
        kernel_step(*b, step=1, **HYPER)
    finally:
        torch.set_flush_denormal(False)
    assert (b[3] == 0).all()  # flushed on the calling thread
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_many_spans_match_one_span_each(kernel_threads):
    kernel_threads(2)
    sizes = [1, 17, 64, 65, 0, 100_000, 3, 40_000, 70_001]
    many = [make_state(n, seed=i) for i, n in enumerate(sizes)]
    single = [make_state(n, seed=i) for i, n in enumerate(sizes)]
    _C.adam_step_ptrs([s[0].data_ptr() for s in many], [s[1].data_ptr() for s in many],
                      [s[2].data_ptr() for s in many], [s[3].data_ptr() for s in many], [], sizes,
                      "float32", "none", step=4, **HYPER)
    for s in single:
        if s[0].numel():
            kernel_step(*s, step=4, **HYPER)
    for a, b in zip(many, single):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def _numpy_state(n):
    # numpy, not torch: torch's own OpenMP pool is not usable in a forked child, and that is not what we test.
    rng = np.random.default_rng(0)
    return [rng.standard_normal(n, dtype=np.float32) for _ in range(2)] + [np.zeros(n, np.float32), np.zeros(n, np.float32)]


def _step_in_child(queue):
    p, g, m, v = _numpy_state(200_000)
    kernel_step(p, g, m, v, step=1, **HYPER)
    queue.put(p.tobytes())


def test_kernel_works_in_a_forked_child(kernel_threads):
    kernel_threads(2)
    kernel_step(*make_state(200_000), step=1, **HYPER)  # the parent's pool is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_step_in_child, args=(queue,))
    child.start()
    from_child = queue.get(timeout=60)  # before join(): the child cannot exit while its queue holds data
    child.join(timeout=60)
    assert child.exitcode == 0
    p, g, m, v = _numpy_state(200_000)
    kernel_step(p, g, m, v, step=1, **HYPER)
    assert from_child == p.tobytes()


# --- the boundary: bad input is rejected with a message naming the argument, and nothing is modified ---------


def _call(p, g, m, v, lowp=None, **over):
    kernel_step(p, g, m, v, lowp, **{**HYPER, "step": 1, **over})


def test_rejects_non_contiguous():
    p, g, m, v = make_state(64)
    before = p.clone()
    with pytest.raises(ValueError, match="'grad' must be C-contiguous"):
        _call(p, torch.randn(128)[::2], m, v)
    assert torch.equal(p, before)


def test_rejects_wrong_dtypes():
    p, g, m, v = make_state(64)
    with pytest.raises(ValueError, match="'param' must be float32; got float64"):
        _call(p.double(), g, m, v)
    with pytest.raises(ValueError, match="'exp_avg_sq' must be float32; got bfloat16"):
        _call(p, g, m, v.bfloat16())
    with pytest.raises(ValueError, match="'grad' must be float32, bfloat16 or float16; got float64"):
        _call(p, g.double(), m, v)
    with pytest.raises(ValueError, match="'param_lowp' must be bfloat16 or float16; got float32"):
        _call(p, g, m, v, torch.empty(64))


def test_rejects_length_mismatch():
    p, g, m, v = make_state(64)
    with pytest.raises(ValueError, match="'exp_avg' has 63 elements but 'param' has 64"):
        _call(p, g, m[:63], v)
    with pytest.raises(ValueError, match="'param_lowp' has 65 elements"):
        _call(p, g, m, v, torch.empty(65, dtype=torch.bfloat16))


def test_rejects_overlap():
    p, g, m, v = make_state(64)
    with pytest.raises(ValueError, match="overlaps"):
        _call(p, g, p, v)
    big = torch.zeros(100)
    with pytest.raises(ValueError, match="overlaps"):
        _call(p, g, big[:64], big[36:])


def test_rejects_misaligned_buffer():
    raw = np.zeros(4 * 64 + 1, dtype=np.uint8)
    misaligned = np.frombuffer(raw.data, dtype=np.float32, count=64, offset=1)
    p, g, m, v = make_state(64)
    with pytest.raises(ValueError, match="'grad' data pointer is not aligned to its 4-byte element size"):
        _call(p, misaligned, m, v)


def test_rejects_bad_hyper_parameters():
    p, g, m, v = make_state(8)
    for over, field in (({"step": 0}, "step"), ({"beta1": 1.0}, "beta1"), ({"beta2": -0.1}, "beta2"),
                        ({"lr": -1.0}, "lr"), ({"eps": float("nan")}, "eps"), ({"weight_decay": -1.0}, "weight_decay"),
                        ({"grad_scale": float("inf")}, "grad_scale")):
        with pytest.raises(ValueError, match=f"adam_step: {field} "):
            _call(p, g, m, v, **over)


def test_ptrs_entry_rejects_bad_tables():
    p, g, m, v = make_state(64)
    ptrs = [[t.data_ptr()] for t in (p, g, m, v)]
    with pytest.raises(ValueError, match="'grads' has 2 entries but 'numels' has 1"):
        _C.adam_step_ptrs(ptrs[0], ptrs[1] * 2, ptrs[2], ptrs[3], [], [64], "float32", "none", step=1, **HYPER)
    with pytest.raises(ValueError, match=r"'exp_avgs\[0\]' is a null pointer"):
        _C.adam_step_ptrs(ptrs[0], ptrs[1], [0], ptrs[3], [], [64], "float32", "none", step=1, **HYPER)
    with pytest.raises(ValueError, match=r"'params\[0\]' is not aligned"):
        _C.adam_step_ptrs([ptrs[0][0] + 2], ptrs[1], ptrs[2], ptrs[3], [], [63], "float32", "none", step=1, **HYPER)
    with pytest.raises(ValueError, match="overlaps"):
        _C.adam_step_ptrs(ptrs[0] * 2, ptrs[1] * 2, ptrs[2] * 2, ptrs[3] * 2, [], [64, 64], "float32", "none",
                          step=1, **HYPER)
    with pytest.raises(ValueError, match=r"'params\[0\]' with 4611686018427387904 elements overflows"):
        _C.adam_step_ptrs(*ptrs, [], [2**62], "float32", "none", step=1, **HYPER)
    with pytest.raises(ValueError, match="grad_dtype 'float64' is not one of"):
        _C.adam_step_ptrs(*ptrs, [], [64], "float64", "none", step=1, **HYPER)


def test_force_unknown_variant_raises():
    with pytest.raises(ValueError, match="not one of: scalar, avx2, avx512"):
        native.force_simd_variant("sse9")


def test_force_unsupported_variant_raises():
    unsupported = [v for v in VARIANTS if v not in native.supported_simd_variants()]
    if not unsupported:
        pytest.skip("this CPU runs every variant")
    with pytest.raises(RuntimeError, match="not supported by this CPU"):
        native.force_simd_variant(unsupported[0])


def test_read_only_gradients_are_accepted():
    p, g, m, v = (t.numpy() for t in make_state(64))
    g.setflags(write=False)
    _C.adam_step(p, g, m, v, step=1, **HYPER)


def test_env_var_forces_variant_and_rejects_bad_values():
    code = "from offload import native; print(native.simd_variant())"
    env = dict(os.environ, OFFLOAD_SIMD="scalar")
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "scalar"
    env["OFFLOAD_SIMD"] = "fastest"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "OFFLOAD_SIMD='fastest' is not one of: scalar, avx2, avx512" in out.stderr


def test_bad_thread_counts_raise():
    for bad in (0, 4097):
        with pytest.raises(ValueError, match="nthreads must be between 1 and 4096"):
            native.set_num_threads(bad)
    code = "from offload import native; native.num_threads()"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, OFFLOAD_NUM_THREADS="two"),
                         capture_output=True, text=True)
    assert out.returncode != 0 and "OFFLOAD_NUM_THREADS='two'" in out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to build a GPU tensor")
def test_rejects_gpu_tensors():
    p, g, m, v = make_state(64)
    with pytest.raises(ValueError, match="'grad' must be a CPU buffer"):
        _call(p, g.cuda(), m, v)
