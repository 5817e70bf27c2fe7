"""TrainData: the training (and evaluation) data of an `offload train` job, tokenized with the model's tokenizer
(byte tokens for the presets), cached for the next run, and packed into blocks of ``--seq-len`` tokens.

Where the token cache goes: ``--token-cache`` when given; else ``token-cache/`` under the swap directory the
user named (``--nvme-dir`` or the config file's ``nvme_dir``); else a hidden ``.offload-cache/`` beside the
data. Data that ships with offload, and a place that cannot be written, is tokenized into this run's scratch
directory and not kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from offload.cli.model_source import ModelSource
from offload.cli.train_settings import TrainSettings
from offload.config import Config
from offload.data import Encoder, PackedBlocks, tokenize
from offload.errors import ConfigError

SHIPPED_TEXT = "corpus.txt"


@dataclass
class TrainData:
    train_data: Any  # offload.data.TokenizedData
    train: PackedBlocks
    eval_data: Any | None
    evaluation: PackedBlocks | None
    settings: TrainSettings

    @classmethod
    def load(cls, settings: TrainSettings, source: ModelSource, config: Config, scratch: str,
             user_nvme_dir: str | None) -> TrainData:
        if source.tokenizer is None and not source.byte_level:
            raise ConfigError(f"--model: {source.directory} has no tokenizer files (tokenizer.json, "
                              f"tokenizer_config.json), so text data cannot be tokenized for it; add its tokenizer "
                              f"to the directory")
        encoder = Encoder(source.tokenizer)
        shipped = settings.data is None
        path = Path(settings.data) if not shipped else Path(str(resources.files("offload.data") / SHIPPED_TEXT))
        train_data = tokenize(path, encoder, None if shipped else _cache_dir(settings, path, user_nvme_dir),
                              scratch_dir=Path(scratch))
        _check_trained(train_data, "--data")
        train = PackedBlocks(train_data, settings.seq_len)
        eval_data = evaluation = None
        if settings.eval_data:
            eval_path = Path(settings.eval_data)
            eval_data = tokenize(eval_path, encoder, _cache_dir(settings, eval_path, user_nvme_dir),
                                 scratch_dir=Path(scratch), role="eval")
            _check_trained(eval_data, "--eval-data")
            evaluation = PackedBlocks(eval_data, settings.seq_len, flag="--eval-data")
        return cls(train_data, train, eval_data, evaluation, settings)

    def content(self) -> str:
        return self.train_data.content

    def position(self) -> dict[str, int | str]:
        """What fixes the batches of every step: a resumed run continues the same sequence only if all are
        equal. ``content`` is the hash of the tokens themselves (Note [content hash])."""
        s = self.settings
        return {"content": self.train_data.content, "tokens": int(self.train_data.num_tokens),
                "seq_len": s.seq_len, "batch": s.batch, "grad_accum": s.grad_accum, "seed": s.seed}

    def check_resume(self, saved: dict | None, checkpoint_dir: str) -> None:
        """Refuses to resume a checkpoint whose run read other data, or read it in another order (the data
        position after step N is then not what the checkpoint's run saw)."""
        if not isinstance(saved, dict):
            raise ConfigError(f"--resume: the checkpoint in {checkpoint_dir} does not record its data position "
                              f"(written by an older offload train, or by engine.save); it cannot be continued "
                              f"exactly")
        now = self.position()
        changed = [key for key in now if saved.get(key) != now[key]]
        if "content" in changed:
            raise ConfigError(f"--resume: the checkpoint in {checkpoint_dir} was trained on other data (its tokens "
                              f"differ from those of {self.train_data.source}); the data would not continue where "
                              f"it stopped")
        if changed:
            was = ", ".join(f"{key}={saved.get(key)}" for key in changed)
            raise ConfigError(f"--resume: the checkpoint in {checkpoint_dir} was trained with {was}; this run has "
                              f"{', '.join(f'{key}={now[key]}' for key in changed)}; the data would not continue "
                              f"where it stopped")


def _cache_dir(settings: TrainSettings, data: Path, user_nvme_dir: str | None) -> Path:
    if settings.token_cache:
        return Path(settings.token_cache)
    if user_nvme_dir:
        return Path(user_nvme_dir) / "token-cache"
    return data.resolve().parent / ".offload-cache"


def _check_trained(data, flag: str) -> None:
    """Data of which no token is trained (e.g. chat data without an assistant turn) would train on nothing."""
    if data.num_trained == 0:
        raise ConfigError(f"{flag}: {data.source} has no trained tokens ({data.num_tokens:,} tokens, all of "
                          f"prompts or non-assistant turns)")
