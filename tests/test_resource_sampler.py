"""ResourceSampler: disk and CPU counters sampled next to a Timeline's spans, and the step timeline's phases."""

import importlib.util
import json
import os
import time
from pathlib import Path

import psutil
import pytest

import offload
from offload.resource_sampler import DiskCounters, ResourceSampler, Sample, block_device_of, rates, read_disk_counters
from offload.timeline import NO_TIMELINE

SECTOR_BYTES = 512  # /proc/diskstats counts 512-byte sectors whatever the device's own sector size
DISKSTATS = """ 254       0 vda 8475569 301204 21663475322 136909206 6645196 1889788 23702996528 92233586 0 7080780 229602357
 254       1 vda1 100 0 2000 10 200 0 4000 20 0 30 40
"""
SHORT_LINE = "   7       0 loop0 1 2 3 4 5 6 7 8 9\n"


def _counters(timeline, name):
    return [e for e in timeline.events() if e["ph"] == "C" and e["name"] == name]


@pytest.fixture
def fake_proc(tmp_path, monkeypatch):
    """psutil reading a /proc whose diskstats the test writes (and its counters' wrap cache cleared around it)."""
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(tmp_path))
    psutil.disk_io_counters.cache_clear()
    yield tmp_path / "diskstats"
    psutil.disk_io_counters.cache_clear()


def test_diskstats_fields_are_the_documented_ones(fake_proc):
    fake_proc.write_text(DISKSTATS)
    assert read_disk_counters("vda") == DiskCounters(busy_ms=7080780, read_bytes=21663475322 * SECTOR_BYTES,
                                                     written_bytes=23702996528 * SECTOR_BYTES)
    assert read_disk_counters("vda1") == DiskCounters(busy_ms=30, read_bytes=2000 * SECTOR_BYTES,
                                                      written_bytes=4000 * SECTOR_BYTES)
    assert read_disk_counters("sda") is None
    fake_proc.write_text(DISKSTATS + SHORT_LINE)
    assert read_disk_counters("loop0") is None  # a line too short to hold io_ticks (psutil: no counters at all)


def test_rates_are_fractions_and_bytes_per_second():
    before = DiskCounters(busy_ms=1000, read_bytes=0, written_bytes=100 * SECTOR_BYTES)
    after = DiskCounters(busy_ms=1250, read_bytes=2048 * SECTOR_BYTES, written_bytes=(100 + 4096) * SECTOR_BYTES)
    busy, read, written = rates(before, after, 0.5)
    assert busy == pytest.approx(0.5)
    assert read == pytest.approx(2048 * SECTOR_BYTES / 0.5)
    assert written == pytest.approx(4096 * SECTOR_BYTES / 0.5)


def test_usage_interpolates_the_cumulative_counters():
    sampler = ResourceSampler(offload.Timeline())
    sampler._device = "vda"  # as if sampled: only the samples below are used
    sampler.samples = [Sample(10.0, 0.0, DiskCounters(0, 0, 0)),
                       Sample(11.0, 2.0, DiskCounters(1000, 2000 * SECTOR_BYTES, 0)),
                       Sample(12.0, 2.0, DiskCounters(1000, 2000 * SECTOR_BYTES, 4000 * SECTOR_BYTES))]
    whole = sampler.usage([(10.0, 12.0)])
    assert whole.cpu_cores == pytest.approx(1.0) and whole.disk_busy == pytest.approx(0.5)
    assert whole.read_bytes_per_s == pytest.approx(2000 * SECTOR_BYTES / 2)
    halves = sampler.usage([(10.5, 11.0), (11.0, 11.5)])  # half of each interval
    assert halves.cpu_cores == pytest.approx(1.0) and halves.disk_busy == pytest.approx(0.5)
    assert halves.write_bytes_per_s == pytest.approx(2000 * SECTOR_BYTES)
    assert sampler.usage([(5.0, 10.0)]) is None  # before the first sample
    sampler.samples[1] = Sample(11.0, 2.0, None)  # a failed read: the disk is taken from the others
    assert sampler.usage([(10.0, 12.0)]).write_bytes_per_s == pytest.approx(4000 * SECTOR_BYTES / 2)
    # a failed first read: the disk's means cover only the time it was sampled (11 to 12: busy throughout)
    sampler.samples = [Sample(10.0, 0.0, None), Sample(11.0, 1.0, DiskCounters(0, 0, 0)),
                       Sample(12.0, 2.0, DiskCounters(1000, 0, 0)), Sample(13.0, 3.0, DiskCounters(2000, 0, 0))]
    use = sampler.usage([(10.0, 12.0)])
    assert use.cpu_cores == pytest.approx(1.0) and use.disk_busy == pytest.approx(1.0)
    assert sampler.usage([(9.0, 10.5), (12.5, 14.0)]).cpu_cores == pytest.approx(1.0)  # (parts outside: dropped)


def test_a_directory_that_does_not_exist_is_a_note_not_an_error(tmp_path):
    sampler = ResourceSampler(offload.Timeline(), tmp_path / "not made yet")
    assert "not made yet" in sampler.disk_note
    with NO_TIMELINE.sampling(tmp_path / "not made yet") as quiet:
        assert quiet.disk_note is None


def test_cpu_use_of_a_busy_thread_is_one_core():
    timeline = offload.Timeline()
    with timeline.sampling(interval=0.002) as sampler:
        start, busy = time.perf_counter(), time.thread_time()
        while time.perf_counter() < start + 0.3:  # this thread busy (as much as the machine lets it)
            pass
        end, busy = time.perf_counter(), time.thread_time() - busy
    process_cpu = sampler.usage([(start, end)]).cpu_cores * (end - start)
    # the process's CPU time is this thread's plus a little for the sampler (other threads are idle)
    assert busy - 0.02 <= process_cpu <= busy + 0.1
    assert len(_counters(timeline, "CPU cores")) >= 10
    assert not _counters(timeline, "disk busy %")  # no path, no disk


def test_disk_counters_see_an_fsynced_write(tmp_path):
    device = block_device_of(tmp_path)
    timeline = offload.Timeline()
    with timeline.sampling(tmp_path, interval=0.002) as sampler:
        start = sampler.samples[0].t
        data = os.urandom(1 << 20)
        with open(tmp_path / "f", "wb") as f:
            for _ in range(32):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    if device is None or read_disk_counters(device) is None:
        assert sampler.disk_note is not None and str(tmp_path) in sampler.disk_note
        assert not _counters(timeline, "disk busy %")
        pytest.skip(f"{tmp_path} is not on a block device: only the note is checked")
    assert sampler.disk_note is None
    until = sampler.samples[-1].t  # (counters move at completion: up to the sample after the fsync)
    use = sampler.usage([(start, until)])
    # the 32 MiB reached the device meanwhile (other writers can only add to it)
    assert use.write_bytes_per_s * (until - start) >= 32 << 20
    assert 0 < use.disk_busy
    busy = _counters(timeline, "disk busy %")
    assert busy and all(0 <= e["args"]["busy"] <= 100 for e in busy)


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
    assert sampler.usage([(0.0, time.perf_counter())]) is None and NO_TIMELINE.events() == []


def _step_timeline():
    spec = importlib.util.spec_from_file_location(
        "step_timeline", Path(__file__).resolve().parents[1] / "bench" / "step_timeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_phases_split_each_forward_into_compute_and_waits():
    def span(cat, name, s, t):
        return {"ph": "X", "cat": cat, "name": name, "ts": s * 1e6, "dur": (t - s) * 1e6}
    events = [span("step", "forward 2 (call)", 1.0, 2.0),
              span("compute", "forward layer0", 1.3, 1.5), span("compute", "forward layer1", 1.6, 1.9),
              span("compute", "forward head", 1.8, 1.95),  # (overlapping spans count once)
              span("step", "backward 2 (call)", 2.0, 3.0),
              span("step", "step 2 (during backward)", 2.0, 3.0),  # the engine's own span: not a phase
              span("step", "forward 3 (call)", 3.2, 3.5),  # no group spans: parameters on the device
              span("compute", "forward layer0", 0.2, 0.4)]  # before the timed steps
    phases = _step_timeline().phases_of(events, 0.0, 1.0, 4.0)
    total = {name: round(sum(t - s for s, t in spans), 6) for name, spans in phases.items()}
    assert total == pytest.approx({"forward (unsplit)": 0.3, "forward: compute": 0.55, "forward: waits": 0.45,
                                   "backward": 1.0, "rest": 0.2 + 0.5, "whole step": 3.0})
    parts = ("forward (unsplit)", "forward: compute", "forward: waits", "backward", "rest")
    assert sum(total[k] for k in parts) == pytest.approx(3.0)
    # a group span that crosses the call's end counts inside the call only
    crossing = [span("step", "forward 2 (call)", 1.0, 2.0), span("compute", "forward layer0", 1.5, 2.5)]
    phases = _step_timeline().phases_of(crossing, 0.0, 1.0, 3.0)
    assert phases["forward: compute"] == [(1.5, 2.0)] and phases["forward: waits"] == [(1.0, 1.5)]
