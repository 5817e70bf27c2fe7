"""RunLog: where `offload train` records its metrics: a JSONL file (``--metrics``, one object per step and per
evaluation) and TensorBoard scalars (``--tensorboard``, when tensorboard is installed).

Note [metrics of a resumed run]: a run resumed at step S redoes the steps after S that the interrupted run may
already have logged. The JSONL file is therefore cut back to the records of steps <= S when the run resumes
(rewritten through a temporary file and a rename, so a crash leaves the old file or the new one, never half of
one), and the new records are appended: the file reads as one uninterrupted run.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path
from typing import Any

from offload.cli.outputs import check_writable_dir, check_writable_file
from offload.errors import ConfigError


class RunLog:
    def __init__(self, metrics: str | None, tensorboard: str | None, resumed_at: int | None,
                 write: bool = True) -> None:
        """Opens the outputs (``write`` False: a rank that does not speak, records nothing). A fresh run
        (``resumed_at`` None) starts the metrics file empty."""
        self._file = None
        self._board = None
        if not write:
            return
        if metrics:
            path = Path(metrics)
            if resumed_at is not None and path.exists():
                _keep_steps_up_to(path, resumed_at)
                self._file = open(path, "a", encoding="utf-8")
            else:
                self._file = open(path, "w", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(tensorboard, purge_step=resumed_at + 1 if resumed_at is not None else None)

    @staticmethod
    def check(metrics: str | None, tensorboard: str | None) -> None:
        """Refuses, before any training, outputs that cannot be written and TensorBoard without tensorboard."""
        if metrics:
            check_writable_file("--metrics", metrics)
        if tensorboard:
            try:
                importlib.import_module("tensorboard")
            except ImportError:
                raise ConfigError("--tensorboard: needs the tensorboard package; pip install "
                                  "'offload[tensorboard]'") from None
            check_writable_dir("--tensorboard", tensorboard)

    def record(self, values: dict[str, Any]) -> None:
        """One record: ``step`` and named numbers (a training step's ``loss``, ``lr``...; an evaluation's
        ``eval_loss``...). Written and flushed at once, so a killed run keeps what it logged."""
        if self._file is not None:
            self._file.write(json.dumps({k: _plain(v) for k, v in values.items()}) + "\n")
            self._file.flush()
        if self._board is not None:
            step = int(values["step"])
            for name, value in values.items():
                if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    tag = f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"
                    self._board.add_scalar(tag, value, step)
            self._board.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._board is not None:
            self._board.close()
            self._board = None


def _plain(value: Any) -> Any:
    """A number as JSON holds it: floats to 7 significant digits (a warm-up lr of 2e-7 stays 2e-7), and a
    non-finite float as null (JSON has no NaN; the field keeps its type in every record)."""
    if isinstance(value, float):
        return float(f"{value:.7g}") if math.isfinite(value) else None
    return value


def _keep_steps_up_to(path: Path, step: int) -> None:
    """Rewrites the JSONL file at ``path`` without the records of steps after ``step`` (Note [metrics of a
    resumed run]); lines that are not records (e.g. a line cut by a kill) are dropped too."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
