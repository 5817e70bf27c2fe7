import pytest

from offload import native


@pytest.fixture
def simd_variant(request):
    """Forces the SIMD variant given by indirect parametrisation; restores the previous one afterwards."""
    previous = native.simd_variant()
    name = request.param
    if name not in native.supported_simd_variants():
        pytest.skip(f"this CPU cannot run the {name} variant")
    native.force_simd_variant(name)
    yield name
    native.force_simd_variant(previous)


@pytest.fixture
def kernel_threads():
    """Lets a test change the kernel thread count; restores it afterwards."""
    previous = native.num_threads()
    yield native.set_num_threads
    native.set_num_threads(previous)
