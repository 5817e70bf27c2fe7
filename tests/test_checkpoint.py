"""Checkpoints: exact resume for every placement, atomic replacement, corruption and full-disk handling."""

from __future__ import annotations

import json
import os

import pytest
import torch

import offload
from offload.checkpoint.directory import CURRENT, CheckpointDir
from engine_reference import LlamaForCausalLM, batches, loss_of, mlp, no_decay_groups, tiny_llama

needs_transformers = pytest.mark.skipif(LlamaForCausalLM is None, reason="transformers is not installed")

LR = 3e-3


def _config(tmp_path, params="device", optimizer="cpu", dtype="fp32", **kw):
    nvme = str(tmp_path / "swap") if "nvme" in (params, optimizer) else None
    return offload.Config(device="cpu", params=params, optimizer=optimizer, dtype=dtype, nvme_dir=nvme, **kw)


def _make(kind, seed=0):
    return tiny_llama(seed=seed) if kind == "llama" else mlp(seed=seed)


def _train(engine, kind, data):
    losses = []
    for step in data:
        for batch in step:
            engine.backward(loss_of(kind, engine, batch))
        losses.append(loss_of(kind, engine, step[0]).item())
        info = engine.step()
        assert not info.skipped
    return losses


def _engine(kind, model, config, **kw):
    kw.setdefault("lr", LR)
    kw.setdefault("weight_decay", 0.1)
    kw.setdefault("max_grad_norm", 0.5)
    return offload.Engine(model, config, param_groups=no_decay_groups(model), **kw)


def _straight_and_resumed(tmp_path, kind, save_cfg, load_cfg, first=3, second=3, make=None):
    """(losses, state) of first+second steps straight, and of first steps, save, a new engine on a differently
    initialised model, load, second steps."""
    make = make or (lambda seed: _make(kind, seed))
    data = batches(kind, first + second, micro=2)
    with _engine(kind, make(0), save_cfg) as engine:
        straight = _train(engine, kind, data)
        straight_state = engine.state_dict()
    with _engine(kind, make(0), save_cfg) as engine:
        _train(engine, kind, data[:first])
        engine.save(tmp_path / "ckpt", extra={"data_pos": first})
    with _engine(kind, make(7), load_cfg) as engine:
        extra = engine.load(tmp_path / "ckpt")
        assert extra == {"data_pos": first}
        resumed = _train(engine, kind, data[extra["data_pos"]:])
        resumed_state = engine.state_dict()
    return (straight[first:], straight_state), (resumed, resumed_state)


def _assert_same(a, b):
    (losses_a, state_a), (losses_b, state_b) = a, b
    assert losses_a == losses_b
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize("params,optimizer", [("device", "cpu"), ("device", "nvme"), ("cpu", "cpu"),
                                              ("nvme", "cpu"), ("nvme", "nvme")])
def test_ten_plus_ten_steps_equal_twenty_bitwise(tmp_path, params, optimizer):
    config = _config(tmp_path, params, optimizer)
    _assert_same(*_straight_and_resumed(tmp_path, "mlp", config, config, first=10, second=10))


@needs_transformers
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_llama_resume_exact_in_every_dtype(tmp_path, dtype):
    config = _config(tmp_path, "nvme", "nvme", dtype=dtype)
    _assert_same(*_straight_and_resumed(tmp_path, "llama", config, config))


def test_a_checkpoint_loads_into_another_placement(tmp_path):
    saved_with = _config(tmp_path, "device", "cpu")
    loaded_with = _config(tmp_path, "nvme", "nvme", host_memory_limit="40MiB")
    _assert_same(*_straight_and_resumed(tmp_path, "mlp", saved_with, loaded_with))


@needs_transformers
def test_state_partly_in_ram_partly_on_nvme_round_trips(tmp_path):
    """A host budget that keeps some groups' state in RAM and sends the rest to NVMe, saved and loaded."""
    make = lambda seed: tiny_llama(seed=seed, layers=4)  # noqa: E731
    numel = sum(p.numel() for p in make(0).parameters())
    config = _config(tmp_path, "device", "nvme", host_memory_limit=numel * 16)
    with _engine("llama", make(0), config) as probe:
        stats = probe.stats()
        assert stats.optimizer_groups_on_host > 0 and stats.optimizer_groups_on_nvme > 0
    _assert_same(*_straight_and_resumed(tmp_path, "llama", config, config, make=make))


def test_rng_state_and_hyper_parameters_are_restored(tmp_path):
    with _engine("mlp", _make("mlp"), _config(tmp_path)) as engine:
        _train(engine, "mlp", batches("mlp", 1, 1))
        engine.lr = 1.25e-3
        torch.manual_seed(1234)
        engine.save(tmp_path / "ckpt")
        expected = torch.rand(4)
    torch.manual_seed(0)
    with _engine("mlp", _make("mlp"), _config(tmp_path), lr=0.5) as engine:
        engine.load(tmp_path / "ckpt")
        assert torch.equal(torch.rand(4), expected)
        assert engine.lr == 1.25e-3
        assert engine.param_groups[0]["weight_decay"] == 0.0  # the no-decay group kept its own value


def test_the_master_file_is_a_plain_safetensors_file(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    with _engine("mlp", _make("mlp"), _config(tmp_path, "device", "nvme")) as engine:
        _train(engine, "mlp", batches("mlp", 2, 1))
        engine.save(tmp_path / "ckpt")
        state = engine.state_dict()
    version, _ = CheckpointDir(tmp_path / "ckpt").current()
    with safetensors.safe_open(str(version / "master.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(state)
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), state[key])


def test_saving_again_replaces_the_checkpoint_and_leaves_one_version(tmp_path):
    path = tmp_path / "ckpt"
    with _engine("mlp", _make("mlp"), _config(tmp_path)) as engine:
        _train(engine, "mlp", batches("mlp", 1, 1))
        engine.save(path, extra={"n": 1})
        _train(engine, "mlp", batches("mlp", 1, 1, seed=2))
        engine.save(path, extra={"n": 2})
        assert engine.load(path) == {"n": 2}
    assert sorted(p.name for p in path.iterdir() if p.is_dir()) == [json.loads((path / CURRENT).read_text())["version"]]
    assert not (path / (CURRENT + ".tmp")).exists()


def test_save_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with _engine("mlp", _make("mlp"), _config(tmp_path)) as engine:
        _train(engine, "mlp", batches("mlp", 1, 1))
        with pytest.raises(offload.CheckpointError, match="notes.txt"):
            engine.save(tmp_path / "data")
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"


def test_save_refuses_pending_gradients_and_non_json_extra(tmp_path):
    with _engine("mlp", _make("mlp"), _config(tmp_path)) as engine:
        batch = batches("mlp", 1, 1)[0][0]
        engine.backward(loss_of("mlp", engine, batch))
        with pytest.raises(RuntimeError, match="call engine.step"):
            engine.save(tmp_path / "ckpt")
        engine.step()
        with pytest.raises(TypeError, match="JSON"):
            engine.save(tmp_path / "ckpt", extra={"t": torch.zeros(1)})
    assert not (tmp_path / "ckpt").exists()


def _saved(tmp_path, config=None):
    path = tmp_path / "ckpt"
    with _engine("mlp", _make("mlp"), config or _config(tmp_path)) as engine:
        _train(engine, "mlp", batches("mlp", 2, 1))
        engine.save(path)
    version, _ = CheckpointDir(path).current()
    return path, version


@pytest.mark.parametrize("name", ["master.safetensors", "exp_avg_sq.safetensors", "model.safetensors", "meta.json",
                                  "manifest.json"])
def test_a_flipped_byte_is_rejected_naming_the_file(tmp_path, name):
    path, version = _saved(tmp_path)
    target = version / name
    data = bytearray(target.read_bytes())
    data[len(data) * 2 // 3] ^= 0x40
    target.write_bytes(bytes(data))
    with _engine("mlp", _make("mlp", seed=3), _config(tmp_path)) as engine:
        before = engine.state_dict()
        with pytest.raises(offload.CheckpointError, match=name.replace(".", r"\.")):
            engine.load(path)
        after = engine.state_dict()  # the failed load changed nothing
        assert all(torch.equal(before[k], after[k]) for k in before)
        _train(engine, "mlp", batches("mlp", 1, 1))  # and the engine still trains


@pytest.mark.parametrize("name", ["exp_avg.safetensors", "meta.json"])
def test_a_truncated_file_is_rejected_naming_the_file(tmp_path, name):
    path, version = _saved(tmp_path)
    target = version / name
    os.truncate(target, target.stat().st_size // 2)
    with _engine("mlp", _make("mlp"), _config(tmp_path)) as engine:
        with pytest.raises(offload.CheckpointError, match=f"{name.replace('.', '[.]')}.*truncated"):
            engine.load(path)


def test_missing_or_foreign_checkpoints_are_rejected(tmp_path):
    with _engine("mlp", _make("mlp"), _config(tmp_path)) as engine:
        with pytest.raises(offload.CheckpointError, match="no such checkpoint"):
            engine.load(tmp_path / "nowhere")
        (tmp_path / "empty").mkdir()
        with pytest.raises(offload.CheckpointError, match="CURRENT"):
            engine.load(tmp_path / "empty")


@needs_transformers
def test_a_checkpoint_of_another_model_is_rejected_naming_parameters(tmp_path):
    path, _ = _saved(tmp_path)
    with _engine("llama", _make("llama"), _config(tmp_path)) as engine:
        with pytest.raises(offload.CheckpointError, match="missing model.*unexpected 0.bias"):
            engine.load(path)


def test_a_full_disk_raises_enospc_and_keeps_the_previous_checkpoint(tmp_path, tiny_tmpfs):
    path = tiny_tmpfs / "ckpt"
    with _engine("mlp", _make("mlp"), _config(tmp_path)) as engine:
        _train(engine, "mlp", batches("mlp", 1, 1))
        engine.save(path, extra={"n": 1})
        free = os.statvfs(tiny_tmpfs).f_bavail * os.statvfs(tiny_tmpfs).f_frsize
        (tiny_tmpfs / "filler").write_bytes(b"\0" * (free - 40_000))  # room for a part of the next save only
        _train(engine, "mlp", batches("mlp", 1, 1, seed=2))
        with pytest.raises(OSError) as failure:
            engine.save(path, extra={"n": 2})
        assert failure.value.errno == 28 and str(path) in str(failure.value)
        assert engine.load(path) == {"n": 1}
    assert len([p for p in path.iterdir() if p.is_dir()]) == 1  # the failed version was removed


@needs_transformers
def test_export_loads_into_a_fresh_hf_model_with_the_engines_logits(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    ids = batches("llama", 1, 1, seed=5)[0][0]["input_ids"]
    with _engine("llama", tiny_llama(), _config(tmp_path, "nvme", "nvme")) as engine:
        _train(engine, "llama", batches("llama", 3, 1))
        engine.save(tmp_path / "ckpt")
        with torch.no_grad():
            expected = engine(input_ids=ids).logits
    weights = offload.export(tmp_path / "ckpt", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, expected)
    plain = tiny_llama(seed=9)
    result = plain.load_state_dict(safetensors_torch.load_file(weights), strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied: stored once, as HF
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, expected)


def test_export_refuses_a_corrupt_checkpoint_and_writes_nothing(tmp_path):
    path, version = _saved(tmp_path)
    os.truncate(version / "master.safetensors", 100)
    with pytest.raises(offload.CheckpointError, match="master.safetensors"):
        offload.export(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_command_line(tmp_path):
    import subprocess
    import sys

    path, _ = _saved(tmp_path)
    done = subprocess.run([sys.executable, "-m", "offload", "export", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
    failed = subprocess.run([sys.executable, "-m", "offload", "export", str(tmp_path / "nope"), "--out",
                             str(tmp_path / "out2")], capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [f"offload export: error: {tmp_path / 'nope'}: no such checkpoint"]


def test_an_io_error_during_save_keeps_the_previous_checkpoint_and_the_engine(tmp_path):
    from offload import _C

    path = tmp_path / "ckpt"
    config = _config(tmp_path, "nvme", "nvme")
    with _engine("mlp", _make("mlp"), config) as engine:
        _train(engine, "mlp", batches("mlp", 1, 1))
        engine.save(path, extra={"n": 1})
        _C.inject_io_fault("eio", 3)
        try:
            with pytest.raises(OSError) as failure:
                engine.save(path, extra={"n": 2})
        finally:
            _C.inject_io_fault("none", 1)
        assert failure.value.errno == 5 and failure.value.filename
        _train(engine, "mlp", batches("mlp", 1, 1, seed=2))  # a failed save does not harm the training state
        assert engine.load(path) == {"n": 1}


def test_after_an_io_error_in_training_the_last_checkpoint_resumes_exactly(tmp_path):
    from offload import _C

    path = tmp_path / "ckpt"
    config = _config(tmp_path, "nvme", "nvme")
    data = batches("mlp", 4, 1)
    with _engine("mlp", _make("mlp"), config) as engine:
        _train(engine, "mlp", data)
        expected = engine.state_dict()
    with _engine("mlp", _make("mlp"), config) as engine:
        _train(engine, "mlp", data[:2])
        engine.save(path, extra={"next": 2})
        _C.inject_io_fault("eio", 1)
        try:
            with pytest.raises((OSError, RuntimeError)):
                _train(engine, "mlp", data[2:])
                engine.state_dict()
        finally:
            _C.inject_io_fault("none", 1)
        # (a failed read leaves the engine usable, a failed write makes it refuse to go on: either way the
        # run is continued from the checkpoint)
    with _engine("mlp", _make("mlp", seed=4), config) as engine:
        _train(engine, "mlp", data[engine.load(path)["next"]:])
        state = engine.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_a_second_process_saving_to_the_same_path_fails_at_once(tmp_path):
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "ckpt"
    with _engine("mlp", _make("mlp"), _config(tmp_path)) as engine:
        _train(engine, "mlp", batches("mlp", 1, 1))
        engine.save(path, extra={"n": 1})
        # another process in the middle of its save to the same path holds the path's claim
        holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from offload.checkpoint.directory import CheckpointDir
            directory = CheckpointDir({str(path)!r})
            directory.begin(99)
            print("saving", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "saving"
            _train(engine, "mlp", batches("mlp", 1, 1, seed=2))
            with pytest.raises(OSError, match="checkpoint directory .* is in use by another process"):
                engine.save(path, extra={"n": 2})
        finally:
            holder.communicate("")
        assert engine.load(path) == {"n": 1}  # untouched by the refused save
        engine.save(path, extra={"n": 3})  # the other process is gone: saving works again
        assert engine.load(path) == {"n": 3}


def test_a_failed_switch_leaves_no_pending_pointer(tmp_path, monkeypatch):
    import errno

    from offload.checkpoint import directory as checkpoint_directory

    path = tmp_path / "ckpt"
    with _engine("mlp", _make("mlp"), _config(tmp_path)) as engine:
        _train(engine, "mlp", batches("mlp", 1, 1))
        engine.save(path, extra={"n": 1})
        real = checkpoint_directory.write_file_durably

        def full_at_the_pointer(target, data):
            if target.name == CURRENT + ".tmp":
                target.write_bytes(data[:3])  # part of it reached the disk, then the disk was full
                raise OSError(errno.ENOSPC, f"writing {target}: No space left on device", str(target))
            return real(target, data)

        monkeypatch.setattr(checkpoint_directory, "write_file_durably", full_at_the_pointer)
        with pytest.raises(OSError, match="No space left"):
            engine.save(path, extra={"n": 2})
        monkeypatch.undo()
        assert not (path / (CURRENT + ".tmp")).exists()
        assert engine.load(path) == {"n": 1}
        assert len([p for p in path.iterdir() if p.is_dir()]) == 1
