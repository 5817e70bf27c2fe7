"""export: a checkpoint's weights as a plain safetensors file (plus the model's config.json), for use without us.

The output directory holds ``model.safetensors`` with the model's own ``state_dict`` keys and full-precision
(fp32) floating-point tensors, and ``config.json`` when the checkpoint has the model's Hugging Face config, so
``model.load_state_dict(safetensors.torch.load_file(...), strict=False)`` and ``from_pretrained(DIR)`` both
work. A tensor tied under several keys (e.g. input embeddings and LM head) is stored once, under its first key,
as ``save_pretrained`` and ``safetensors.torch.save_model`` do; the others are listed in the file's metadata
(``tied``). Tensors are streamed through a 16 MiB buffer, so exporting needs no memory for the model itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from offload.checkpoint.directory import CheckpointDir, fsync_dir, write_file_durably
from offload.checkpoint.sharded_reader import ShardedTensorReader, state_reader
from offload.checkpoint.tensor_file import TensorFileReader, TensorFileWriter, plan_entries
from offload.config import IOConfig
from offload.errors import CheckpointError
from offload.storage.io_engine import IoEngine

log = logging.getLogger("offload")

WEIGHTS_FILE = "model.safetensors"
_CHUNK_BYTES = 16 << 20


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Writes ``out_dir/model.safetensors`` (and ``config.json``) from the checkpoint at ``checkpoint``, after
    verifying it. Returns the path of the weights file. Files in ``out_dir`` are replaced atomically; other
    files there are left alone. Raises :class:`offload.CheckpointError` for a missing or corrupt checkpoint
    and ``OSError`` (with the path) for a failed write."""
    start = time.perf_counter()
    version, _ = CheckpointDir(checkpoint).verify()
    meta_path = version / "meta.json"
    layout, world = _layout(meta_path)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create {out}: {e.strerror}", str(out)) from None
    io = IoEngine(IOConfig())
    readers = {}
    try:
        readers["model"] = TensorFileReader(version / "model.safetensors", io)
        readers["master"] = state_reader(version, "master", world, io)
        sources = [(key, readers[source], name) for key, source, name in layout if source != "alias"]
        tied = {key: name for key, source, name in layout if source == "alias"}
        entries = plan_entries([(key, _exported_dtype(reader.entry(name).dtype), reader.entry(name).shape)
                                for key, reader, name in sources])
        target = out / WEIGHTS_FILE
        partial = out / f".{WEIGHTS_FILE}.partial-{os.getpid()}"
        metadata = {"format": "pt", "tied": json.dumps(tied)}
        writer = TensorFileWriter(partial, entries, io, metadata)
        try:
            for key, reader, name in sources:
                _copy(reader, name, writer)
            record = writer.finish()
            os.replace(partial, target)
        except BaseException:
            writer.close()
            partial.unlink(missing_ok=True)
            raise
    finally:
        for reader in readers.values():
            reader.close()
        io.close()
    if (version / "config.json").exists():
        partial_config = out / f".config.json.partial-{os.getpid()}"
        write_file_durably(partial_config, (version / "config.json").read_bytes())
        os.replace(partial_config, out / "config.json")
    fsync_dir(out)
    log.info("offload: exported %d tensors (%.2f GB) from %s to %s in %.1f s", len(entries), record.size / 1e9,
             checkpoint, target, time.perf_counter() - start)
    return target


def _exported_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype.is_floating_point else dtype


def _copy(reader: TensorFileReader | ShardedTensorReader, name: str, writer: TensorFileWriter) -> None:
    """Appends tensor ``name`` of ``reader`` to ``writer``, converted to its exported dtype, piece by piece."""
    entry = reader.entry(name)
    out_dtype = _exported_dtype(entry.dtype)
    element = torch.empty((), dtype=entry.dtype).element_size()
    numel = entry.nbytes // element
    step = max(1, _CHUNK_BYTES // max(element, torch.empty((), dtype=out_dtype).element_size()))
    for first in range(0, numel, step):
        n = min(step, numel - first)
        piece = torch.empty(n, dtype=entry.dtype)
        reader.wait(reader.read(name, first * element, piece))
        writer.wait(writer.append(piece.to(out_dtype)))


def _layout(meta_path: Path) -> tuple[list[tuple[str, str, str]], int]:
    """The checkpoint's ``state_dict_keys`` (key, source, name) and world size, checked."""
    try:
        meta = json.loads(meta_path.read_bytes())
        layout = [(str(key), str(source), str(name)) for key, source, name in meta["state_dict_keys"]]
        world = meta.get("world_size", 1)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: malformed ({type(e).__name__}: {e})") from None
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{meta_path}: world_size: expected an integer >= 1, got {world!r}")
    unknown = sorted({source for _, source, _ in layout} - {"model", "master", "alias", "frozen"})
    if unknown:
        raise CheckpointError(f"{meta_path}: state_dict_keys: unknown source {unknown[0]!r} "
                              "(model, master, alias or frozen)")
    frozen = [key for key, source, _ in layout if source == "frozen"]
    if frozen:  # (a LoRA checkpoint: the adapters and their state, and only a fingerprint of the base)
        raise CheckpointError(f"{meta_path}: the checkpoint does not hold the frozen parameters ({len(frozen)}, "
                              f"e.g. {frozen[0]!r}), only their fingerprint; export from an engine with the base "
                              "loaded: engine.load(checkpoint), then offload.save_pretrained(engine, DIR)")
    return layout, world
