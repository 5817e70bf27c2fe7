"""Exceptions raised by offload."""

from __future__ import annotations

# The configuration's own errors live with it (config.py imports nothing of ours); they are offload's errors too.
from offload.config import ConfigError, UnknownConfigKey

__all__ = ["CheckpointError", "ConfigError", "MemoryBudgetError", "OffloadedWeightError", "OutputExistsError",
           "UnknownConfigKey", "format_bytes"]


class OutputExistsError(ConfigError):
    """An output directory exists and is not empty, and replacing it was not asked for; the message names it
    and how to replace it."""

    def __init__(self, path: object) -> None:
        self.path = path
        super().__init__(f"{path} exists and is not empty; pass overwrite=True (offload train: --overwrite) to "
                         "replace it")

    def __reduce__(self) -> tuple:  # (pickled to other ranks: rebuilt from the path, not from the message)
        return type(self), (self.path,)


class MemoryBudgetError(MemoryError):
    """A host or device allocation would exceed the budget the configuration set.

    ``needed`` and ``available`` are bytes; ``setting`` names the configuration field to change.
    """

    def __init__(self, what: str, needed: int, available: int, setting: str) -> None:
        self.needed = needed
        self.available = available
        self.setting = setting
        super().__init__(
            f"{what}: needs {format_bytes(needed)} but only {format_bytes(available)} of the budget is left; "
            f"raise {setting} or place more state on NVMe"
        )


def format_bytes(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit it reaches, two decimals: "1.50 GiB", "512 B"."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, truncated, corrupt, or made for a different model. The message
    names the file (and the tensor or field) at fault."""


class OffloadedWeightError(RuntimeError):
    """An offloaded weight was read outside a use of its group and outside ``engine.gathered()`` (Note [guarded
    reads]); the message names the parameter and how to read it."""
