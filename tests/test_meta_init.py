"""Models built on the meta device (offload.init_empty), offload.load_pretrained and Engine(..., pretrained=)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import offload
from engine_reference import batches, mlp, tiny_llama, train_with_engine

pytest.importorskip("transformers", reason="the meta-init tests build a small Llama")


def _llama(tied=True):
    return tiny_llama(seed=0, layers=4, tied=tied)


@pytest.mark.parametrize("make", [lambda: _llama(True), lambda: _llama(False), lambda: mlp(seed=0)],
                         ids=["llama-tied", "llama-untied", "mlp"])
@pytest.mark.parametrize("params,dtype", [("device", "fp32"), ("cpu", "bf16"), ("nvme", "fp32")])
def test_init_empty_gives_the_weights_of_a_normal_build(make, params, dtype, tmp_path):
    normal = make().state_dict()
    torch.manual_seed(123)  # init_empty replays from the generator as it is when build() starts...
    model = offload.init_empty(make)  # ...and make() reseeds, which the replay follows
    assert all(p.is_meta for p in model.parameters())
    config = offload.Config(device="cpu", dtype=dtype, params=params, optimizer="nvme", nvme_dir=tmp_path)
    with offload.Engine(model, config) as engine:
        state = engine.state_dict()
        assert not any(p.is_meta for p in engine.model.parameters())
    assert state.keys() == normal.keys()
    for key, value in normal.items():
        assert torch.equal(state[key], value.float()), key


def test_a_model_from_init_empty_trains_exactly_like_a_normal_one(tmp_path):
    data = batches("llama", 5, micro=2)
    config = offload.Config(device="cpu", dtype="bf16", params="nvme", optimizer="nvme", nvme_dir=tmp_path)
    ref_losses, ref_state, _ = train_with_engine("llama", _llama(), data, config, lr=3e-3)
    losses, state, _ = train_with_engine("llama", offload.init_empty(_llama), data, config, lr=3e-3)
    assert losses == ref_losses
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


def test_a_meta_model_without_the_log_gets_each_modules_own_init():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8))
    with offload.Engine(model, offload.Config(device="cpu", dtype="fp32")) as engine:
        state = engine.state_dict()
    bound = 1 / 64 ** 0.5  # nn.Linear's reset_parameters: U(-1/sqrt(in), 1/sqrt(in))
    assert 0 < state["0.weight"].abs().max() <= bound and state["0.weight"].std() > bound / 3
    assert torch.equal(state["1.weight"], torch.ones(64)) and torch.equal(state["1.bias"], torch.zeros(64))


class _NoInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.empty(4, 4))

    def forward(self, x):
        return x @ self.w


def test_a_meta_parameter_nothing_can_initialise_is_named():
    with torch.device("meta"):
        model = _NoInit()
    with pytest.raises(offload.ConfigError, match=r"model: w is on the meta device.*init_empty"):
        offload.Engine(model, offload.Config(device="cpu"))
    assert model.w.is_meta  # the model is left as it was


def _saved(tmp_path, dtype=torch.float32, tied=True):
    plain = tiny_llama(seed=3, layers=4, tied=tied).to(dtype)
    out = tmp_path / "pretrained"
    plain.save_pretrained(out, max_shard_size="20KB")  # sharded, with an index
    assert len(list(out.glob("*.safetensors"))) > 3 and (out / "model.safetensors.index.json").exists()
    return plain, out


@pytest.mark.parametrize("params", ["device", "cpu", "nvme"])
def test_load_pretrained_from_sharded_safetensors_gives_the_same_logits(params, tmp_path):
    plain, path = _saved(tmp_path)
    prompt = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain(input_ids=prompt).logits
    config = offload.Config(device="cpu", dtype="fp32", params=params, optimizer="nvme", nvme_dir=tmp_path / "swap")
    with offload.Engine(offload.init_empty(_llama), config) as engine:
        offload.load_pretrained(engine, path)
        with torch.no_grad():
            assert torch.equal(engine(input_ids=prompt).logits, expected)
        state = engine.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())


def test_load_pretrained_converts_dtypes_and_a_single_file_works(tmp_path):
    plain, _ = _saved(tmp_path, dtype=torch.bfloat16)
    single = tmp_path / "single"
    plain.save_pretrained(single)
    config = offload.Config(device="cpu", dtype="bf16", params="nvme", optimizer="cpu", nvme_dir=tmp_path / "swap")
    with offload.Engine(offload.init_empty(_llama), config) as engine:
        offload.load_pretrained(engine, single / "model.safetensors")
        state = engine.state_dict()
        engine.backward(engine(input_ids=torch.arange(12).view(1, 12), labels=torch.arange(12).view(1, 12)).loss)
        engine.step()  # and it trains from there
    assert all(torch.equal(state[k], v.float()) for k, v in plain.state_dict().items())


def test_load_pretrained_names_what_does_not_fit_and_changes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    plain, path = _saved(tmp_path, tied=False)
    single = tmp_path / "edited.safetensors"
    tensors = {k: v.contiguous() for k, v in plain.state_dict().items()}
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.extra.weight"] = torch.zeros(3)
    tensors["lm_head.weight"] = torch.zeros(5, 32)
    save_file(tensors, single)
    config = offload.Config(device="cpu", dtype="fp32")
    with offload.Engine(_llama(tied=False), config) as engine:
        before = engine.state_dict()
        with pytest.raises(offload.CheckpointError) as e:
            offload.load_pretrained(engine, single)
        message = str(e.value)
        assert "missing 1 tensors (model.layers.1.mlp.up_proj.weight)" in message
        assert "unexpected 1 tensors (model.extra.weight)" in message
        assert "lm_head.weight (checkpoint [5, 32], model [96, 32])" in message
        assert all(torch.equal(before[k], v) for k, v in engine.state_dict().items())
        with pytest.raises(offload.CheckpointError, match="neither"):
            offload.load_pretrained(engine, tmp_path / "nowhere")
        engine.backward(engine(input_ids=torch.arange(8).view(1, 8), labels=torch.arange(8).view(1, 8)).loss)
        engine.step()
        with pytest.raises(offload.CheckpointError, match="already trained"):
            offload.load_pretrained(engine, path)
    assert load_file(single)  # the file was only read


@pytest.mark.parametrize("params,dtype", [("device", "fp32"), ("cpu", "bf16"), ("nvme", "fp32")])
def test_an_engine_built_from_a_pretrained_checkpoint_computes_no_random_init(params, dtype, tmp_path, monkeypatch):
    """Engine(..., pretrained=path): the same state as load_pretrained after the build, but each group is
    filled from the checkpoint directly and the replay draws no random number for the weights it holds (Note
    [values provided elsewhere]). A model that is not on the meta device has its values replaced."""
    from offload.layout.meta_init import Materializer

    plain, path = _saved(tmp_path)
    replays = []
    init = Materializer.__init__
    monkeypatch.setattr(Materializer, "__init__", lambda self, *a, **k: (replays.append(self), init(self, *a, **k))[1])
    config = offload.Config(device="cpu", dtype=dtype, params=params, optimizer="nvme", nvme_dir=tmp_path / "swap")
    expected = plain.state_dict()  # (the fp32 masters: as in the checkpoint, whatever the compute dtype)
    for model in (offload.init_empty(_llama), _llama()):
        with offload.Engine(model, config, pretrained=path) as engine:
            state = engine.state_dict()
            engine.backward(engine(input_ids=torch.arange(8).view(1, 8), labels=torch.arange(8).view(1, 8)).loss)
            engine.step()  # and it trains from there
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], v) for k, v in expected.items())
    (replay,) = replays  # (the meta model's; _llama() reseeds its generator to 0 first thing)
    assert torch.equal(replay._generator.get_state(), torch.Generator().manual_seed(0).get_state())


def test_a_pretrained_checkpoint_that_does_not_fit_fails_before_the_engine_allocates(tmp_path):
    from safetensors.torch import save_file

    plain, _ = _saved(tmp_path, tied=False)
    tensors = {k: v.contiguous() for k, v in plain.state_dict().items()}
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, tmp_path / "edited.safetensors")
    model = offload.init_empty(lambda: _llama(tied=False))
    swap = tmp_path / "swap"
    config = offload.Config(device="cpu", dtype="fp32", params="nvme", optimizer="nvme", nvme_dir=swap)
    with pytest.raises(offload.CheckpointError, match=r"pretrained=.*edited.safetensors: the checkpoint does not "
                                                      r"fit the model: missing 1 tensors \(model.layers.1.mlp.up_proj"):
        offload.Engine(model, config, pretrained=tmp_path / "edited.safetensors")
    assert not swap.exists() or not any(swap.iterdir())  # no swap file was made
    assert all(p.is_meta for p in model.parameters())
    with offload.Engine(model, config) as engine:  # the model is free for another engine
        assert not any(p.is_meta for p in engine.model.parameters())


def test_close_leaves_offloaded_weights_out_of_ram_when_asked_or_when_they_exceed_the_host_limit(tmp_path):
    prompt = torch.arange(6).view(1, 6)
    for keep, limit in ((False, None), (None, 64 << 20), (None, None)):
        model = _llama()
        config = offload.Config(device="cpu", dtype="fp32", params="nvme", nvme_dir=tmp_path, host_memory_limit=limit)
        engine = offload.Engine(model, config)
        if limit is not None:  # shrink the budget after the fact: the model's weights "exceed" it
            engine.config = engine.config.replace(host_memory_limit=1024)
        engine.close(keep_weights=keep)
        if keep is None and limit is None:
            with torch.no_grad():
                model(input_ids=prompt)  # kept: the model works on its own
        else:
            assert all(p.is_meta for p in model.parameters())


CHILD = Path(__file__).with_name("pretrained_child.py")


@pytest.mark.slow
def test_peak_rss_of_build_load_and_train_stays_near_the_host_limit_not_the_model_size(tmp_path):
    """A 512M-parameter model (2 GB of fp32 weights, 8 GB of training state) with host_memory_limit 640 MiB:
    built with init_empty, loaded from safetensors, trained for 2 steps with everything on NVMe; the RSS above
    the process's start stays near the limit, far below the weights."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=40,
                         num_attention_heads=16, tie_word_embeddings=True)
    maker = (f"import torch\nfrom transformers import LlamaConfig, LlamaForCausalLM\ntorch.manual_seed(0)\n"
             f"LlamaForCausalLM(LlamaConfig(**{config.to_diff_dict()!r})).save_pretrained({str(tmp_path / 'ckpt')!r})")
    subprocess.run([sys.executable, "-c", maker], check=True, timeout=600)
    config.save_pretrained(tmp_path / "cfg")
    run = subprocess.run([sys.executable, str(CHILD), str(tmp_path / "cfg"), str(tmp_path / "ckpt"),
                          str(tmp_path / "swap"), str(640 << 20)], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    weights = result["params"] * 4
    assert weights > 2e9 and result["gradients_on_nvme"]
    # the limit, plus what no limit covers: activations, autograd temporaries, allocator caching
    assert result["peak_above_start"] < (640 + 400) * 2**20, result
    assert result["peak_above_start"] < weights / 2, result
    assert result["losses"][1] < result["losses"][0] + 1.0  # it trains (finite, sane)
