"""SwapStore: private run directories, preallocation, the O_DIRECT fallback, and cleanup after kills."""

import errno
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from offload.config import IOConfig
from offload.errors import ConfigError
from offload.storage.host_pool import HostPool
from offload.storage.ownership import LOCK_FILE, DirectoryBusy, DirectoryOwner, is_abandoned
from offload.storage.swap_store import OWNER_FILE, SwapStore, clean_stale_runs

KiB, MiB = 1 << 10, 1 << 20


def test_round_trip_in_a_private_directory_removed_on_close(tmp_path):
    pool = HostPool()
    with SwapStore(tmp_path, IOConfig(block_size="64KiB")) as store:
        assert stat.S_IMODE(store.run_dir.stat().st_mode) == 0o700
        assert (store.run_dir / OWNER_FILE).read_text().split()[0] == str(os.getpid())
        assert is_abandoned(store.run_dir) is None  # this process holds it
        swap = store.create("group0.master", 300 * KiB + 1)
        assert swap.capacity == 304 * KiB and os.path.getsize(swap.path) == swap.capacity
        assert stat.S_IMODE(os.stat(swap.path).st_mode) == 0o600
        out, back = pool.allocate(swap.capacity, "out"), pool.allocate(swap.capacity, "back")
        out.tensor.copy_(torch.randint(0, 256, (swap.capacity,), dtype=torch.uint8))
        store.wait(store.write(swap, 0, out.tensor))
        store.wait(store.read(swap, 0, back.tensor))
        assert torch.equal(back.tensor, out.tensor)
        run_dir = store.run_dir
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_direct_io_is_used_where_the_filesystem_allows_it(tmp_path):
    with SwapStore(tmp_path) as store:
        if not store.direct:
            pytest.skip(f"{tmp_path} refuses O_DIRECT")
        swap = store.create("x", 4 * KiB)
        assert swap.direct and os.O_DIRECT & __import__("fcntl").fcntl(swap.fd, __import__("fcntl").F_GETFL)


def test_filesystem_without_direct_io_falls_back_to_buffered_with_one_warning(no_direct_fs, caplog):
    with caplog.at_level(logging.WARNING, logger="offload"):
        with SwapStore(no_direct_fs) as store:
            assert not store.direct
            swap = store.create("odd", 5000)
            data = torch.arange(1250, dtype=torch.float32)  # 5000 bytes: no alignment needed when buffered
            store.wait(store.write(swap, 0, data))
            back = torch.empty_like(data)
            store.wait(store.read(swap, 0, back))
            assert torch.equal(back, data)
    assert sum("refuses O_DIRECT" in r.message for r in caplog.records) == 1
    with pytest.raises(ConfigError, match="io.direct: the filesystem of .* refuses O_DIRECT"):
        SwapStore(no_direct_fs, IOConfig(direct=True))
    assert list(no_direct_fs.iterdir()) == []


def test_not_enough_space_is_reported_up_front_and_leaves_nothing(tiny_tmpfs):
    with SwapStore(tiny_tmpfs) as store:
        small = store.create("small", 256 * KiB)
        with pytest.raises(OSError) as info:
            store.create("big", 4 * MiB)
        assert info.value.errno == errno.ENOSPC and "needs 4194304 bytes" in str(info.value)
        assert sorted(p.name for p in store.run_dir.iterdir()) == sorted([LOCK_FILE, OWNER_FILE,
                                                                          os.path.basename(small.path)])


def test_reads_and_writes_outside_the_file_are_rejected(tmp_path):
    with SwapStore(tmp_path, IOConfig(direct=False)) as store:
        swap = store.create("x", 8 * KiB)
        with pytest.raises(ValueError, match=r"bytes \[4096, 12288\) are outside the file's 8192 bytes"):
            store.write(swap, 4 * KiB, torch.zeros(8 * KiB, dtype=torch.uint8))
        with pytest.raises(ValueError, match="exists already"):
            store.create("x", 10)


def test_read_only_root_gives_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)]).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        with pytest.raises(OSError, match="cannot create a swap directory under .*ro") as info:
            SwapStore(ro)
        assert info.value.errno == errno.EROFS
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=True)


def test_killed_run_is_cleaned_by_the_next_store_and_by_the_cli(tmp_path, caplog):
    script = textwrap.dedent(f"""
        import os, sys
        from offload.storage.swap_store import SwapStore
        store = SwapStore({str(tmp_path)!r})
        store.create("x", 4096)
        print(store.run_dir, flush=True)
        sys.stdin.read()
    """)

    def killed_run():
        child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        run_dir = child.stdout.readline().strip()
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert os.path.isdir(run_dir)
        return run_dir

    left = killed_run()
    with caplog.at_level(logging.WARNING, logger="offload"):
        store = SwapStore(tmp_path)
    assert not os.path.exists(left)
    assert any("left behind by process" in r.message for r in caplog.records)
    store.close()

    left = killed_run()
    out = subprocess.run([sys.executable, "-m", "offload", "clean", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and "removed 1 stale swap directory" in out.stdout
    assert not os.path.exists(left)
    assert clean_stale_runs(tmp_path) == []


def test_normal_exit_without_close_removes_the_directory(tmp_path):
    script = f"from offload.storage.swap_store import SwapStore; s = SwapStore({str(tmp_path)!r}); s.create('x', 4096)"
    subprocess.run([sys.executable, "-c", script], check=True)
    assert list(tmp_path.iterdir()) == []


def _abandoned_run_dir(root, pid: str):
    """A run directory as a killed run leaves it: an unlocked owner.lock and the dead run's owner.pid."""
    run_dir = root / "offload-swap-left"
    run_dir.mkdir()
    owner = DirectoryOwner.claim(run_dir)
    (run_dir / "00000.swap").write_bytes(b"x" * 4096)
    owner.release()  # what the kernel does when the owner dies
    (run_dir / OWNER_FILE).write_text(f"{pid} somehost\n")
    return run_dir


def test_an_abandoned_directory_is_removed_although_its_pid_runs(tmp_path):
    # In a container every run is PID 1, and PIDs are reused on a host: a live PID proves nothing.
    left = _abandoned_run_dir(tmp_path, "1")
    assert clean_stale_runs(tmp_path) == [left] and not left.exists()
    left = _abandoned_run_dir(tmp_path, str(os.getpid()))  # even this process's own PID
    assert clean_stale_runs(tmp_path) == [left]


def test_a_directory_held_by_a_live_process_is_never_removed(tmp_path):
    with SwapStore(tmp_path) as mine:
        holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from offload.storage.swap_store import SwapStore
            store = SwapStore({str(tmp_path)!r})
            print(store.run_dir, flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            theirs = holder.stdout.readline().strip()
            (Path(theirs) / OWNER_FILE).write_text("999999999 elsewhere\n")  # a PID that runs nowhere
            assert clean_stale_runs(tmp_path) == []
            assert os.path.isdir(theirs) and mine.run_dir.is_dir()
            with pytest.raises(DirectoryBusy, match="in use by another process"):
                DirectoryOwner.claim(theirs)
        finally:
            holder.communicate("")
        assert not os.path.exists(theirs)  # its own close removed it


def test_a_directory_of_an_older_release_is_judged_by_its_pid(tmp_path):
    old = tmp_path / "offload-swap-old"
    old.mkdir()
    (old / OWNER_FILE).write_text(f"{os.getpid()}\n")  # alive: kept
    assert clean_stale_runs(tmp_path) == []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (old / OWNER_FILE).write_text(f"{dead}\n")
    assert clean_stale_runs(tmp_path) == [old]
    stranger = tmp_path / "offload-swap-stranger"  # no owner files at all: not ours, left alone
    stranger.mkdir()
    assert clean_stale_runs(tmp_path) == [] and stranger.is_dir()


def test_an_nvme_dir_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "swap").write_text("mine")
    with pytest.raises(OSError, match="swap directory .*swap \\(nvme_dir\\) exists and is not a directory") as info:
        SwapStore(tmp_path / "swap")
    assert info.value.errno == errno.ENOTDIR and (tmp_path / "swap").read_text() == "mine"
