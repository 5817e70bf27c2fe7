"""The frozen base: what checkpoints keep of the frozen floating-point parameters instead of their values.

Frozen parameters (``requires_grad=False``: the base of a LoRA model) never change in training, so a checkpoint
holds a fingerprint of them rather than a copy (a LoRA checkpoint is then the size of the adapters and their
state, not of the model): for each, its first ``state_dict`` key, shape, dtype and the CRC-32 of its values in
the compute dtype, as the engine holds them. Loading a checkpoint compares it with the engine's own and
refuses a different base before anything changes. The values are the same whatever the placement (device,
host RAM, NVMe), so a checkpoint loads onto any of them.

The fingerprint reads the whole base once (through the device, one frozen group at a time) the first time it
is needed, and is kept until the frozen values change (``offload.load_pretrained``).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from offload.checkpoint.tensor_file import DTYPE_NAMES
from offload.errors import CheckpointError

if TYPE_CHECKING:
    from offload.engine.training_state import TrainingState

FINGERPRINT_KEY = "frozen_fingerprint"  # in a checkpoint's meta.json


def is_frozen_weight(value: torch.Tensor) -> bool:
    """A frozen floating-point parameter: fingerprinted in checkpoints, not stored."""
    return isinstance(value, nn.Parameter) and not value.requires_grad and value.is_floating_point()


def frozen_fingerprint(state: TrainingState) -> dict[str, list[Any]]:
    """{first state_dict key: [shape, dtype name, CRC-32 of the values]} of every frozen floating-point
    parameter, in ``state_dict`` order. Computed once, then cached on ``state`` until the frozen values change.
    Collective with several ranks (offloaded frozen groups are gathered on every rank)."""
    if state.frozen_fingerprint is not None:
        return state.frozen_fingerprint
    frozen: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (first key, the parameter)
    for key, value in state.model.state_dict(keep_vars=True).items():
        if is_frozen_weight(value) and id(value) not in frozen:
            frozen[id(value)] = (key, value)
    crc: dict[int, int] = {}
    for group in state.frozen_groups:  # offloaded: one group's copy in memory at a time
        flat = state.weights.group_copy(group.index)
        for slot in group.slots:
            crc[id(slot.param)] = _crc32(group.view(flat, slot))
        del flat
    prints = {}
    for param_id, (key, value) in frozen.items():
        if param_id not in crc:  # a frozen parameter that stays on the device (in the compute dtype)
            crc[param_id] = _crc32(value.detach().to("cpu"))
        prints[key] = [list(value.shape), DTYPE_NAMES[value.dtype], crc[param_id]]
    state.frozen_fingerprint = prints
    return prints


def check_frozen_fingerprint(state: TrainingState, saved: Any, meta_path: Path) -> bool:
    """Raises CheckpointError unless ``saved`` (a checkpoint's fingerprint) is the engine's frozen base.
    ``saved`` None: a checkpoint of an older offload, which stored the frozen parameters in its model file;
    returns True when they can be loaded from there (none of them is offloaded), else raises."""
    if saved is None:
        if state.frozen_groups:
            raise CheckpointError(f"{meta_path}: no {FINGERPRINT_KEY}: saved by an older offload, which stored "
                                  "the frozen parameters; load it with params='device' and save it again")
        return True
    ours = frozen_fingerprint(state)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{meta_path}: {FINGERPRINT_KEY}: expected an object, got {type(saved).__name__}")
    missing, unexpected = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
    if missing or unexpected:
        what = f"the model's {missing[0]!r} is not in it" if missing else f"it has {unexpected[0]!r}, the model not"
        raise CheckpointError(f"{meta_path}: saved with a different frozen base ({len(saved)} frozen tensors, the "
                              f"model {len(ours)}; {what}); load it onto an engine built from the same base model")
    for key, (shape, dtype, crc) in ours.items():
        if list(saved[key]) != [shape, dtype, crc]:
            raise CheckpointError(f"{meta_path}: saved with a different frozen base: {key!r} differs (checkpoint "
                                  f"{_describe(saved[key])}, model {_describe([shape, dtype, crc])}); load it "
                                  "onto an engine built from the same base model")
    return False


def _describe(entry: Any) -> str:
    try:
        shape, dtype, crc = entry
        return f"{dtype} {list(shape)} crc32 {int(crc):08x}"
    except (TypeError, ValueError):
        return repr(entry)


def _crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy())
