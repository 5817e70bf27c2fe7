"""Residency: the state of each offloaded group's weights, from home to the device, through its update and back.

One :class:`Residency` per group, held by :class:`ResidencyTable`, which is the only place it changes: every
change is checked against ``TRANSITIONS`` and an illegal one raises. Note [the life of a group] draws them.
"""

from __future__ import annotations

import enum


class Residency(enum.Enum):
    # No device copy: the weights are only at home (host RAM or NVMe) ...
    HOME = "home"                          # ... and the home holds the latest weights
    AWAITING_UPDATE = "awaiting update"    # ... and an announced update has not been seen to put its new weights
                                           # there yet (Note [overlapped step]): a fetch waits, a prefetch skips
    FETCHING = "fetching"                  # a read from NVMe (into a host staging slot; on the CPU device into the
                                           # device buffer itself), or (CUDA) the copy to the device, is in flight;
                                           # nothing has waited for it yet
    # The device buffer holds the weights ...
    RESIDENT = "resident"                  # ... an ordinary resident group (in use, prefetched, kept for backward)
    KEPT = "kept"                          # ... kept through its update for the next forward, which refreshes it
                                           # (Note [kept through the update])
    OFFERED = "offered"                    # ... backward is done with it and its update, about to be built, may
                                           # take the buffer as its master (Note [lent to the update])
    KEPT_OFFERED = "kept, offered"         # ... both of the above
    LENT = "lent"                          # ... its update's master; nobody uses it; it goes home once the
                                           # update's writes, which read it, are complete
    KEPT_LENT = "kept, lent"               # ... its update's master, kept for the next forward
    LENT_IN_USE = "lent, in use"           # ... used since it was lent, while its update's writes may still read it


RELEASED = frozenset({Residency.HOME, Residency.AWAITING_UPDATE})  # no device memory: where a release ends
# The device buffer holds the group's weights (perhaps being rewritten by its update: wait for it before a use).
ON_DEVICE = frozenset(Residency) - RELEASED - {Residency.FETCHING}
KEPT_STATES = frozenset({Residency.KEPT, Residency.KEPT_OFFERED, Residency.KEPT_LENT})
OFFERED_STATES = frozenset({Residency.OFFERED, Residency.KEPT_OFFERED})
LENT_STATES = frozenset({Residency.LENT, Residency.KEPT_LENT, Residency.LENT_IN_USE})

# Every legal change: state -> the states it may become. The comments name the call that makes it; every state
# with device memory may also go home (RELEASED: the end of a release, Note [the life of a group]).
TRANSITIONS: dict[Residency, frozenset[Residency]] = {
    Residency.HOME: frozenset({
        Residency.FETCHING,          # start_fetch: an NVMe read issued, or (CUDA) a copy from a host home
        Residency.RESIDENT,          # start_fetch: a host home copied on the CPU device (done at once)
        Residency.AWAITING_UPDATE,   # expect_update
    }),
    Residency.AWAITING_UPDATE: frozenset({
        Residency.HOME,              # start_fetch sees the update's new weights home (``updated``)
    }),
    Residency.FETCHING: RELEASED | {
        Residency.RESIDENT,          # ensure_resident waited for the read (and the copy)
    },                               # home: release of a prefetch nobody used, a failed read or copy
    Residency.RESIDENT: RELEASED | {
        Residency.KEPT,              # release_or_keep: a candidate of the next forward, with room
        Residency.OFFERED,           # release_or_keep: while backward's groups may be lent
    },
    Residency.KEPT: RELEASED | {
        Residency.RESIDENT,          # its first use (ensure_resident)
        Residency.KEPT_OFFERED,      # release_or_keep, while backward's groups may be lent
    },
    Residency.OFFERED: RELEASED | {
        Residency.LENT,              # lend_master
        Residency.RESIDENT,          # lend_to_updates(False): no update took it
    },
    Residency.KEPT_OFFERED: RELEASED | {
        Residency.KEPT_LENT,         # lend_master
        Residency.OFFERED,           # a use (ensure_resident) ends the keep, not the offer
        Residency.KEPT,              # lend_to_updates(False): no update took it
    },
    Residency.LENT: RELEASED | {
        Residency.LENT_IN_USE,       # a use (ensure_resident), once the update's Adam pass is done
    },
    Residency.KEPT_LENT: RELEASED | {
        Residency.LENT_IN_USE,       # its first use, once the update's Adam pass is done
        Residency.KEPT,              # the update's writes are seen complete: no longer lent
    },
    Residency.LENT_IN_USE: RELEASED | {
        Residency.RESIDENT,          # the update's writes are seen complete: no longer lent
        Residency.LENT,              # release_after_use while the writes still read the buffer
    },
}

# Note [the life of a group]: a group's weights move through the states of ``Residency``; the arrows are
# ``TRANSITIONS`` (the names on them are OffloadedParams' methods, or the update thread's event the method
# sees). The fetch cycle:
#
#   AWAITING_UPDATE <-- expect_update -- HOME -- start_fetch --> FETCHING -- ensure_resident --> RESIDENT
#          |                             ^  |                                                       ^
#          +-- start_fetch sees updated -+  +-- start_fetch (CPU device, from RAM: copied at once) -+
#
# Around the update (Note [kept through the update], Note [lent to the update]); "returned" is the update's
# writes seen complete, "withdraw" is lend_to_updates(False) at the end of a backward_step:
#
#          +---------------------------------- returned -----------------------------------+
#          v                                                                               |
#        KEPT ------ offer -----> KEPT_OFFERED ----------------- lend_master ---------> KEPT_LENT
#        ^  |  <--- withdraw ---    |                                                      |
#   keep |  | use               use |                                                      | use
#        |  v                       v                                                      v
#      RESIDENT ---- offer -----> OFFERED -- lend_master --> LENT ---------- use ------> LENT_IN_USE
#          ^  ^  <--- withdraw ---                            ^                            |     |
#          |  |                                               +---- release_after_use -----+     |
#          |  |                                                   (writes not complete)          |
#          |  +------------------------------------ returned ------------------------------------+
#          +-- ensure_resident (from FETCHING, above)
#
# Not drawn: every state but the two at home goes home by a release (``release``; ``release_all``;
# ``release_returned`` for LENT; ``set_keep_candidates`` for the kept ones; a failed read or copy for
# FETCHING): to HOME, or to AWAITING_UPDATE while an announced update has not put the new weights home yet.
# "keep" and "offer" are release_or_keep, when backward has given the group its last gradient: a group it
# neither keeps nor offers goes home. A group both kept and offered goes RESIDENT -> KEPT -> KEPT_OFFERED in
# one call.
#
# Which thread: every change is made by the training thread (the one that runs forward and the optimizer
# steps, or autograd's thread while that one waits in backward: fetch, use, release, keep, offer, lend_master
# while it builds the update, expect_update before it hands the update over). The update thread changes no
# state. It only sets the events of UpdateHandoff that end what the training thread started: ``updated`` (the
# new weights are home: ends AWAITING_UPDATE), ``device_current`` (the kept buffer is refreshed, or the lent
# one holds the Adam pass's result: a use of KEPT* or LENT* waits for it) and ``returned`` (the writes that
# read the lent buffer are complete: ends LENT*); the training thread moves the state when it next looks
# (start_fetch, ensure_resident, release_or_keep, release_returned, release, which wait where they must).
# So a state, written by one thread only, can be read and acted on without a lock; it is the training
# thread's knowledge, one step behind the update thread at most (a LENT group whose writes completed a moment
# ago is still LENT until someone looks). The update thread reads a state only to check that an update may
# rewrite the group (``kernel_output``), in a state the training thread leaves only after waiting for that
# update. (The events are cleared by the training thread only, before it hands the update over, so they
# cannot be cleared under a waiter by the thread that sets them.)


class ResidencyTable:
    """Every group's ``Residency``, and the only place it changes: ``move`` checks each change against
    ``TRANSITIONS`` and raises RuntimeError (naming the group, its state and the state refused) on an illegal
    one. Changed by the training thread only (Note [the life of a group]); any thread may read it."""

    def __init__(self, names: list[str]) -> None:
        """``names``: each group's name, for errors (``""``: the root module)."""
        self._names = [name or "<root>" for name in names]
        self._state = [Residency.HOME] * len(names)
        self._members: dict[Residency, set[int]] = {state: set() for state in Residency}
        self._members[Residency.HOME].update(range(len(names)))

    def __len__(self) -> int:
        return len(self._state)

    def __getitem__(self, g: int) -> Residency:
        return self._state[g]

    def move(self, g: int, new: Residency) -> None:
        """Group g is now in state ``new`` (staying in the same state is no change). Raises RuntimeError if
        ``TRANSITIONS`` does not allow it; then nothing changed."""
        old = self._state[g]
        if new is old:
            return
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"offload: group {g} ({self._names[g]}) cannot go from {old.value} to {new.value}; "
                               "this is a bug in the offload schedule")
        self._members[old].discard(g)
        self._members[new].add(g)
        self._state[g] = new

    def groups_in(self, *states: Residency) -> list[int]:
        """The groups in any of ``states``, in index order."""
        return sorted(g for state in states for g in self._members[state])

    def count(self, state: Residency) -> int:
        """How many groups are in ``state``."""
        return len(self._members[state])
