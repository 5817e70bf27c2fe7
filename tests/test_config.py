"""Config: defaults, normalisation, one-line errors naming the field, TOML round trip, atomic writes."""

import dataclasses
import errno
import os
import pathlib
import tomllib

import pytest
import torch

import offload
from offload import config as config_module
from offload.config import Config, IOConfig
from offload.errors import ConfigError


@pytest.fixture
def two_gpus(monkeypatch):
    """Makes torch report CUDA with two devices, so the cuda paths run on any machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_defaults(no_cuda):
    cfg = Config()
    assert (cfg.device, cfg.params, cfg.optimizer, cfg.nvme_dir) == ("cpu", "device", "cpu", None)
    assert (cfg.dtype, cfg.torch_dtype) == ("bf16", torch.bfloat16)
    assert (cfg.host_memory_limit, cfg.device_memory_limit, cfg.prefetch_layers) == (None, None, 2)
    assert cfg.io == IOConfig() and cfg.io.block_size == 8 << 20


def test_config_error_is_a_value_error_and_public():
    assert issubclass(ConfigError, ValueError)
    assert offload.ConfigError is ConfigError


def test_device_defaults_to_cuda_when_available(two_gpus):
    assert Config().device == "cuda"
    assert Config(device="cuda:01").device == "cuda:1"
    assert Config(device=torch.device("cuda", 1)).device == "cuda:1"


def test_device_index_beyond_visible_devices(two_gpus):
    with pytest.raises(ConfigError, match=r"^device: 'cuda:2' .*only 2 CUDA device"):
        Config(device="cuda:2")


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_refused(no_cuda, device):
    with pytest.raises(ConfigError, match=r"^device: .*CUDA is not available"):
        Config(device=device)


@pytest.mark.parametrize("value, nbytes", [
    (123, 123), ("24GiB", 24 << 30), ("8 MiB", 8 << 20), ("1.5GB", 1_500_000_000), ("4096", 4096),
    ("1 GB", 10**9), ("1.5GiB", 3 << 29), ("0.1GB", 10**8), ("2b", 2),
])
def test_sizes_are_stored_as_int_bytes(value, nbytes):
    cfg = Config(host_memory_limit=value, device_memory_limit=value)
    assert cfg.host_memory_limit == nbytes and cfg.device_memory_limit == nbytes
    assert type(cfg.host_memory_limit) is int


@pytest.mark.parametrize("value, name, torch_dtype", [
    ("fp32", "fp32", torch.float32), ("float32", "fp32", torch.float32), (torch.float32, "fp32", torch.float32),
    ("bf16", "bf16", torch.bfloat16), ("bfloat16", "bf16", torch.bfloat16), (torch.bfloat16, "bf16", torch.bfloat16),
    ("fp16", "fp16", torch.float16), ("float16", "fp16", torch.float16), (torch.float16, "fp16", torch.float16),
])
def test_dtype_is_normalised(value, name, torch_dtype):
    cfg = Config(dtype=value)
    assert (cfg.dtype, cfg.torch_dtype) == (name, torch_dtype)
    assert cfg == Config(dtype=name)


def test_io_from_dict():
    cfg = Config(io={"block_size": "1MiB", "queue_depth": 8, "threads": 4, "direct": False})
    assert cfg.io == IOConfig(block_size=1 << 20, queue_depth=8, threads=4, direct=False)
    assert isinstance(cfg.io, IOConfig)


def test_nvme_dir_is_stored_as_str_and_kept_when_unused(tmp_path):
    assert Config(optimizer="nvme", nvme_dir=tmp_path).nvme_dir == str(tmp_path)
    assert Config(nvme_dir=tmp_path / "x").nvme_dir == str(tmp_path / "x")
    assert Config(params="nvme", nvme_dir="~/swap").nvme_dir == os.path.expanduser("~/swap")


def test_frozen_replace_and_unknown_keyword():
    cfg = Config(params="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.params = "device"
    changed = cfg.replace(prefetch_layers=4, host_memory_limit="1GiB")
    assert (changed.prefetch_layers, changed.host_memory_limit, changed.params) == (4, 1 << 30, "cpu")
    assert cfg.prefetch_layers == 2
    with pytest.raises(ConfigError, match="^params:"):
        cfg.replace(params="nvm")
    with pytest.raises(TypeError, match=r"param: unknown key \(did you mean 'params'\?\)"):
        Config(param="cpu")  # also a ConfigError


def _nvme(**kw):
    return dict(params="nvme", optimizer="nvme", nvme_dir="/tmp/x", **kw)


# (kwargs or TOML text, what the message starts with (after "PATH: " for files), a fragment it must contain)
BAD = [
    (dict(params="nvm"), "params", "did you mean 'nvme'"),
    (dict(params=3), "params", "'device', 'cpu', 'nvme'"),
    (dict(optimizer="device"), "optimizer", "'cpu', 'nvme'"),
    (dict(optimizer="nvem", nvme_dir="/tmp/x"), "optimizer", "did you mean 'nvme'"),
    (dict(optimizer="nvme"), "nvme_dir", "required when optimizer='nvme'"),
    (dict(params="nvme"), "nvme_dir", "required when params='nvme'"),
    (dict(params="nvme", optimizer="nvme", nvme_dir=""), "nvme_dir", "empty string"),
    (dict(nvme_dir=42), "nvme_dir", "got int 42"),
    (dict(device="gpu"), "device", "did you mean 'cuda'"),
    (dict(device="cuda:x"), "device", "'cuda:N'"),
    (dict(device=0), "device", "got int 0"),
    (dict(dtype="bf61"), "dtype", "did you mean 'bf16'"),
    (dict(dtype=torch.float64), "dtype", "torch.float64 is not supported"),
    (dict(dtype=16), "dtype", "'fp32', 'bf16', 'fp16'"),
    (dict(host_memory_limit=-1), "host_memory_limit", "positive byte count"),
    (dict(host_memory_limit=0), "host_memory_limit", "got 0"),
    (dict(host_memory_limit=True), "host_memory_limit", "got True"),
    (dict(device_memory_limit="8 GiBs"), "device_memory_limit", "did you mean '8GiB'"),
    (dict(device_memory_limit="0GiB"), "device_memory_limit", "positive byte count"),
    (dict(device_memory_limit=1.5e9), "device_memory_limit", "got float"),
    (dict(prefetch_layers=True), "prefetch_layers", "from 0 to 64; got True"),
    (dict(prefetch_layers="2"), "prefetch_layers", "got '2'"),
    (dict(prefetch_layers=65), "prefetch_layers", "got 65"),
    (dict(prefetch_layers=-1), "prefetch_layers", "got -1"),
    (dict(io={"block_size": "1000"}), "io.block_size", "multiple of 4 KiB"),
    (dict(io={"queue_depth": 0}), "io.queue_depth", "from 1 to 256"),
    (dict(io={"threads": "2"}), "io.threads", "got '2'"),
    (dict(io={"direct": "yes"}), "io.direct", "'auto', True, False"),
    (dict(io={"backend": "uring"}), "io.backend", "did you mean 'io_uring'"),
    (dict(io={"blocksize": "8MiB"}), "io.blocksize", "did you mean 'io.block_size'"),
    (dict(io="fast"), "io", "IOConfig or a dict"),
    (_nvme(io={"threads": 16, "queue_depth": 32}), "io.threads x io.queue_depth", "at most 256"),
    ('prefetch_layer = 3\n', "prefetch_layer", "did you mean 'prefetch_layers'"),
    ('params = "cpu"\n[io]\nqeue_depth = 8\n', "io.qeue_depth", "did you mean 'io.queue_depth'"),
    ('params = "nvm"\n', "params", "did you mean 'nvme'"),
    ('params = \n', "not valid TOML", "line 1"),
    ('io = [1, 2\n', "not valid TOML", "Unclosed array"),
    ('io = 3\n', "io", "got int 3"),
]


@pytest.mark.parametrize("source, starts, fragment", BAD, ids=[f"{i}-{case[1]}" for i, case in enumerate(BAD)])
def test_bad_config_names_the_field_in_one_line(tmp_path, source, starts, fragment):
    if isinstance(source, str):
        path = tmp_path / "offload.toml"
        path.write_text(source)
        starts = f"{path}: {starts}"
        with pytest.raises(ConfigError) as info:
            Config.from_file(path)
    else:
        with pytest.raises(ConfigError) as info:
            Config(**source)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{starts}:"), message
    assert fragment in message, message


def test_bad_cases_are_distinct():
    assert len({repr(case) for case in BAD}) == len(BAD) >= 18


def test_file_round_trip(tmp_path):
    cfg = Config(device="cpu", params="nvme", optimizer="nvme", nvme_dir=tmp_path / "swap", dtype="float16",
                 host_memory_limit="24GiB", device_memory_limit=123 << 20, prefetch_layers=0,
                 io={"block_size": "1MiB", "queue_depth": 4, "threads": 8, "direct": True, "backend": "threads"})
    path = tmp_path / "offload.toml"
    cfg.to_file(path)
    written = tomllib.loads(path.read_text())
    assert written["host_memory_limit"] == 24 << 30 and written["device_memory_limit"] == 123 << 20
    assert written["dtype"] == "fp16" and written["nvme_dir"] == str(tmp_path / "swap")
    assert written["io"] == {"block_size": 1 << 20, "queue_depth": 4, "threads": 8, "direct": True,
                             "backend": "threads"}
    assert Config.from_file(path) == cfg
    assert Config.from_file(str(path)) == cfg


def test_default_round_trip_omits_none_and_writes_resolved_device(tmp_path, no_cuda):
    path = tmp_path / "offload.toml"
    Config().to_file(path)
    written = tomllib.loads(path.read_text())
    assert "nvme_dir" not in written and "host_memory_limit" not in written
    assert "device_memory_limit" not in written
    assert written["device"] == "cpu" and written["io"]["direct"] == "auto"
    assert Config.from_file(path) == Config()


def test_from_file_fills_defaults(tmp_path):
    path = tmp_path / "offload.toml"
    path.write_text('optimizer = "nvme"\nnvme_dir = "/mnt/nvme"\nhost_memory_limit = "2GiB"\n[io]\nthreads = 4\n')
    assert Config.from_file(path) == Config(optimizer="nvme", nvme_dir="/mnt/nvme", host_memory_limit=2 << 30,
                                            io=IOConfig(threads=4))


def test_from_file_missing_is_an_oserror_with_the_path(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(FileNotFoundError) as info:
        Config.from_file(path)
    assert info.value.filename == str(path)


def _fail_io(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def _fail_dumps(data):
    raise RuntimeError("serialisation failed")


@pytest.mark.parametrize("target, replacement, error", [
    ("tomli_w.dumps", _fail_dumps, RuntimeError),
    ("os.fsync", _fail_io, OSError),
    ("os.replace", _fail_io, OSError),
])
def test_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch, target, replacement, error):
    path = tmp_path / "offload.toml"
    Config(params="cpu").to_file(path)
    before = path.read_bytes()
    module, name = target.split(".")
    monkeypatch.setattr(getattr(config_module, module), name, replacement)
    with pytest.raises(error, match="No space left on device|serialisation failed"):
        Config(params="nvme", nvme_dir="/mnt/nvme").to_file(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["offload.toml"]
    assert Config.from_file(path).params == "cpu"


def test_to_file_replaces_an_existing_file(tmp_path):
    path = tmp_path / "offload.toml"
    Config(params="cpu").to_file(path)
    Config(params="device", prefetch_layers=5).to_file(pathlib.PurePath(path))
    assert Config.from_file(path) == Config(params="device", prefetch_layers=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["offload.toml"]


@pytest.mark.parametrize("value", ["1.9B", "0.5", "1.0000001KB"])
def test_a_size_that_is_not_whole_bytes_is_refused_not_truncated(value):
    with pytest.raises(ConfigError, match="host_memory_limit: .* not a whole number of bytes"):
        Config(host_memory_limit=value)


def test_a_misspelled_keyword_gets_the_closest_field():
    with pytest.raises(ConfigError, match=r"nvme_dri: unknown key \(did you mean 'nvme_dir'\?\)"):
        Config(nvme_dri="/tmp")
    with pytest.raises(ConfigError, match=r"io.queue_dept: unknown key \(did you mean 'io.queue_depth'\?\)"):
        IOConfig(queue_dept=4)
    assert Config(dtype="fp32").replace(prefetch_layers=1).prefetch_layers == 1
