"""Configuration values: one parser, one set of defaults, errors that name the field.

Imports nothing of offload but the exceptions, so every layer can use it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from offload.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNIT_NAMES = ["B", "KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB"]


def parse_bytes(field: str, value: int | str) -> int:
    """``8388608``, ``"8MiB"``, ``"24 GiB"`` or ``"1.5GB"`` -> bytes. Raises ConfigError naming ``field``."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected a byte count like 8388608 or '8MiB'; got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{field}: must be >= 0; got {value}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
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


@dataclass(frozen=True, kw_only=True)
class IOConfig:
    """How the swap store moves data to and from files.

    block_size: bytes per transfer (a multiple of 4 KiB). threads x queue_depth: transfers in flight at once,
    as fio's numjobs x iodepth (the engine runs one worker thread per transfer in flight, at most 256).
    direct: ``"auto"`` opens swap files with O_DIRECT and falls back to buffered I/O (with one warning) where
    the filesystem refuses it; ``True`` requires O_DIRECT; ``False`` always uses buffered I/O.
    """

    block_size: int | str = "8MiB"
    queue_depth: int = 32
    threads: int = 2
    direct: bool | str = "auto"

    def __post_init__(self) -> None:
        block = parse_bytes("io.block_size", self.block_size)
        if block == 0 or block % 4096:
            raise ConfigError(f"io.block_size: must be a positive multiple of 4 KiB; got {block} bytes")
        object.__setattr__(self, "block_size", block)
        for field, value, low, high in (("io.queue_depth", self.queue_depth, 1, 256),
                                        ("io.threads", self.threads, 1, 256)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{field}: must be an integer from {low} to {high}; got {value!r}")
        if self.in_flight > 256:
            raise ConfigError(f"io.threads x io.queue_depth: at most 256 transfers in flight; got "
                              f"{self.threads} x {self.queue_depth} = {self.in_flight}")
        _choice("io.direct", self.direct, ("auto", True, False))

    @property
    def in_flight(self) -> int:
        """Transfers in flight at once: threads x queue_depth."""
        return self.threads * self.queue_depth
