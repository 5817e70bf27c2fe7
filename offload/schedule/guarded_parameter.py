"""OffloadedParameter: the class an offloaded trainable parameter has while an engine holds it, so that reading
its weights outside a use raises a Python error instead of faulting.

Note [guarded reads]: between uses an offloaded group's device buffer is given back (Note [fetch stream]): on
CUDA a storage of zero bytes, on the CPU device inaccessible pages, because torch has no CPU tensor state that
refuses reads (a zero-size storage is read as a null pointer in most CPU kernels). A read there would stop the
process with SIGSEGV. So while an engine holds a parameter, its class is this subclass of ``nn.Parameter``
(the way torch's own ``UninitializedParameter`` becomes a ``Parameter``), whose ``__torch_function__`` looks
at every operation the parameter takes part in: reading its metadata (shape, dtype, device, ``grad``, hooks,
``requires_grad_``...) always passes; an operation that reads its values passes when its storage is claimed
(inside a use) or when it is not the group's storage at all (inside ``engine.gathered()``, which points it at
an fp32 copy), and otherwise raises :class:`OffloadedWeightError`, naming the parameter and the way to read
it. The operations themselves run with subclass dispatch off, so their results are plain tensors and autograd
is unchanged (saved weights are unpacked in C++, past this check). The engine's own code reads ``.data``
with dispatch off too. When the engine closes, the parameters become plain ``nn.Parameter`` again.
"""

from __future__ import annotations

import torch
from torch import nn

from offload.errors import OffloadedWeightError
from offload.schedule.device_storage import GroupStorage


# Operations that read no values of the tensor (attribute reads and writes are ``__get__`` / ``__set__``;
# reading ``.data`` is not among them, since the tensor it returns is the storage itself).
_METADATA = frozenset({"__set__", "numel", "dim", "size", "stride", "is_contiguous", "element_size", "nelement",
                       "data_ptr", "storage_offset", "untyped_storage", "register_hook",
                       "register_post_accumulate_grad_hook", "requires_grad_", "__hash__", "is_floating_point",
                       "is_complex", "get_device", "type"})
_DATA_GET = torch.Tensor.data.__get__

# id(param) -> (its group's storage, its name), while an engine holds the parameter
_GUARDED: dict[int, tuple[GroupStorage, str]] = {}


class OffloadedParameter(nn.Parameter):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in _METADATA and (name != "__get__" or func == _DATA_GET):
            for value in _tensors(args, kwargs):
                guard = _GUARDED.get(id(value))
                if guard is not None:
                    _check(value, *guard)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _tensors(args: tuple, kwargs: dict):
    for value in (*args, *kwargs.values()):
        if isinstance(value, OffloadedParameter):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, OffloadedParameter))


def _check(param: torch.Tensor, storage: GroupStorage, name: str) -> None:
    if storage.claimed:  # inside a use (every operation of a forward): nothing more to look at
        return
    with torch._C.DisableTorchFunctionSubclass():
        own = param.untyped_storage()._cdata == storage.tensor.untyped_storage()._cdata
    if own:
        raise OffloadedWeightError(
            f"offload: parameter {name!r} is offloaded: its weights are on the device only while a forward uses "
            "them. Read it inside `with engine.gathered(module):` (fp32 master values; writable=True to edit "
            "them), or take engine.state_dict()")


def guard(param: nn.Parameter, storage: GroupStorage, name: str) -> None:
    """From now on ``param`` (whose data is a view of ``storage``) refuses reads while ``storage`` is given back."""
    _GUARDED[id(param)] = (storage, name)
    param.__class__ = OffloadedParameter


def unguard(param: nn.Parameter) -> None:
    """``param`` becomes a plain ``nn.Parameter`` again."""
    _GUARDED.pop(id(param), None)
    if type(param) is OffloadedParameter:
        param.__class__ = nn.Parameter


def raw_data(param: nn.Parameter) -> torch.Tensor:
    """``param.data`` without the check (the engine's own bookkeeping, e.g. to keep it for later)."""
    with torch._C.DisableTorchFunctionSubclass():
        return param.data
