"""Hyper-parameter groups for the engine: torch-style ``param_groups`` resolved against the model."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from offload.errors import ConfigError
from offload.optim.cpu_adam import _check_hyper

HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")


def validated_hyper(where: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values``' lr, betas, eps and weight_decay as floats (betas a tuple); raises ConfigError naming
    ``where`` + the field for a value torch would reject."""
    betas = values["betas"]
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}betas: expected two numbers like (0.9, 0.999); got {betas!r}") from None
    hyper = {"lr": float(values["lr"]), "betas": (beta1, beta2), "eps": float(values["eps"]),
             "weight_decay": float(values["weight_decay"])}
    try:
        _check_hyper(hyper["lr"], hyper["betas"], hyper["eps"], hyper["weight_decay"])
    except ValueError as e:
        raise ConfigError(f"{where.rstrip('.') or 'Engine'}: {e}") from None
    return hyper


def resolve_param_groups(model: nn.Module, trainable: list[tuple[str, nn.Parameter]],
                         param_groups: list[dict[str, Any]] | None,
                         defaults: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """The hyper-parameter groups (dicts with ``lr``, ``betas``, ``eps``, ``weight_decay``, ``names`` and
    ``params``, the parameters under those names: torch's ``param_groups`` layout, see optimizer_view.py) and
    for every trainable parameter (by ``id``) the index of its group.

    Entries of ``param_groups`` name their parameters as tensors of ``model`` or by qualified name; keys they
    leave out take the Engine's arguments. Trainable parameters no entry lists form a last group with the
    Engine's arguments. A parameter listed twice, a tensor that is not a trainable parameter of the model, or an
    unknown key raise :class:`ConfigError`.
    """
    base = validated_hyper("", defaults)
    by_name = dict(trainable)
    by_id = {id(p): name for name, p in trainable}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    frozen_names = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in frozen}
    aliases = {name: by_id[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if id(p) in by_id}
    groups: list[dict[str, Any]] = []
    index_of: dict[int, int] = {}
    for g, entry in enumerate(param_groups or []):
        where = f"param_groups[{g}]."
        if not isinstance(entry, dict) or "params" not in entry:
            raise ConfigError(f"param_groups[{g}]: expected a dict with a 'params' list; got {entry!r:.80}")
        for key in entry:
            if key != "params" and key not in HYPER_KEYS:
                close = difflib.get_close_matches(key, HYPER_KEYS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}{key}: unknown key; accepted: params, {', '.join(HYPER_KEYS)}{hint}")
        hyper = validated_hyper(where, {**base, **{k: v for k, v in entry.items() if k != "params"}})
        names = []
        for item in entry["params"]:
            if (item in frozen_names) if isinstance(item, str) else (id(item) in frozen):
                continue  # as torch: a frozen parameter may be listed; it gets no gradient, so no update
            name = aliases.get(item) if isinstance(item, str) else by_id.get(id(item))
            if name is None:
                raise ConfigError(f"{where}params: {item if isinstance(item, str) else type(item).__name__!r} is "
                                  "not a trainable parameter of the model")
            if id(by_name[name]) in index_of:
                raise ConfigError(f"{where}params: parameter {name!r} appears in more than one group")
            index_of[id(by_name[name])] = len(groups)
            names.append(name)
        groups.append({**hyper, "names": names, "params": [by_name[n] for n in names]})
    rest = [name for name, p in trainable if id(p) not in index_of]
    if rest or not groups:
        for name in rest:
            index_of[id(by_name[name])] = len(groups)
        groups.append({**base, "names": rest, "params": [by_name[n] for n in rest]})
    return groups, index_of


def step_hyper(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each group's hyper-parameters as a step uses them (floats), read once per step: whatever set them (a
    scheduler, ``engine.lr``, a callback) is checked here, before any update, with the group named."""
    return [validated_hyper(f"engine.optimizer.param_groups[{k}].", group) for k, group in enumerate(param_groups)]
