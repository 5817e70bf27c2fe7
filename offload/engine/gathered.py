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
``state_dict`` is.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from offload.engine.state_fill import fill_group, quiesce
from offload.optim.state_store import STATE_PARTS, StatePlacement
from offload.schedule.guarded_parameter import raw_data

if TYPE_CHECKING:
    from offload.engine.engine import Engine


def groups_of(engine: Engine, module: nn.Module | None) -> list[int]:
    """The groups holding a trainable parameter of ``module`` (all groups for None)."""
    if module is None:
        return list(range(len(engine.groups)))
    if not any(m is module for m in engine.model.modules()):
        raise ValueError("engine.gathered(module): the module is not part of the engine's model")
    owned = {id(p) for p in module.parameters()}
    return [g for g, group in enumerate(engine.groups) if any(id(slot.param) in owned for slot in group.slots)]


@contextlib.contextmanager
def gathered(engine: Engine, module: nn.Module | None, writable: bool) -> Iterator[None]:
    if writable and engine.ranks.many:
        raise NotImplementedError("engine.gathered(writable=True) with several ranks: edit the weights on one "
                                  "rank's model before building the engine, or load them with load_pretrained")
    engine._sync()  # the masters read below are those of the last step, complete
    chosen = groups_of(engine, module)
    masters = {g: engine._full_master(g) for g in chosen}  # fp32 CPU tensors of our own
    originals: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    engine._gathered += 1
    try:
        for g in chosen:
            group = engine.groups[g]
            for slot in group.slots:
                value = group.view(masters[g], slot).to(engine.device, copy=engine.device.type != "cpu")
                originals[id(slot.param)] = (slot.param, raw_data(slot.param))  # (a view of released storage)
                slot.param.data = value
        yield
        if writable:
            _write_back(engine, chosen, masters)
    finally:
        for param, data in originals.values():
            param.data = data
        engine._gathered -= 1


def _write_back(engine: Engine, chosen: list[int], masters: dict[int, torch.Tensor]) -> None:
    """The parameters' values at exit become the masters of their groups (moments kept)."""
    for g in chosen:
        group = engine.groups[g]
        for slot in group.slots:
            group.view(masters[g], slot).copy_(slot.param.data.detach().to("cpu", torch.float32))
    quiesce(engine)  # no group on the device while its home is rewritten
    store = engine.store
    for g in chosen:
        state, master = store.states[g], masters[g]

        def read(parts: tuple[torch.Tensor, ...], start: int, end: int, state=state, master=master) -> None:
            if state.placement is not StatePlacement.HOST:  # a staged NVMe chunk: its moments come from disk
                staging = store.staging[0].view(torch.float32)[:STATE_PARTS * (end - start)]
                for handle in store.transfer("read", state, start - state.group.lo, end - state.group.lo,
                                             staging, parts=(1, 2)):
                    store.swap.wait(handle)
            parts[0].copy_(master[start - state.group.lo:end - state.group.lo])

        fill_group(engine, state, read)
