"""`offload train --lora-r R ...`: a LoRA adapter trained on a saved Hugging Face model with the base frozen and
offloaded, written as a peft adapter directory (or, with --merge-lora, a merged model), checked against peft
and transformers themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft", reason="LoRA training needs peft (pip install 'offload[lora]')")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import hf_model_dir  # noqa: E402
from test_finetune_cli import _one_error  # noqa: E402  (one definition of a CLI run that failed on one line)

FAST = ["--batch", "4", "--seq-len", "32", "--no-sample", "--log-every", "1", "--dtype", "fp32"]
LINEAR_NAMES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama")
    hf_model_dir.make_model_dir(out, hidden=64, layers=2, intermediate=172, heads=4, vocab_size=512)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Training text and held-out text from the shipped corpus, as JSONL."""
    root = tmp_path_factory.mktemp("data")
    paragraphs = hf_model_dir.training_text()
    files = {"text": root / "train.jsonl", "eval": root / "eval.jsonl"}
    files["text"].write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:-4] * 3))
    files["eval"].write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[-4:]))
    return files


def _train(tmp_path: Path, *flags: str, check: bool = True, without_peft: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    # (without_peft: peft's import fails, as where it is not installed)
    command = ([sys.executable, "-c", "import sys; sys.modules['peft'] = None; from offload.cli.main import main; "
                "sys.exit(main())"] if without_peft else [sys.executable, "-m", "offload"])
    done = subprocess.run([*command, "train", *flags], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done




def _base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _held_out_loss(model, model_dir: Path, eval_file: Path, seq_len: int = 32) -> float:
    """``model``'s loss on the held-out text in blocks of ``seq_len`` tokens (text + eos, as offload packs it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = []
    for line in eval_file.read_text().splitlines():
        ids += tokenizer(json.loads(line)["text"]).input_ids + [tokenizer.eos_token_id]
    blocks = torch.tensor(ids[:len(ids) // seq_len * seq_len]).view(-1, seq_len)
    with torch.no_grad():
        return float(model.eval()(input_ids=blocks, labels=blocks).loss)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_lora_with_the_base_on_nvme_writes_an_adapter_peft_loads_that_lowers_held_out_loss(tmp_path, model_dir,
                                                                                            data):
    from peft import PeftModel

    config = tmp_path / "job.toml"  # (the LoRA settings from the [train] table, the rest from flags)
    config.write_text('[train]\nlora_r = 8\nlora_alpha = 16\nlora_targets = "q_proj,v_proj,o_proj,down_proj"\n')
    out = tmp_path / "adapter"
    done = _train(tmp_path, "--config", str(config), "--model", str(model_dir), "--data", str(data["text"]),
                  "--steps", "20", "--lr", "2e-2", "--params", "nvme", "--optimizer", "nvme", "--output", str(out),
                  *FAST)
    assert "LoRA r=8 alpha=16 dropout=0 on 8 layers (q_proj,v_proj,o_proj,down_proj)" in done.stdout
    assert "adapter: " in done.stdout and "PeftModel.from_pretrained" in done.stdout
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "offload_run.json"} <= files
    assert not any(name.startswith("model") for name in files)  # no copy of the base
    written = json.loads((out / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["peft_type"], written["task_type"]) == (8, 16, "LORA",
                                                                                                 "CAUSAL_LM")
    assert written["inference_mode"] is True and written["base_model_name_or_path"] == str(model_dir.resolve())
    weights = _weights(out)
    assert len(weights) == 2 * 2 * 4 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
    assert all(t.dtype == torch.float32 for t in weights.values())
    base = _base(model_dir)
    before = _held_out_loss(base, model_dir, data["eval"])
    tuned = PeftModel.from_pretrained(base, out)
    after = _held_out_loss(tuned, model_dir, data["eval"])
    assert after < before - 0.05, (before, after)  # (a base of random weights: 6.26 -> 6.16 in 20 steps)
    with tuned.disable_adapter():  # the base under the adapter is the saved model, unchanged
        assert _held_out_loss(tuned, model_dir, data["eval"]) == pytest.approx(before, rel=1e-6)
    assert list((tmp_path / "tmp").iterdir()) == []  # swap files gone


def test_merge_lora_writes_the_model_peft_merges_and_transformers_loads(tmp_path, model_dir, data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common = ["--model", str(model_dir), "--data", str(data["text"]), "--lora-r", "4", "--lora-alpha", "8",
              "--steps", "6", "--lr", "2e-2", "--params", "nvme", "--optimizer", "nvme", *FAST]
    _train(tmp_path, *common, "--output", str(tmp_path / "adapter"))
    done = _train(tmp_path, *common, "--merge-lora", "--max-shard-size", "100KB", "--output", str(tmp_path / "merged"))
    assert "merged model written to" in done.stdout
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"} <= files
    assert not any(name.startswith("adapter") for name in files)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert ours.dtype == torch.float32  # --output-dtype auto: the input model's
    reference = PeftModel.from_pretrained(_base(model_dir), tmp_path / "adapter").merge_and_unload()
    written, expected, base = _weights(tmp_path / "merged"), reference.state_dict(), _base(model_dir).state_dict()
    assert written.keys() == expected.keys() == base.keys()  # the base's names: no lora_, no base_layer
    changed = 0
    for key in expected:
        torch.testing.assert_close(written[key], expected[key], rtol=0, atol=1e-6)
        changed += not torch.equal(written[key], base[key])
    assert changed == 2 * 7  # every linear layer of the two blocks (all-linear leaves lm_head out)
    assert _held_out_loss(ours, model_dir, data["eval"]) == pytest.approx(
        _held_out_loss(reference, model_dir, data["eval"]), rel=1e-5)


def test_a_killed_lora_run_resumes_exactly_on_its_pretrained_base(tmp_path, model_dir, data):
    """A LoRA checkpoint holds the adapters and a fingerprint of the base, not the base: the resumed run reads
    the base from --model again, and ends with the adapter of the run that was never interrupted. Its first
    adapter is the one peft makes on the pretrained model with the run's seed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = ["--model", str(model_dir), "--data", str(data["text"]), "--lora-r", "4", "--lora-targets",
            "q_proj,down_proj", "--params", "nvme", "--optimizer", "nvme", *FAST]
    common = [*lora, "--steps", "6", "--lr", "1e-2", "--checkpoint-every", "3"]
    _train(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "a"), "--output", str(tmp_path / "straight"))
    child = subprocess.Popen([sys.executable, "-m", "offload", "train", *common, "--checkpoint-dir",
                              str(tmp_path / "b"), "--output", str(tmp_path / "resumed")], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, TMPDIR=str(tmp_path / "tmp")))
    for line in child.stdout:
        if line.startswith("step=4 "):  # (lines are printed before the step's saves: step 3's is done)
            child.kill()
            break
    child.wait()
    resumed = _train(tmp_path, *common, "--checkpoint-dir", str(tmp_path / "b"), "--resume", "--output",
                     str(tmp_path / "resumed"))
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    assert "schedule differs" not in resumed.stderr  # (the same schedule: nothing to warn about)
    straight, again = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    # the adapter it starts from: peft's on the pretrained model, with the run's seed (--seed 0); one step of
    # lr 1e-30 moves it by nothing that shows
    _train(tmp_path, *lora, "--steps", "1", "--lr", "1e-30", "--output", str(tmp_path / "start"))
    torch.manual_seed(0)
    expected = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                              LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"])).state_dict()
    start = _weights(tmp_path / "start")
    adapters = {k.replace(".default", ""): v for k, v in expected.items() if ".lora_A." in k}
    assert len(adapters) == 2 * 2
    for key, value in adapters.items():
        torch.testing.assert_close(start[key], value, rtol=0, atol=1e-12)


def test_save_adapter_and_save_merged_from_one_engine_match_peft(tmp_path, model_dir):
    """The writers on a LoRA model built in RAM from the pretrained weights (no meta build, no load_pretrained),
    its base offloaded to host RAM: the adapter and the merged model (bf16, sharded) of the same trained weights
    agree with peft's merge."""
    import offload
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from offload.engine.peft_adapter import save_adapter
    from offload.cli.lora_merge import save_merged

    torch.manual_seed(0)
    model = get_peft_model(_base(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                        task_type="CAUSAL_LM"))
    config = offload.Config(device="cpu", params="cpu", optimizer="cpu", dtype="fp32")
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with offload.Engine(model, config, lr=1e-2) as engine:
        for _ in range(3):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        save_adapter(engine, tmp_path / "adapter", base_model=str(model_dir))
        save_merged(engine, tmp_path / "merged", dtype=torch.bfloat16, max_shard_size="50KB")
        with pytest.raises(offload.ConfigError, match="exists and is not empty"):
            save_adapter(engine, tmp_path / "merged")  # (without overwrite)
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) > 1
    reference = PeftModel.from_pretrained(_base(model_dir), tmp_path / "adapter").merge_and_unload()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    ours_sd = ours.state_dict()
    for key, value in reference.state_dict().items():  # the fp32 merge, rounded once to bf16
        assert torch.equal(ours_sd[key], value.to(torch.bfloat16).float()), key


def test_bad_lora_input_gives_one_line_errors_and_writes_nothing(tmp_path, model_dir, data):
    out = tmp_path / "out"
    base = ["--model", str(model_dir), "--data", str(data["text"]), "--steps", "2", "--output", str(out), *FAST]
    error = _one_error(_train(tmp_path, *base, "--lora-r", "8", check=False, without_peft=True))
    assert error == ("offload train: error: --lora-r: LoRA training needs peft, which is not installed; pip install "
                     "'offload[lora]'")
    error = _one_error(_train(tmp_path, *base, "--lora-r", "8", "--lora-targets", "q_proj,v_prj", check=False))
    assert error == (f"offload train: error: --lora-targets: 'v_prj' names no linear layer of {model_dir}; its "
                     f"linear layers are {LINEAR_NAMES}")
    error = _one_error(_train(tmp_path, *base, "--merge-lora", check=False))
    assert error == "offload train: error: --merge-lora: needs --lora-r (a LoRA run: the rank of its adapter)"
    error = _one_error(_train(tmp_path, "--lora-r", "8", "--steps", "2", "--output", str(out), *FAST, check=False))
    assert "--lora-r: LoRA adapts pretrained weights; give --model a Hugging Face model directory" in error
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    error = _one_error(_train(tmp_path, *base, "--lora-r", "8", "--merge-lora", check=False))
    assert "--output" in error and "--overwrite" in error and (out / "keep.txt").read_text() == "precious"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_lora_settings_are_checked_wherever_they_come_from(tmp_path):
    import argparse

    from offload.cli.train_settings import TrainSettings, add_flags, resolve
    from offload.errors import ConfigError

    parser = argparse.ArgumentParser()
    add_flags(parser)
    settings = resolve(parser.parse_args(["--lora-r", "16", "--lora-targets", "q_proj, v_proj"]), None)
    assert (settings.lora_r, settings.lora_alpha, settings.lora_targets, settings.merge_lora) == (16, None,
                                                                                                   "q_proj, v_proj",
                                                                                                   False)
    refused = {"--lora-alpha: needs --lora-r": dict(lora_alpha=16.0),
               "--lora-targets: needs --lora-r": dict(lora_targets="all-linear"),
               "--lora-dropout: expected a probability in [0, 1); got 1.0": dict(lora_r=8, lora_dropout=1.0),
               "--lora-r: expected a positive integer; got 0": dict(lora_r=0),
               "--lora-alpha: expected a positive number; got -1": dict(lora_r=8, lora_alpha=-1),
               "--lora-targets: expected layer names separated by commas": dict(lora_r=8, lora_targets="q_proj,"),
               "--merge-lora: needs --output": dict(lora_r=8, merge_lora=True)}
    for message, values in refused.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            TrainSettings(**values)
    config = tmp_path / "job.toml"
    config.write_text("[train]\nlora_r = 8\nlora_targets = 5\n")
    with pytest.raises(ConfigError, match=r"job.toml: train.lora_targets: expected layer names separated by commas"):
        resolve(parser.parse_args([]), str(config))
