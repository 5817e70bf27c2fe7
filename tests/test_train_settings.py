"""TrainSettings: one definition of each `offload train` setting serving the flags and the [train] table, and
the learning-rate schedules it computes."""

from __future__ import annotations

import argparse
import math

import pytest

from offload.cli.train_settings import TrainSettings, add_flags, resolve
from offload.errors import ConfigError


def _parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(list(flags))


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text('[train]\nsteps = 30\nbatch = 2\noverwrite = true\nlr_schedule = "linear"\n')
    settings = resolve(_parse("--batch", "6"), str(config))
    assert (settings.steps, settings.batch, settings.overwrite, settings.lr_schedule) == (30, 6, True, "linear")
    assert settings.seq_len == TrainSettings().seq_len  # neither: the default
    assert resolve(_parse(), None) == TrainSettings()


@pytest.mark.parametrize("table,message", [
    ("grad_accum = 0", "job.toml: train.grad_accum: expected a positive integer; got 0"),
    ('lr_schedule = "cosin"', "job.toml: train.lr_schedule: expected one of cosine, linear, constant; got 'cosin'"),
    ("overwrite = 1", "job.toml: train.overwrite: expected true or false; got 1"),
    ('activation_checkpointing = "yes"', "job.toml: train.activation_checkpointing: expected true or false; got 'yes'"),
    ('max_shard_size = "0"', "job.toml: train.max_shard_size: must be a positive size"),
    ("stpes = 3", "job.toml: train.stpes: unknown key (did you mean 'train.steps'?)"),
])
def test_a_bad_value_in_the_file_is_named_by_its_key_and_file(tmp_path, table, message):
    config = tmp_path / "job.toml"
    config.write_text(f"[train]\n{table}\n")
    with pytest.raises(ConfigError) as error:
        resolve(_parse(), str(config))
    assert str(error.value).startswith(str(tmp_path / message)), str(error.value)


@pytest.mark.parametrize("values,message", [
    (dict(eval_every=5), "--eval-every: needs --eval-data"),
    (dict(save_every=5), "--save-every: needs --output"),
    (dict(checkpoint_every=5), "--checkpoint-every: needs --checkpoint-dir"),
    (dict(lr=-1.0), "--lr: expected a positive number"),
    (dict(max_grad_norm=math.nan), "--max-grad-norm: expected a non-negative number"),
    (dict(max_shard_size="lots"), "--max-shard-size:"),
])
def test_settings_that_cannot_work_are_refused_naming_the_flag(values, message):
    with pytest.raises(ConfigError, match="^" + message):
        TrainSettings(**values)


def test_learning_rate_schedules():
    peak = 1e-3
    cosine = TrainSettings(steps=110, warmup_steps=10)
    assert [cosine.learning_rate(s, peak) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert cosine.learning_rate(10, peak) == pytest.approx(peak)
    assert cosine.learning_rate(60, peak) == pytest.approx(peak / 2)  # half-way through the decay
    assert cosine.learning_rate(109, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    linear = TrainSettings(steps=110, warmup_steps=10, lr_schedule="linear")
    assert linear.learning_rate(60, peak) == pytest.approx(peak / 2)
    assert linear.learning_rate(109, peak) == pytest.approx(peak / 100)
    constant = TrainSettings(steps=110, warmup_steps=0, lr_schedule="constant")
    assert {constant.learning_rate(s, peak) for s in range(110)} == {peak}
    assert TrainSettings(steps=50).warmup() == 5 and TrainSettings(steps=5000).warmup() == 100
