"""The examples of a data source, read one at a time.

A source is a text file (``.txt``: documents), a JSON-lines file (``.jsonl``, ``.json``: one object per line), a
parquet file, or a directory written by ``datasets.Dataset.save_to_disk``. Whatever the format, an example is a
:class:`Record`: the fields of one object and where it came from, so that every error can name a file and a line.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offload.errors import ConfigError

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
# The files `save_to_disk` writes at the top of a Dataset directory (state.json, dataset_info.json) or a
# DatasetDict directory (dataset_dict.json).
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SNIFF_BYTES = 1 << 20
ROWS_PER_READ = 1000

KINDS = ("text", "prompt_completion", "messages")
ROLE_FLAGS = {"train": "--data", "eval": "--eval-data"}  # the flag an error about the source names
ROLE_SPLITS = {"train": ("train",), "eval": ("validation", "test", "eval")}  # of a datasets DatasetDict


@dataclass(frozen=True, slots=True)
class Record:
    """One example: ``fields`` as the source holds them, ``where`` is "path:line" (or "path:row N", rows counted
    from 0 as ``dataset[N]`` indexes them)."""

    where: str
    fields: dict[str, Any]


def kind_of(record: Record) -> str:
    """The kind of ``record``: "text" (a str ``text`` field), "prompt_completion" (str ``prompt`` and
    ``completion``) or "messages" (a list of ``{"role": str, "content": str}``). Raises ConfigError naming
    ``record.where`` and the field when the fields fit none of them or hold the wrong types.

    Note [which kind wins]: a record is classified by the first of ``text``, ``prompt``/``completion``,
    ``messages`` it has, so that extra columns (a dataset's ids, sources, scores) never matter, and a record
    that has one of the keys but a wrong value is reported as that kind's error, not as "no known keys".
    """
    fields, where = record.fields, record.where
    if "text" in fields:
        _check_str(fields["text"], where, "text")
        return "text"
    if "prompt" in fields or "completion" in fields:
        if "prompt" not in fields or "completion" not in fields:
            missing = "completion" if "prompt" in fields else "prompt"
            raise ConfigError(f"{where}: a 'prompt' needs a 'completion' and the other way round; '{missing}' is "
                              f"missing (found keys: {', '.join(fields)})")
        _check_str(fields["prompt"], where, "prompt")
        _check_str(fields["completion"], where, "completion")
        return "prompt_completion"
    if "messages" in fields:
        _check_messages(fields["messages"], where)
        return "messages"
    raise ConfigError(f"{where}: expected a 'text' field, 'prompt' and 'completion', or 'messages'; found keys: "
                      f"{', '.join(map(str, fields)) or '(none)'}")


def _check_str(value: object, where: str, field: str) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field '{field}' must be a string, found {_type_name(value)}")


def _check_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: field 'messages' must be a non-empty list of {{'role': str, 'content': str}}, "
                          f"found {_type_name(messages) if not isinstance(messages, list) else 'an empty list'}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConfigError(f"{where}: field 'messages[{i}]' must be an object with 'role' and 'content', "
                              f"found {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise ConfigError(f"{where}: field 'messages[{i}]' has no '{key}' (found keys: "
                                  f"{', '.join(map(str, message))})")
            _check_str(message[key], where, f"messages[{i}].{key}")


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def txt_mode(path: str | Path, flag: str = "--data") -> str:
    """How a ``.txt`` file is cut into documents: "paragraph" when its first MiB holds a blank line between two
    non-blank lines (documents are separated by blank lines), else "line" (each non-empty line is a document).

    Note [txt mode]: blank lines only at the start or the end (a trailing "\\n\\n") do not make a file of
    one-line documents into one paragraph; only a blank line *between* text does.
    """
    with _open_binary(Path(path), flag) as f:
        head = f.read(SNIFF_BYTES)
    seen_text = seen_gap = False
    for line in head.split(b"\n"):
        if line.strip():
            if seen_gap:
                return "paragraph"
            seen_text = True
        elif seen_text:
            seen_gap = True
    return "line"


class RecordStream(Iterator[Record]):
    """The records of one data source, in file order, read lazily: an iterator (it reads the source once) that
    holds one line (text, JSON lines) or one batch of ``ROWS_PER_READ`` rows (parquet, dataset directories) in
    memory, never the whole source.

    Constructing it checks that the source exists and has an accepted format (raising OSError ENOENT or
    ConfigError at once); reading errors are raised while iterating, naming the file and line. ``done`` counts
    what was consumed so far in ``unit`` ("B" of the file for text and JSON lines, "rows" otherwise) out of
    ``total``; it advances as records are yielded, for progress reports.
    """

    def __init__(self, path: str | Path, role: str = "train") -> None:
        self.path = Path(path)
        self.role = role
        self.flag = ROLE_FLAGS[role]
        if not self.path.exists():
            raise OSError(errno.ENOENT, f"{self.flag}: no such file or directory: {self.path}", str(self.path))
        self.format = _format_of(self.path, self.flag)
        self.txt_mode = txt_mode(self.path, self.flag) if self.format == "txt" else None
        self.done = 0
        if self.format in ("txt", "jsonl"):
            self.unit, self.total = "B", self.path.stat().st_size
        else:
            self.unit, self.total = "rows", -1  # known once the dataset is opened (see _open_dataset)
        self._records: Iterator[Record] | None = None

    def __iter__(self) -> RecordStream:
        return self

    def __next__(self) -> Record:
        if self._records is None:
            self._records = self._read()
        return next(self._records)

    def _read(self) -> Iterator[Record]:
        if self.format == "txt":
            return self._paragraphs() if self.txt_mode == "paragraph" else self._lines()
        if self.format == "jsonl":
            return self._json_lines()
        return self._rows()

    def _lines(self) -> Iterator[Record]:
        for number, line in self._decoded_lines():
            text = line.rstrip("\r\n")
            if text.strip():
                yield Record(f"{self.path}:{number}", {"text": text})

    def _paragraphs(self) -> Iterator[Record]:
        lines: list[str] = []
        first = 0
        for number, line in self._decoded_lines():
            if line.strip():
                if not lines:
                    first = number
                lines.append(line)
            elif lines:
                yield Record(f"{self.path}:{first}", {"text": "".join(lines).rstrip("\r\n")})
                lines = []
        if lines:
            yield Record(f"{self.path}:{first}", {"text": "".join(lines).rstrip("\r\n")})

    def _json_lines(self) -> Iterator[Record]:
        for number, line in self._decoded_lines():
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not a JSON object ({e.msg} at column {e.colno}){self._json_hint(number)}"
                                  ) from None
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: not a JSON object (found a JSON {_json_type(value)})"
                                  f"{self._json_hint(number)}")
            yield Record(where, value)

    def _json_hint(self, number: int) -> str:
        # A .json file holding one array of objects is the common mistake; say how it is read.
        if self.path.suffix.lower() == ".json" and number == 1:
            return "; a .json file is read as JSON lines: one object per line"
        return ""

    def _decoded_lines(self) -> Iterator[tuple[int, str]]:
        """(1-based line number, line with its newline) for each line; ``done`` counts the bytes consumed."""
        with _open_binary(self.path, self.flag) as f:
            for number, raw in enumerate(f, start=1):
                self.done += len(raw)
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ConfigError(f"{self.path}:{number}: not valid UTF-8 (byte {e.start + 1} of the line)"
                                      ) from None

    def _rows(self) -> Iterator[Record]:
        dataset = self._open_dataset()
        n = 0
        for batch in dataset.iter(batch_size=ROWS_PER_READ):
            columns = list(batch)
            count = len(batch[columns[0]]) if columns else 0
            for i in range(count):
                self.done = n + 1
                yield Record(f"{self.path}:row {n}", {c: batch[c][i] for c in columns})
                n += 1

    def _open_dataset(self) -> Any:
        """The dataset behind a parquet file (streamed, nothing copied) or a save_to_disk directory (memory
        mapped); sets ``total`` to its row count."""
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"{self.flag}: reading {self.path} needs the datasets library: "
                              "pip install 'offload[datasets]'") from None
        if self.format == "parquet":
            # Note [parquet without a copy]: Dataset.from_parquet would first convert the whole file into an
            # Arrow copy in ~/.cache/huggingface; streaming reads it in row batches where it is. The row count
            # comes from the parquet footer (pyarrow is a dependency of datasets).
            import pyarrow.parquet

            self.total = pyarrow.parquet.read_metadata(self.path).num_rows
            return datasets.load_dataset("parquet", data_files=str(self.path), split="train", streaming=True)
        loaded = datasets.load_from_disk(str(self.path))
        if isinstance(loaded, datasets.DatasetDict):
            # training reads the "train" split, evaluation the first of "validation", "test", "eval"
            splits = list(loaded)
            wanted = next((name for name in ROLE_SPLITS[self.role] if name in loaded), None)
            if wanted is not None:
                loaded = loaded[wanted]
            elif len(splits) == 1:
                loaded = loaded[splits[0]]
            else:
                raise ConfigError(f"{self.flag}: {self.path} holds the splits {', '.join(splits)} and none is "
                                  f"{' or '.join(repr(n) for n in ROLE_SPLITS[self.role])}; name one split's "
                                  f"directory instead (e.g. {self.path / splits[0]})")
        self.total = len(loaded)
        return loaded


def read_records(path: str | Path, role: str = "train") -> RecordStream:
    """The records of the data source at ``path`` (see :class:`RecordStream`), an iterator that streams them.
    ``role`` ("train" or "eval") names the flag errors mention and the split a dataset dictionary gives.

    Raises OSError(ENOENT) when ``path`` does not exist and ConfigError for a format it cannot read.
    """
    return RecordStream(path, role)


def _format_of(path: Path, flag: str) -> str:
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASET_MARKERS):
            return "dataset"
        raise ConfigError(f"{flag}: {path} is a directory but not one written by datasets' save_to_disk (it has "
                          f"none of {', '.join(DATASET_MARKERS)})")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "txt"
    if suffix in JSON_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    accepted = ", ".join(TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES)
    raise ConfigError(f"{flag}: {path} has the suffix {suffix or '(none)'!r}; accepted: {accepted}, or a "
                      f"directory written by datasets' save_to_disk")


def _open_binary(path: Path, flag: str):
    try:
        return open(path, "rb")
    except OSError as e:
        raise OSError(e.errno, f"{flag}: cannot read {path}: {e.strerror}", str(path)) from None


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null"
