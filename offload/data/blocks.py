"""Training batches cut from a token stream: consecutive blocks of ``seq_len`` tokens, shuffled per epoch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from offload.data.token_cache import TokenizedData
from offload.errors import ConfigError

IGNORE_INDEX = -100  # what transformers' causal-LM loss skips
PERMUTATION_CACHE = 2  # a batch spans at most two epochs unless it is larger than an epoch


class PackedBlocks:
    """The tokens of ``data`` cut into ``num_blocks`` consecutive blocks of ``seq_len`` tokens; the last
    incomplete block is dropped. Documents are packed back to back: a block may hold the end of one document
    and the start of the next (each text ends with its end-of-sequence token, so the model learns the boundary).

    Note [batches are a function of (seed, index)]: batch ``index`` of ``size`` holds the blocks at global
    positions ``index*size .. index*size + size - 1`` of an infinite sequence of epochs; epoch ``e`` visits every
    block once, in the order ``torch.randperm(num_blocks)`` draws from a generator seeded with
    ``seed * 1_000_003 + e``. Nothing depends on the batches drawn before, so a resumed run that knows its step
    sees exactly the batches of the uninterrupted run, and the same holds whatever the batch size.
    """

    def __init__(self, data: TokenizedData, seq_len: int, flag: str = "--data") -> None:
        """``flag`` is what an error names as the data's source (``--data``, ``--eval-data``)."""
        if seq_len < 1:
            raise ConfigError(f"--seq-len: must be at least 1, got {seq_len}")
        self.seq_len = seq_len
        self.num_blocks = data.num_tokens // seq_len
        if self.num_blocks < 1:
            raise ConfigError(f"{flag}: {data.source} has {data.num_tokens:,} tokens, fewer than one sequence of "
                              f"--seq-len {seq_len}")
        used = self.num_blocks * seq_len
        # Views of the (memory-mapped) files: nothing is read until a batch gathers its rows.
        self._ids = data.ids[:used].reshape(self.num_blocks, seq_len)
        self._mask = data.mask[:used].reshape(self.num_blocks, seq_len)
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def batch(self, index: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` (from 0) of ``size`` blocks for ``seed`` (Note [batches are a function of (seed,
        index)]): ``input_ids`` and ``labels``, both int64 of shape (size, seq_len), new tensors the caller owns;
        ``labels`` equals ``input_ids`` where the token is trained and -100 elsewhere."""
        if index < 0 or size < 1:
            raise ValueError(f"batch: index must be >= 0 and size >= 1, got index={index}, size={size}")
        positions = np.arange(index * size, (index + 1) * size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_blocks)
        blocks = np.empty(size, dtype=np.int64)
        for epoch in np.unique(epochs).tolist():
            chosen = epochs == epoch
            blocks[chosen] = self._permutation(seed, epoch)[offsets[chosen]]
        return self._gather(blocks)

    def eval_batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every block once, in order, as (input_ids, labels) batches of ``size`` (the last may be smaller)."""
        if size < 1:
            raise ValueError(f"eval_batches: size must be >= 1, got {size}")
        for start in range(0, self.num_blocks, size):
            yield self._gather(np.arange(start, min(start + size, self.num_blocks), dtype=np.int64))

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._permutations:
            if len(self._permutations) >= PERMUTATION_CACHE:
                del self._permutations[next(iter(self._permutations))]  # the oldest
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._permutations[key] = torch.randperm(self.num_blocks, generator=generator).numpy()
        return self._permutations[key]

    def _gather(self, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # uint32 ids become int64 here, one batch at a time; the cache stays 4 bytes a token.
        input_ids = torch.from_numpy(np.array(self._ids[blocks], dtype=np.int64))
        trained = torch.from_numpy(np.array(self._mask[blocks], dtype=np.bool_))
        labels = torch.where(trained, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        return input_ids, labels
