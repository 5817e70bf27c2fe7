"""UpdateHandoff: how offloaded groups pass between the device's uses and the optimizer's updates.

Owned by :class:`~offload.schedule.offloaded_params.OffloadedParams` (which fetches and releases; that module
describes residency and homes). Here: which groups an overlapped step is about to update and when their new
weights are home (Note [overlapped step]), which groups stay on the device through their update, and which
lend their device buffer to it; the events by which the update thread says it is done with a group, and the
state changes around the update (Note [the life of a group], residency.py).

Note [overlapped step]: the optimizer may update the groups on a background thread while the next forward
runs. A group's ``updated`` event is cleared when such a step announces it (``expect_update``; a released group
becomes AWAITING_UPDATE) and set once its new weights are home (``mark_updated``); a fetch of the group waits
for it, a prefetch skips it until then. After a failed or interrupted step every event is set, so nothing
waits for an update that will never come.

Note [kept through the update]: on the CPU device, the groups the next forward uses first (the last ones
backward finishes) would otherwise be released at the end of backward, updated, written home and read back
at once, with the forward waiting for all of it: the step's tail. Instead, when backward gives such a group
its last gradient (``release_or_keep``) and the device limit leaves room for one more use, the group stays
on the device, KEPT; its update then also copies each new master chunk into the device buffer
(``after_update``, on the update thread; fp32 -> compute dtype rounds exactly as the kernel's own copy does),
and its next use waits only for that copy (``device_current``), not for the writes home. A group is kept until
its first use (then it is an ordinary RESIDENT group) or its release; until then every update announced for it
refreshes its device buffer, and a release first waits for a refresh in flight (the update thread may be
writing the buffer). One still kept when the next backward begins was not used by that forward and goes home.
Only unsharded groups on the CPU device.

Note [lent to the update]: in fp32 with the weights in the state file, a group's device buffer holds exactly
the master part of its state file when backward is done with it (it was read from there; nothing writes
weights between). When its update follows at once (``backward_step``: ``lend_to_updates``), the group stays
on the device, OFFERED, and its update takes the buffer as its master (``lend_master``: LENT; Note [master in
memory], group_stepper.py): the update reads only the moments and runs Adam on the buffer in place, and the
state writes read the new master from it. From then on the buffer may not be given back until those writes
are complete (``returned``, set with ``mark_updated`` at the group's ``written``), and a use must first wait
for the Adam pass (``device_current``). A lent group the next forward keeps (KEPT_LENT) needs no refresh copy;
any other goes home once its writes are complete, when the training thread next looks (``release_returned``),
unless a use took it over first (LENT_IN_USE; after that use, ``release_after_use`` makes it LENT again if its
writes are still running; only an explicit ``release`` waits for them). An offer no update took is withdrawn
when the backward_step ends. Room: as for kept groups, and at most ``lend_limit`` LENT groups at a time. Only
unsharded groups on the CPU device.
"""

from __future__ import annotations

import threading
import time
import torch

from offload.schedule.residency import KEPT_STATES, LENT_STATES, OFFERED_STATES, Residency, ResidencyTable
from offload.schedule.weight_homes import AfterUpdate
from offload.timeline import Timeline

# ensure_resident of a kept or lent group: the state its use leaves it in (Note [the life of a group])
_IN_USE = {Residency.KEPT: Residency.RESIDENT, Residency.KEPT_OFFERED: Residency.OFFERED,
           Residency.KEPT_LENT: Residency.LENT_IN_USE, Residency.LENT: Residency.LENT_IN_USE,
           Residency.LENT_IN_USE: Residency.LENT_IN_USE}
# lend_master: the state of an offered group once its update has taken the buffer
_LENT = {Residency.OFFERED: Residency.LENT, Residency.KEPT_OFFERED: Residency.KEPT_LENT}
# the training thread sees a loan's writes complete, or withdraws an offer nobody took: what remains
_LOAN_OVER = {Residency.LENT_IN_USE: Residency.RESIDENT, Residency.KEPT_LENT: Residency.KEPT}
_OFFER_WITHDRAWN = {Residency.OFFERED: Residency.RESIDENT, Residency.KEPT_OFFERED: Residency.KEPT}


class UpdateHandoff:
    """The groups' side of the optimizer's updates, for :class:`OffloadedParams`: the events the update thread
    sets and the training thread waits for, and the moves of ``residency`` around an update."""

    def __init__(self, residency: ResidencyTable, names: list[str], lend_limit: int, timeline: Timeline) -> None:
        """All quiet: no update announced, nothing kept, offered or lent. ``names``: the groups' names (for the
        timeline). ``lend_limit``: how many groups no forward keeps may be LENT at once."""
        ngroups = len(residency)
        self._residency = residency
        self._names = [name or "<root>" for name in names]
        self._timeline = timeline
        # Whether group g's weights at home are its latest (Note [overlapped step]). Cleared by the training
        # thread (expect_update) before it hands the update over; set by the update thread once the new weights
        # are home (mark_updated), or by whoever ends the step (settle, abort). Waited for by the training
        # thread before it fetches g (wait_for_home), and read when it releases g (state_at_home). Safe: only
        # the thread that announces updates clears it, always before the update can run, so the update cannot
        # set it first, and a waiter never sees it cleared again under it.
        self._updated = _set_events(ngroups)
        # Whether group g's device buffer holds its latest weights. Cleared by the training thread before the
        # update is handed over, for a kept group (expect_update: the update will refresh the buffer) or a lent
        # one (lend: the update runs Adam on it); set by the update thread after the last chunk's refresh or
        # Adam pass (after_update), or by settle/abort. Waited for by the training thread before a use of a kept
        # or lent group (begin_use) and before the release of a kept one (wait_until_free): until then the
        # update thread writes the buffer.
        self._device_current = _set_events(ngroups)
        # Whether the update that took group g's buffer is done with it (its state writes, which read the buffer,
        # are complete). Cleared by the training thread when the update takes it (lend), before the update runs;
        # set by the update thread in mark_updated (at the group's ``written``), or by settle/abort. Waited for by
        # the training thread before a lent buffer is given back (wait_until_free, wait_until_a_loan_returns);
        # polled when it looks for loans that are over (returned_loans, end_loan_if_returned). Only after it is
        # set does the training thread give the buffer back or let a new update take it.
        self._returned = _set_events(ngroups)
        self._step_failure: str | None = None
        # Note [kept through the update]: the groups backward may keep (set by the scheduler), and the bytes a
        # use may need next to them.
        self._keep_candidates: frozenset[int] = frozenset()
        self.keep_reserve = 0
        # Note [lent to the update]: whether backward's groups may be offered now.
        self._lending = False
        self._lend_limit = lend_limit

    # ---- announcing and ending updates -------------------------------------------------------------------------

    def expect_update(self, groups: list[int]) -> None:
        """An update of each of ``groups`` is about to be handed over: fetches of a group wait until its
        ``mark_updated``, and a kept group's use until its refresh. Training thread. Nothing after a failed step
        (no update runs any more: nothing may wait for one)."""
        if self._step_failure is not None:
            return
        for g in groups:
            self._updated[g].clear()
            state = self._residency[g]
            if state is Residency.HOME:
                self._residency.move(g, Residency.AWAITING_UPDATE)
            elif state in KEPT_STATES:
                self._device_current[g].clear()

    def mark_updated(self, g: int) -> None:
        """Group g's new weights are home (for a home in the state file: its writes are complete, so a lent
        device buffer is no longer read by them either). Update thread."""
        self._updated[g].set()
        self._returned[g].set()

    def settle(self) -> None:
        """No update is running or will run: nothing waits any longer for one announced that never ran."""
        for event in self._updated + self._device_current + self._returned:
            event.set()

    def abort(self, reason: str) -> None:
        """The step failed: nobody may wait for its updates any longer, and no later one runs. Any thread."""
        self._step_failure = reason
        self.settle()

    def check_failure(self) -> None:
        """Raises RuntimeError if a step failed: the weights at home are neither old nor new."""
        if self._step_failure is not None:
            raise RuntimeError(f"offload: {self._step_failure}; the weights cannot be fetched")

    def update_due(self, g: int) -> bool:
        """Whether an update announced for group g has not put its new weights home yet. (Only the training
        thread clears the event, so on that thread a False stays False until it announces another update.)"""
        return not self._updated[g].is_set()

    def state_at_home(self, g: int) -> Residency:
        """Where a release leaves group g: HOME, or AWAITING_UPDATE while an announced update is due."""
        return Residency.AWAITING_UPDATE if self.update_due(g) else Residency.HOME

    def wait_for_home(self, g: int, wait: bool) -> bool:
        """For a fetch of released group g: True once its home holds its latest weights. AWAITING_UPDATE: with
        ``wait`` blocks until its update has put them there (then HOME), else returns False while it has not.
        Raises after a failed step. Training thread."""
        if self._residency[g] is Residency.AWAITING_UPDATE:
            updated = self._updated[g]
            if not updated.is_set():
                if not wait:
                    return False
                with self._timeline.span("fetch", f"wait for update {self._names[g]}"):
                    updated.wait()
            self.check_failure()
            self._residency.move(g, Residency.HOME)
        self.check_failure()
        return True

    # ---- uses and releases of kept and lent groups --------------------------------------------------------------

    def begin_use(self, g: int) -> float:
        """A use of kept or lent group g begins: waits until its update has refreshed (or, lent, finished its
        Adam pass on) the device buffer, and the group is kept no longer. Returns the seconds waited. Raises
        after a failed step. Training thread."""
        waited = 0.0
        device_current = self._device_current[g]
        if not device_current.is_set():
            start = time.perf_counter()
            with self._timeline.span("fetch", f"wait for refresh {self._names[g]}"):
                device_current.wait()
            waited = time.perf_counter() - start
        self.check_failure()
        self._residency.move(g, _IN_USE[self._residency[g]])
        self.end_loan_if_returned(g)
        return waited

    def end_loan_if_returned(self, g: int) -> None:
        """Group g, lent and used since or kept, is lent no longer once its update's writes are complete."""
        state = self._residency[g]
        if state in _LOAN_OVER and self._returned[g].is_set():
            self._residency.move(g, _LOAN_OVER[state])

    def lent_after_use(self, g: int) -> bool:
        """A use of group g is over and none follows soon: True if its update's writes still read its buffer,
        and it is now LENT (it goes home once they are complete, ``returned_loans``); False if it may go home
        now. Training thread."""
        if self._residency[g] in (Residency.LENT, Residency.LENT_IN_USE) and not self._returned[g].is_set():
            self._residency.move(g, Residency.LENT)
            return True
        return False

    def returned_loans(self) -> list[int]:
        """The LENT groups whose update's writes are complete: they may go home now."""
        return [g for g in self._residency.groups_in(Residency.LENT) if self._returned[g].is_set()]

    def wait_until_a_loan_returns(self) -> None:
        """Blocks until the first LENT group's writes are complete (room, when a fetch finds the device full)."""
        with self._timeline.span("fetch", "wait for lent weights"):
            self._returned[self._residency.groups_in(Residency.LENT)[0]].wait()

    def wait_until_free(self, g: int) -> None:
        """Before group g's buffer is given back: waits for a refresh in flight (kept) and for the writes that
        read a lent buffer (Note [kept through the update], [lent to the update])."""
        state = self._residency[g]
        if state in KEPT_STATES:
            self._device_current[g].wait()
        if state in LENT_STATES:
            self._returned[g].wait()

    def lent_with_writes_running(self, g: int) -> bool:
        """Whether group g is LENT with its update's writes still running (``release_all`` leaves it)."""
        return self._residency[g] is Residency.LENT and not self._returned[g].is_set()

    # ---- keeping and lending ------------------------------------------------------------------------------------

    def set_keep_candidates(self, groups: list[int], reserve_bytes: int) -> None:
        """The groups backward may keep from now on (Note [kept through the update]), and the room that must stay
        free next to them. The caller has released those kept until now."""
        self._keep_candidates = frozenset(groups)
        self.keep_reserve = reserve_bytes

    def keep_or_offer(self, g: int, can_lend: bool) -> bool:
        """Backward has given group g its last gradient and there is room next to it: keeps it if it is a
        candidate, offers it to its update while lending is on and ``can_lend``. False if neither (the caller
        releases it). A group already offered in this backward stays as it is. Training thread."""
        state = self._residency[g]
        if state in OFFERED_STATES:
            return True
        if state not in (Residency.RESIDENT, Residency.KEPT):
            return False
        if g in self._keep_candidates:
            self._residency.move(g, Residency.KEPT)
        kept = self._residency[g] is Residency.KEPT
        if self._lending and can_lend and (kept or self._residency.count(Residency.LENT) < self._lend_limit):
            self._residency.move(g, Residency.KEPT_OFFERED if kept else Residency.OFFERED)
            return True
        return kept

    def lend_to_updates(self, on: bool) -> None:
        """Whether backward's groups may be offered to their update, which follows at once (``backward_step``).
        Turning it off withdraws the offers no update took. Training thread."""
        self._lending = on
        if not on:
            for g in self._residency.groups_in(*OFFERED_STATES):
                self._residency.move(g, _OFFER_WITHDRAWN[self._residency[g]])

    def lend(self, g: int) -> bool:
        """The update of group g about to be handed over takes its device buffer as its master if g is offered
        (True; then LENT or KEPT_LENT), else nothing changes (False; also after a failed step, when no update
        runs). Training thread."""
        state = self._residency[g]
        if state not in _LENT or self._step_failure is not None:
            return False
        self._residency.move(g, _LENT[state])
        self._returned[g].clear()
        self._device_current[g].clear()
        return True

    def after_update(self, g: int, home: AfterUpdate | None, device_buffer: torch.Tensor) -> AfterUpdate | None:
        """What the update thread calls for each new master chunk of group g: ``home`` (the way to its home,
        None when the kernel wrote it), plus, for a kept group, a refresh of its ``device_buffer``; for a group
        whose buffer the update runs on, only the end of the Adam pass. Built on the training thread."""
        device_current = self._device_current[g]
        state = self._residency[g]
        if state in LENT_STATES and not self._returned[g].is_set():  # this update runs on the buffer itself
            # (lend has just lent it: nothing to copy)
            return lambda master, start, last: device_current.set() if last else None
        if state not in KEPT_STATES:
            return home
        timeline, name = self._timeline, self._names[g]

        def refresh(master: torch.Tensor, start: int, last: bool) -> None:
            if home is not None:
                home(master, start, last)
            with timeline.span("fetch", f"refresh {name}"):
                device_buffer[start:start + master.numel()].copy_(master)  # (unsharded: shard = group)
            if last:
                device_current.set()

        return refresh


def _set_events(n: int) -> list[threading.Event]:
    """``n`` events, all set (nothing to wait for yet)."""
    events = [threading.Event() for _ in range(n)]
    for event in events:
        event.set()
    return events
