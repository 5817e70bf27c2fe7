"""A data source tokenized once: token ids and trained mask in two flat files, memory-mapped for training.

``tokenize`` streams the records of a source through an :class:`~offload.data.encode.Encoder` one batch at a
time and appends the results to ``KEY.ids`` (little-endian uint32) and ``KEY.mask`` (uint8, 1 = trained), then
writes ``KEY.meta.json``. The key hashes what decides the ids (the source's path, size and mtime, the encoder, the
file format), so a second run on the same inputs maps the files without tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from offload.data.encode import Encoder
from offload.data.records import Record, RecordStream, read_records
from offload.storage.ownership import pid_alive

log = logging.getLogger("offload")

# Bump when the files' layout or the encoding rules change: older caches then no longer match.
FORMAT_VERSION = 2  # 2: the meta holds the content hash
MAGIC = "offload token cache"
WORK_PREFIX = ".tokenizing-"  # + pid + "-" + random: a run's work directory in the cache directory
LOG_EVERY_S = 10.0
WRITE_BUFFER = 4 << 20
# Note [batch size in characters]: the tokenizer's batch output costs ~70 bytes of RAM per input character
# (Rust encodings with offsets and token strings, then Python lists), so a batch ends at ``batch_records``
# records or at BATCH_CHARS characters, whichever comes first: ~35 MB at most, however long the documents are.
# One record is never split, so a single huge document (a .txt without newlines) is still held whole.
BATCH_CHARS = 1 << 19
IDS_DTYPE = np.dtype("<u4")
MASK_DTYPE = np.dtype("u1")


@dataclass(frozen=True)
class TokenizedData:
    """The tokens of one source. ``ids`` (uint32) and ``mask`` (uint8, 1 where trained) are read-only numpy
    memmaps of ``num_tokens`` elements, backed by files (empty in-memory arrays when there are no tokens);
    ``records`` counts the records per kind; ``fingerprint`` is the cache key; ``cache_dir`` is where the files
    are kept (None when they were written to scratch space and not kept); ``from_cache`` says whether they
    were read from an earlier run."""

    ids: np.ndarray
    mask: np.ndarray
    num_tokens: int
    num_trained: int
    records: dict[str, int]
    source: str
    fingerprint: str
    content: str  # sha256 of the ids and the mask: what a resumed run compares (Note [content hash])
    cache_dir: Path | None
    from_cache: bool = field(default=False)

    def describe(self) -> str:
        """One line for the command line: how much data there is, from where, and where its tokens are."""
        where = ("not cached" if self.cache_dir is None
                 else f"read from cache {self.cache_dir}" if self.from_cache else f"cached in {self.cache_dir}")
        return (f"{sum(self.records.values()):,} records, {self.num_tokens:,} tokens ({self.num_trained:,} trained) "
                f"from {self.source}, {where}")


def tokenize(path: str | Path, encoder: Encoder, cache_dir: Path | None, *, scratch_dir: Path,
             batch_records: int = 1000, progress: bool = True, role: str = "train") -> TokenizedData:
    """The tokens of the data source at ``path``, encoded by ``encoder``.

    With a writable ``cache_dir`` (created if missing), the files are kept there and reused by a later call with
    the same source (same absolute path, size and mtime) and encoder; otherwise (None, or not writable: logged)
    they are written into ``scratch_dir`` and unlinked once mapped, so nothing is left behind. Memory stays
    bounded by one batch (``batch_records`` records, at most about BATCH_CHARS characters unless one record is
    longer: Note [batch size in characters]) whatever the size of the source. Shows a progress bar when
    ``progress`` and stderr is a terminal, else logs a line every ~10 s; always logs a final line.

    Raises what :func:`~offload.data.records.read_records` and :meth:`Encoder.encode` raise, and OSError naming
    the file when writing fails.
    """
    stream = read_records(path, role)
    size, mtime_ns = _stat_source(stream.path)
    key = cache_key(stream.path, size, mtime_ns, encoder)
    if cache_dir is not None:
        cached = _open_cached(Path(cache_dir), key)
        if cached is not None:
            log.info("%s: tokens read from the cache (%s), not tokenized again", stream.path, cache_dir)
            return cached
    out_dir = Path(cache_dir) if cache_dir is not None and _writable(Path(cache_dir)) else None
    meta = {"magic": MAGIC, "format": FORMAT_VERSION, "key": key, "source": str(stream.path.resolve()),
            "size": size, "mtime_ns": mtime_ns, "tokenizer": encoder.fingerprint, "txt_mode": stream.txt_mode}
    if out_dir is not None:
        _remove_abandoned(out_dir)
    # (the pid in the name lets a later run remove what a killed one left: _remove_abandoned)
    with tempfile.TemporaryDirectory(dir=out_dir or scratch_dir, prefix=f"{WORK_PREFIX}{os.getpid()}-") as work:
        ids_tmp, mask_tmp = Path(work) / "ids", Path(work) / "mask"
        meta.update(_write(stream, encoder, ids_tmp, mask_tmp, batch_records, progress, size))
        if out_dir is None:
            return _map(ids_tmp, mask_tmp, meta, cache_dir=None, from_cache=False)
        # Note [cache commit order]: the data files are renamed into place first and the meta last; the meta
        # states the files' sizes, so a cache is valid only when its meta exists and both sizes match. A crash
        # at any point leaves either no meta (not a cache) or a complete one.
        ids_path, mask_path, meta_path = _cache_paths(out_dir, key)
        os.replace(ids_tmp, ids_path)
        os.replace(mask_tmp, mask_path)
        meta_tmp = Path(work) / "meta"
        _write_synced(meta_tmp, json.dumps(meta, indent=1).encode())
        os.replace(meta_tmp, meta_path)
    _remove_stale(out_dir, meta)
    return _map(ids_path, mask_path, meta, cache_dir=out_dir, from_cache=False)


def _remove_abandoned(cache_dir: Path) -> None:
    """Removes the work directories of tokenizing runs that were killed (their process is gone)."""
    for entry in cache_dir.iterdir():
        pid = entry.name[len(WORK_PREFIX):].split("-", 1)[0]
        if entry.name.startswith(WORK_PREFIX) and pid.isdigit() and not pid_alive(int(pid)):
            log.info("%s: removing %s, left by a run that was killed while tokenizing", cache_dir, entry.name)
            shutil.rmtree(entry, ignore_errors=True)


def cache_key(path: Path, size: int, mtime_ns: int, encoder: Encoder) -> str:
    """sha256 of the source's absolute path, size and mtime, the encoder's fingerprint and the format version."""
    identity = [str(path.resolve()), size, mtime_ns, encoder.fingerprint, FORMAT_VERSION]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def _stat_source(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file; of a directory, the total size and latest mtime of the files under it."""
    st = path.stat()
    if not path.is_dir():
        return st.st_size, st.st_mtime_ns
    size, mtime_ns = 0, st.st_mtime_ns
    for root, _, files in os.walk(path):
        for name in files:
            fst = os.stat(os.path.join(root, name))
            size += fst.st_size
            mtime_ns = max(mtime_ns, fst.st_mtime_ns)
    return size, mtime_ns


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path, Path]:
    return cache_dir / f"{key}.ids", cache_dir / f"{key}.mask", cache_dir / f"{key}.meta.json"


def _open_cached(cache_dir: Path, key: str) -> TokenizedData | None:
    """The cache of ``key`` in ``cache_dir`` if it is complete (Note [cache commit order]), else None."""
    ids_path, mask_path, meta_path = _cache_paths(cache_dir, key)
    try:
        meta = json.loads(meta_path.read_text())
        n = meta["num_tokens"]
        valid = (meta.get("magic") == MAGIC and meta.get("format") == FORMAT_VERSION and meta.get("key") == key
                 and ids_path.stat().st_size == n * IDS_DTYPE.itemsize
                 and mask_path.stat().st_size == n * MASK_DTYPE.itemsize)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not valid:
        log.info("%s: incomplete token cache, tokenizing again", meta_path)
        return None
    return _map(ids_path, mask_path, meta, cache_dir=cache_dir, from_cache=True)


def _writable(cache_dir: Path) -> bool:
    """Whether files can be created in ``cache_dir`` (created if missing); logs why not when they cannot."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
        return True
    except OSError as e:
        log.warning("token cache %s is not writable (%s); tokenizing into scratch space, not kept",
                    cache_dir, e.strerror or e)
        return False


def _write(stream: RecordStream, encoder: Encoder, ids_path: Path, mask_path: Path, batch_records: int,
           progress: bool, size: int) -> dict:
    """Encodes ``stream`` batch by batch into the two files (synced before returning); returns the counts."""
    kinds: Counter[str] = Counter()
    num_tokens = num_trained = 0
    # Note [content hash]: the cache key names the source by path, size and mtime (cheap to check before
    # reading anything); what the tokens *are* is this hash of the ids and the mask, taken as they are written.
    # A resumed run compares it with the one its checkpoint saved: the same tokens in the same order are the
    # same data, whatever the file is called or when it was touched.
    ids_hash, mask_hash = hashlib.sha256(), hashlib.sha256()
    report = _Progress(stream, progress, size)
    records = iter(stream)
    try:
        with open(ids_path, "wb", buffering=WRITE_BUFFER) as ids_file, \
                open(mask_path, "wb", buffering=WRITE_BUFFER) as mask_file:
            for batch in _batches(records, batch_records):
                encoded = encoder.encode(batch)
                ids = np.concatenate([e.ids for e in encoded]).astype(IDS_DTYPE, copy=False)
                mask = np.concatenate([e.trained for e in encoded]).astype(MASK_DTYPE, copy=False)
                ids_file.write(ids.tobytes())
                mask_file.write(mask.tobytes())
                ids_hash.update(ids.tobytes())
                mask_hash.update(mask.tobytes())
                kinds.update(e.kind for e in encoded)
                num_tokens += len(ids)
                num_trained += int(mask.sum())
                report.update(num_tokens)
            for f in (ids_file, mask_file):
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        if e.filename is not None:  # a read error, already naming the source
            raise
        raise OSError(e.errno, f"writing tokens into {ids_path.parent}: {e.strerror}", str(ids_path.parent)
                      ) from None
    finally:
        report.close()
    report.finish(num_tokens)
    content = hashlib.sha256(ids_hash.digest() + mask_hash.digest()).hexdigest()
    return {"num_tokens": num_tokens, "num_trained": num_trained, "records": dict(kinds), "content": content}


def _batches(records: Iterator[Record], max_records: int) -> Iterator[list[Record]]:
    """``records`` in consecutive lists of at most ``max_records`` records and about BATCH_CHARS characters."""
    batch: list[Record] = []
    chars = 0
    for record in records:
        batch.append(record)
        chars += _chars(record.fields)
        if len(batch) >= max_records or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _chars(fields: dict) -> int:
    """The characters of text in a record's fields (strings and messages' contents), for batch sizing."""
    n = 0
    for value in fields.values():
        if isinstance(value, str):
            n += len(value)
        elif isinstance(value, list):
            n += sum(len(m["content"]) for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))
    return n


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _map(ids_path: Path, mask_path: Path, meta: dict, cache_dir: Path | None, from_cache: bool) -> TokenizedData:
    """The data of ``meta`` with its files memory-mapped read-only. Scratch files (``cache_dir`` None) are
    unlinked once mapped: the mappings keep their contents alive, and nothing is left on disk afterwards."""
    n = meta["num_tokens"]
    if n:
        ids = np.memmap(ids_path, dtype=IDS_DTYPE, mode="r", shape=(n,))
        mask = np.memmap(mask_path, dtype=MASK_DTYPE, mode="r", shape=(n,))
    else:  # mmap cannot map an empty file
        ids, mask = np.empty(0, dtype=IDS_DTYPE), np.empty(0, dtype=MASK_DTYPE)
    if cache_dir is None:
        ids_path.unlink()
        mask_path.unlink()
    return TokenizedData(ids=ids, mask=mask, num_tokens=n, num_trained=meta["num_trained"],
                         records=meta["records"], source=meta["source"], fingerprint=meta["key"],
                         content=meta["content"], cache_dir=cache_dir, from_cache=from_cache)


def _remove_stale(cache_dir: Path, meta: dict) -> None:
    """Removes the caches of earlier versions of the same source with the same encoder, so that editing a data
    file does not grow the cache without bound. Best effort: a cache that cannot be removed stays."""
    for other in cache_dir.glob("*.meta.json"):
        key = other.name.removesuffix(".meta.json")
        if key == meta["key"]:
            continue
        try:
            old = json.loads(other.read_text())
            if old.get("magic") != MAGIC or (old.get("source"), old.get("tokenizer")) != (meta["source"],
                                                                                          meta["tokenizer"]):
                continue
            other.unlink()  # the meta first: without it the data files are no longer a cache
            for path in _cache_paths(cache_dir, key)[:2]:
                path.unlink(missing_ok=True)
        except (OSError, ValueError, AttributeError):
            continue


class _Progress:
    """Reports how far tokenizing got: a tqdm bar on a terminal, else a log line every ``LOG_EVERY_S``."""

    def __init__(self, stream: RecordStream, enabled: bool, size: int) -> None:
        self.stream, self.enabled, self.size = stream, enabled, size
        self.start = self.last_log = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=stream.total if stream.total >= 0 else None, unit=stream.unit,
                            unit_scale=True, desc=f"tokenizing {stream.path.name}", dynamic_ncols=True,
                            leave=False)

    def update(self, num_tokens: int) -> None:
        done, total = self.stream.done, self.stream.total
        if self.bar is not None:
            if self.bar.total is None and total >= 0:  # a dataset's row count is known once it is opened
                self.bar.total = total
            self.bar.set_postfix_str(f"{num_tokens:,} tokens", refresh=False)
            self.bar.update(done - self.bar.n)
        elif self.enabled and time.monotonic() - self.last_log >= LOG_EVERY_S:
            self.last_log = time.monotonic()
            share = f"{100 * done / total:.0f}% " if total > 0 else ""
            log.info("tokenizing %s: %s(%s of %s %s), %s tokens so far", self.stream.path, share,
                     f"{done:,}", f"{total:,}" if total >= 0 else "?", self.stream.unit, f"{num_tokens:,}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finish(self, num_tokens: int) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        log.info("tokenized %s: %s tokens in %.1f s (%.1f MB/s)", self.stream.path, f"{num_tokens:,}", elapsed,
                 self.size / elapsed / 1e6)
