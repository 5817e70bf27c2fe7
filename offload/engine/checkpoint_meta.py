"""A checkpoint's ``meta.json``, parsed and checked in full before a load changes anything (Note [check, then
apply]).

Note [check, then apply]: ``Engine.load`` must never leave an engine half-replaced by a checkpoint it then
rejects. Everything a load will apply is therefore converted and validated here, into a ``LoadPlan`` of plain,
typed values: the step counts, the optimizer's hyper-parameters, the loss scaler's state, the RNG states
(decoded and tried on scratch generators of each kind, so a wrong size or version is found now), the caller's
``extra``. Any problem is a ``CheckpointError`` naming the file and the field. Only after the plan (and the
tensor files' names, shapes and dtypes) have passed does the load touch the engine, and what it then applies
can no longer fail on a value: only the I/O of reading the state back can, which fails the engine explicitly.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from offload.errors import CheckpointError


@dataclass(frozen=True)
class HyperParams:
    names: tuple[str, ...]
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    # the other numbers kept in the group (an lr scheduler's: initial_lr, max_lr, ...), restored as they are
    scheduler_keys: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadPlan:
    step: int
    param_steps: dict[str, int]
    world_size: int
    scaler: dict[str, float | int]
    hyper: list[HyperParams]
    rng_torch: torch.Tensor | None
    rng_cuda: list[torch.Tensor] | None
    rng_python: tuple | None
    rng_numpy: tuple | None
    extra: dict[str, Any]
    frozen_fingerprint: Any = None  # the frozen base's (frozen_base.py), checked there; None: an older checkpoint


class _Fields:
    """Typed access to one JSON object; every failure names the file and the field's path."""

    def __init__(self, path: Path, data: Any, where: str = "") -> None:
        self.path, self.where = path, where
        if not isinstance(data, dict):
            self.fail(f"expected an object, got {type(data).__name__}")
        self.data = data

    def fail(self, why: str) -> None:
        raise CheckpointError(f"{self.path}: {self.where or 'top level'}: {why}")

    def child(self, key: str) -> Any:
        if key not in self.data:
            raise CheckpointError(f"{self.path}: {self._at(key)}: missing")
        return self.data[key]

    def _at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def obj(self, key: str) -> _Fields:
        return _Fields(self.path, self.child(key), self._at(key))

    def integer(self, key: str, minimum: int = 0) -> int:
        return _integer(self.path, self._at(key), self.child(key), minimum)

    def number(self, key: str, minimum: float = 0.0) -> float:
        return _number(self.path, self._at(key), self.child(key), minimum)


def _integer(path: Path, at: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"{path}: {at}: expected an integer >= {minimum}, got {value!r}")
    return value


def _number(path: Path, at: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise CheckpointError(f"{path}: {at}: expected a finite number >= {minimum}, got {value!r}")
    return float(value)


def parse(meta_path: Path, trainable: list[str], group_names: list[list[str]]) -> LoadPlan:
    """The plan of a load from ``meta_path`` onto an engine whose trainable parameters are ``trainable`` and
    whose parameter groups hold ``group_names``; raises CheckpointError before anything is applied."""
    try:
        raw = json.loads(meta_path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{meta_path}: cannot read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    meta = _Fields(meta_path, raw)
    steps = meta.obj("param_steps")
    if set(steps.data) != set(trainable):
        missing, unexpected = sorted(set(trainable) - set(steps.data)), sorted(set(steps.data) - set(trainable))
        steps.fail("does not match the model's trainable parameters: "
                   + "; ".join(f"{what} {short_list(names)}" for what, names in (("missing", missing),
                                                                          ("unexpected", unexpected)) if names))
    param_steps = {name: steps.integer(name) for name in trainable}
    scaler = meta.obj("loss_scaler")
    scaler_state = {"scale": scaler.number("scale", minimum=0.0), "good_steps": scaler.integer("good_steps")}
    if scaler_state["scale"] <= 0:
        scaler.fail(f"scale: expected a positive number, got {scaler_state['scale']!r}")
    extra = meta.child("extra")
    if not isinstance(extra, dict):
        meta.fail(f"extra: expected an object, got {type(extra).__name__}")
    return LoadPlan(step=meta.integer("step"), param_steps=param_steps,
                    world_size=_integer(meta_path, "world_size", raw.get("world_size", 1), minimum=1),
                    scaler=scaler_state, hyper=_hyper(meta_path, meta.child("param_groups"), group_names),
                    extra=extra, frozen_fingerprint=raw.get("frozen_fingerprint"), **_rng(meta_path, raw.get("rng", {})))


def short_list(names: list[str]) -> str:
    """The first three names, and how many more (for error messages)."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _hyper(path: Path, groups: Any, group_names: list[list[str]]) -> list[HyperParams]:
    if not isinstance(groups, list):
        raise CheckpointError(f"{path}: param_groups: expected a list, got {type(groups).__name__}")
    out = []
    for i, group in enumerate(groups):
        fields = _Fields(path, group, f"param_groups[{i}]")
        names = fields.child("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            fields.fail("names: expected a list of parameter names")
        betas = fields.child("betas")
        if not isinstance(betas, list) or len(betas) != 2:
            fields.fail(f"betas: expected two numbers, got {betas!r}")
        others = {key: _number(path, f"param_groups[{i}].{key}", value, -math.inf) for key, value in group.items()
                  if key not in ("names", "lr", "betas", "eps", "weight_decay")}
        out.append(HyperParams(tuple(names), fields.number("lr"),
                               tuple(_number(path, f"param_groups[{i}].betas", b) for b in betas),
                               fields.number("eps"), fields.number("weight_decay"), others))
    if [sorted(h.names) for h in out] != [sorted(names) for names in group_names]:
        raise CheckpointError(f"{path}: param_groups: the parameter groups differ from the engine's "
                              f"({len(out)} saved, {len(group_names)} now, or other members)")
    return out


def _rng(path: Path, states: Any) -> dict[str, Any]:
    """The RNG states, decoded and each tried on a scratch generator of its kind."""
    if not isinstance(states, dict):
        raise CheckpointError(f"{path}: rng: expected an object, got {type(states).__name__}")
    out: dict[str, Any] = {"rng_torch": None, "rng_cuda": None, "rng_python": None, "rng_numpy": None}
    if "torch" in states:
        out["rng_torch"] = _decode(path, "rng.torch", states["torch"])
        _try(path, "rng.torch", lambda: torch.Generator().set_state(out["rng_torch"]))
    if "cuda" in states:
        cuda = states["cuda"]
        if not isinstance(cuda, list):
            raise CheckpointError(f"{path}: rng.cuda: expected a list, got {type(cuda).__name__}")
        out["rng_cuda"] = [_decode(path, f"rng.cuda[{i}]", s) for i, s in enumerate(cuda)]
    if "python" in states:
        try:
            version, internal, gauss = states["python"]
            value = (version, tuple(internal), gauss)
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: rng.python: expected [version, state, gauss]") from None
        _try(path, "rng.python", lambda: random.Random().setstate(value))
        out["rng_python"] = value
    numpy = sys.modules.get("numpy")
    if "numpy" in states and numpy is not None:
        try:
            kind, keys, pos, has_gauss, cached = states["numpy"]
            value = (kind, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, cached)
        except (TypeError, ValueError, OverflowError):
            raise CheckpointError(f"{path}: rng.numpy: expected [kind, keys, pos, has_gauss, cached]") from None
        _try(path, "rng.numpy", lambda: numpy.random.RandomState().set_state(value))
        out["rng_numpy"] = value
    return out


def _decode(path: Path, at: str, text: Any) -> torch.Tensor:
    if not isinstance(text, str):
        raise CheckpointError(f"{path}: {at}: expected base64 text, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError(f"{path}: {at}: not valid base64") from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _try(path: Path, at: str, apply: Any) -> None:
    try:
        apply()
    except Exception as e:  # whatever the generator says of a state it cannot take
        raise CheckpointError(f"{path}: {at}: not a valid state ({type(e).__name__}: {e})") from None
