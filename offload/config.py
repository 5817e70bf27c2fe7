"""Configuration values: one parser, one set of defaults, errors that name the field.

Imports nothing of offload, so every layer can use it; its two exceptions are defined here (and exported by
``offload.errors`` with the others).
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import os
import re
import tomllib
import uuid
from dataclasses import dataclass, field
from typing import Any

import tomli_w
import torch


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the accepted values."""


class UnknownConfigKey(ConfigError, TypeError):
    """A keyword or TOML key that names no field; the message suggests the closest one. Also a TypeError, which
    is what Python raises for an unexpected keyword argument."""


_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNIT_NAMES = ["B", "KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB"]


def parse_bytes(field: str, value: int | str) -> int:
    """A size in bytes: an int, or a string of a number and an optional unit, ``"8388608"``, ``"8MiB"``,
    ``"24 GiB"``, ``"1.5GB"`` (binary units KiB MiB GiB TiB, decimal KB MB GB TB, B for bytes; case-insensitive;
    spaces around the unit allowed). The result must be a whole number of bytes: ``"1.9B"`` or ``"0.5"`` is an
    error, never truncated. Raises ConfigError naming ``field``."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected a byte count like 8388608 or '8MiB'; got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{field}: must be >= 0; got {value}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            exact = decimal.Decimal(m.group(1)) * _UNITS[m.group(2).lower()]  # (no binary rounding of "0.1GB")
            if exact != exact.to_integral_value():
                raise ConfigError(f"{field}: {value!r} is {exact} bytes, not a whole number of bytes; write whole "
                                  f"bytes, or a size with a unit ({', '.join(_UNIT_NAMES[1:])})")
            return int(exact)
        hint = difflib.get_close_matches(m.group(2), _UNIT_NAMES, n=1) if m else []
        suggestion = f" (did you mean '{m.group(1)}{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{field}: cannot read {value!r} as a size; use bytes or one of the units "
                          f"{', '.join(_UNIT_NAMES)}{suggestion}")
    raise ConfigError(f"{field}: expected a byte count like 8388608 or '8MiB'; got {type(value).__name__}")


def _choice(field: str, value: object, accepted: tuple) -> None:
    if value not in accepted:
        close = difflib.get_close_matches(str(value), [str(a) for a in accepted], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{field}: {value!r} is not one of {', '.join(repr(a) for a in accepted)}{hint}")


# The docstrings of IOConfig and Config have one `name: text` entry per field, from which
# tools/gen_config_docs.py writes docs/configuration.md (tests/test_docs.py keeps the page current).
@dataclass(frozen=True, kw_only=True)
class IOConfig:
    """How the swap store moves data to and from files.

    block_size: bytes per transfer, a multiple of 4 KiB: an int or a size such as ``"8MiB"``; stored as int bytes.
    queue_depth: with ``threads``, how many transfers are in flight at once: ``threads x queue_depth``, as fio's
        numjobs x iodepth, at most 256. Both backends use only that product.
    threads: see ``queue_depth``; 1 to 256.
    direct: ``"auto"`` opens swap files with O_DIRECT and falls back to buffered I/O (with one warning) where the
        filesystem refuses it; ``True`` requires O_DIRECT; ``False`` always uses buffered I/O.
    backend: ``"io_uring"`` keeps the transfers in flight on one io_uring with one completion thread;
        ``"threads"`` runs one worker thread per transfer in flight doing pread/pwrite; ``"auto"`` takes io_uring
        where the kernel allows it (Linux 5.6+, not disabled) and threads elsewhere.
    """

    block_size: int | str = "8MiB"
    queue_depth: int = 32
    threads: int = 2
    direct: bool | str = "auto"
    backend: str = "auto"

    def __new__(cls, *args: Any, **kwargs: Any) -> IOConfig:
        _check_keys("io.", kwargs, [f.name for f in dataclasses.fields(cls)])  # a misspelled keyword: did you mean
        return super().__new__(cls)

    def __post_init__(self) -> None:
        block = parse_bytes("io.block_size", self.block_size)
        if block == 0 or block % 4096:
            raise ConfigError(f"io.block_size: must be a positive multiple of 4 KiB; got {block} bytes")
        object.__setattr__(self, "block_size", block)
        for name, value, low, high in (("io.queue_depth", self.queue_depth, 1, 256),
                                       ("io.threads", self.threads, 1, 256)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name}: must be an integer from {low} to {high}; got {value!r}")
        if self.in_flight > 256:
            raise ConfigError(f"io.threads x io.queue_depth: at most 256 transfers in flight; got "
                              f"{self.threads} x {self.queue_depth} = {self.in_flight}")
        _choice("io.direct", self.direct, ("auto", True, False))
        _choice("io.backend", self.backend, IO_BACKENDS)

    @property
    def in_flight(self) -> int:
        """Transfers in flight at once: threads x queue_depth."""
        return self.threads * self.queue_depth


IO_BACKENDS = ("auto", "io_uring", "threads")
_PLACEMENTS_PARAMS = ("device", "cpu", "nvme")
_PLACEMENTS_OPTIMIZER = ("cpu", "nvme")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_PREFETCH_MAX = 64
TRAIN_TABLE = "train"  # the table of a config file that holds `offload train`'s settings, not Config fields


@dataclass(frozen=True, kw_only=True)
class Config:
    """Where training state lives and how it moves; the one configuration an ``Engine`` takes.

    All fields are keyword-only and validated on construction; a bad value raises ``ConfigError`` (a
    ``ValueError``) naming the field, the value and what is accepted. The instance is frozen: use
    ``cfg.replace(field=value)`` for a changed copy. After construction every field holds its normalised
    form (sizes in bytes, dtype as a short name, device resolved), so two configs that mean the same compare equal.

    device: the compute device, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (a ``torch.device`` is accepted too).
        Default ``None`` resolves to ``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``; the stored
        value is always the resolved string. Asking for CUDA on a machine without it is an error.
    params: where parameters live between uses. ``"device"`` (default) keeps them all resident on the device;
        ``"cpu"`` keeps them in host RAM and fetches each layer group before it runs; ``"nvme"`` keeps them in
        files under ``nvme_dir`` (fp32 weights with ``optimizer="nvme"`` are the master part of the optimizer
        state, so they stay in RAM for the groups whose state ``host_memory_limit`` keeps there).
    optimizer: where the fp32 master weights and Adam's m and v live: ``"cpu"`` (default, host RAM) or
        ``"nvme"`` (files under ``nvme_dir``; groups that fit in ``host_memory_limit`` stay in RAM).
    nvme_dir: directory for swap files (str or path-like, stored as str with ``~`` expanded). Required when
        ``params`` or ``optimizer`` is ``"nvme"``, kept but unused otherwise. Default ``None``. It is not
        checked here; the engine creates its private run directory inside it and reports what goes wrong.
    dtype: compute dtype on the device and of the parameter copies: ``"fp32"``, ``"bf16"`` (default) or
        ``"fp16"`` (which turns on dynamic loss scaling). ``"float32"``, ``"bfloat16"``, ``"float16"`` and the
        matching ``torch`` dtypes are accepted and stored as the short name; ``torch_dtype`` gives the torch dtype.
    host_memory_limit: bound, in bytes, on the host buffers the engine allocates (master weights, m, v,
        gradient accumulators, parameter copies, staging). An int or a size such as ``"24GiB"`` or ``"32GB"``;
        stored as int bytes; must be > 0. Default ``None``: no bound beyond what the machine has.
    device_memory_limit: bound, in bytes, on parameter bytes resident on the device at once; same forms as
        ``host_memory_limit``. Default ``None``: no bound.
    prefetch_layers: how many layer groups ahead of the one computing are fetched, 0 to 64. Default 2.
        More hides more transfer latency and costs that many groups of device (and staging) memory.
    io: how swap files are read and written (block size, queue depth, threads, O_DIRECT); an ``IOConfig`` or a
        dict of its fields. Default ``IOConfig()``.
    """

    device: str | None = None
    params: str = "device"
    optimizer: str = "cpu"
    nvme_dir: str | os.PathLike | None = None
    dtype: str | torch.dtype = "bf16"
    host_memory_limit: int | str | None = None
    device_memory_limit: int | str | None = None
    prefetch_layers: int = 2
    io: IOConfig = field(default_factory=IOConfig)

    def __new__(cls, *args: Any, **kwargs: Any) -> Config:
        _check_keys("", kwargs, [f.name for f in dataclasses.fields(cls)])  # a misspelled keyword: did you mean
        return super().__new__(cls)

    def __post_init__(self) -> None:
        _choice("params", self.params, _PLACEMENTS_PARAMS)
        _choice("optimizer", self.optimizer, _PLACEMENTS_OPTIMIZER)
        value = self.prefetch_layers
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _PREFETCH_MAX:
            raise ConfigError(f"prefetch_layers: must be an integer from 0 to {_PREFETCH_MAX}; got {value!r}")
        # The remaining fields are stored in their normalised form (the dataclass is frozen, hence __setattr__).
        for name, normalised in (
            ("device", _device(self.device)),
            ("nvme_dir", _nvme_dir(self.nvme_dir, self.params, self.optimizer)),
            ("dtype", _dtype(self.dtype)),
            ("host_memory_limit", _limit("host_memory_limit", self.host_memory_limit)),
            ("device_memory_limit", _limit("device_memory_limit", self.device_memory_limit)),
            ("io", _io(self.io)),
        ):
            object.__setattr__(self, name, normalised)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The compute dtype as a ``torch.dtype`` (``torch.bfloat16`` for ``"bf16"``)."""
        return _DTYPES[self.dtype]

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied, validated like a new config; this one is unchanged."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Config:
        """Reads a TOML file: top-level keys are Config fields, an optional ``[io]`` table holds IOConfig fields.

        Fields not in the file take their defaults; a ``[train]`` table (``offload train``'s settings) is left
        to the command that reads it. A missing or unreadable file raises ``OSError`` with the
        path; invalid TOML, unknown keys and bad values raise ``ConfigError`` prefixed with the path.
        """
        path = os.fspath(path)
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid TOML: {_one_line(e)}") from None
        data.pop(TRAIN_TABLE, None)  # the settings of `offload train`'s job, which reads that table itself
        try:
            _check_keys("", data, [f.name for f in dataclasses.fields(cls)])
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_file(self, path: str | os.PathLike) -> None:
        """Writes this config as TOML that ``from_file`` reads back equal: sizes as int bytes, ``None`` fields
        left out, ``io`` as an ``[io]`` table, ``device`` as resolved (a file written on a CUDA machine names
        ``"cuda"`` and is refused where CUDA is missing). Atomic: the file at ``path`` is replaced whole or, if
        anything fails, left as it was, with no temporary file left behind.
        """
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "io"}
        data = {name: value for name, value in data.items() if value is not None}
        data["io"] = dataclasses.asdict(self.io)
        write_atomic(os.fspath(path), tomli_w.dumps(data))


def _device(value: object) -> str:
    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(value, torch.device):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"device: expected 'cpu', 'cuda' or 'cuda:N'; got {type(value).__name__} {value!r}")
    if value == "cpu":
        return value
    m = re.fullmatch(r"cuda(?::([0-9]+))?", value)
    if not m:
        guess = re.sub(r"^gpu", "cuda", value.strip().lower())
        valid_guess = guess != value and re.fullmatch(r"cpu|cuda(:[0-9]+)?", guess)
        hint = f" (did you mean {guess!r}?)" if valid_guess else ""
        raise ConfigError(f"device: {value!r} is not one of 'cpu', 'cuda', 'cuda:N' (N a device index){hint}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {value!r} asked for, but CUDA is not available here "
                          f"(torch.cuda.is_available() is False); use 'cpu' or leave device unset")
    if m.group(1) is None:
        return value
    index, count = int(m.group(1)), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device: {value!r} asked for, but only {count} CUDA device(s) are visible "
                          f"(cuda:0 to cuda:{count - 1})")
    return f"cuda:{index}"


def _nvme_dir(value: object, params: str, optimizer: str) -> str | None:
    needed_by = [f"{name}='nvme'" for name, placement in (("params", params), ("optimizer", optimizer))
                 if placement == "nvme"]
    if value is None:
        if needed_by:
            raise ConfigError(f"nvme_dir: required when {' and '.join(needed_by)}; got None "
                              f"(set it to a directory on a local NVMe disk)")
        return None
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise ConfigError(f"nvme_dir: expected a directory path (str or path-like); got "
                          f"{type(value).__name__} {value!r}")
    if not path.strip():
        raise ConfigError(f"nvme_dir: must be a directory path, not an empty string; got {path!r}")
    return os.path.expanduser(path)


def _dtype(value: object) -> str:
    if isinstance(value, torch.dtype):
        for name, dtype in _DTYPES.items():
            if dtype == value:
                return name
        raise ConfigError(f"dtype: {value} is not supported; use one of {', '.join(map(repr, _DTYPES))} "
                          f"or torch.float32, torch.bfloat16, torch.float16")
    if isinstance(value, str):
        value = _DTYPE_ALIASES.get(value, value)
    _choice("dtype", value, tuple(_DTYPES))
    return value


def _limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    # Negative ints skip parse_bytes, whose message (">= 0") is wrong for a limit.
    nbytes = value if isinstance(value, int) and value < 0 else parse_bytes(name, value)
    if nbytes <= 0:
        raise ConfigError(f"{name}: must be a positive byte count or a size like '24GiB', or None for no "
                          f"limit; got {value!r}")
    return nbytes


def _io(value: object) -> IOConfig:
    if isinstance(value, IOConfig):
        return value
    if isinstance(value, dict):
        _check_keys("io.", value, [f.name for f in dataclasses.fields(IOConfig)])
        return IOConfig(**value)
    raise ConfigError(f"io: expected an IOConfig or a dict of its fields; got {type(value).__name__} {value!r}")


def _check_keys(prefix: str, data: dict, accepted: list[str]) -> None:
    """Raises ConfigError for the first key of ``data`` not in ``accepted``, suggesting the closest one."""
    for key in data:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UnknownConfigKey(f"{prefix}{key}: unknown key{hint}; accepted keys: "
                                   f"{', '.join(prefix + a for a in accepted)}")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to a new file beside ``path`` (same filesystem), syncs it, then renames it over ``path``."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    # 0o666 with O_EXCL: a fresh file that honours the umask, as a plain open() would make.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
