"""The native I/O engine: round trips, O_DIRECT, concurrency, and faults that must never pass silently."""

import errno
import os

import pytest
import torch

from offload import _C
from offload.config import IOConfig
from offload.errors import ConfigError
from offload.storage.host_pool import HostPool
from offload.storage.io_engine import IoEngine

KiB, MiB = 1 << 10, 1 << 20


def random_bytes(n, seed=0):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


URING = bool(_C.uring_available())


@pytest.fixture(params=["threads", pytest.param("io_uring", marks=pytest.mark.skipif(
    not URING, reason="this kernel refuses io_uring"))])
def engine(request):
    """Every test runs on both backends: 4 transfers in flight (threads: 4 more queued behind them)."""
    engine = IoEngine(IOConfig(block_size="64KiB", queue_depth=2, threads=2, backend=request.param))
    assert engine.backend == request.param
    yield engine
    engine.close()


@pytest.fixture
def scratch(tmp_path):
    path = tmp_path / "swap.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    yield fd, str(path)
    os.close(fd)


def open_direct(path):
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip(f"{path}: this filesystem refuses O_DIRECT")
        raise


def test_round_trip_at_odd_sizes_and_offsets(engine, scratch):
    fd, path = scratch
    cases = [(1, 0), (4095, 3), (4097, 10_001), (3 * 64 * KiB + 5, 777_777)]
    for i, (n, offset) in enumerate(cases):
        data = random_bytes(n, seed=i)
        engine.wait(engine.write(fd, offset, data, path))
        back = torch.empty(n, dtype=torch.uint8)
        engine.wait(engine.read(fd, offset, back, path))
        assert torch.equal(back, data), (n, offset)


def test_typed_buffers_move_their_bytes(engine, scratch):
    fd, path = scratch
    data = torch.randn(10_000)
    engine.wait(engine.write(fd, 0, data, path))
    back = torch.empty(10_000)
    engine.wait(engine.read(fd, 0, back, path))
    assert torch.equal(back, data)


def test_direct_io_round_trip_with_pool_buffers(engine, tmp_path):
    path = str(tmp_path / "direct.bin")
    fd = open_direct(path)
    try:
        pool = HostPool()
        out, back = pool.allocate(MiB + 64 * KiB, "out"), pool.allocate(MiB + 64 * KiB, "back")
        out.tensor.copy_(random_bytes(out.nbytes))
        engine.wait(engine.write(fd, 8 * KiB, out.tensor, path))
        engine.wait(engine.read(fd, 8 * KiB, back.tensor, path))
        assert torch.equal(back.tensor, out.tensor)
        with pytest.raises(ValueError, match="O_DIRECT, so the offset must be a multiple of 4096; got 100"):
            engine.read(fd, 100, back.tensor, path)
        with pytest.raises(ValueError, match="O_DIRECT, so the length must be a multiple of 4096"):
            engine.read(fd, 0, back.tensor[:5000], path)
    finally:
        os.close(fd)


def test_many_concurrent_requests_with_back_pressure(engine, scratch):
    fd, path = scratch
    chunks = [random_bytes(100 * KiB + i, seed=i) for i in range(64)]
    offsets = [i * 128 * KiB for i in range(64)]
    handles = [engine.write(fd, o, c, path) for o, c in zip(offsets, chunks)]  # 2 blocks each, queue of 4
    for h in handles:
        engine.wait(h)
    backs = [torch.empty_like(c) for c in chunks]
    for o, b in zip(offsets, backs):
        engine.read(fd, o, b, path)
    engine.wait_all()
    for b, c in zip(backs, chunks):
        assert torch.equal(b, c)


def test_injected_eio_is_raised_with_errno_path_and_offset(engine, scratch):
    fd, path = scratch
    good = random_bytes(256 * KiB)
    engine.wait(engine.write(fd, 0, good, path))
    _C.inject_io_fault("eio", 1)
    back = torch.empty(256 * KiB, dtype=torch.uint8)
    with pytest.raises(OSError) as info:
        engine.wait(engine.read(fd, 0, back, path))
    assert info.value.errno == errno.EIO
    assert info.value.filename == path
    assert "read of" in str(info.value) and "at offset" in str(info.value)
    engine.wait(engine.read(fd, 0, back, path))  # the engine and the data are fine afterwards
    assert torch.equal(back, good)


def test_injected_short_transfers_are_completed(engine, scratch):
    fd, path = scratch
    data = random_bytes(512 * KiB)
    _C.inject_io_fault("short", 2)
    engine.wait(engine.write(fd, 0, data, path))
    _C.inject_io_fault("short", 1)
    back = torch.empty_like(data)
    engine.wait(engine.read(fd, 0, back, path))
    assert torch.equal(back, data)


def test_reading_past_the_end_is_an_error(engine, scratch):
    fd, path = scratch
    engine.wait(engine.write(fd, 0, random_bytes(1000), path))
    with pytest.raises(OSError, match="unexpected end of file"):
        engine.wait(engine.read(fd, 0, torch.empty(5000, dtype=torch.uint8), path))


def test_writing_to_a_read_only_descriptor_names_the_file(engine, tmp_path):
    path = tmp_path / "ro.bin"
    path.write_bytes(b"x" * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            engine.wait(engine.write(fd, 0, random_bytes(10), str(path)))
        assert info.value.errno == errno.EBADF and info.value.filename == str(path)
    finally:
        os.close(fd)


def test_wait_all_waits_for_everything_then_raises_the_failure(engine, scratch):
    fd, path = scratch
    data = [random_bytes(64 * KiB, seed=i) for i in range(8)]
    _C.inject_io_fault("eio", 3)
    handles = [engine.write(fd, i * 64 * KiB, d, path) for i, d in enumerate(data)]
    with pytest.raises(OSError):
        engine.wait_all()
    assert all(engine_done(engine, h) for h in handles)


def engine_done(engine, handle):
    try:
        engine.poll(handle)
    except ValueError:  # already waited for by wait_all: forgotten
        return True
    return False


def test_unknown_handle_raises(engine, scratch):
    fd, path = scratch
    h = engine.write(fd, 0, random_bytes(10), path)
    engine.wait(h)
    with pytest.raises(ValueError, match="unknown or already waited-for handle"):
        engine.wait(h)


def test_full_disk_gives_enospc_and_keeps_earlier_data(engine, tiny_tmpfs):
    path = str(tiny_tmpfs / "swap.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        first = random_bytes(256 * KiB)
        engine.wait(engine.write(fd, 0, first, path))
        with pytest.raises(OSError) as info:
            engine.wait(engine.write(fd, 256 * KiB, random_bytes(2 * MiB), path))
        assert info.value.errno == errno.ENOSPC and info.value.filename == path
        back = torch.empty_like(first)
        engine.wait(engine.read(fd, 0, back, path))
        assert torch.equal(back, first)
    finally:
        os.close(fd)


def test_io_config_is_validated_with_field_names():
    assert IOConfig(block_size="1MiB").block_size == MiB
    for kwargs, message in (
        (dict(block_size="8MiBs"), r"io.block_size: .* \(did you mean '8MiB'\?\)"),
        (dict(block_size=1000), "io.block_size: must be a positive multiple of 4 KiB"),
        (dict(queue_depth=0), "io.queue_depth: must be an integer from 1 to 256"),
        (dict(threads=16, queue_depth=32), r"at most 256 transfers in flight; got 16 x 32 = 512"),
        (dict(threads=1.5), "io.threads: must be an integer from 1 to 256"),
        (dict(direct="auot"), r"io.direct: 'auot' is not one of 'auto', True, False \(did you mean 'auto'\?\)"),
        (dict(backend="uring"), r"io.backend: 'uring' is not one of 'auto', 'io_uring', 'threads' \(did you mean "
                                r"'io_uring'\?\)"),
    ):
        with pytest.raises(ConfigError, match=message):
            IOConfig(**kwargs)


def test_auto_backend_is_io_uring_where_the_kernel_allows_it():
    assert IoEngine(IOConfig()).backend == ("io_uring" if URING else "threads")
    assert IoEngine(IOConfig(backend="threads")).backend == "threads"


@pytest.mark.skipif(not URING, reason="this kernel refuses io_uring")
def test_io_uring_keeps_many_requests_in_flight_from_several_threads(tmp_path):
    """Submitters on several threads share one ring; a ring shallower than the requests' blocks makes them
    wait for slots, and every byte still lands where it belongs."""
    import threading

    engine = IoEngine(IOConfig(block_size="4KiB", queue_depth=1, threads=2, backend="io_uring"))
    fds = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(4)]
    data = [random_bytes(256 * KiB + 4096 * i, seed=i) for i in range(4)]
    errors = []

    def round_trip(i):
        try:
            back = torch.zeros_like(data[i])
            engine.wait(engine.write(fds[i], 8192, data[i], f"f{i}"))
            engine.wait(engine.read(fds[i], 8192, back, f"f{i}"))
            assert torch.equal(back, data[i])
        except BaseException as e:  # reported below: an assertion in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=round_trip, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    for fd in fds:
        os.close(fd)
    assert not errors, errors
