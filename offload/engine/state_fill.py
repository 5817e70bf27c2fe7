"""fill_group: writes a group's optimizer state (fp32 master, m, v), chunk by chunk, into its home (host or
NVMe) and makes its compute-dtype weights from the new master wherever they live. Used to materialise a model
built on the meta device, to load pretrained weights and to load a checkpoint: one chunk in memory at a time."""

from __future__ import annotations

from typing import Callable

import torch

from offload.optim.state_store import STATE_PARTS, GroupState, OptimizerStateStore, StatePlacement, chunks, split_state
from offload.schedule.weights import Weights

# (parts, start, end): writes elements [start, end) of the group into ``parts`` = (master, m, v), each fp32 of
# end - start elements. A part it leaves alone keeps what it holds: the current values for a group in RAM,
# zeros for an NVMe chunk; padding between parameters is zero in every buffer and stays so.
ReadState = Callable[[tuple[torch.Tensor, ...], int, int], None]


def fill_group(store: OptimizerStateStore, weights: Weights, state: GroupState, read: ReadState) -> None:
    """``read`` is asked for group coordinates; the state and weights homes hold this rank's shard of them
    (Note [rank shards]), so ``read`` sees elements [lo + start, lo + end) for shard elements [start, end).
    Outside a step, after ``TrainingState.quiesce()``."""
    group = state.group
    numel, lo = group.shard_numel, group.lo
    if state.placement is StatePlacement.HOST:
        parts = split_state(state.state_host.view(torch.float32), numel)
        read(parts, lo, lo + numel)
        weights.load_weights(group.index, parts[0], 0, True)
        return
    pieces = chunks(numel, store.chunk_elements)
    for k, (start, end) in enumerate(pieces):
        staging = store.staging[0].view(torch.float32)[:STATE_PARTS * (end - start)]
        staging.zero_()  # (the slot holds another chunk's bytes)
        parts = split_state(staging, end - start)
        read(parts, lo + start, lo + end)
        for handle in store.transfer("write", state, start, end, staging):
            store.swap.wait(handle)
        weights.load_weights(group.index, parts[0], start, k == len(pieces) - 1)


def master_from_values(group, value_of: Callable[[object], torch.Tensor]) -> ReadState:
    """A ReadState that sets the master from in-memory parameter values (``value_of(slot)``, any dtype) and
    leaves the moments (zero in a new engine) alone."""
    def read(parts: tuple[torch.Tensor, ...], start: int, end: int) -> None:
        for slot, a, b in group.pieces(start, end):
            parts[0][a - start:b - start].copy_(value_of(slot).reshape(-1)[a - slot.offset:b - slot.offset])
    return read
