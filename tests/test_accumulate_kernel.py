"""The native gradient accumulation (accum = [accum +] grad, and the sum of squares of the result): every SIMD
variant and thread count against torch, the fixed summation order, and the checks at the boundary."""

import pytest
import torch

from offload import _C, native

GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 15, 16, 1023, 1024, 1025, 70_001, 300_007]


@pytest.fixture(autouse=True)
def restore_kernel_settings():
    variant, threads = native.simd_variant(), native.num_threads()
    yield
    native.force_simd_variant(variant)
    native.set_num_threads(threads)


def settings():
    return [(v, t) for v in native.supported_simd_variants() for t in (1, 2, 3)]


@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_sum_equals_torch_and_squares_are_the_same_bits_everywhere(grad_dtype, n):
    gen = torch.Generator().manual_seed(n)
    accum0 = torch.randn(n, generator=gen)
    grad = (torch.randn(n, generator=gen) * 3).to(grad_dtype)
    expected = accum0 + grad.float()  # torch widens and adds in fp32: one rounding, as the kernel
    sums = set()
    for variant, threads in settings():
        native.force_simd_variant(variant)
        native.set_num_threads(threads)
        accum = accum0.clone()
        sums.add(_C.accumulate_grad(accum, grad))
        assert torch.equal(accum, expected), (variant, threads)
    assert len(sums) == 1, f"the sum of squares depends on the variant or thread count: {sums}"
    exact = expected.double().square().sum().item()
    assert sums.pop() == pytest.approx(exact, rel=1e-6, abs=0.0)


@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_overwrite_copies_the_widened_gradient(grad_dtype):
    grad = torch.randn(5000).to(grad_dtype)
    accum = torch.full((5000,), 7.0)
    squares = _C.accumulate_grad(accum, grad, overwrite=True)
    assert torch.equal(accum, grad.float())
    assert squares == pytest.approx(grad.double().square().sum().item(), rel=1e-6)


def test_shapes_may_differ_but_not_the_element_count():
    accum, grad = torch.zeros(4, 6), torch.ones(24, dtype=torch.bfloat16)
    assert _C.accumulate_grad(accum, grad) == 24.0
    assert torch.equal(accum, torch.ones(4, 6))
    with pytest.raises(ValueError, match="accumulate_grad: 'grad' has 23 elements but 'accum' has 24"):
        _C.accumulate_grad(accum, torch.ones(23))


def test_non_finite_values_pass_through():
    accum = torch.tensor([1.0, float("inf"), 0.0, 2.0])
    grad = torch.tensor([float("nan"), 1.0, float("-inf"), 1.0], dtype=torch.bfloat16)
    squares = _C.accumulate_grad(accum, grad)
    assert torch.isnan(accum[0]) and accum[1] == float("inf") and accum[2] == float("-inf") and accum[3] == 3.0
    assert squares != squares  # NaN: the caller's non-finite check sees it


@pytest.mark.parametrize("accum, grad, message", [
    (torch.zeros(8, dtype=torch.float64), torch.zeros(8), "'accum'"),
    (torch.zeros(8), torch.zeros(8, dtype=torch.int32), "'grad'"),
    (torch.zeros(8, 2).t(), torch.zeros(16), "'accum' must be C-contiguous"),
])
def test_bad_buffers_are_rejected_naming_the_argument(accum, grad, message):
    with pytest.raises(ValueError, match=message):
        _C.accumulate_grad(accum, grad)


def test_overlapping_buffers_are_rejected():
    flat = torch.zeros(64)
    with pytest.raises(ValueError, match="overlap"):
        _C.accumulate_grad(flat[:32], flat[16:48])
