"""UpdateHandoff: how OffloadedParams hands groups between the device's uses and the optimizer's updates.

Part of :class:`~offload.schedule.offloaded_params.OffloadedParams` (a base class; that module describes
residency, fetches and homes). Here: which groups an overlapped step is about to update and when their new
weights are home (Note [overlapped step]), which groups stay on the device through their update, and which
lend their device buffer to it.

Note [overlapped step]: the optimizer may update the groups on a background thread while the next forward
runs. A group's ``_updated`` event is cleared when such a step announces it (``expect_update``) and set once
its new weights are home (``mark_updated``); a fetch of the group waits for it, a prefetch skips it until then.
After a failed or interrupted step every event is set, so nothing waits for an update that will never come.

Note [kept through the update]: on the CPU device, the groups the next forward uses first (the last ones
backward finishes) would otherwise be released at the end of backward, updated, written home and read back
at once, with the forward waiting for all of it: the step's tail. Instead, when backward gives such a group
its last gradient (``release_or_keep``) and the device limit leaves room for one more use, the group stays
RESIDENT ("kept"); its update then also copies each new master chunk into the device buffer (``after_update``,
on the update thread; fp32 -> compute dtype rounds exactly as the kernel's own copy does), and its next use
waits only for that copy (``_fresh``), not for the writes home. A group is kept until its first use (then it
is an ordinary resident group) or its release; until then every update announced for it refreshes its device
buffer, and a release first waits for a refresh in flight (the update thread may be writing the buffer). One
still kept when the next backward begins was not used by that forward and goes home. Only unsharded groups
on the CPU device.

Note [lent to the update]: in fp32 with the weights in the state file, a group's device buffer holds exactly
the master part of its state file when backward is done with it (it was read from there; nothing writes
weights between). When its update follows at once (``backward_step``: ``lend_to_updates``), the group stays
RESIDENT ("lendable") and its update takes the buffer as its master (``lend_master``; Note [master in
memory], group_stepper.py): the update reads only the moments and runs Adam on the buffer in place, and the
state writes read the new master from it. From then on the buffer may not be given back until those writes
are complete (``_returned``, set with ``mark_updated`` at the group's ``written``), and a use must first wait
for the Adam pass (``_fresh``). A lent group the next forward keeps (a kept group) needs no refresh copy; any
other goes home once its writes are complete, when the training thread next looks (``reap``), unless a use
took it over first (after that use, ``release_after_use`` hands it back to ``reap`` if its writes are still
running; only an explicit ``release`` waits for them). Room: as for kept groups, and at most ``lend_limit``
such groups at a time. Only unsharded groups on the CPU device.
"""

from __future__ import annotations

import threading

import torch

from offload.schedule.residency import Residency


class UpdateHandoff:
    """The update side of :class:`OffloadedParams`' residency (its ``__init__`` calls ``_init_handoff``)."""

    def _init_handoff(self, ngroups: int, lend_limit: int) -> None:
        """The events and sets of the notes above, all quiet: no update announced, nothing kept or lent."""
        # Note [overlapped step]: set once group g's new weights are home.
        self._updated = _set_events(ngroups)
        # Note [kept through the update]: the groups that may be kept (set by the scheduler), those kept now,
        # and per group whether its device buffer holds its latest weights (cleared while a kept group's
        # update is pending; set by the update thread). ``_keep_reserve``: bytes a use may need next to them.
        self._keep_candidates: frozenset[int] = frozenset()
        self._keep_reserve = 0
        self._kept: set[int] = set()
        self._fresh = _set_events(ngroups)
        # Note [lent to the update]: whether backward's groups may be lent now, those waiting for their update
        # to take them (lendable), those whose buffer an update has taken (lent: its writes may read it until
        # ``_returned``), and the lent ones nobody has used since (``reap`` releases them once returned).
        self._lending = False
        self._lend_limit = lend_limit
        self._lendable: set[int] = set()
        self._lent: set[int] = set()
        self._reapable: set[int] = set()
        self._returned = _set_events(ngroups)
        self._step_failure: str | None = None

    def expect_update(self, groups: list[int], drain: bool = True) -> None:
        """An overlapped step is about to update ``groups``: fetches of them wait until ``mark_updated``.
        With ``drain``, every copy still reading a host home finishes first (the kernel rewrites the homes).
        An update during backward passes False: its group's last copy was consumed by the group's backward
        kernels, which the update waits for through the gradient copies' events, and a prefetch of the group
        that nobody used is discarded (its result is never read)."""
        if drain:
            self._h2d.drain()
        if self._step_failure is not None:  # a failed step runs no more updates: nothing may wait for one
            return
        for g in groups:
            self._updated[g].clear()
            if g in self._kept:
                self._fresh[g].clear()

    def mark_updated(self, g: int) -> None:
        """Group g's new weights are home (for a home in the state file: its writes are complete, so a lent
        device buffer is no longer read by them either)."""
        self._updated[g].set()
        self._returned[g].set()

    def settle_updates(self) -> None:
        """No update is running or will run (the caller has joined the step): fetches stop waiting for updates
        that were announced but never happened (a step interrupted before it started)."""
        for event in self._updated + self._fresh + self._returned:
            event.set()

    def abort_updates(self, reason: str) -> None:
        """The overlapped step failed: nobody may wait for its updates any longer. (Its transfers are waited
        for before the failure is reported, so no write still reads a lent buffer.)"""
        self._step_failure = reason
        for event in self._updated + self._fresh + self._returned:
            event.set()

    def can_lend(self, g: int) -> bool:
        """Whether group g's device buffer can be its update's master (Note [lent to the update])."""
        return self._direct and self.home_is_state_file(g) and not self.groups[g].sharded

    def lend_to_updates(self, on: bool) -> None:
        """Whether each group's update follows as soon as backward is done with it (``backward_step``), so
        that its device buffer may be lent to the update (Note [lent to the update])."""
        self._lending = on

    def lend_master(self, g: int) -> torch.Tensor | None:
        """Group g's device buffer, for its update about to be built to use as its master, or None (then the
        update reads the master from the state file). Training thread."""
        if g not in self._lendable or self._step_failure is not None:  # (after a failure no update runs)
            return None
        self._lendable.discard(g)
        self._lent.add(g)
        if g not in self._kept:
            self._reapable.add(g)
        self._returned[g].clear()
        self._fresh[g].clear()
        return self.weight_device[g]

    def _settle_lent(self, g: int) -> None:
        """Group g is no longer lent once its update's writes are complete (nothing reads the buffer for them)."""
        if g in self._lent and self._returned[g].is_set():
            self._lent.discard(g)
            self._reapable.discard(g)

    def reap(self) -> None:
        """Sends home the lent groups nobody has used whose update's writes are complete."""
        for g in [g for g in self._reapable if self._returned[g].is_set()]:
            self.release(g)

    def set_keep_candidates(self, groups: list[int], reserve_bytes: int) -> None:
        """The groups the next forward uses first, which backward may keep on the device (Note [kept through
        the update]); ``reserve_bytes``: room that must stay free next to them for the next use. A group still
        kept from the last backward was not used by the forward since (a use releases it): it goes home now,
        rather than stay on the device for a forward that may never use it."""
        for g in list(self._kept):
            self.release(g)
        self._keep_candidates = frozenset(g for g in groups if self._direct and not self.groups[g].sharded)
        self._keep_reserve = reserve_bytes

    def release_or_keep(self, g: int) -> None:
        """Backward gave every parameter of group g its gradient: keeps g resident if it is a candidate and
        the device limit leaves room for the next use next to it, or if its update is to take its buffer
        (Note [lent to the update]); else releases it."""
        self.reap()
        self._settle_lent(g)  # (lent in an earlier step and used since: its writes are long complete)
        if self.residency[g] is not Residency.RESIDENT or not self._gathered[g] or \
                not self.has_room(self._keep_reserve):
            self.release(g)
            return
        if g in self._keep_candidates:
            self._kept.add(g)
        if self._lending and self.can_lend(g) and (g in self._kept or len(self._reapable) < self._lend_limit):
            self._lendable.add(g)
        elif g not in self._kept:
            self.release(g)

    def kept(self) -> set[int]:
        """The groups kept on the device for the next forward now."""
        return set(self._kept)


def _set_events(n: int) -> list[threading.Event]:
    """``n`` events, all set (nothing to wait for yet)."""
    events = [threading.Event() for _ in range(n)]
    for event in events:
        event.set()
    return events
