"""Tensor files: safetensors files written as a stream, read back range by range, with a CRC-32 of every byte.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape
and byte range, then the tensors' bytes back to back. Because the header only needs names, dtypes and shapes,
it can be written first and the data appended afterwards in header order, chunk by chunk, from wherever it is
(a host buffer, a staging slot just read from a swap file): a checkpoint never needs a tensor whole in memory.
The header is padded with spaces (which the format allows) so the data starts on a 4 KiB boundary. The files
are ordinary safetensors files: ``safetensors.safe_open`` reads them.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from offload.errors import CheckpointError
from offload.storage.io_engine import IoEngine, IoHandle

DATA_ALIGNMENT = 4096
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit: a larger "header" is a corrupt length field
_READ_CHUNK = 16 << 20

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a tensor file: ``begin``/``end`` are byte offsets from the start of the data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class FileRecord:
    """What the manifest keeps of a finished file: its size and the CRC-32 of all its bytes."""

    size: int
    crc32: int


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (for ``zlib.crc32`` and ``os.write``)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("byte_view: expected a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def plan_entries(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[TensorEntry]:
    """Byte ranges for ``tensors`` (name, dtype, shape), back to back in the given order."""
    entries, offset = [], 0
    for name, dtype, shape in tensors:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in a safetensors file")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        entries.append(TensorEntry(name, dtype, tuple(int(d) for d in shape), offset, offset + nbytes))
        offset += nbytes
    return entries


def encode_header(entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces so that the data starts 4 KiB-aligned."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    for e in entries:
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    padded = -(-(8 + len(text)) // DATA_ALIGNMENT) * DATA_ALIGNMENT - 8
    return struct.pack("<Q", padded) + text + b" " * (padded - len(text))


class TensorFileWriter:
    """Writes one tensor file: the header at once, then the tensors' bytes through ``append`` in header order.

    Appends are queued on ``io`` (asynchronous, checked writes); the caller keeps each appended buffer
    unchanged until the handles ``append`` returned are waited for with :meth:`wait` (or until :meth:`finish`).
    The file is preallocated to its final size first, so a full disk fails before any data is written.
    ``finish`` waits for everything, checks that exactly the declared bytes arrived, fsyncs and closes.
    """

    def __init__(self, path: Path, entries: list[TensorEntry], io: IoEngine,
                 metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.io = io
        header = encode_header(entries, metadata)
        self.data_start = len(header)
        self.size = self.data_start + (entries[-1].end if entries else 0)
        self._cursor = self.data_start
        self._crc = zlib.crc32(header)
        self._pending: dict[int, IoHandle] = {}
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if self.size:
                os.posix_fallocate(self.fd, 0, self.size)
            _write_all(self.fd, memoryview(header), 0, path)
        except OSError as e:
            os.close(self.fd)
            raise OSError(e.errno, f"writing {path}: {e.strerror}", str(path)) from None

    def append(self, data: torch.Tensor) -> list[IoHandle]:
        """Queues ``data`` (a contiguous CPU tensor) as the next bytes of the file."""
        nbytes = data.numel() * data.element_size()
        if self._cursor + nbytes > self.size:
            raise RuntimeError(f"{self.path}: {self._cursor + nbytes - self.size} bytes more than declared")
        if nbytes == 0:
            return []
        self._crc = zlib.crc32(byte_view(data), self._crc)
        handle = self.io.write(self.fd, self._cursor, data.view(-1), str(self.path))
        self._cursor += nbytes
        self._pending[handle.id] = handle
        return [handle]

    def wait(self, handles: list[IoHandle]) -> None:
        for handle in handles:
            if self._pending.pop(handle.id, None) is not None:
                self.io.wait(handle)

    def finish(self) -> FileRecord:
        self.wait(list(self._pending.values()))
        if self._cursor != self.size:
            raise RuntimeError(f"{self.path}: {self.size - self._cursor} declared bytes were never written")
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise OSError(e.errno, f"fsync of {self.path}: {e.strerror}", str(self.path)) from None
        finally:
            self.close()
        return FileRecord(self.size, self._crc)

    def close(self) -> None:
        """Abandons the file (waits for queued writes, which still use the descriptor); idempotent."""
        for handle in list(self._pending.values()):
            try:
                self.io.wait(handle)
            except OSError:
                pass  # abandoning after a failure: the first error is the one reported
        self._pending.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


class TensorFileReader:
    """Reads a tensor file's header (validated) and any byte range of a tensor into a caller's buffer."""

    def __init__(self, path: Path, io: IoEngine) -> None:
        self.path = path
        self.io = io
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
        try:
            self.size = os.fstat(self.fd).st_size
            self.entries, self.metadata, self.data_start = self._read_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _read_header(self) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
        prefix = os.pread(self.fd, 8, 0)
        if len(prefix) < 8:
            raise CheckpointError(f"{self.path}: truncated ({self.size} bytes; no header)")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > self.size:
            raise CheckpointError(f"{self.path}: corrupt or truncated header (length field {length}, "
                                  f"file {self.size} bytes)")
        try:
            header = json.loads(os.pread(self.fd, length, 8))
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from None
        metadata = header.pop("__metadata__", {}) or {}
        entries: dict[str, TensorEntry] = {}
        end_of_data = 0
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry") from None
            expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if begin < 0 or end - begin != expected:
                raise CheckpointError(f"{self.path}: tensor {name!r}: byte range [{begin}, {end}) does not fit "
                                      f"shape {list(shape)} of {info['dtype']}")
            entries[name] = TensorEntry(name, dtype, shape, begin, end)
            end_of_data = max(end_of_data, end)
        if 8 + length + end_of_data > self.size:
            raise CheckpointError(f"{self.path}: truncated ({self.size} bytes; the header declares "
                                  f"{8 + length + end_of_data})")
        return entries, metadata, 8 + length

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None

    def read(self, name: str, byte_offset: int, out: torch.Tensor) -> IoHandle:
        """Queues a read of ``out.nbytes`` bytes of tensor ``name``, from ``byte_offset`` within it, into
        ``out`` (contiguous CPU); wait for it on ``io``."""
        entry = self.entry(name)
        nbytes = out.numel() * out.element_size()
        if byte_offset < 0 or byte_offset + nbytes > entry.nbytes:
            raise ValueError(f"{self.path}: bytes [{byte_offset}, {byte_offset + nbytes}) are outside tensor "
                             f"{name!r} ({entry.nbytes} bytes)")
        return self.io.read(self.fd, self.data_start + entry.begin + byte_offset, out.view(-1), str(self.path))

    def wait(self, handles: IoHandle | list[IoHandle]) -> None:
        """Waits for reads queued by ``read`` (one handle or a list, as ShardedTensorReader returns)."""
        for handle in handles if isinstance(handles, list) else [handles]:
            self.io.wait(handle)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def file_crc32(path: Path, bounce: torch.Tensor | None = None) -> FileRecord:
    """Size and CRC-32 of the file at ``path``, read in 16 MiB pieces (into ``bounce`` when given)."""
    buffer = bounce if bounce is not None else torch.empty(_READ_CHUNK, dtype=torch.uint8)
    view = byte_view(buffer)
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            size += n
    return FileRecord(size, crc)
