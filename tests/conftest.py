import subprocess

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


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (no O_DIRECT, fills up fast); skips where mounting is not allowed."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.fixture
def no_direct_fs(tmp_path):
    """A filesystem that refuses O_DIRECT. ramfs does; tmpfs accepts it since Linux 6.6."""
    mount_point = tmp_path / "ramfs"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)
