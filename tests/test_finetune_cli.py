"""`offload train --model DIR --data FILE --output OUT`: fine-tuning a saved Hugging Face model on the user's data
and getting a Hugging Face model directory back, run as a user runs it (a subprocess), against transformers."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import hf_model_dir  # noqa: E402

FAST = ["--batch", "4", "--seq-len", "32", "--no-sample", "--log-every", "1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama")
    hf_model_dir.make_model_dir(out, hidden=64, layers=2, intermediate=172, heads=4, vocab_size=512)
    return out


def _paragraphs() -> list[str]:
    return hf_model_dir.training_text()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Text, prompt/completion and chat JSONL files, and held-out text, from the shipped corpus."""
    root = tmp_path_factory.mktemp("data")
    paragraphs = _paragraphs()
    train, held_out = paragraphs[:-4], paragraphs[-4:]
    files = {"text": root / "train.jsonl", "eval": root / "eval.jsonl", "pc": root / "pc.jsonl",
             "chat": root / "chat.jsonl"}
    files["text"].write_text("".join(json.dumps({"text": p}) + "\n" for p in train * 3))
    files["eval"].write_text("".join(json.dumps({"text": p}) + "\n" for p in held_out))
    lines, chats = [], []
    for p in train * 3:
        head, _, tail = p.partition(" ")
        lines.append(json.dumps({"prompt": "Zq vx Zq vx Zq vx: ", "completion": p}) + "\n")
        chats.append(json.dumps({"messages": [{"role": "user", "content": head},
                                              {"role": "assistant", "content": tail}]}) + "\n")
    files["pc"].write_text("".join(lines))
    files["chat"].write_text("".join(chats))
    return files


def _metric_losses(metrics: Path) -> list[float]:
    """The step losses of a --metrics file (not rounded, as the printed ones are)."""
    return [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]


def _train(tmp_path: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "offload", "train", *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(stdout: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step=(\d+) loss=([\d.]+) tok/s=", stdout, re.M)}


def _held_out_loss(model_path: Path, eval_file: Path, seq_len: int = 32) -> float:
    """The loss of a model directory on held-out text, computed with transformers alone (token-weighted over
    blocks of ``seq_len`` of the text's tokens + eos, as offload packs them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = []
    for line in eval_file.read_text().splitlines():
        ids += tokenizer(json.loads(line)["text"]).input_ids + [tokenizer.eos_token_id]
    blocks = torch.tensor(ids[:len(ids) // seq_len * seq_len]).view(-1, seq_len)
    with torch.no_grad():
        return float(model(input_ids=blocks, labels=blocks).loss)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_fine_tune_on_jsonl_with_everything_on_nvme_writes_a_model_transformers_loads(tmp_path, model_dir, data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tuned"
    metrics = tmp_path / "metrics.jsonl"
    done = _train(tmp_path, "--model", str(model_dir), "--data", str(data["text"]), "--eval-data", str(data["eval"]),
                  "--eval-every", "10", "--steps", "20", "--lr", "3e-3", "--params", "nvme", "--optimizer", "nvme",
                  "--dtype", "fp32", "--output", str(out), "--metrics", str(metrics), *FAST)
    losses = _losses(done.stdout)
    assert losses[20] < losses[1] - 0.5, losses
    assert "its tokenizer (512 tokens)" in done.stdout and "weights from" in done.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32 and len(tokenizer) == 512  # auto: the input's dtype
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "offload_run.json"} <= {p.name for p in out.iterdir()}
    before, after = _held_out_loss(model_dir, data["eval"]), _held_out_loss(out, data["eval"])
    assert after < before - 0.3, (before, after)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert {"lr", "grad_norm", "tokens_per_s"} <= steps[0].keys()
    assert [r["step"] for r in evals] == [0, 10, 20] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # the eval loss offload reports at step 0 and at the end is the one transformers computes on the same blocks
    assert evals[0]["eval_loss"] == pytest.approx(before, rel=1e-4)
    assert evals[-1]["eval_loss"] == pytest.approx(after, rel=1e-4)
    assert math.isclose(evals[-1]["eval_perplexity"], math.exp(evals[-1]["eval_loss"]), rel_tol=1e-4)
    assert list((tmp_path / "tmp").iterdir()) == []  # swap files gone


def test_placements_write_the_same_weights_and_a_resumed_run_equals_the_straight_one(tmp_path, model_dir, data):
    common = ["--model", str(model_dir), "--data", str(data["pc"]), "--steps", "10", "--dtype", "fp32",
              "--lr", "1e-3", "--grad-accum", "2", "--warmup-steps", "2", "--weight-decay", "0.01", *FAST]
    _train(tmp_path, *common, "--params", "device", "--optimizer", "cpu", "--output", str(tmp_path / "a"))
    _train(tmp_path, *common, "--params", "nvme", "--optimizer", "nvme", "--output", str(tmp_path / "b"),
           "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "5")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    # resume the nvme run from its step-5 checkpoint (the checkpoint of step 10 removed)
    from offload.checkpoint.directory import CheckpointDir

    ckpt = CheckpointDir(tmp_path / "ckpt")
    assert json.loads((ckpt.current()[0] / "meta.json").read_text())["extra"]["step"] == 10
    # the same run, killed (SIGKILL) after its step-5 checkpoint, then resumed
    split = tmp_path / "split"
    child = subprocess.Popen([sys.executable, "-m", "offload", "train", *common, "--params", "nvme", "--optimizer",
                              "nvme", "--checkpoint-dir", str(split), "--checkpoint-every", "5", "--output",
                              str(tmp_path / "c")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=dict(os.environ, TMPDIR=str(tmp_path / "tmp")))
    for line in child.stdout:
        if line.startswith("step=6 "):  # lines are printed before the step's saves: step 5's is done
            child.kill()
            break
    child.wait()
    assert not (tmp_path / "c").exists()  # --output is written at the end only
    resumed = _train(tmp_path, *common, "--params", "nvme", "--optimizer", "nvme", "--checkpoint-dir", str(split),
                     "--resume", "--output", str(tmp_path / "c"))
    assert "resumed from" in resumed.stdout and "at step 5" in resumed.stdout
    assert sorted(_losses(resumed.stdout)) == [6, 7, 8, 9, 10]
    c = _weights(tmp_path / "c")
    for key in b:
        assert torch.equal(b[key], c[key]), key


def test_the_prompt_of_prompt_completion_data_is_not_learnt(tmp_path, model_dir, data):
    """Every example starts with the same odd prompt. Trained as text, the model learns it (its loss on the
    prompt falls far); trained as prompt + completion, the prompt's tokens carry no loss and it is not learnt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    as_text = tmp_path / "as-text.jsonl"
    as_text.write_text("".join(json.dumps({"text": json.loads(line)["prompt"] + json.loads(line)["completion"]})
                               + "\n" for line in data["pc"].read_text().splitlines()))
    flags = ["--model", str(model_dir), "--steps", "30", "--lr", "1e-2", "--dtype", "fp32", *FAST]
    _train(tmp_path, *flags, "--data", str(data["pc"]), "--output", str(tmp_path / "pc"))
    _train(tmp_path, *flags, "--data", str(as_text), "--output", str(tmp_path / "text"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = torch.tensor([tokenizer("Zq vx Zq vx Zq vx: ").input_ids])

    def prompt_loss(path: Path) -> float:
        with torch.no_grad():
            return float(AutoModelForCausalLM.from_pretrained(path)(input_ids=prompt, labels=prompt).loss)

    base, masked, unmasked = prompt_loss(model_dir), prompt_loss(tmp_path / "pc"), prompt_loss(tmp_path / "text")
    assert unmasked < base - 2.0, (base, masked, unmasked)  # learnt when trained on
    assert masked > base - 0.5 * (base - unmasked), (base, masked, unmasked)  # not learnt when masked


def test_chat_messages_train_and_a_config_file_train_table_sets_the_job(tmp_path, model_dir, data):
    config = tmp_path / "job.toml"
    config.write_text(f'dtype = "fp32"\n[train]\nmodel = "{model_dir}"\ndata = "{data["chat"]}"\nsteps = 8\n'
                      f'lr = 3e-3\nbatch = 2\nseq_len = 32\nlr_schedule = "constant"\nwarmup_steps = 0\n')
    done = _train(tmp_path, "--config", str(config), "--batch", "4", "--no-sample", "--log-every", "1")
    losses = _losses(done.stdout)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]
    assert "4 x 1 sequences" in done.stdout  # the flag wins over the file
    assert re.search(r"lr=0\.003 ", done.stdout)  # constant, no warm-up
    config.write_text('[train]\nstpes = 3\n')
    bad = _train(tmp_path, "--config", str(config), check=False)
    assert bad.returncode == 1 and "train.stpes: unknown key (did you mean 'train.steps'?)" in bad.stderr


def test_a_hub_id_is_read_from_the_local_cache_and_never_downloaded(tmp_path, model_dir):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        (snapshot / file.name).symlink_to(file)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path))
    run = [sys.executable, "-m", "offload", "train", "--steps", "1", *FAST]
    done = subprocess.run([*run, "--model", "acme/tiny-llama"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"acme/tiny-llama (cached at {snapshot})" in done.stdout
    missing = subprocess.run([*run, "--model", "acme/other"], env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        f"offload train: error: --model: 'acme/other' is not in the local Hugging Face cache ({cache}) and offload "
        "train does not download; fetch it first (hf download acme/other) or give its directory")


def _one_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stdout[-2000:]
    assert "Traceback" not in done.stderr and "step=" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.startswith("offload train: error:")]
    assert len(lines) == 1, done.stderr[-2000:]
    return lines[0]


def test_bad_input_gives_one_line_errors_and_writes_nothing(tmp_path, model_dir, data):
    out = tmp_path / "out"
    base = ["--steps", "2", "--output", str(out), *FAST]
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    assert "has no config.json" in _one_error(_train(tmp_path, "--model", str(no_config), *base, check=False))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    assert "has no weights" in _one_error(_train(tmp_path, "--model", str(no_weights), *base, check=False))
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).symlink_to(model_dir / name)
    assert "has no tokenizer files" in _one_error(_train(tmp_path, "--model", str(no_tokenizer), "--data",
                                                         str(data["text"]), *base, check=False))
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert f"{bad_line}:2" in _one_error(_train(tmp_path, "--model", str(model_dir), "--data", str(bad_line), *base,
                                                check=False))
    no_field = tmp_path / "fields.jsonl"
    no_field.write_text('{"text": "fine"}\n{"question": "?", "answer": "!"}\n')
    error = _one_error(_train(tmp_path, "--model", str(model_dir), "--data", str(no_field), *base, check=False))
    assert f"{no_field}:2" in error and "question" in error
    short = tmp_path / "short.txt"
    short.write_text("Too short.\n")
    assert "fewer than one sequence" in _one_error(_train(tmp_path, "--model", str(model_dir), "--data", str(short),
                                                          *base, check=False))
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    assert ".csv" in _one_error(_train(tmp_path, "--model", str(model_dir), "--data", str(odd), *base, check=False))
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    error = _one_error(_train(tmp_path, "--model", str(model_dir), *base, check=False))
    assert "--output" in error and "--overwrite" in error and (out / "keep.txt").read_text() == "precious"
    assert [p for p in (tmp_path / "tmp").iterdir()] == []  # no swap files left


def test_a_full_disk_while_writing_the_output_keeps_the_last_good_one(tmp_path, model_dir, data, monkeypatch,
                                                                       capsys):
    """In process, with the disk made full (ENOSPC) for the second write of --output: the run fails with a
    one-line error and the model the first write (--save-every) left is intact, byte for byte."""
    import offload.checkpoint.tensor_file as tensor_file
    from offload.cli.main import main

    out = tmp_path / "out"
    real = os.posix_fallocate
    writes = []

    def fallocate(fd: int, offset: int, length: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if ".partial-" in path and str(tmp_path) in path and path.endswith(".safetensors"):
            writes.append(path)
            if len(writes) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(tensor_file.os, "posix_fallocate", fallocate)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    code = main(["train", "--model", str(model_dir), "--data", str(data["text"]), "--steps", "4", "--save-every",
                 "2", "--output", str(out), "--nvme-dir", str(tmp_path / "swap"), *FAST])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err.strip().splitlines()[-1]
    record = json.loads((out / "offload_run.json").read_text())
    assert record["step"] == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # the step-2 model, whole
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_tensorboard_gets_the_loss_the_lr_and_the_eval_loss(tmp_path, model_dir, data):
    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    _train(tmp_path, "--model", str(model_dir), "--data", str(data["text"]), "--eval-data", str(data["eval"]),
           "--steps", "3", "--tensorboard", str(board), *FAST)
    events = EventAccumulator(str(board))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/perplexity"} <= set(scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 3]


def test_a_datasets_directory_and_a_parquet_file_train_like_the_jsonl_they_hold(tmp_path, model_dir, data):
    datasets = pytest.importorskip("datasets", reason="--data DIR / .parquet need the datasets extra")
    rows = [json.loads(line) for line in data["pc"].read_text().splitlines()]
    table = datasets.Dataset.from_list(rows)
    table.save_to_disk(str(tmp_path / "saved"))
    table.to_parquet(str(tmp_path / "rows.parquet"))
    flags = ["--model", str(model_dir), "--steps", "3", "--dtype", "fp32", *FAST]
    runs = {name: _losses(_train(tmp_path, *flags, "--data", str(path)).stdout)
            for name, path in (("jsonl", data["pc"]), ("saved", tmp_path / "saved"),
                               ("parquet", tmp_path / "rows.parquet"))}
    assert runs["saved"] == runs["jsonl"] == runs["parquet"]


def test_the_loss_of_a_step_weights_micro_batches_by_their_trained_tokens(tmp_path, model_dir, data):
    """Prompt/completion micro-batches train different numbers of tokens; one step of 8 sequences and one of
    2 x 4 accumulated see the same blocks (the batches are a function of the seed and the position), so with
    the loss a mean over the step's trained tokens their losses and weights agree."""
    flags = ["--model", str(model_dir), "--data", str(data["pc"]), "--steps", "4", "--dtype", "fp32", "--lr",
             "1e-3", "--seq-len", "32", "--no-sample", "--log-every", "1", "--params", "cpu", "--optimizer", "cpu"]
    _train(tmp_path, *flags, "--batch", "8", "--output", str(tmp_path / "one"), "--metrics", str(tmp_path / "1.jsonl"))
    _train(tmp_path, *flags, "--batch", "4", "--grad-accum", "2", "--output", str(tmp_path / "two"), "--metrics",
           str(tmp_path / "2.jsonl"))
    assert len(_metric_losses(tmp_path / "1.jsonl")) == 4
    assert _metric_losses(tmp_path / "1.jsonl") == pytest.approx(_metric_losses(tmp_path / "2.jsonl"), rel=1e-5)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_trains_the_same_weights(tmp_path, model_dir, data, lora):
    """--activation-checkpointing recomputes each block in backward (fp32: the same values), so the run's losses
    and written weights are those of the run that keeps every activation; with LoRA too."""
    if lora:
        pytest.importorskip("peft", reason="LoRA needs peft")
    flags = ["--model", str(model_dir), "--data", str(data["text"]), "--steps", "4", "--dtype", "fp32", "--lr",
             "1e-3", "--params", "nvme", "--optimizer", "nvme", *FAST] + (["--lora-r", "4"] if lora else [])
    kept = _train(tmp_path, *flags, "--output", str(tmp_path / "kept"), "--metrics", str(tmp_path / "kept.jsonl"))
    recomputed = _train(tmp_path, *flags, "--activation-checkpointing", "--output", str(tmp_path / "recomputed"),
                        "--metrics", str(tmp_path / "recomputed.jsonl"))
    assert "activation checkpointing: each block recomputed in backward" in recomputed.stdout
    assert "activation checkpointing" not in kept.stdout
    assert "use_cache" not in recomputed.stderr  # (the training forward asks for no KV cache)
    assert len(_metric_losses(tmp_path / "kept.jsonl")) == 4
    assert _metric_losses(tmp_path / "recomputed.jsonl") == pytest.approx(_metric_losses(tmp_path / "kept.jsonl"),
                                                                          rel=1e-6)
    a, b = _weights(tmp_path / "kept"), _weights(tmp_path / "recomputed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_metrics_hold_the_schedule_and_a_resumed_run_rewrites_them_as_one_run(tmp_path, model_dir, data):
    from offload.cli.train_settings import TrainSettings

    flags = ["--model", str(model_dir), "--data", str(data["text"]), "--steps", "6", "--lr", "2e-5",
             "--warmup-steps", "3", "--checkpoint-every", "3", *FAST]
    straight = tmp_path / "straight.jsonl"
    _train(tmp_path, *flags, "--metrics", str(straight), "--checkpoint-dir", str(tmp_path / "a"))
    records = [json.loads(line) for line in straight.read_text().splitlines()]
    settings = TrainSettings(steps=6, warmup_steps=3)
    assert [r["lr"] for r in records] == pytest.approx([settings.learning_rate(s, 2e-5) for s in range(6)],
                                                       rel=1e-6)  # 2e-5 / 3 at step 1: not rounded away
    # the same run killed after step 5's record (its checkpoint is step 3's), the last line cut short
    metrics = tmp_path / "m.jsonl"
    child = subprocess.Popen([sys.executable, "-m", "offload", "train", *flags, "--metrics", str(metrics),
                              "--checkpoint-dir", str(tmp_path / "b")], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, TMPDIR=str(tmp_path / "tmp")))
    for line in child.stdout:
        if line.startswith("step=5 "):
            child.kill()
            break
    child.wait()
    with open(metrics, "a") as f:
        f.write('{"step": 6, "lo')
    _train(tmp_path, *flags, "--metrics", str(metrics), "--checkpoint-dir", str(tmp_path / "b"), "--resume")
    resumed = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records]


def test_bf16_tied_model_in_bf16_out_sharded_and_evaluated_in_eval_mode(tmp_path, data):
    """A bf16 model directory with tied embeddings and attention dropout: --output-dtype auto writes bf16,
    --max-shard-size splits it with an index, the tied weight is stored once, and the eval loss at step 0 is
    transformers' (dropout off) on the same blocks."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "bf16-model"
    hf_model_dir.make_model_dir(source, dtype="bfloat16", tie=True)
    config = json.loads((source / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    metrics = tmp_path / "m.jsonl"
    _train(tmp_path, "--model", str(source), "--data", str(data["text"]), "--eval-data", str(data["eval"]),
           "--steps", "2", "--dtype", "fp32", "--output", str(out), "--max-shard-size", "100KB", "--metrics",
           str(metrics), *FAST)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    weights = _weights(out)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16} and "lm_head.weight" not in weights
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    evals = [json.loads(line) for line in metrics.read_text().splitlines() if "eval_loss" in line]
    assert evals[0]["eval_loss"] == pytest.approx(_held_out_loss(source, data["eval"]), rel=1e-4)
    # --overwrite replaces it
    _train(tmp_path, "--model", str(source), "--data", str(data["text"]), "--steps", "1", "--output", str(out),
           "--overwrite", "--output-dtype", "fp32", *FAST)
    assert {t.dtype for t in _weights(out).values()} == {torch.float32}


def test_more_bad_input_is_refused_before_training(tmp_path, model_dir, data):
    base = ["--model", str(model_dir), "--data", str(data["text"]), "--steps", "2", *FAST]

    def error(*flags: str) -> str:
        return _one_error(_train(tmp_path, *base, *flags, check=False))

    one_line = tmp_path / "one.jsonl"
    one_line.write_text(json.dumps({"text": "Short."}) + "\n")
    assert error("--eval-data", str(one_line)).endswith("fewer than one sequence of --seq-len 32")
    assert "--eval-data:" in error("--eval-data", str(one_line))
    assert "--metrics: cannot write" in error("--metrics", str(tmp_path / "missing" / "m.jsonl"))
    assert "--eval-every: needs --eval-data" in error("--eval-every", "5")
    assert "overlaps --checkpoint-dir" in error("--output", str(tmp_path / "out"), "--checkpoint-dir",
                                                str(tmp_path / "out" / "ckpt"))
    assert "overlaps --model" in error("--output", str(model_dir), "--overwrite")
    chat_without_answers = tmp_path / "no-answers.jsonl"
    chat_without_answers.write_text(json.dumps({"messages": [{"role": "user", "content": "Hello there."}]}) + "\n")
    assert "has no trained tokens" in error("--data", str(chat_without_answers), "--seq-len", "4")
    assert "--seq-len: 4096 is longer than the model's 512 positions" in error("--seq-len", "4096")
    # resuming: a checkpoint of other data, or past --steps, is refused before anything is loaded
    ckpt = tmp_path / "ckpt"
    _train(tmp_path, *base, "--checkpoint-dir", str(ckpt))
    assert "trained on other data" in error("--checkpoint-dir", str(ckpt), "--resume", "--data", str(data["pc"]))
    assert "past --steps 1" in error("--checkpoint-dir", str(ckpt), "--resume", "--steps", "1")
    assert "batch=4" in error("--checkpoint-dir", str(ckpt), "--resume", "--batch", "2")
