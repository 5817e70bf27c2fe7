"""The engine's Adam state in ``torch.optim.AdamW``'s ``state_dict`` format, out and back in.

``engine.optimizer.state_dict()`` and ``load_state_dict`` use these. The format is torch's: ``{"state": {i:
{"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [{..hyper-parameters.., "params": [i, ...]}]}`` with ``i``
counting the parameters through the groups in order, so a state dict moves between an engine and a plain
``torch.optim.AdamW`` over the same parameters (in the same groups) both ways. The fp32 master weights are not
in it (torch keeps them in the parameters): ``engine.save`` is the checkpoint, and the one that streams; these
build every moment in RAM (8 bytes per trainable parameter), one group's state read at a time.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from offload.engine.state_fill import fill_group
from offload.engine.training_state import TrainingState
from offload.optim.hyper import HYPER_KEYS, validated_hyper

_MOMENTS = ("exp_avg", "exp_avg_sq")
# group keys a state dict may carry that this engine cannot honour (torch.optim.AdamW's flags), with the value
# it can
_FIXED_FLAGS = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}
# how torch.optim.AdamW runs (not what it computes): accepted and not kept
_IMPLEMENTATION_FLAGS = ("foreach", "fused", "decoupled_weight_decay")


def _single_rank(state: TrainingState, what: str) -> None:
    if state.ranks.many:
        raise RuntimeError(f"engine.optimizer.{what}: with several ranks each holds a shard of the state; use "
                           "engine.save(path) / engine.load(path), which write and read the shards in parallel")


def _slots(state: TrainingState) -> list[tuple[int, int]]:
    """(group, slot) of every trainable parameter, in the order of ``param_groups``' ``params``."""
    where = {slot.name: (g, i) for g, group in enumerate(state.groups) for i, slot in enumerate(group.slots)}
    return [where[name] for hyper in state.param_groups for name in hyper["names"]]


def state_dict(state: TrainingState) -> dict[str, Any]:
    """See the module docstring. ``state`` is quiescent."""
    _single_rank(state, "state_dict()")
    slots = _slots(state)
    out_state: dict[int, dict[str, torch.Tensor]] = {}
    by_group: dict[int, list[tuple[int, int]]] = {}
    for index, (g, i) in enumerate(slots):
        by_group.setdefault(g, []).append((index, i))
    for g in sorted(by_group):  # (the slices below are copies)
        group = state.groups[g]
        steps = state.param_steps[g]
        if not any(steps[i] for _, i in by_group[g]):
            continue  # as torch: a parameter that was never updated has no state
        m, v = state.store.read_parts(state.store.states[g], (1, 2))  # (one group's moments at a time)
        for index, i in by_group[g]:
            if steps[i]:
                slot = group.slots[i]
                out_state[index] = {"step": torch.tensor(float(steps[i])),
                                    "exp_avg": group.view(m, slot).clone(),
                                    "exp_avg_sq": group.view(v, slot).clone()}
    groups_out, first = [], 0
    for hyper in state.param_groups:
        packed = {k: (tuple(v) if k == "betas" else v) for k, v in hyper.items() if k not in ("params", "names")}
        packed.update(_FIXED_FLAGS)
        packed["params"] = list(range(first, first + len(hyper["names"])))
        first += len(hyper["names"])
        groups_out.append(packed)
    return {"state": out_state, "param_groups": groups_out}


def _checked(state: TrainingState, state_dict: Any
             ) -> tuple[list[dict[str, Any]], dict[tuple[int, int], dict[str, Any]]]:
    """The state dict's groups, and its state by (group, slot) of the engine; checked against the engine,
    raising ValueError naming the entry."""
    where = "engine.optimizer.load_state_dict"
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups' (an optimizer's state_dict())")
    groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(groups, list) or len(groups) != len(state.param_groups):
        raise ValueError(f"{where}: the state dict has {len(groups) if isinstance(groups, list) else '?'} "
                         f"param_groups; the engine has {len(state.param_groups)}")
    slots = _slots(state)
    index_of: dict[Any, int] = {}
    for k, (saved, hyper) in enumerate(zip(groups, state.param_groups)):
        params = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(params, list) or len(params) != len(hyper["names"]):
            raise ValueError(f"{where}: param_groups[{k}] holds {len(params) if isinstance(params, list) else '?'} "
                             f"parameters; the engine's holds {len(hyper['names'])}")
        for key, value in _FIXED_FLAGS.items():
            if saved.get(key, value) != value:
                raise ValueError(f"{where}: param_groups[{k}].{key}={saved[key]!r} is not supported (only {value})")
        if saved.get("decoupled_weight_decay", True) is False and saved.get("weight_decay", 0) != 0:
            raise ValueError(f"{where}: param_groups[{k}] is torch.optim.Adam's L2 weight decay "
                             "(decoupled_weight_decay=False); the engine's is AdamW's")
        for key in HYPER_KEYS:
            if key not in saved:
                raise ValueError(f"{where}: param_groups[{k}] has no {key!r}")
        for saved_id in params:
            if saved_id in index_of:
                raise ValueError(f"{where}: param_groups[{k}] lists parameter {saved_id!r} a second time")
            index_of[saved_id] = len(index_of)
    if not isinstance(saved_state, dict):
        raise ValueError(f"{where}: 'state' must be a dict, got {type(saved_state).__name__}")
    entries: dict[tuple[int, int], dict[str, Any]] = {}
    for saved_id, entry in saved_state.items():
        if saved_id not in index_of:
            raise ValueError(f"{where}: state[{saved_id!r}] belongs to no parameter of param_groups")
        index = index_of[saved_id]
        g, i = slots[index]
        slot = state.groups[g].slots[i]
        name = f"state[{saved_id!r}] ({slot.name})"
        if not isinstance(entry, dict) or not {"step", *_MOMENTS} <= entry.keys():
            raise ValueError(f"{where}: {name}: expected 'step', 'exp_avg' and 'exp_avg_sq'")
        step = float(entry["step"].item() if isinstance(entry["step"], torch.Tensor) else entry["step"])
        if not (math.isfinite(step) and step >= 1 and step == int(step)):
            raise ValueError(f"{where}: {name}: step must be a whole number >= 1, got {step}")
        for key in _MOMENTS:
            value = entry[key]
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() != slot.numel:
                raise ValueError(f"{where}: {name}.{key}: expected a floating-point tensor of {slot.numel} "
                                 f"elements (shape {tuple(slot.shape)}), got "
                                 f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        entries[(g, i)] = {"step": int(step), **{key: entry[key] for key in _MOMENTS}}
    return groups, entries


def load_state_dict(state: TrainingState, state_dict: dict[str, Any]) -> None:
    """Sets the engine's moments, step counts and hyper-parameters from ``state_dict``; parameters it holds no
    state for start afresh (zero moments, step 0), as in torch. Everything is checked before anything changes;
    a failure while writing (an I/O error) leaves the engine failed. ``state`` is quiescent."""
    _single_rank(state, "load_state_dict()")
    groups, entries = _checked(state, state_dict)
    dropped = {"params", "names", *_FIXED_FLAGS, *_IMPLEMENTATION_FLAGS}
    hyper = [{k: v for k, v in saved.items() if k not in dropped} for saved in groups]
    for k, values in enumerate(hyper):
        values.update(validated_hyper(f"engine.optimizer.load_state_dict: param_groups[{k}].", values))
    state.grads.finish()  # (gradients accumulated before the load belong to the state it replaces: copies in
    state.grads.reset()   # flight land first, then are forgotten)
    try:
        state.quiesce()
        for gstate in state.store.states:
            group = gstate.group
            g = group.index
            master = state.store.read_master(gstate)  # kept as it is: torch's state dict has no weights
            slot_index = {id(slot): i for i, slot in enumerate(group.slots)}

            def read(parts: tuple[torch.Tensor, ...], start: int, end: int, group=group, g=g, master=master,
                     slot_index=slot_index) -> None:
                parts[0].copy_(master[start - group.lo:end - group.lo])
                parts[1].zero_()
                parts[2].zero_()
                for slot, a, b in group.pieces(start, end):
                    entry = entries.get((g, slot_index[id(slot)]))
                    if entry is not None:
                        for part, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
                            flat = entry[key].detach().reshape(-1)
                            parts[part][a - start:b - start].copy_(flat[a - slot.offset:b - slot.offset])

            fill_group(state.store, state.weights, gstate, read)
            state.param_steps[g] = [entries[(g, i)]["step"] if (g, i) in entries else 0
                                    for i in range(len(group.slots))]
    except BaseException as e:
        state.failed = f"engine.optimizer.load_state_dict failed part-way ({type(e).__name__}: {e})"
        raise
    for group, values in zip(state.param_groups, hyper):
        group.update(values)
    state.step = max((max(steps, default=0) for steps in state.param_steps), default=0)

