"""``engine.gathered(module=None, writable=False)``: the offloaded weights of a module (or of the whole model),
readable (and with ``writable``, editable) outside forward, in the spirit of FSDP's ``summon_full_params``.

Note [gathered weights]: inside the context every trainable parameter of the chosen groups holds its fp32
master value (the same values ``engine.state_dict()`` returns) in a tensor of its own on the engine's device:
``param.data`` is pointed at that tensor on entry and back at the parameter's view of its group's device
buffer on exit. Nothing of the offloaded machinery changes meanwhile: the groups stay where they were, so no
device budget is touched except by the fp32 copies themselves (restrict ``module`` to bound them). With
``writable`` the values at exit become the new masters: each group's state is rewritten through ``fill_group``
(Adam's moments kept: read back first where they live on NVMe), which also makes the compute-dtype weights
from the new master wherever they live; unchanged values come back bit for bit. A forward inside the context is
refused (the parameters are fp32 copies, not the engine's weights), and so is a step (``engine.step`` waits for
nothing the context holds). Single rank for ``writable``; reading is collective with several ranks, as
``state_dict`` is. Offloaded frozen parameters (Note [frozen groups]) hold their values in the compute dtype
(what the engine keeps of them) in tensors of their own the same way; with ``writable`` their values at exit
become their weights.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from offload.engine.state_fill import fill_group
from offload.optim.state_store import STATE_PARTS, StatePlacement
from offload.schedule.guarded_parameter import raw_data

if TYPE_CHECKING:
    from offload.engine.training_state import TrainingState


def groups_of(state: TrainingState, module: nn.Module | None, frozen: bool = False) -> list[int]:
    """The groups holding a trainable parameter of ``module`` (all groups for None); with ``frozen``, the
    offloaded frozen groups holding one of its frozen parameters (their indices, after the trainable ones)."""
    groups = state.frozen_groups if frozen else state.groups
    if module is None:
        return [group.index for group in groups]
    if not any(m is module for m in state.model.modules()):
        raise ValueError("engine.gathered(module): the module is not part of the engine's model")
    owned = {id(p) for p in module.parameters()}
    return [group.index for group in groups if any(id(slot.param) in owned for slot in group.slots)]


@contextlib.contextmanager
def gathered(state: TrainingState, module: nn.Module | None, writable: bool) -> Iterator[None]:
    if writable and state.ranks.many:
        raise NotImplementedError("engine.gathered(writable=True) with several ranks: edit the weights on one "
                                  "rank's model before building the engine, or load them with load_pretrained")
    # (``state`` is quiescent: the masters read below are those of the last step, complete)
    chosen = groups_of(state, module)
    masters = {g: state.full_master(g) for g in chosen}  # fp32 CPU tensors of our own
    frozen = {g: state.weights.group_copy(g) for g in groups_of(state, module, frozen=True)}  # compute dtype
    every = [(state.groups[g], masters[g]) for g in chosen] + \
        [(state.frozen_groups[g - len(state.groups)], flat) for g, flat in frozen.items()]
    originals: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    state.gathered_contexts += 1
    try:
        for group, flat in every:
            for slot in group.slots:
                value = group.view(flat, slot).to(state.device, copy=state.device.type != "cpu")
                originals[id(slot.param)] = (slot.param, raw_data(slot.param))  # (a view of released storage)
                slot.param.data = value
        yield
        if writable:
            _write_back(state, chosen, masters, frozen)
    finally:
        for param, data in originals.values():
            param.data = data
        state.gathered_contexts -= 1


def _write_back(state: TrainingState, chosen: list[int], masters: dict[int, torch.Tensor],
                frozen: dict[int, torch.Tensor]) -> None:
    """The parameters' values at exit become the masters of their groups (moments kept), and the weights of
    the frozen groups."""
    for g in chosen:
        group = state.groups[g]
        for slot in group.slots:
            group.view(masters[g], slot).copy_(slot.param.data.detach().to("cpu", torch.float32))
    for g, flat in frozen.items():
        group = state.frozen_groups[g - len(state.groups)]
        for slot in group.slots:
            group.view(flat, slot).copy_(slot.param.data.detach().to("cpu"))
    state.quiesce()  # no group on the device while its home is rewritten
    for g, flat in frozen.items():
        state.weights.load_weights(g, flat, 0, True)  # (one rank: the shard is the whole group)
    if frozen:
        state.frozen_fingerprint = None
    store = state.store
    for g in chosen:
        group_state, master = store.states[g], masters[g]

        def read(parts: tuple[torch.Tensor, ...], start: int, end: int, group_state=group_state,
                 master=master) -> None:
            lo = group_state.group.lo
            if group_state.placement is not StatePlacement.HOST:  # a staged NVMe chunk: moments come from disk
                staging = store.staging[0].view(torch.float32)[:STATE_PARTS * (end - start)]
                for handle in store.transfer("read", group_state, start - lo, end - lo, staging, parts=(1, 2)):
                    store.swap.wait(handle)
            parts[0].copy_(master[start - lo:end - lo])

        fill_group(store, state.weights, group_state, read)
