"""engine.gathered(): offloaded weights read (and edited) outside forward, for every placement: the values are
state_dict()'s, reading never faults, a read-only context leaves training bit for bit as it was, a writable
one that changes nothing too (Adam's moments kept), and a change made in it is what the next forward uses."""

from __future__ import annotations

import pytest
import torch

import offload
from engine_reference import batches, loss_of, tiny_llama

pytest.importorskip("transformers", reason="the gathered tests train a small Llama")

PLACEMENTS = [("device", "cpu", "fp32"), ("cpu", "cpu", "bf16"), ("nvme", "nvme", "fp32"), ("cpu", "nvme", "bf16"),
              ("nvme", "cpu", "bf16")]


def _engine(tmp_path, params, optimizer, dtype):
    config = offload.Config(device="cpu", params=params, optimizer=optimizer, dtype=dtype,
                            nvme_dir=str(tmp_path / "swap"), prefetch_layers=1)
    return offload.Engine(tiny_llama(layers=3, tied=False), config, lr=3e-3, weight_decay=0.1)


def _steps(engine, data):
    for step in data:
        engine.backward(loss_of("llama", engine, step[0]))
        engine.step()


def _interrupted_and_straight(tmp_path, placement, between):
    """The state after 4 steps straight, and after 2 steps, ``between(engine)``, 2 more steps."""
    data = batches("llama", 4, 1)
    with _engine(tmp_path / "a", *placement) as reference:
        _steps(reference, data)
        expected = reference.state_dict()
    with _engine(tmp_path / "b", *placement) as engine:
        _steps(engine, data[:2])
        between(engine)
        _steps(engine, data[2:])
        return engine.state_dict(), expected


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_inside_the_values_are_the_state_dicts_and_training_is_unchanged(tmp_path, placement):
    def look(engine):
        masters = engine.state_dict()
        with engine.gathered():
            for name, p in engine.model.named_parameters():
                assert p.dtype == torch.float32 and torch.equal(p.detach(), masters[name]), name
            assert torch.isfinite(sum(p.float().norm() for p in engine.model.parameters()))  # reads: no fault
            embed = engine.model.get_input_embeddings().weight
            assert embed.shape == masters["model.embed_tokens.weight"].shape

    state, expected = _interrupted_and_straight(tmp_path, placement, look)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_writable_context_that_changes_nothing_changes_nothing(tmp_path, placement):
    def touch(engine):
        with engine.gathered(writable=True):
            pass

    # the moments survived and the weights were made again from the same masters
    state, expected = _interrupted_and_straight(tmp_path, placement, touch)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("params,optimizer,dtype", PLACEMENTS[:3])
def test_an_edit_in_a_writable_context_is_what_the_next_forward_uses(tmp_path, params, optimizer, dtype):
    batch = batches("llama", 1, 1)[0][0]
    with _engine(tmp_path, params, optimizer, dtype) as engine:
        _steps(engine, batches("llama", 1, 1))
        with torch.no_grad():
            before = loss_of("llama", engine, batch).item()
        layer = engine.model.model.layers[1]
        others = {k: v for k, v in engine.state_dict().items() if not k.startswith("model.layers.1.")}
        with engine.gathered(layer, writable=True):
            assert all(p.dtype == torch.float32 for p in layer.parameters())
            assert engine.model.lm_head.weight.dtype == engine.dtype  # not gathered
            with torch.no_grad():
                layer.mlp.down_proj.weight.zero_()
                layer.self_attn.o_proj.weight.zero_()  # the layer now adds nothing to the residual stream
        state = engine.state_dict()
        assert torch.count_nonzero(state["model.layers.1.mlp.down_proj.weight"]) == 0
        assert all(torch.equal(state[k], v) for k, v in others.items())  # the rest bit for bit
        with torch.no_grad():
            edited = loss_of("llama", engine, batch).item()
    reference = tiny_llama(layers=3, tied=False)
    reference.load_state_dict(state)
    with torch.no_grad():
        expected = loss_of("llama", reference, batch).item()
    assert edited != before
    assert edited == pytest.approx(expected, rel=2e-2 if dtype == "bf16" else 1e-5)


def test_forward_and_step_are_refused_inside_and_a_foreign_module_is_named(tmp_path):
    with _engine(tmp_path, "cpu", "cpu", "fp32") as engine:
        batch = batches("llama", 1, 1)[0][0]
        with engine.gathered():
            with pytest.raises(RuntimeError, match="a forward inside engine.gathered"):
                loss_of("llama", engine, batch)
            with pytest.raises(RuntimeError, match="a step inside engine.gathered"):
                engine.step()
        with pytest.raises(ValueError, match="not part of the engine's model"):
            with engine.gathered(torch.nn.Linear(2, 2)):
                pass
        engine.backward(loss_of("llama", engine, batch))  # usable again after the context
        engine.step()
