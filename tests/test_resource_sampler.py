"""ResourceSampler: disk and CPU counters sampled into a Timeline next to the engine's spans."""

import json
import os
import time

import pytest

import offload
from offload.resource_sampler import ResourceSampler, block_device_of, read_disk_counters
from offload.timeline import NO_TIMELINE


def _counters(timeline, name):
    return [e for e in timeline.events() if e["ph"] == "C" and e["name"] == name]


def test_cpu_counter_sees_a_busy_thread(tmp_path):
    timeline = offload.Timeline()
    with timeline.sampling(interval=0.002):
        end = time.perf_counter() + 0.2
        while time.perf_counter() < end:  # one core busy
            pass
    cpu = [e["args"]["process"] for e in _counters(timeline, "CPU cores")]
    assert len(cpu) >= 10
    assert 0.5 < sorted(cpu)[len(cpu) // 2] < 1.5  # the median sample: about one core
    assert not _counters(timeline, "disk busy %")  # no path, no disk


def test_disk_counters_follow_the_device_under_the_path(tmp_path):
    device = block_device_of(tmp_path)
    timeline = offload.Timeline()
    with timeline.sampling(tmp_path, interval=0.002) as sampler:
        data = os.urandom(1 << 20)
        with open(tmp_path / "f", "wb") as f:
            for _ in range(32):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        time.sleep(0.02)
    if device is None or read_disk_counters(device) is None:
        assert sampler.disk_note is not None and str(tmp_path) in sampler.disk_note
        assert not _counters(timeline, "disk busy %")
        pytest.skip(f"{tmp_path} is not on a block device: only the note is checked")
    assert sampler.disk_note is None
    busy = _counters(timeline, "disk busy %")
    rates = _counters(timeline, "disk MB/s")
    assert busy and len(busy) == len(rates)
    assert all(0 <= e["args"]["busy"] <= 100 for e in busy)
    # the fsync'd 32 MiB reached the device while the sampler watched (other writers can only add to it)
    written = sum(e["args"]["write"] for e in rates)
    assert written > 0


def test_counters_are_saved_with_the_spans(tmp_path):
    timeline = offload.Timeline()
    with timeline.sampling(interval=0.002):
        with timeline.span("compute", "work"):
            time.sleep(0.02)
    timeline.save(tmp_path / "trace.json")
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert any(e["ph"] == "C" and e["name"] == "CPU cores" for e in events)
    assert any(e["ph"] == "X" and e["name"] == "work" for e in events)


def test_sampler_rejects_a_bad_interval_and_a_second_start():
    with pytest.raises(ValueError, match="interval"):
        ResourceSampler(offload.Timeline(), interval=0)
    sampler = ResourceSampler(offload.Timeline(), interval=0.01)
    sampler.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            sampler.start()
    finally:
        sampler.stop()


def test_no_timeline_samples_nothing():
    with NO_TIMELINE.sampling("/") as sampler:
        time.sleep(0.01)
    assert sampler is None and NO_TIMELINE.events() == []
