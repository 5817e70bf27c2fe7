"""The harness shared by `offload bench adam|io|step`: interleaved rounds, medians, per-round ratios, JSON lines
and the one markdown table printer.

The machines these run on drift (the memory bandwidth of a shared VM by +-50% over minutes, a disk with its
write-back state), so absolute numbers from different moments do not compare. Every benchmark therefore runs
all its implementations in each round, in an order that alternates between rounds (A B C, then C B A), and
compares them by ratios taken within a round; what it reports is the median of those ratios with their range.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TypeVar

T = TypeVar("T")


def round_order(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` in their order in even rounds and reversed in odd ones, so that none always runs first or
    always right after the same other one."""
    return list(items) if round_index % 2 == 0 else list(items)[::-1]


def median(values: Iterable[float]) -> float:
    """The median of ``values`` (raises ValueError when there are none)."""
    values = list(values)
    if not values:
        raise ValueError("median of no values")
    return statistics.median(values)


@dataclass(frozen=True)
class Ratio:
    """The median of per-round ratios and their smallest and largest."""
    median: float
    low: float
    high: float

    def cell(self) -> str:
        """``1.10 [1.05-1.20]``: how a ratio reads in a table."""
        return f"{self.median:.2f} [{self.low:.2f}-{self.high:.2f}]"


def paired_ratio(num: Mapping[Hashable, float], den: Mapping[Hashable, float]) -> Ratio | None:
    """``num[k] / den[k]`` over the keys (rounds) both have, as a Ratio; None when they share no key."""
    ratios = [num[k] / den[k] for k in num if k in den]
    if not ratios:
        return None
    return Ratio(statistics.median(ratios), min(ratios), max(ratios))


def put_ratio(row: dict, name: str, ratio: Ratio | None) -> None:
    """Stores ``ratio`` in a summary row as ``row[name]`` (the median) and ``row[name + " range"]`` ([min, max]),
    rounded to 3 digits: the JSON form every benchmark prints. Nothing is stored for None."""
    if ratio is not None:
        row[name] = round(ratio.median, 3)
        row[f"{name} range"] = [round(ratio.low, 3), round(ratio.high, 3)]


def ratio_cell(row: Mapping, name: str) -> str:
    """The table cell of a ratio stored by put_ratio (empty when the row has none)."""
    if name not in row:
        return ""
    low, high = row[f"{name} range"]
    return Ratio(row[name], low, high).cell()


class JsonLines:
    """Appends records to ``path`` as JSON lines, each flushed as it is written (a killed run keeps what it
    measured); with ``path`` None it writes nothing. A context manager: the file is closed on exit."""

    def __init__(self, path: str | None) -> None:
        self._file: IO[str] | None = open(path, "a") if path else None

    def write(self, record: Mapping) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]], labels: int = 1) -> str:
    """A GitHub markdown table: the first ``labels`` columns left-aligned (what a row is), the others
    right-aligned (what was measured). Cells are printed with ``str``; None prints as an empty cell."""
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "---|" * labels + "---:|" * (len(columns) - labels)]
    for row in rows:
        cells = ["" if cell is None else str(cell) for cell in row]
        if len(cells) != len(columns):
            raise ValueError(f"markdown_table: a row of {len(cells)} cells under {len(columns)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
