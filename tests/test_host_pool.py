"""HostPool: alignment, exact sizes, the budget, reuse, and memory that is really there."""

import errno

import pytest
import torch

from offload.errors import MemoryBudgetError
from offload.storage import host_pool
from offload.storage.host_pool import PAGE, HostPool

MiB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def test_buffers_are_page_aligned_exact_and_writable():
    pool = HostPool()
    for nbytes in (1, 4095, 4096, 4097, 3 * MiB + 5):
        buf = pool.allocate(nbytes, name=f"b{nbytes}")
        assert buf.address % PAGE == 0
        assert buf.tensor.numel() == nbytes and buf.tensor.dtype == torch.uint8
        buf.tensor.fill_(7)
        assert int(buf.tensor[-1]) == 7
    assert pool.stats().in_use == sum(HostPool.mapped_size(n) for n in (1, 4095, 4096, 4097, 3 * MiB + 5))


def test_views_reinterpret_the_same_memory():
    pool = HostPool()
    buf = pool.allocate(4 * 1024, name="fp32")
    buf.view(torch.float32).fill_(1.5)
    assert torch.equal(buf.view(torch.float32), torch.full((1024,), 1.5))


def test_budget_is_enforced_with_a_clear_error():
    pool = HostPool(limit_bytes=MiB)
    pool.allocate(600 * 1024, name="first")
    with pytest.raises(MemoryBudgetError, match="host buffer 'second'.*raise host_memory_limit") as info:
        pool.allocate(600 * 1024, name="second")
    assert info.value.needed == 600 * 1024 and info.value.available == MiB - 600 * 1024
    assert info.value.setting == "host_memory_limit"
    assert pool.stats().in_use == 600 * 1024  # the failed request took nothing


def test_released_buffers_are_reused_by_size_and_dropped_when_space_is_needed():
    pool = HostPool(limit_bytes=MiB)
    a = pool.allocate(512 * 1024, name="a")
    address = a.address
    pool.release(a)
    assert pool.stats().cached == 512 * 1024 and pool.stats().in_use == 0
    b = pool.allocate(512 * 1024, name="b")
    assert b.address == address  # same mapping handed out again
    pool.release(b)
    c = pool.allocate(800 * 1024, name="c")  # does not fit beside the kept 512 KiB: it is dropped first
    assert pool.stats().cached == 0 and pool.stats().in_use == 800 * 1024
    assert pool.stats().peak == 800 * 1024
    pool.release(c)
    assert pool.trim() == 800 * 1024


def test_release_of_a_foreign_or_released_buffer_raises():
    pool, other = HostPool(), HostPool()
    buf = pool.allocate(100, name="x")
    with pytest.raises(ValueError, match="not in use in this pool"):
        other.release(buf)
    pool.release(buf)
    with pytest.raises(ValueError, match="not in use in this pool"):
        pool.release(buf)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="nbytes must be > 0"):
        HostPool().allocate(0, name="empty")
    with pytest.raises(ValueError, match="limit_bytes must be >= 0"):
        HostPool(limit_bytes=-1)


def test_memory_is_faulted_in_when_allocated():
    pool = HostPool()
    before = rss_bytes()
    buf = pool.allocate(64 * MiB, name="big")
    assert rss_bytes() - before >= 60 * MiB  # resident now, not at first touch
    pool.release(buf)
    pool.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs CUDA")
def test_buffers_are_page_locked_when_cuda_is_available():
    pool = HostPool()
    buf = pool.allocate(3 * MiB + 17, name="pinned")
    assert buf.pinned and buf.tensor.is_pinned()
    pool.close()


def test_large_buffers_are_faulted_in_by_slices_in_threads(monkeypatch):
    monkeypatch.setattr(host_pool, "_POPULATE_SLICE", 1 * MiB)
    monkeypatch.setattr(host_pool, "_POPULATE_THREADS", 3)
    calls = []
    real = host_pool._madvise_populate
    monkeypatch.setattr(host_pool, "_madvise_populate", lambda address, n: calls.append((address, n)) or real(address, n))
    pool = HostPool(pin=False)
    before = rss_bytes()
    buf = pool.allocate(10 * MiB + 100, name="sliced")
    assert rss_bytes() - before >= 9 * MiB
    base = buf.tensor.data_ptr()
    assert sorted(calls) == [(base + k * MiB, MiB) for k in range(10)] + [(base + 10 * MiB, 4096)]
    assert int(buf.tensor.sum()) == 0
    pool.close()


@pytest.mark.parametrize("code, error", [(errno.ENOMEM, MemoryBudgetError), (errno.EPERM, OSError)])
def test_a_failed_fault_in_raises_a_clear_error(monkeypatch, code, error):
    monkeypatch.setattr(host_pool, "_madvise_populate", lambda address, n: code)
    pool = HostPool(pin=False)
    with pytest.raises(error, match="faulting in 8192 bytes of host memory"):
        pool.allocate(8192, name="refused")
    assert pool.stats().in_use == 0
    pool.close()


def test_a_kernel_without_populate_write_touches_every_page(monkeypatch):
    monkeypatch.setattr(host_pool, "_madvise_populate", lambda address, n: errno.EINVAL)
    pool = HostPool(pin=False)
    before = rss_bytes()
    buf = pool.allocate(16 * MiB, name="touched")
    assert rss_bytes() - before >= 15 * MiB
    pool.close()
    del buf
