"""fill_group: writes a group's fp32 master weights, chunk by chunk, into its state (host or NVMe) with zero
moments, and makes its compute-dtype weights from them wherever they live. Used to materialise a model built
on the meta device and to load pretrained weights: one chunk of master weights in memory at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from offload.optim.state_store import STATE_PARTS, GroupState, StatePlacement, chunks, split_state

if TYPE_CHECKING:
    from offload.engine.engine import Engine

# (master, start, end): fills ``master`` (fp32, end - start elements) with elements [start, end) of the group
ReadMaster = Callable[[torch.Tensor, int, int], None]


def fill_group(engine: Engine, state: GroupState, read: ReadMaster) -> None:
    group, store = state.group, engine.store
    if state.placement is StatePlacement.HOST:
        master, exp_avg, exp_avg_sq = split_state(state.state_host.view(torch.float32), group.numel)
        read(master, 0, group.numel)
        exp_avg.zero_()
        exp_avg_sq.zero_()
        engine.weights.load_weights(group.index, master, 0, True)
        return
    pieces = chunks(group.numel, store.chunk_elements)
    for k, (start, end) in enumerate(pieces):
        staging = store.staging[0].view(torch.float32)[:STATE_PARTS * (end - start)]
        staging.zero_()  # the moments start at zero; padding between parameters stays zero
        master = split_state(staging, end - start)[0]
        read(master, start, end)
        for handle in store.transfer("write", state, start, end, staging):
            store.swap.wait(handle)
        engine.weights.load_weights(group.index, master, start, k == len(pieces) - 1)


def slot_reader(group, value_of: Callable[[object], torch.Tensor]) -> ReadMaster:
    """A ReadMaster over in-memory parameter values (``value_of(slot)``: the slot's tensor, any dtype)."""
    def read(master: torch.Tensor, start: int, end: int) -> None:
        master.zero_()  # padding between parameters
        for slot in group.slots:
            a, b = max(slot.offset, start), min(slot.end, end)
            if a < b:
                master[a - start:b - start].copy_(value_of(slot).reshape(-1)[a - slot.offset:b - slot.offset])
    return read
