"""OffloadTrainer trains like transformers.Trainer with optim="adamw_torch", resumes exactly, writes a model
directory, and refuses what it cannot honour."""

from __future__ import annotations

import os

import pytest
import torch

import offload

transformers = pytest.importorskip("transformers", reason="OffloadTrainer needs transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from engine_reference import tiny_llama  # noqa: E402
from offload.integrations.hf import OffloadTrainer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402


class TokenRows(torch.utils.data.Dataset):
    """Fixed rows of token ids (labels = inputs), the same for every run."""

    def __init__(self, rows: int = 24, length: int = 12, seed: int = 3) -> None:
        self.ids = torch.randint(0, 96, (rows, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(out, **overrides) -> TrainingArguments:
    """The acceptance settings: accumulation 2, clipping at 1.0, a linear schedule with warmup, fp32."""
    settings = dict(output_dir=str(out), optim="adamw_torch", per_device_train_batch_size=2,
                    gradient_accumulation_steps=2, max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=2,
                    max_steps=6, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                    learning_rate=3e-3, weight_decay=0.01, disable_tqdm=True)
    settings.update(overrides)
    return TrainingArguments(**settings)


def nvme(tmp_path, dtype="fp32") -> offload.Config:
    return offload.Config(device="cpu", dtype=dtype, params="nvme", optimizer="nvme", nvme_dir=tmp_path / "swap")


def logged(trainer, key="loss") -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def test_offload_trainer_trains_like_trainer_with_adamw_torch(tmp_path):
    """The acceptance: params and optimizer on NVMe, fp32, gradient_accumulation_steps=2, max_grad_norm=1.0,
    linear warmup: the same logged losses (and grad norms, learning rates) and the same saved weights."""
    ref = Trainer(model=tiny_llama(), args=arguments(tmp_path / "ref"), train_dataset=TokenRows())
    ref.train()
    ref.save_model(tmp_path / "ref-model")
    ours = OffloadTrainer(model=tiny_llama(), args=arguments(tmp_path / "ours"), train_dataset=TokenRows(),
                          offload_config=nvme(tmp_path))
    assert ours.engine.stats().optimizer_groups_on_nvme > 0 and ours.offload_config.params == "nvme"
    ours.train()
    ours.save_model(tmp_path / "ours-model")
    assert len(logged(ours)) == 6
    for key in ("loss", "grad_norm", "learning_rate"):
        steps, values = zip(*logged(ours, key))
        ref_steps, ref_values = zip(*logged(ref, key))
        assert steps == ref_steps
        torch.testing.assert_close(torch.tensor(values), torch.tensor(ref_values), rtol=1e-5, atol=0, msg=key)
    assert getattr(ours.optimizer, "optimizer", ours.optimizer) is ours.engine.optimizer  # (accelerate wraps it)
    saved, ref_saved = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ours-model", "ref-model"))
    assert saved.keys() == ref_saved.keys()
    for key, value in ref_saved.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=1e-5, msg=key)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours-model")
    assert torch.isfinite(model(input_ids=TokenRows()[0]["input_ids"][None]).logits).all()
    assert (tmp_path / "ours-model" / "training_args.bin").is_file()


def test_activation_checkpointing_in_the_arguments_recomputes_through_the_engine(tmp_path):
    """TrainingArguments(activation_checkpointing=True): the Trainer turns it on for the engine's model, whose
    blocks are then recomputed in backward (fetched again from NVMe), with Trainer's own losses."""
    ref = Trainer(model=tiny_llama(), args=arguments(tmp_path / "ref", activation_checkpointing=True),
                  train_dataset=TokenRows())
    ref.train()
    ours = OffloadTrainer(model=tiny_llama(), args=arguments(tmp_path / "ours", activation_checkpointing=True),
                          train_dataset=TokenRows(), offload_config=nvme(tmp_path))
    ours.train()
    assert all(layer.gradient_checkpointing for layer in ours.engine.model.model.layers)
    (steps, values), (ref_steps, ref_values) = zip(*logged(ours)), zip(*logged(ref))
    assert steps == ref_steps and len(steps) == 6
    torch.testing.assert_close(torch.tensor(values), torch.tensor(ref_values), rtol=1e-5, atol=0)


def test_resuming_from_checkpoint_3_logs_the_straight_runs_losses(tmp_path):
    straight = OffloadTrainer(model=tiny_llama(), args=arguments(tmp_path / "run", save_strategy="steps",
                                                                 save_steps=3),
                              train_dataset=TokenRows(), offload_config=nvme(tmp_path))
    straight.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "offload" / "CURRENT").is_file() and (checkpoint / "scheduler.pt").is_file()
    assert not (checkpoint / "optimizer.pt").exists()  # (the state is in the engine's checkpoint)
    straight_state = straight.engine.state_dict()
    straight.engine.close()
    # another initialisation: everything the run continues from comes out of the checkpoint
    resumed = OffloadTrainer(model=tiny_llama(seed=7), args=arguments(tmp_path / "run2", save_strategy="no"),
                             train_dataset=TokenRows(), offload_config=nvme(tmp_path))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # (the log history of steps 1-3 comes back with the trainer state; 4-6 are the resumed run's)
    assert [s for s, _ in logged(resumed)] == [1, 2, 3, 4, 5, 6]
    assert logged(resumed)[3:] == logged(straight)[3:]
    assert logged(resumed, "learning_rate")[3:] == logged(straight, "learning_rate")[3:]
    assert logged(resumed, "grad_norm")[3:] == logged(straight, "grad_norm")[3:]
    final, straight_final = resumed.engine.state_dict(), straight_state
    assert all(torch.equal(final[k], straight_final[k]) for k in straight_final)


def test_evaluation_runs_through_the_engine_like_trainers(tmp_path):
    ref = Trainer(model=tiny_llama(), args=arguments(tmp_path / "ref"), eval_dataset=TokenRows(8, seed=9))
    ours = OffloadTrainer(model=tiny_llama(), args=arguments(tmp_path / "ours"), eval_dataset=TokenRows(8, seed=9),
                          offload_config=nvme(tmp_path))
    assert ours.evaluate()["eval_loss"] == pytest.approx(ref.evaluate()["eval_loss"], rel=1e-6)


def test_the_best_model_comes_back_at_the_end(tmp_path):
    args = arguments(tmp_path / "run", eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", learning_rate=0.3)
    trainer = OffloadTrainer(model=tiny_llama(), args=args, train_dataset=TokenRows(),
                             eval_dataset=TokenRows(8, seed=9), offload_config=offload.Config(device="cpu", dtype="fp32"))
    trainer.train()  # (a learning rate this high makes the later steps worse: the best is an early one)
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")  # (steps 4 and 6 evaluate worse)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-6)


def test_save_model_into_the_output_dir_keeps_its_checkpoints(tmp_path):
    out = tmp_path / "run"
    trainer = OffloadTrainer(model=tiny_llama(), args=arguments(out, save_strategy="steps", save_steps=3),
                             train_dataset=TokenRows(), offload_config=offload.Config(device="cpu", dtype="fp32"))
    trainer.train()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00009.safetensors").write_bytes(b"a shard of an earlier save")
    trainer.save_model()
    names = set(os.listdir(out))
    assert {"checkpoint-3", "checkpoint-6", "notes.txt", "model.safetensors", "config.json"} <= names
    assert "model-00001-of-00009.safetensors" not in names and not any(n.startswith(".offload-save") for n in names)
    assert (out / "notes.txt").read_text() == "mine"


def test_offload_config_may_be_a_toml_file(tmp_path):
    path = tmp_path / "offload.toml"
    offload.Config(device="cpu", dtype="fp32", optimizer="nvme", nvme_dir=tmp_path / "swap").to_file(path)
    trainer = OffloadTrainer(model=tiny_llama(), args=arguments(tmp_path / "run"), train_dataset=TokenRows(),
                             offload_config=path)
    assert trainer.offload_config.optimizer == "nvme" and trainer.engine.stats().optimizer_groups_on_nvme > 0


def test_bf16_in_the_arguments_is_the_engines_compute_dtype(tmp_path):
    trainer = OffloadTrainer(model=tiny_llama(), args=arguments(tmp_path / "run", bf16=True, max_steps=2),
                             train_dataset=TokenRows(), offload_config=offload.Config(device="cpu", dtype="bf16"))
    assert trainer.args.bf16 is False  # the engine computes in bf16; no autocast on top
    trainer.train()
    assert all(p.dtype == torch.bfloat16 for p in trainer.engine.model.parameters())
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in logged(trainer))


@pytest.mark.parametrize("overrides, kwargs, match", [
    ({"optim": "adafactor"}, {}, r"TrainingArguments.optim='adafactor': the engine's optimizer is AdamW"),
    ({"optim_args": "foo=1"}, {}, r"TrainingArguments.optim_args='foo=1'"),
    ({"torch_compile": True}, {}, r"TrainingArguments.torch_compile=True"),
    ({"bf16": True}, {}, r"TrainingArguments.bf16=True with offload_config.dtype='fp32'"),
    ({"bf16_full_eval": True}, {}, r"TrainingArguments.bf16_full_eval=True"),
    ({}, {"model_init": tiny_llama}, r"model_init: the engine is built over one model"),
    ({"push_to_hub": True}, {}, r"TrainingArguments.push_to_hub=True"),
    ({"auto_find_batch_size": True}, {}, r"TrainingArguments.auto_find_batch_size=True"),
    ({"load_best_model_at_end": True, "save_only_model": True, "eval_strategy": "steps", "save_strategy": "steps"},
     {}, r"load_best_model_at_end with save_only_model"),
    ({}, {"optimizers": (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), None)},
     r"optimizers / optimizer_cls_and_kwargs"),
])
def test_settings_the_engine_cannot_honour_are_refused_in_one_line(tmp_path, overrides, kwargs, match):
    try:
        args = arguments(tmp_path / "run", **overrides)
    except (ValueError, ImportError) as e:  # (transformers itself refuses some on this machine)
        pytest.skip(f"TrainingArguments refuses {overrides}: {e}")
    with pytest.raises(offload.ConfigError, match=match) as error:
        OffloadTrainer(model=tiny_llama(), args=args, train_dataset=TokenRows(),
                       offload_config=offload.Config(device="cpu", dtype="fp32"), **kwargs)
    assert "\n" not in str(error.value)


def test_deepspeed_arguments_are_refused(tmp_path):
    args = arguments(tmp_path / "run")
    args.deepspeed = {"zero_optimization": {"stage": 3}}  # (TrainingArguments would need deepspeed installed)
    with pytest.raises(offload.ConfigError, match="TrainingArguments.deepspeed: offload replaces DeepSpeed"):
        OffloadTrainer(model=tiny_llama(), args=args, offload_config=offload.Config(device="cpu", dtype="fp32"))


def test_a_lora_model_trains_like_peft_with_trainer_and_saves_its_adapter(tmp_path):
    peft = pytest.importorskip("peft", reason="LoRA needs peft")

    def lora_model():
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        return peft.get_peft_model(tiny_llama(), config)

    ref = Trainer(model=lora_model(), args=arguments(tmp_path / "ref"), train_dataset=TokenRows())
    ref.train()
    ours = OffloadTrainer(model=lora_model(), args=arguments(tmp_path / "ours"), train_dataset=TokenRows(),
                          offload_config=nvme(tmp_path))
    ours.train()
    torch.testing.assert_close(torch.tensor([v for _, v in logged(ours)]),
                               torch.tensor([v for _, v in logged(ref)]), rtol=1e-5, atol=0)
    ours.save_model(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    ids = TokenRows()[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref.model(input_ids=ids).logits, rtol=0, atol=1e-4)
