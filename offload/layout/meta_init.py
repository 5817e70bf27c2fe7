"""Models built on the meta device, and their initial weights produced group by group.

``init_empty(build)`` runs ``build()`` on the meta device under a recorder that logs, in order, every operation
that creates a tensor out of nothing (``torch.empty``, ``ones``, ``randn``, ...) or changes one in place
(``uniform_``, ``normal_``, ``fill_``, ``copy_``, ...): that is how modules initialise their parameters. No
memory is used. Later ``Materializer`` replays the log on the CPU with a generator that starts from the state
torch's generator had when ``build()`` started, so the random numbers come out exactly as in a normal build
with the same seed, and it hands out each parameter's final value as soon as the last operation that touches it
has run (Note [replay]). Hugging Face models skip their ``post_init`` weight initialisation on the meta
device; while recording it is made to run (on meta tensors, so it only logs), which keeps the log complete.

A model built on the meta device without ``init_empty`` has no log: each group is then initialised on its own
with its modules' ``reset_parameters()`` (or a Hugging Face model's ``_init_weights``), which gives weights of
the right distributions but not those of a normal build (``ModuleInit``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from offload.errors import ConfigError

LOG_ATTRIBUTE = "_offload_init_log"
# In-place operations that draw from the generator, and factories that do.
_RANDOM_INPLACE = {"uniform_", "normal_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_",
                   "bernoulli_"}
_RANDOM_FACTORIES = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal",
                     "bernoulli", "multinomial"}
# In-place operations whose result does not depend on the tensor's previous contents.
_OVERWRITES = _RANDOM_INPLACE | {"fill_", "zero_"}


@dataclasses.dataclass(frozen=True)
class _Geometry:
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> _Geometry:
        return _Geometry(t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


@dataclasses.dataclass(frozen=True)
class _TensorArg:
    storage: int
    geometry: _Geometry


@dataclasses.dataclass(frozen=True)
class _Entry:
    func: Any                     # the aten overload
    factory: bool                 # creates ``storage`` (else changes it in place)
    storage: int                  # the target's storage key
    geometry: _Geometry           # of the target (the created tensor, or the view changed in place)
    args: tuple                   # the other arguments, tensors as _TensorArg
    kwargs: dict
    storage_bytes: int
    reseed: torch.Tensor | None = None  # torch's generator was reseeded before this random operation: its state

    @property
    def name(self) -> str:
        return self.func.overloadpacket.__name__


@dataclasses.dataclass
class InitLog:
    entries: list[_Entry]
    rng_state: torch.Tensor       # torch's CPU generator state when the build started


def storage_key(t: torch.Tensor) -> int:
    """What identifies ``t``'s storage in an init log (tied parameters share one)."""
    return t.untyped_storage()._cdata


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.entries: list[_Entry] = []
        self._alive: list[torch.Tensor] = []  # keeps every logged storage alive, so no key is reused
        # On meta tensors random operations draw nothing, so torch's generator changes during the build only
        # when build() reseeds it (torch.manual_seed); each change is logged with the next random operation.
        self._rng_state = torch.get_rng_state()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        in_place = func._schema.is_mutable and args and isinstance(args[0], torch.Tensor)
        factory = not in_place and isinstance(out, torch.Tensor) and not any(
            isinstance(a, torch.Tensor) for a in args)
        if in_place or factory:
            target = args[0] if in_place else out
            rest = tuple(_TensorArg(storage_key(a), _Geometry.of(a)) if isinstance(a, torch.Tensor) else a
                         for a in (args[1:] if in_place else args))
            reseed = None
            if func.overloadpacket.__name__ in _RANDOM_INPLACE | _RANDOM_FACTORIES:
                if kwargs.get("generator") is not None:
                    raise ConfigError("init_empty: build() draws from its own torch.Generator; only torch's "
                                      "default generator can be replayed")
                state = torch.get_rng_state()
                if not torch.equal(state, self._rng_state):
                    reseed = self._rng_state = state
            self.entries.append(_Entry(func, factory, storage_key(target), _Geometry.of(target), rest,
                                       {k: v for k, v in kwargs.items() if k not in ("device", "generator")},
                                       target.untyped_storage().nbytes(), reseed))
            self._alive.append(target)
        return out


@contextlib.contextmanager
def _hf_init_runs_on_meta() -> Iterator[None]:
    """Hugging Face models skip their weight initialisation on the meta device; make it run (and be logged)."""
    try:
        from transformers import modeling_utils
    except ImportError:
        yield
        return
    cls = modeling_utils.PreTrainedModel
    original = cls.init_weights

    def init_weights(self) -> None:
        if hasattr(self, "initialize_weights"):
            self.initialize_weights()
        original(self)  # (on meta it only ties the weights)

    cls.init_weights = init_weights
    try:
        yield
    finally:
        cls.init_weights = original


def init_empty(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device, with the log an ``offload.Engine`` uses to give each parameter exactly the
    value a normal ``build()`` would, with torch's generator as it is now. The model takes no memory until the
    engine materialises it, group by group, into its home (host RAM or NVMe). torch's generator is left as it
    was (a normal build would advance it)."""
    state = torch.get_rng_state()
    recorder = _Recorder()
    with _hf_init_runs_on_meta(), torch.device("meta"), recorder:
        model = build()
    if not isinstance(model, nn.Module):
        raise TypeError(f"init_empty: build() returned {type(model).__name__}, not an nn.Module")
    setattr(model, LOG_ATTRIBUTE, InitLog(recorder.entries, state))
    return model


# Note [replay]: for each storage that ends up in a parameter or buffer, the replay needs only the operations
# from its last full overwrite (its creation, or an in-place random fill, fill_ or zero_ of all of it) on;
# earlier ones are dead, except that a dead random operation must still draw its numbers, or every later value
# would shift. So the entries run in their recorded order: a dead random one on a scratch tensor of the same
# geometry (the number of draws depends on size and layout), which is freed at once; a live one on the
# storage's real CPU tensor, created by the overwrite. After the storage's last operation its value is final
# and handed out; its real tensor lives only between those two points. Operations on tensors that belong to no
# parameter or buffer matter only if they draw numbers. A live operation that reads a tensor the replay does
# not have (e.g. copy_ from a computed temporary) makes that storage unreplayable: ``value`` then says so.
#
# Note [values provided elsewhere]: next to a pretrained checkpoint, the replay follows ``from_pretrained``,
# which initialises none of the weights it loads: it runs only the operations on the storages it produces
# itself. Those of the checkpoint's tensors, and dead temporaries (a weight replaced by a tied one), neither run
# nor draw numbers. The values the replay still makes are then those the same code makes after a
# ``from_pretrained`` that loaded everything else: a PEFT model's adapters come out as those of
# ``torch.manual_seed(s); get_peft_model(AutoModel.from_pretrained(dir), config)`` (tests/test_meta_init.py),
# not as in a normal build of the whole model, which draws the base's random init first.
class Materializer:
    def __init__(self, model: nn.Module, log: InitLog, provided: frozenset[int] | None = None) -> None:
        """``provided``: the storage keys (``storage_key``) of the tensors a pretrained checkpoint gives values
        to (Note [values provided elsewhere]); None: the replay is that of a normal build."""
        self._entries = log.entries
        self._generator = torch.Generator()
        self._generator.set_state(log.rng_state)
        self._from_checkpoint = provided is not None
        provided = provided or frozenset()
        wanted: dict[int, int] = {}  # storage key -> nbytes, for every parameter and buffer storage
        for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
            if t.is_meta and storage_key(t) not in provided:
                wanted[storage_key(t)] = t.untyped_storage().nbytes()
        self._first_live: dict[int, int] = {}
        self._last: dict[int, int] = {}
        for i, e in enumerate(self._entries):
            if e.storage not in wanted:
                continue
            self._last[e.storage] = i
            if e.factory or (e.name in _OVERWRITES and _covers(e.geometry, e.storage_bytes)):
                self._first_live[e.storage] = i
        self._real: dict[int, torch.Tensor] = {}
        self._final: dict[int, torch.Tensor] = {}
        self._broken: dict[int, str] = {}
        self._next = 0

    def value(self, t: torch.Tensor) -> torch.Tensor | None:
        """Meta tensor ``t``'s value (a CPU tensor), replaying as far as needed; None if the log cannot produce
        it (no operation created it, or a live operation reads what the replay lacks). The value is handed
        out once: the materializer drops it."""
        key = storage_key(t)
        while key not in self._final and key not in self._broken and self._next < len(self._entries) and \
                self._next <= self._last.get(key, -1):
            self._run(self._next)
            self._next += 1
        real = self._final.pop(key, None)
        if real is None:
            return None
        return real.as_strided(t.shape, t.stride(), t.storage_offset())

    def why_not(self, t: torch.Tensor) -> str:
        return self._broken.get(storage_key(t), "no recorded operation creates it")

    def ready_at(self, t: torch.Tensor) -> float | None:
        """Where in the log ``t``'s value is final; None if the log does not produce it."""
        return self._last.get(storage_key(t))

    def _run(self, i: int) -> None:
        e = self._entries[i]
        random = e.name in _RANDOM_INPLACE or e.name in _RANDOM_FACTORIES
        if random and e.reseed is not None:  # (also before an operation left out: the reseed still happened)
            self._generator.set_state(e.reseed)
        if self._from_checkpoint and e.storage not in self._last:
            return  # (Note [values provided elsewhere])
        live = e.storage in self._first_live and i >= self._first_live[e.storage] and e.storage not in self._broken
        kwargs = dict(e.kwargs)
        if random:
            kwargs["generator"] = self._generator
        if not live:
            if e.name in _RANDOM_FACTORIES or (e.name in _RANDOM_INPLACE and not e.factory):
                self._draw(e, kwargs)  # dead, but its numbers must still be drawn
            return
        if e.factory:
            self._real[e.storage] = _as_storage(e.func(*e.args, **kwargs, device="cpu"), e)
        else:
            args = []
            for a in e.args:
                if isinstance(a, _TensorArg):
                    source = self._real.get(a.storage, self._final.get(a.storage))
                    if source is None:
                        self._broken[e.storage] = f"{e.name} reads a tensor the replay does not have"
                        self._real.pop(e.storage, None)
                        return
                    a = _view(source, a.geometry)
                args.append(a)
            if e.storage not in self._real:  # the live part starts with an in-place overwrite
                self._real[e.storage] = torch.empty(e.storage_bytes // _itemsize(e.geometry.dtype),
                                                    dtype=e.geometry.dtype)
            e.func(_view(self._real[e.storage], e.geometry), *args, **kwargs)
        if i == self._last[e.storage]:
            self._final[e.storage] = self._real.pop(e.storage)

    def _draw(self, e: _Entry, kwargs: dict) -> None:
        if e.factory:
            e.func(*e.args, **kwargs, device="cpu")
        else:
            scratch = torch.empty(e.storage_bytes // _itemsize(e.geometry.dtype), dtype=e.geometry.dtype)
            e.func(_view(scratch, e.geometry), *[a for a in e.args if not isinstance(a, _TensorArg)], **kwargs)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _covers(g: _Geometry, storage_bytes: int) -> bool:
    numel = 1
    for s in g.size:
        numel *= s
    contiguous = all(st == expected for st, expected in zip(g.stride, _contiguous_strides(g.size)))
    return g.offset == 0 and contiguous and numel * _itemsize(g.dtype) == storage_bytes


def _contiguous_strides(size: tuple[int, ...]) -> list[int]:
    strides, running = [], 1
    for s in reversed(size):
        strides.append(running)
        running *= max(s, 1)
    return list(reversed(strides))


def _as_storage(t: torch.Tensor, e: _Entry) -> torch.Tensor:
    """The real storage of a created tensor, as a flat tensor of its dtype."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (e.storage_bytes // t.element_size(),))


def _view(storage: torch.Tensor, g: _Geometry) -> torch.Tensor:
    return storage.as_strided(g.size, g.stride, g.offset)


class ModuleInit:
    """Values for a meta model without a log: each parameter's module is materialised on the CPU and
    initialised on its own (a Hugging Face model's ``_init_weights``, else ``reset_parameters()``), then put
    back on the meta device. Deterministic given torch's generator and the order of the requests, but not a
    normal build's weights."""

    def __init__(self, model: nn.Module, provided: frozenset[int] | None = None) -> None:
        self._model = model
        self._owner = {id(t): m for m in model.modules()
                       for t in list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False)
                                                                     if b is not None]}
        self._done: dict[int, torch.Tensor] = {}
        self._provided = provided or frozenset()  # (their values are not kept: a checkpoint gives them)

    def value(self, t: torch.Tensor) -> torch.Tensor | None:
        if id(t) in self._done:
            return self._done.pop(id(t))
        module = self._owner.get(id(t))
        if module is None:
            return None
        params = dict(module.named_parameters(recurse=False))
        buffers = {n: b for n, b in module.named_buffers(recurse=False) if b is not None}
        real = {n: torch.empty_like(p, device="cpu") for n, p in list(params.items()) + list(buffers.items())}
        saved = {n: getattr(module, n) for n in real}
        try:
            for n, v in real.items():  # swap the real tensors in for the module's own init
                if n in params:
                    module._parameters[n] = nn.Parameter(v, requires_grad=params[n].requires_grad)
                else:
                    module._buffers[n] = v
            with torch.no_grad():
                if hasattr(self._model, "_init_weights"):
                    self._model._init_weights(module)
                elif hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                else:
                    return None
            values = {n: (module._parameters.get(n) if n in params else module._buffers.get(n)).detach()
                      for n in real}
        finally:
            for n, v in saved.items():
                if n in params:
                    module._parameters[n] = v
                else:
                    module._buffers[n] = v
        for n, v in values.items():
            if saved[n] is t or storage_key(saved[n]) not in self._provided:
                self._done[id(saved[n])] = v
        return self._done.pop(id(t))

    @staticmethod
    def ready_at(t: torch.Tensor) -> float | None:
        return None  # (on request, in any order)

    @staticmethod
    def why_not(t: torch.Tensor) -> str:
        return "its module has neither reset_parameters() nor a Hugging Face _init_weights"


class ValueSource(Protocol):
    """Where values of a meta model's tensors come from: a pretrained checkpoint, the init_empty log, each
    module's own init."""

    def value(self, t: torch.Tensor) -> torch.Tensor | None:
        """``t``'s value (a CPU tensor of its shape, any dtype), or None if this source does not produce it."""

    def ready_at(self, t: torch.Tensor) -> float | None:
        """How far this source must go before ``t``'s value is ready (-1: at once), None if it never is or
        if any order will do."""

    def why_not(self, t: torch.Tensor) -> str:
        """Why ``value(t)`` is None."""


def value_sources(model: nn.Module, checkpoint: Any = None) -> list[ValueSource]:
    """Where a meta model's values come from: ``checkpoint`` (a pretrained one, a ValueSource whose
    ``provided`` holds the storage keys of the tensors it gives values to), then its init_empty log if it has
    one, then each module's own init (for what the log cannot replay, e.g. buffers computed from other
    tensors)."""
    log = getattr(model, LOG_ATTRIBUTE, None)
    provided = checkpoint.provided if checkpoint is not None else None
    return (([checkpoint] if checkpoint is not None else []) +
            ([Materializer(model, log, provided)] if isinstance(log, InitLog) else []) +
            [ModuleInit(model, provided)])


def order_of_completion(sources: list[ValueSource], groups) -> list[int]:
    """Group indices in the order the sources finish their parameters: those of a checkpoint first, then as
    the replay finishes them (groups no source orders, last)."""
    def ready(t: torch.Tensor) -> float:
        return next((at for at in (s.ready_at(t) for s in sources) if at is not None), math.inf)

    def done_at(g: int) -> float:
        return max(ready(slot.param) for slot in groups[g].slots)
    return sorted(range(len(groups)), key=done_at)


def meta_value(sources: list[ValueSource], t: torch.Tensor, name: str) -> torch.Tensor:
    """``t``'s value from the first source that can produce it."""
    for source in sources:
        value = source.value(t)
        if value is not None:
            return value
    raise ConfigError(f"model: {name} is on the meta device and cannot be materialised "
                      f"({sources[0].why_not(t)}); build the model with offload.init_empty(...)")
