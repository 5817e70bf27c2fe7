"""offload.save_pretrained: the engine's weights as a Hugging Face model directory, streamed and atomic."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import offload
from offload.checkpoint import hf_directory, tensor_file
from offload.checkpoint.hf_directory import ShardWriter, plan_shards
from offload.errors import OutputExistsError

pytest.importorskip("transformers", reason="save_pretrained writes transformers model directories")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import hf_model_dir  # noqa: E402

LR = 3e-3


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("untied")
    hf_model_dir.make_model_dir(out, tie=False)
    return out


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tied")
    hf_model_dir.make_model_dir(out, tie=True)
    return out


def trained_engine(model_dir: Path, swap: Path, params: str = "cpu", dtype: str = "fp32", steps: int = 2,
                   optimizer: str = "cpu") -> offload.Engine:
    """An engine over the model of ``model_dir`` (built empty, then loaded), after ``steps`` steps."""
    config = AutoConfig.from_pretrained(model_dir)
    engine = offload.Engine(offload.init_empty(lambda: AutoModelForCausalLM.from_config(config)),
                            offload.Config(device="cpu", dtype=dtype, params=params, optimizer=optimizer,
                                           nvme_dir=swap), lr=LR)
    offload.load_pretrained(engine, model_dir)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (2, 12), generator=gen)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    return engine


def written(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (one file or shards), checking the index against the files."""
    index = out / "model.safetensors.index.json"
    if not index.exists():
        return load_file(out / "model.safetensors")
    weight_map = json.loads(index.read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        part = load_file(out / file)
        assert all(weight_map[name] == file for name in part)
        tensors.update(part)
    assert set(tensors) == set(weight_map)
    return tensors


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def logits(model, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=prompt).logits


PROMPT = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))


def test_fp32_weights_equal_state_dict_and_load_with_the_same_logits(untied_dir, tmp_path, caplog):
    with trained_engine(untied_dir, tmp_path / "swap") as engine:
        state = engine.state_dict()
        with caplog.at_level("INFO", logger="offload"):
            out = offload.save_pretrained(engine, tmp_path / "out")
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    got = written(out)
    assert set(got) == set(state)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], state[k]) for k in state)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert any("saved 21 tensors" in r.getMessage() and "1 shard" in r.getMessage() for r in caplog.records)

    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(untied_dir))
    reference.load_state_dict(state)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.float32
    assert torch.equal(logits(loaded, PROMPT), logits(reference, PROMPT))
    assert leftovers(tmp_path) == []


def test_bf16_output_and_auto_from_the_config(untied_dir, tmp_path):
    with trained_engine(untied_dir, tmp_path / "swap", dtype="bf16") as engine:
        state = engine.state_dict()
        offload.save_pretrained(engine, tmp_path / "bf16", dtype="bf16")
        offload.save_pretrained(engine, tmp_path / "auto32")  # the config says float32
        engine.model.config.dtype = torch.bfloat16
        offload.save_pretrained(engine, tmp_path / "auto16")
        assert engine.model.config.dtype == torch.bfloat16  # (the model's config is not changed)
    for name in ("bf16", "auto16"):
        got = written(tmp_path / name)
        assert all(torch.equal(got[k], v.to(torch.bfloat16)) for k, v in state.items())
        assert json.loads((tmp_path / name / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in written(tmp_path / "auto32").values())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16


def test_a_small_max_shard_size_gives_shards_and_an_index_that_from_pretrained_loads(untied_dir, tmp_path):
    with trained_engine(untied_dir, tmp_path / "swap", params="nvme") as engine:
        state = engine.state_dict()
        out = offload.save_pretrained(engine, tmp_path / "out", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(files)
    assert count > 3 and files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in state.values())
    # the embeddings and the LM head (512 x 64 x 4 bytes) are larger than the limit: a file of their own each
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert list(load_file(out / index["weight_map"][name])) == [name]
    assert all(os.path.getsize(out / f) <= 100_000 + 4096 for f in files
               if len(load_file(out / f)) > 1)  # (the header is padded to 4 KiB)
    got = written(out)
    assert all(torch.equal(got[k], state[k]) for k in state)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)


def test_memory_holds_one_master_and_one_converted_tensor_at_a_time(untied_dir, tmp_path, monkeypatch):
    alive: list[weakref.ref] = []
    peaks = {"masters": 0, "converted": 0}
    with trained_engine(untied_dir, tmp_path / "swap", params="nvme", steps=1) as engine:
        state = engine.training_state()
        read_master = state.full_master

        def full_master(g: int) -> torch.Tensor:
            peaks["masters"] = max(peaks["masters"], sum(r() is not None for r in alive) + 1)
            master = read_master(g)
            alive.append(weakref.ref(master))
            return master

        append = ShardWriter.append
        converted: list[weakref.ref] = []

        def append_tracked(self, name: str, tensor: torch.Tensor):
            peaks["converted"] = max(peaks["converted"], sum(r() is not None for r in converted) + 1)
            converted.append(weakref.ref(tensor))
            return append(self, name, tensor)

        monkeypatch.setattr(state, "full_master", full_master)
        monkeypatch.setattr(ShardWriter, "append", append_tracked)
        offload.save_pretrained(engine, tmp_path / "out", dtype="bf16")
        assert len(alive) == len(engine.groups) > 2
    assert peaks == {"masters": 1, "converted": 1}


def test_frozen_parameters_and_buffers_follow_the_trainable_ones(untied_dir, tmp_path):
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(untied_dir))
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.register_buffer("seen_tokens", torch.tensor([5, 7], dtype=torch.int64))
    model.model.register_buffer("scale", torch.full((3,), 1 / 3))
    config = offload.Config(device="cpu", dtype="bf16", params="nvme", nvme_dir=tmp_path / "swap")
    with offload.Engine(model, config, lr=LR) as engine:
        engine.backward(engine(input_ids=PROMPT, labels=PROMPT).loss)
        engine.step()
        state = engine.state_dict()
        out = offload.save_pretrained(engine, tmp_path / "out", dtype="fp16")
    got = written(out)
    assert set(got) == set(state)
    assert got["model.seen_tokens"].dtype == torch.int64 and got["model.seen_tokens"].tolist() == [5, 7]
    assert all(torch.equal(got[k], v.to(torch.float16) if v.is_floating_point() else v) for k, v in state.items())
    # produced group by group (the trainable groups, then the frozen ones: the embedding's is offloaded with
    # params="nvme", Note [frozen groups]), then the rest in model order
    with open(out / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    names = [k for k in header if k != "__metadata__"]
    assert names[-3:] == ["model.embed_tokens.weight", "model.seen_tokens", "model.scale"]
    assert sorted(header[k]["data_offsets"][0] for k in names) == [header[k]["data_offsets"][0] for k in names]
    assert header["__metadata__"] == {"format": "pt"}


def test_tied_embeddings_are_written_once_and_load_tied(tied_dir, tmp_path):
    with trained_engine(tied_dir, tmp_path / "swap") as engine:
        state = engine.state_dict()
        out = offload.save_pretrained(engine, tmp_path / "out")
    got = written(out)
    assert "model.embed_tokens.weight" in got and "lm_head.weight" not in got
    assert set(got) == set(state) - {"lm_head.weight"}
    assert torch.equal(got["model.embed_tokens.weight"], state["lm_head.weight"])
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tied_dir))
    reference.load_state_dict(state)
    assert torch.equal(logits(loaded, PROMPT), logits(reference, PROMPT))


def test_every_placement_writes_the_same_files(untied_dir, tmp_path):
    contents = {}
    for params, optimizer in (("device", "cpu"), ("cpu", "nvme"), ("nvme", "cpu")):
        with trained_engine(untied_dir, tmp_path / f"swap-{params}", params=params, optimizer=optimizer,
                            steps=1) as engine:
            out = offload.save_pretrained(engine, tmp_path / params, max_shard_size="300KB")
        contents[params] = snapshot(out)
    assert "model.safetensors.index.json" in contents["device"] and len(contents["device"]) > 3  # (sharded)
    assert contents["device"] == contents["cpu"] == contents["nvme"]


def test_tokenizer_generation_config_and_extra_files_land_in_the_directory(untied_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(untied_dir)
    generation = GenerationConfig(max_new_tokens=7, do_sample=False, eos_token_id=2)
    with trained_engine(untied_dir, tmp_path / "swap", steps=0) as engine:
        out = offload.save_pretrained(engine, tmp_path / "out", tokenizer=tokenizer, generation_config=generation,
                                      extra_files={"README.md": b"# trained with offload\n", "run.json": b"{}"})
    assert (out / "README.md").read_bytes() == b"# trained with offload\n"
    assert (out / "run.json").read_bytes() == b"{}"
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    assert reloaded.chat_template == tokenizer.chat_template


def test_a_non_empty_target_is_refused_without_overwrite_and_replaced_with_it(untied_dir, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (target / "sub").mkdir()
    (target / "sub" / "deep.bin").write_bytes(b"\0" * 10)
    before = snapshot(target)
    with trained_engine(untied_dir, tmp_path / "swap", steps=1) as engine:
        with pytest.raises(OutputExistsError, match=rf"^{target} exists and is not empty; pass overwrite=True "
                                                    r"\(offload train: --overwrite\) to replace it$"):
            offload.save_pretrained(engine, target)
        assert snapshot(target) == before and leftovers(tmp_path) == []
        assert isinstance(OutputExistsError(target), offload.ConfigError)

        empty = tmp_path / "empty"
        empty.mkdir()
        offload.save_pretrained(engine, empty)  # an existing empty directory is fine
        assert (empty / "model.safetensors").exists()

        offload.save_pretrained(engine, target, overwrite=True)
        state = engine.state_dict()
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert all(torch.equal(v, state[k]) for k, v in written(target).items())
    assert leftovers(tmp_path) == []


def test_replacing_without_rename_exchange_falls_back_to_two_renames(untied_dir, tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    monkeypatch.setattr(hf_directory, "_exchange", lambda a, b: False)
    with trained_engine(untied_dir, tmp_path / "swap", steps=0) as engine:
        offload.save_pretrained(engine, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert leftovers(tmp_path) == []


def _full_disk(fd: int, offset: int, length: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_the_old_directory_intact(untied_dir, tmp_path, monkeypatch):
    target = tmp_path / "out"
    with trained_engine(untied_dir, tmp_path / "swap", steps=1) as engine:
        offload.save_pretrained(engine, target, max_shard_size="300KB")
        before = snapshot(target)
        engine.backward(engine(input_ids=PROMPT, labels=PROMPT).loss)
        engine.step()  # new weights, which must not reach the directory

        monkeypatch.setattr(tensor_file.os, "posix_fallocate", _full_disk)
        with pytest.raises(OSError) as failure:
            offload.save_pretrained(engine, target, overwrite=True, max_shard_size="300KB")
        assert failure.value.errno == errno.ENOSPC and ".safetensors" in str(failure.value)
        assert failure.value.filename and str(tmp_path) in failure.value.filename
        assert snapshot(target) == before and leftovers(tmp_path) == []
        monkeypatch.undo()
        offload.save_pretrained(engine, target, overwrite=True, max_shard_size="300KB")  # and then it works
        assert snapshot(target) != before


def test_a_stale_partial_directory_of_a_dead_process_is_removed(untied_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".out.partial-{os.getppid()}"  # a live process's: never touched
    alive.mkdir()
    other = tmp_path / f".other.partial-{dead.pid}"  # another target's: not ours to clean
    other.mkdir()
    with trained_engine(untied_dir, tmp_path / "swap", steps=0) as engine:
        offload.save_pretrained(engine, tmp_path / "out")
    assert not stale.exists() and alive.exists() and other.exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_an_old_model_left_renamed_away_by_a_crash_is_put_back(untied_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".out.old-{dead.pid}"  # a crash between the two renames of the fallback
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"the previous model")
    with trained_engine(untied_dir, tmp_path / "swap", steps=0) as engine:
        with pytest.raises(OutputExistsError):
            offload.save_pretrained(engine, tmp_path / "out")
    assert snapshot(tmp_path / "out") == {"model.safetensors": b"the previous model"}
    assert leftovers(tmp_path) == []


def test_bad_arguments_name_the_field(untied_dir, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with trained_engine(untied_dir, tmp_path / "swap", steps=0) as engine:
        for value in ("5XB", 0, -3, "lots", 1.5):
            with pytest.raises(offload.ConfigError, match="max_shard_size"):
                offload.save_pretrained(engine, tmp_path / "out", max_shard_size=value)
        for value in ("fp8", "float64x", torch.int32, 3):
            with pytest.raises(offload.ConfigError, match=r"dtype: .*'auto', 'fp32', 'bf16', 'fp16'"):
                offload.save_pretrained(engine, tmp_path / "out", dtype=value)
        with pytest.raises(offload.ConfigError, match="extra_files"):
            offload.save_pretrained(engine, tmp_path / "out", extra_files={"model.safetensors": b""})
        with pytest.raises(offload.ConfigError, match="extra_files"):
            offload.save_pretrained(engine, tmp_path / "out", extra_files={"../x": b""})
        with pytest.raises(offload.ConfigError, match=rf"{a_file}: exists and is not a directory"):
            offload.save_pretrained(engine, a_file, overwrite=True)
        offload.save_pretrained(engine, tmp_path / "gib", max_shard_size="1GiB", dtype=torch.float16)
    assert not (tmp_path / "out").exists() and a_file.read_text() == "x"
    assert all(v.dtype == torch.float16 for v in written(tmp_path / "gib").values())
    assert hf_directory.parse_max_shard_size("5GB") == 5 * 10**9
    assert hf_directory.parse_max_shard_size("2GiB") == 2 << 30


def test_shards_are_split_as_huggingface_hub_splits_them():
    from huggingface_hub import split_torch_state_dict_into_shards

    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 400, (60,), generator=gen).tolist() + [1500, 3, 900, 2000, 10]
    tensors = {f"t{i}": torch.empty(n, dtype=torch.float32) for i, n in enumerate(sizes)}
    for limit in (1000, 4000, 10**9):
        expected = split_torch_state_dict_into_shards(tensors, max_shard_size=limit)
        plan = plan_shards([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], limit)
        assert {s.file: [e.name for e in s.entries] for s in plan.shards} == expected.filename_to_tensors
        assert plan.total_size == expected.metadata["total_size"]


# ---- several ranks ----------------------------------------------------------------------------------------------

def _rank_main(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with trained_engine(Path(model_dir), Path(out) / f"swap{rank}", params="nvme", steps=1) as engine:
            state = engine.state_dict()
            path = offload.save_pretrained(engine, Path(out) / "model", max_shard_size="300KB")
            if rank == 0:  # a full disk on the writing rank: every rank raises it, none waits forever
                tensor_file.os.posix_fallocate = _full_disk
            try:
                offload.save_pretrained(engine, Path(out) / "model", overwrite=True)
                error = None
            except OSError as e:
                error = e.errno
            torch.save({"state": state, "path": str(path), "error": error}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_several_ranks_gather_and_rank_0_writes(untied_dir, tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(untied_dir), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert results[0]["path"] == results[1]["path"] == str(tmp_path / "model")
    assert results[0]["error"] == results[1]["error"] == errno.ENOSPC
    got = written(tmp_path / "model")
    assert set(got) == set(results[0]["state"])
    assert all(torch.equal(got[k], v) for k, v in results[0]["state"].items())
    assert leftovers(tmp_path) == []
