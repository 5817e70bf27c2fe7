"""TrainLoop: the steps of `offload train`: micro-batches of packed blocks through the engine, the learning-rate
schedule, evaluation, progress output and the per-step saves.

Note [the loss of a step]: a step is ``grad_accum`` micro-batches of ``batch`` blocks; blocks of prompt /
completion or chat data train only some of their tokens (labels -100 elsewhere), so micro-batches differ in how
many tokens they train. The step's loss is the mean over every trained token of the step (what a single
micro-batch of all its sequences would give, and how the Hugging Face Trainer counts since it passes
``num_items_in_batch``): each micro-batch's mean loss (the model's, over its own trained tokens) is weighted by
its share of the step's trained tokens before its backward. With several ranks every rank builds the same global
batch, so each knows the step's total; the engine averages gradients over ranks, hence the factor ``world``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import psutil
import torch

from offload.cli.launch import Launch
from offload.cli.run_log import RunLog
from offload.cli.train_settings import TrainSettings


@dataclass
class StepReport:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    step_s: float
    fetch_wait_s: float
    optimizer_s: float
    rss_bytes: int
    nvme_read: int
    nvme_written: int

    def line(self) -> str:
        return (f"step={self.step} loss={self.loss:.4f} tok/s={self.tokens_per_s:.0f} lr={self.lr:.3g} "
                f"grad_norm={self.grad_norm:.3f} step_s={self.step_s:.3f} fetch_wait_s={self.fetch_wait_s:.3f} "
                f"optimizer_s={self.optimizer_s:.3f} rss_gib={self.rss_bytes / 2**30:.2f} "
                f"nvme_read_mb={self.nvme_read / 1e6:.1f} nvme_written_mb={self.nvme_written / 1e6:.1f}")

    def postfix(self) -> str:
        return (f"loss {self.loss:.3f} | lr {self.lr:.2g} | {self.tokens_per_s:.0f} tok/s | step {self.step_s:.2f}s "
                f"(fetch wait {self.fetch_wait_s:.2f}s, optimizer {self.optimizer_s:.2f}s) | RAM "
                f"{self.rss_bytes / 2**30:.2f} GiB | NVMe {self.nvme_read / 1e6:.0f}/{self.nvme_written / 1e6:.0f} MB r/w")

    def metrics(self) -> dict[str, float]:
        return {"step": self.step, "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
                "tokens_per_s": self.tokens_per_s, "step_s": self.step_s, "rss_bytes": self.rss_bytes}


@dataclass(frozen=True)
class EvalResult:
    step: int
    loss: float
    tokens: int
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def line(self) -> str:
        return (f"eval step={self.step} eval_loss={self.loss:.4f} perplexity={self.perplexity:.2f} "
                f"tokens={self.tokens} eval_s={self.seconds:.1f}")

    def metrics(self) -> dict[str, float]:
        return {"step": self.step, "eval_loss": self.loss, "eval_perplexity": self.perplexity,
                "eval_tokens": self.tokens}


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode (dropout off) inside the block, back in the mode it was in after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def trained_tokens(labels: torch.Tensor) -> int:
    """How many tokens of ``labels`` are predicted (and trained): a causal LM's label at position 0 has no
    prediction, and -100 marks the untrained ones."""
    return int((labels[:, 1:] != -100).sum())


class TrainLoop:
    """Runs steps ``first + 1 .. settings.steps`` of ``engine`` on ``train`` (a PackedBlocks), evaluating on
    ``evaluation`` (or None) and calling ``save(step)`` after every step (which writes the checkpoints and
    outputs the settings ask for)."""

    def __init__(self, engine, settings: TrainSettings, train, evaluation, launch: Launch, log: RunLog,
                 peak_lr: float, save: Callable[[int], None]) -> None:
        self.engine = engine
        self.settings = settings
        self.train = train
        self.evaluation = evaluation
        self.launch = launch
        self.log = log
        self.peak_lr = peak_lr
        self.save = save
        self.losses: list[float] = []
        self.evals: list[EvalResult] = []

    def run(self, first: int) -> None:
        from tqdm import tqdm

        s = self.settings
        interactive = sys.stdout.isatty() and self.launch.main
        if self.evaluation is not None and first == 0:
            self._evaluate(0)
        bar = tqdm(total=s.steps, initial=first, disable=not interactive, unit="step", dynamic_ncols=True)
        try:
            before = self.engine.stats()
            for step in range(first, s.steps):
                report, before = self._step(step, before)
                self.log.record(report.metrics())
                if interactive:
                    bar.set_postfix_str(report.postfix(), refresh=False)
                    bar.update(1)
                elif (step + 1) % s.log_every == 0 or step == first or step + 1 == s.steps:
                    print(report.line(), flush=True)
                done = step + 1
                if self.evaluation is not None and (done == s.steps or (s.eval_every and done % s.eval_every == 0)):
                    self._evaluate(done, bar if interactive else None)
                self.save(done)
        finally:
            bar.close()

    def _step(self, step: int, before) -> tuple[StepReport, object]:
        """One optimizer step: ``grad_accum`` micro-batches (Note [the loss of a step])."""
        s, engine, launch = self.settings, self.engine, self.launch
        start = time.perf_counter()
        engine.lr = lr = s.learning_rate(step, self.peak_lr)
        micro = [self.train.batch(step * s.grad_accum + k, s.batch, s.seed) for k in range(s.grad_accum)]
        total = sum(trained_tokens(labels) for _, labels in micro)
        loss_sum = 0.0
        for k, (ids, labels) in enumerate(micro):
            ids, labels = launch.share(ids), launch.share(labels)
            count = trained_tokens(labels)
            if count:
                # (no KV cache in training: nothing reads it, and activation checkpointing refuses one)
                loss = engine(input_ids=ids, labels=labels, use_cache=False).loss
                weighted = loss * (count * launch.world / max(total, 1))
            else:
                # Nothing to learn in this share, but the backward must still reach every parameter (the
                # engine's groups expect their gradients): one token's loss, weighted by zero.
                one = torch.full_like(labels, -100)
                one[0, -1] = ids[0, -1]
                weighted = engine(input_ids=ids, labels=one, use_cache=False).loss * 0.0
            loss_sum += weighted.item()
            if k + 1 < len(micro):
                engine.backward(weighted)
            else:  # the step's updates may start during this backward (Note [updates during backward])
                info = engine.backward_step(weighted)
        loss = launch.mean(loss_sum)  # the token-weighted mean loss of the global step
        self.losses.append(loss)
        elapsed = time.perf_counter() - start
        now = engine.stats()
        # Engine totals, not StepInfo: an overlapped step's optimizer time and NVMe bytes are added to the
        # totals when it completes (during the next step), so in steady state each line shows one step's.
        report = StepReport(
            step=info.step, loss=loss, lr=lr, grad_norm=info.grad_norm,
            tokens_per_s=s.tokens_per_step / elapsed, step_s=elapsed,
            fetch_wait_s=now.fetch_wait_s - before.fetch_wait_s,
            optimizer_s=(now.optimizer_adam_s + now.optimizer_io_wait_s
                         - before.optimizer_adam_s - before.optimizer_io_wait_s),
            rss_bytes=psutil.Process().memory_info().rss, nvme_read=now.nvme_bytes_read - before.nvme_bytes_read,
            nvme_written=now.nvme_bytes_written - before.nvme_bytes_written)
        return report, now

    def _evaluate(self, step: int, bar=None) -> EvalResult:
        """The mean loss over every trained token of the evaluation data (every rank evaluates all of it: the
        forward of offloaded weights is collective, and evaluation is short)."""
        start = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        with torch.no_grad(), evaluating(self.engine.model):
            for ids, labels in self.evaluation.eval_batches(self.settings.batch):
                count = trained_tokens(labels)
                if not count:
                    continue
                out = self.engine(input_ids=ids, labels=labels, use_cache=False)
                loss_sum += out.loss.item() * count
                tokens += count
        result = EvalResult(step, loss_sum / max(tokens, 1), tokens, time.perf_counter() - start)
        self.evals.append(result)
        self.log.record(result.metrics())
        if bar is not None:
            bar.write(result.line())
        else:
            print(result.line(), flush=True)
        return result
