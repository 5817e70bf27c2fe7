"""GroupStorage on the CPU device (Note [CPU device pages]): a fixed, page-aligned mapping whose pages go back to
the OS on release and are inaccessible until claimed again; NVMe fetches read straight into it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import psutil
import pytest
import torch

import offload
from offload import _C
from offload.schedule.device_storage import GroupStorage

MIB = 1 << 20


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_pages_come_back_to_the_os_and_the_address_stays():
    storage = GroupStorage(torch.device("cpu"), torch.bfloat16, 64 * MIB // 2)
    address = storage.address
    assert address % 4096 == 0 and storage.direct
    before = _rss()
    storage.claim()
    storage.tensor.fill_(1.5)
    filled = _rss()
    assert filled - before > 48 * MIB
    storage.give_back()
    assert filled - _rss() > 48 * MIB
    storage.claim()  # usable again, at the same address; the contents start over
    assert storage.address == address
    storage.tensor.fill_(2.0)
    assert storage.tensor[-1].item() == 2.0
    storage.give_back()
    storage.give_back()  # idempotent


def test_released_weights_fault_instead_of_reading_zeros():
    child = textwrap.dedent("""
        import torch
        from offload.schedule.device_storage import GroupStorage
        storage = GroupStorage(torch.device("cpu"), torch.float32, 1 << 16)
        storage.claim(); storage.tensor.fill_(1.0); storage.give_back()
        print("sum", storage.tensor.sum().item(), flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert result.returncode == -11, (result.returncode, result.stdout, result.stderr)  # SIGSEGV
    assert "sum" not in result.stdout


def test_protect_pages_rejects_a_range_that_is_not_whole_pages():
    storage = GroupStorage(torch.device("cpu"), torch.uint8, 8192)
    with pytest.raises(ValueError, match="page size"):
        _C.protect_pages(storage.address + 64, 4096, True)
    with pytest.raises(ValueError, match="page size"):
        _C.protect_pages(storage.address, 100, True)


def test_nvme_fetches_need_no_staging_on_the_cpu_device(tmp_path):
    """params="nvme" on the CPU device: no fetch staging buffers in the host pool (the reads land in the device
    buffers), only the two write-back slots for bf16; the weights still train like the device-resident run."""
    pytest.importorskip("transformers", reason="builds a small Llama")
    from engine_reference import batches, loss_of, tiny_llama

    data = batches("llama", 3, micro=1)
    results = []
    for params in ("device", "nvme"):
        config = offload.Config(device="cpu", dtype="bf16", params=params, nvme_dir=tmp_path)
        with offload.Engine(tiny_llama(layers=2), config, lr=1e-3) as engine:
            if params == "nvme":
                weights = engine.weights
                assert weights._fetch_slots == [] and len(weights._writeback_slots) == 2
                assert all(weights.storage_address(g) % 4096 == 0 for g in range(len(weights.groups)))
            for step in data:
                engine.backward(loss_of("llama", engine, step[0]))
                engine.step()
            results.append(engine.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
