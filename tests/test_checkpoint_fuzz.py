"""engine.load over random edits of a valid checkpoint's meta.json and manifest.json, with every checksum made
consistent again (so the edits reach the parser, not the CRC check): each load either raises CheckpointError and
leaves the engine exactly as it was (weights, Adam state, step counts, hyper-parameters, loss scale), or loads
the checkpoint's weights exactly. Never a partial apply, never another exception type."""

from __future__ import annotations

import copy
import json
import random
import shutil
import zlib
from pathlib import Path

import pytest
import torch

import offload
from engine_reference import batches, loss_of, mlp
from offload.checkpoint.directory import CURRENT, MANIFEST

REPLACEMENTS = ["x", -1, 0, 1.5, None, [], {}, True, 2**70, "AAAA", [1, 2, 3], {"a": 1}, float("nan"), ""]


def _engine(tmp_path, seed):
    config = offload.Config(device="cpu", dtype="fp32", params="cpu", optimizer="nvme",
                            nvme_dir=str(tmp_path / f"swap{seed}"))
    return offload.Engine(mlp(seed=seed), config, lr=3e-3, weight_decay=0.1)


def _train(engine, steps, seed):
    for step in batches("mlp", steps, 1, seed=seed):
        engine.backward(loss_of("mlp", engine, step[0]))
        engine.step()


def _fingerprint(engine, where: Path) -> dict:
    """Everything a load may change, as plain values and files: weights, Adam state (a checkpoint of it), step
    counts, hyper-parameters, the loss scale."""
    if where.exists():
        shutil.rmtree(where)
    engine.save(where)
    version = where / json.loads((where / CURRENT).read_text())["version"]
    states = {p.name: p.read_bytes() for p in version.iterdir() if p.suffix == ".safetensors"}
    return {"states": states, "step": engine.training_state().step,
            "param_steps": copy.deepcopy(engine.training_state().param_steps),
            "hyper": [{k: v for k, v in g.items() if k != "params"} for g in engine.param_groups],
            "scaler": engine.training_state().scaler.state_dict()}


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node[:4]):  # (a few entries of long lists: the RNG state's 625 integers)
            yield from _paths(value, prefix + (i,))


def _edited(document, rng: random.Random):
    """A copy of ``document`` with one random edit: a value replaced, a key removed, or a key added."""
    document = copy.deepcopy(document)
    path = rng.choice([p for p in _paths(document) if p])
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    op = rng.choice(["replace", "replace", "remove", "add"])
    if op == "remove" and isinstance(parent, dict):
        del parent[path[-1]]
    elif op == "add" and isinstance(parent, dict):
        parent["unexpected"] = rng.choice(REPLACEMENTS)
    else:
        parent[path[-1]] = rng.choice(REPLACEMENTS)
    return document, f"{op} {'.'.join(map(str, path))}"


def _rewrite(checkpoint: Path, name: str, document) -> None:
    """Writes ``name`` (meta.json or manifest.json) of the current version and makes every checksum that
    covers it consistent again."""
    current = json.loads((checkpoint / CURRENT).read_text())
    version = checkpoint / current["version"]
    data = json.dumps(document).encode()
    (version / name).write_bytes(data)
    if name != MANIFEST:
        manifest = json.loads((version / MANIFEST).read_bytes())
        manifest["files"][name] = {"size": len(data), "crc32": zlib.crc32(data)}
        (version / MANIFEST).write_bytes(json.dumps(manifest).encode())
    current["manifest_crc32"] = zlib.crc32((version / MANIFEST).read_bytes())
    (checkpoint / CURRENT).write_text(json.dumps(current))


@pytest.mark.parametrize("target", ["meta.json", MANIFEST])
def test_random_edits_either_fail_cleanly_or_load_exactly(tmp_path, target):
    source = tmp_path / "source"
    with _engine(tmp_path, 0) as engine:
        _train(engine, 3, seed=1)
        engine.save(source, extra={"data_pos": 3})
        expected = engine.state_dict()
    version = source / json.loads((source / CURRENT).read_text())["version"]
    original = json.loads((version / target).read_bytes())
    rng = random.Random(target)
    outcomes = {"refused": 0, "loaded": 0}
    with _engine(tmp_path, 5) as engine:
        _train(engine, 2, seed=9)  # a state of its own: a partial apply would show
        for trial in range(40):
            checkpoint = tmp_path / f"edited{trial}"
            shutil.copytree(source, checkpoint)
            document, edit = _edited(original, rng)
            _rewrite(checkpoint, target, document)
            before = _fingerprint(engine, tmp_path / "before")
            try:
                engine.load(checkpoint)
            except offload.CheckpointError:
                outcomes["refused"] += 1
                assert engine._state.failed is None, edit
                assert _fingerprint(engine, tmp_path / "after") == before, f"partly applied: {edit}"
            else:
                outcomes["loaded"] += 1
                state = engine.state_dict()
                assert all(torch.equal(state[k], expected[k]) for k in expected), edit
                _train(engine, 2, seed=9)  # back to a state of its own for the next trial
            shutil.rmtree(checkpoint)
    assert outcomes["refused"] > 0  # (the edits did reach the parser)


@pytest.mark.parametrize("target", ["meta.json", MANIFEST])
def test_export_of_an_edited_checkpoint_fails_cleanly_or_exports(tmp_path, target):
    source = tmp_path / "source"
    with _engine(tmp_path, 0) as engine:
        _train(engine, 1, seed=1)
        engine.save(source)
    version = source / json.loads((source / CURRENT).read_text())["version"]
    original = json.loads((version / target).read_bytes())
    rng = random.Random("export" + target)
    for trial in range(25):
        checkpoint, out = tmp_path / f"edited{trial}", tmp_path / f"out{trial}"
        shutil.copytree(source, checkpoint)
        document, edit = _edited(original, rng)
        _rewrite(checkpoint, target, document)
        try:
            offload.export(checkpoint, out)
        except offload.CheckpointError:
            assert not out.exists() or not any(out.iterdir()), edit  # nothing half-written
        shutil.rmtree(checkpoint)


def test_the_export_command_names_a_manifest_that_is_not_json(tmp_path):
    import subprocess
    import sys

    source = tmp_path / "source"
    with _engine(tmp_path, 0) as engine:
        _train(engine, 1, seed=1)
        engine.save(source)
    version = source / json.loads((source / CURRENT).read_text())["version"]
    (version / MANIFEST).write_bytes(b"{not json")
    current = json.loads((source / CURRENT).read_text())
    current["manifest_crc32"] = zlib.crc32(b"{not json")
    (source / CURRENT).write_text(json.dumps(current))
    out = subprocess.run([sys.executable, "-m", "offload", "export", str(source), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"{version / MANIFEST}: not valid JSON" in out.stderr
