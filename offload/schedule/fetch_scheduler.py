"""FetchScheduler: brings parameter groups to the device just before they run and sends them away after.

Hooks on the modules that use a group's weights (the group's own module, plus any module outside it that holds
one of its parameters, such as a head tied to the embedding) mark each *use*. In forward, a use waits for its
groups, starts fetching the groups of the next ``prefetch`` uses, and releases its groups once it is done
unless one of those next uses needs them again. The sequence of uses of the first forward is the trace that
prefetching follows later; a forward that departs from it is detected at the first differing use, gets no
prefetch from that point on (correctness never depends on the trace), and becomes the new trace.

In backward the uses come in reverse. A hook on each use's output tensors fires when the gradient reaching
that output is complete, which is before the use's own backward runs, and fetches the use's groups; a group
goes home once all of its parameters have their gradients (Note [backward release]); a frozen group, which
gets none, once its use's backward is past it (Note [frozen release in backward]). A use recomputed by
activation checkpointing (its forward runs again during backward) counts as a backward use too.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections import defaultdict

import torch
from torch import nn
from torch.utils import _pytree

from offload.layout.flat_group import FlatGroup
from offload.schedule.offloaded_params import OffloadedParams
from offload.timeline import NO_TIMELINE, Timeline

log = logging.getLogger("offload")


class Phase(enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


def uses_by_module(model: nn.Module, groups: list[FlatGroup]) -> dict[nn.Module, tuple[int, ...]]:
    """For every module whose forward needs a group's weights: the groups it needs. A group's own module
    needs it; a module outside that module's subtree that holds one of the group's parameters (tied weights)
    needs it as well."""
    group_of = {id(slot.param): g.index for g in groups for slot in g.slots}
    roots: dict[str, list[int]] = defaultdict(list)  # (a block's trainable and frozen groups share its name)
    for g in groups:
        roots[g.name].append(g.index)
    needs: dict[nn.Module, list[int]] = defaultdict(list)
    for path, module in model.named_modules():
        if path in roots:
            needs[module].extend(roots[path])
        covered = {g for p in roots if p == "" or path == p or path.startswith(p + ".") for g in roots[p]}
        for param in module.parameters(recurse=False):
            g = group_of.get(id(param))
            if g is not None and g not in covered and g not in needs[module]:
                needs[module].append(g)
    return {module: tuple(gs) for module, gs in needs.items() if gs}


def max_use_width(needs: dict[nn.Module, tuple[int, ...]]) -> int:
    """The most groups one use needs at once."""
    return max((len(gs) for gs in needs.values()), default=1)


def _output_tensors(output) -> list[torch.Tensor]:
    """The tensors in a module's output: through tuples, lists, dicts, HF ModelOutputs and dataclasses."""
    found = []
    for leaf in _pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            for field in dataclasses.fields(leaf):
                found.extend(_output_tensors(getattr(leaf, field.name)))
    return found


class FetchScheduler:
    def __init__(self, model: nn.Module, groups: list[FlatGroup], params: OffloadedParams, prefetch: int,
                 timeline: Timeline = NO_TIMELINE) -> None:
        self.params = params
        self.timeline = timeline
        self._started: dict[int, float] = {}             # id(module) -> when its forward began (timeline)
        self._names = {module: name for name, module in model.named_modules()}
        self.prefetch = prefetch
        self.phase = Phase.FORWARD
        self.trace: list[tuple[int, ...]] = []          # the uses of the reference forward, in order
        self._trace_valid = False
        self._position = 0                             # index of the next use in the current forward
        self._diverged = False
        self._uses: list[tuple[int, ...]] = []          # uses of the forwards since the last backward (grad on)
        self._backward_pointer = 0
        self._warned = False
        self._needs = uses_by_module(model, groups)
        self.max_use_width = max_use_width(self._needs)
        self._group_sizes = [len(g.slots) for g in groups]
        self._frozen = [g.frozen for g in groups]  # Note [frozen groups], flat_group.py
        # device bytes the widest use may need next to the groups resident (the room kept groups must leave)
        self._use_reserve = max((sum(params.nbytes(g) for g in use) for use in self._needs.values()), default=0)
        self._backward_first: frozenset[int] = frozenset()  # Note [kept into backward]; set with the trace
        self._grads_done: list[set[int]] = [set() for _ in groups]
        # frozen group -> the trainable groups of its use whose gradients it waits for before it goes home
        # (Note [frozen release in backward])
        self._frozen_waits: dict[int, set[int]] = {}
        self._inputs_without_grad: dict[int, bool] = {}  # id(module) -> its running use's inputs need no gradient
        self._recording = False                        # the current forward runs with gradients
        self._handles = [model.register_forward_pre_hook(self._on_model_forward, prepend=True),
                         model.register_forward_hook(self._on_model_forward_end, prepend=True)]
        for module, needed in self._needs.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_forward_hook(needed), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_forward_hook(needed)))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---- forward ---------------------------------------------------------------------------------------------

    def _on_model_forward(self, module: nn.Module, args: tuple) -> None:
        if self.phase is Phase.FORWARD:
            self._position = 0
            self._diverged = False
            self._recording = torch.is_grad_enabled()
            # Whatever an interrupted forward left on the device goes home; a saved view is refetched in backward.
            # Groups kept through the update are this forward's first (Note [kept through the update]).
            self.params.release_all(keep_kept=True)

    def _on_model_forward_end(self, module: nn.Module, args: tuple, output) -> None:
        if self.phase is Phase.FORWARD:
            self.end_forward_trace()

    def _pre_forward_hook(self, needed: tuple[int, ...]):
        has_frozen = any(self._frozen[g] for g in needed)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.phase is Phase.BACKWARD:
                self._backward_use(needed)  # recomputation by activation checkpointing
                if has_frozen and torch.is_grad_enabled() and not self._signal_when_past(needed, (args, kwargs)):
                    self._frozen_use_past(needed)  # (no input to wait for: the trainable groups are the signal)
                return
            if has_frozen and torch.is_grad_enabled():
                self._inputs_without_grad[id(module)] = not self._signal_when_past(needed, (args, kwargs))
            self._follow_trace(needed)
            for g in needed:
                self.params.ensure_resident(g)
            if self._recording:  # (inner no-grad regions, e.g. reentrant checkpointing, are recorded too)
                self._uses.append(needed)
            self._prefetch(self._upcoming_forward())
            self._started[id(module)] = self.timeline.now()
        return hook

    def _post_forward_hook(self, needed: tuple[int, ...]):
        def hook(module: nn.Module, args: tuple, output):
            if self.phase is Phase.BACKWARD:
                return output  # recomputation: the backward that follows needs these weights
            if id(module) in self._started:
                self.timeline.add("compute", f"forward {self._names.get(module) or '<root>'}",
                                  self._started.pop(id(module)), self.timeline.now())
            tensors = _output_tensors(output)
            if torch.is_grad_enabled():
                self._register_pre_backward(tensors, needed, self._inputs_without_grad.pop(id(module), False))
            soon = {g for use in self._upcoming_forward() for g in use}
            # An output that is a view of the weights themselves (e.g. a learned position table sliced) keeps
            # its group on the device until the next forward or the end of backward.
            returned = {t.untyped_storage().data_ptr() for t in tensors}
            for g in needed:
                if g not in soon and self.params.storage_address(g) not in returned and not self._keep_for_backward(g):
                    self.params.release_after_use(g)
            return output
        return hook

    # Note [kept into backward]: backward begins with the forward's last uses, in reverse. Released at the end
    # of the forward, their groups would be read back at once, and the first of them with nothing to hide
    # behind (backward cannot start without it). So in a forward that records gradients and follows the trace,
    # a group of the last ``prefetch + 1`` uses stays on the device after its use, while the device limit
    # leaves room for one more use next to the groups resident (the rule for kept groups); backward then
    # releases it as usual once its gradients are complete. A forward that no backward follows leaves them to
    # the next forward, which releases whatever is resident when it begins.
    # CPU device only so far: on CUDA it has not been measured, and device memory is the scarcer resource.
    def _keep_for_backward(self, g: int) -> bool:
        if not (self.params.device.type == "cpu" and self._recording and torch.is_grad_enabled()
                and self._trace_valid and not self._diverged):
            return False
        return g in self._backward_first and self.params.has_room(self._use_reserve)

    def _follow_trace(self, needed: tuple[int, ...]) -> None:
        """Checks this use against the trace; records the trace on the first forward and after a change."""
        i = self._position
        self._position += 1
        if self._trace_valid and not self._diverged:
            if i < len(self.trace) and self.trace[i] == needed:
                return
            self._diverged = True
            if not self._warned:
                log.warning("offload: this forward ran its layers in a different order than the traced one "
                            "(use %d); prefetching follows the new order from the next forward on", i)
                self._warned = True
            self.trace = self.trace[:i]
        if i == 0:
            self.trace = []
        self.trace.append(needed)

    def _upcoming_forward(self) -> list[tuple[int, ...]]:
        if not self._trace_valid or self._diverged:
            return []
        return self.trace[self._position:self._position + self.prefetch]

    def forward_order(self) -> list[int]:
        """Trainable groups in the order of their first use in the traced forward (what the updates follow)."""
        return list(dict.fromkeys(g for use in self.trace for g in use if not self._frozen[g]))

    def end_forward_trace(self) -> None:
        """The forward that just ended is complete: its uses are the trace from now on."""
        self._trace_valid = True
        self._diverged = False
        self._backward_first = frozenset(g for use in self.trace[-(self.prefetch + 1):] for g in use)

    # ---- backward --------------------------------------------------------------------------------------------

    def _register_pre_backward(self, tensors: list[torch.Tensor], needed: tuple[int, ...],
                               frozen_past_with_trainable: bool = False) -> None:
        """Hooks the use's output ``tensors``: the first gradient to reach one of them starts its backward use.
        ``frozen_past_with_trainable``: no input of the use needs a gradient, so its frozen groups may go home
        once its trainable groups have their gradients (Note [frozen release in backward])."""
        fired = [False]

        def on_grad() -> None:
            if not fired[0]:  # several outputs of one use: the first gradient is the signal
                fired[0] = True
                self._backward_use(needed)
                if frozen_past_with_trainable:
                    self._frozen_use_past(needed)

        # Note [output hooks after input hooks]: the use's output is often the next use's input, whose frozen
        # groups go home when its gradient is complete (a tensor hook, Note [frozen release in backward]).
        # Autograd runs a node's tensor hooks before its own pre-hooks, so hooking the output's grad_fn here
        # makes that release come before this use's fetch: the two need not fit the device at once.
        # An output without grad_fn (a leaf: a parameter returned as it is, or a result made to require a
        # gradient after the fact, as transformers' enable_input_require_grads does to the embedding's) leads
        # backward into no operation of this use: it has no backward use, nothing to fetch.
        nodes = set()
        for tensor in tensors:
            if tensor.requires_grad and tensor.grad_fn is not None and tensor.grad_fn not in nodes:
                nodes.add(tensor.grad_fn)
                tensor.grad_fn.register_prehook(lambda grad_outputs: on_grad())

    # Note [backward release]: in backward a group goes home once every one of its parameters has received
    # its gradient in this backward (the post-accumulate-grad hooks, relayed through ``param_done``): no
    # backward operation can read its weights after that. Releasing earlier, e.g. when an earlier use's output
    # gradient completes, is unsafe for nested groups, reentrant checkpoints spanning several groups and
    # weight-only autograd branches. A group whose parameters get no gradient stays until the end of backward,
    # and a tied group stays resident from the backward of its last use to that of its first.
    def _backward_use(self, needed: tuple[int, ...]) -> None:
        pointer = self._locate(needed)
        upcoming = [self._uses[i] for i in range(pointer - 1, max(pointer - 1 - self.prefetch, -1), -1)] \
            if pointer is not None else []
        for g in needed:
            self.params.ensure_resident(g)
        self._prefetch(upcoming)

    def param_done(self, g: int, slot_index: int) -> None:
        """A parameter of group g has its gradient for this backward (called by the gradient hooks)."""
        if self.phase is not Phase.BACKWARD:
            return
        done = self._grads_done[g]
        done.add(slot_index)
        if len(done) == self._group_sizes[g]:
            self.params.release_or_keep(g)
            for f, waits in list(self._frozen_waits.items()):
                waits.discard(g)
                if not waits:
                    del self._frozen_waits[f]
                    self.params.release_after_use(f)

    # Note [frozen release in backward]: a frozen group gets no gradient, so the rule for trainable groups
    # (Note [backward release]) never releases it. Its weights are read in backward by the nodes of its use:
    # those on the way from the use's output to its inputs (e.g. x @ W for the gradient of x) and those on
    # the way to the use's trainable parameters (e.g. a LoRA adapter's, or a weight-only branch such as a
    # norm of W + BA). Once the gradients of every input that needs one are complete (a hook on each of
    # them) and the use's trainable groups have all their gradients, none of those nodes is left to run, and
    # the frozen group goes home. A use whose inputs need no gradient (the first block after a frozen
    # embedding) waits for its trainable groups only; one with neither has no backward. A frozen group
    # needed again later in backward (tied weights) is simply fetched again. Whatever the rule misses stays
    # until the end of backward, which only costs device memory.
    def _signal_when_past(self, needed: tuple[int, ...], inputs: object) -> bool:
        """Registers the release of the use's frozen groups for when the gradients of its ``inputs`` (a
        pytree) are complete; False if none of them needs a gradient."""
        tensors = list({id(t): t for t in _pytree.tree_leaves(inputs)
                        if isinstance(t, torch.Tensor) and t.requires_grad}.values())
        if not tensors:
            return False
        # One tensor hook each and a count, holding nothing of the graph. (torch's register_multi_grad_hook
        # keeps the tensors' grad_fn nodes in the hooks it puts on those same tensors: a cycle through C++
        # that Python's collector cannot break, so every step's graph and activations stayed alive.) An input
        # whose gradient backward does not compute leaves the count above zero: the frozen groups then stay
        # to the end of backward.
        left = [len(tensors)]

        def on_input_grad(grad: torch.Tensor) -> None:
            left[0] -= 1
            if left[0] == 0:
                self._frozen_use_past(needed, inputs_done=True)

        for tensor in tensors:
            tensor.register_hook(on_input_grad)
        return True

    def _frozen_use_past(self, needed: tuple[int, ...], inputs_done: bool = False) -> None:
        """The use's backward no longer reads its frozen groups except for its trainable groups' gradients still
        to come: each frozen group goes home now, or once those are complete. ``inputs_done``: the signal is
        its inputs' gradients (else: it has no input that needs one, and its trainable groups are the only
        signal there is; without any, the frozen groups stay to the end of backward)."""
        if self.phase is not Phase.BACKWARD:
            return
        trainable = [g for g in needed if not self._frozen[g]]
        if not inputs_done and not trainable:
            return
        pending = {g for g in trainable if len(self._grads_done[g]) < self._group_sizes[g]}
        for f in (g for g in needed if self._frozen[g]):
            if pending:
                self._frozen_waits.setdefault(f, set()).update(pending)
            else:
                self.params.release_after_use(f)

    def _locate(self, needed: tuple[int, ...]) -> int | None:
        """The position in this forward's uses of the backward use now running: searched from the last one
        found downward (repeated and recomputed uses are found in order), else from the end (nested uses,
        whose outer use's gradient arrives first). Only prefetching depends on it."""
        start = min(self._backward_pointer, len(self._uses) - 1)
        for i in list(range(start, -1, -1)) + list(range(len(self._uses) - 1, start, -1)):
            if self._uses[i] == needed:
                self._backward_pointer = i
                return i
        return None

    def begin_backward(self) -> None:
        # The groups backward finishes last are the next forward's first: those within the prefetch window
        # may stay on the device through their update (Note [kept through the update], update_handoff.py).
        first = self.forward_order()[:self.prefetch + 1] if self._trace_valid else []
        self.params.set_keep_candidates(first, self._use_reserve)
        self.phase = Phase.BACKWARD
        self._backward_pointer = len(self._uses) - 1
        self._grads_done = [set() for _ in self._group_sizes]
        self._frozen_waits.clear()

    def end_backward(self) -> None:
        """After backward: every group goes home (the optimizer updates them there), except those kept for
        the next forward (Note [kept through the update])."""
        self.phase = Phase.FORWARD
        self._uses.clear()
        self._frozen_waits.clear()
        self.params.release_all(keep_kept=True)

    def _prefetch(self, uses: list[tuple[int, ...]]) -> None:
        self.params.advance()
        for use in uses:
            for g in use:
                # keep staging slots for the widest use, so that a fetch on demand always finds one
                if not self.params.start_fetch(g, reserve=self.max_use_width):
                    return  # no room (device limit or staging slots): the rest is fetched on demand
