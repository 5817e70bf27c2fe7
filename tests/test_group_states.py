"""Note [the life of a group]: the residency table accepts exactly the transitions of ``TRANSITIONS`` and keeps
its per-state bookkeeping; the table itself has no unreachable state and no dead end; and a training run that
keeps and lends groups leaves the table consistent with the bytes on the device and the update events."""

from __future__ import annotations

import random
import re
from collections import deque

import pytest
import torch

import offload
from offload.schedule.residency import (
    KEPT_STATES, LENT_STATES, OFFERED_STATES, ON_DEVICE, RELEASED, TRANSITIONS, Residency, ResidencyTable,
)

NAMES = ["", "model.embed", "model.layers.0", "model.layers.1", "model.layers.2", "lm_head"]


def _check_bookkeeping(table: ResidencyTable, shadow: list[Residency]) -> None:
    """The table says what the shadow says: per group, per state (members and counts), all groups once."""
    assert [table[g] for g in range(len(shadow))] == shadow
    for state in Residency:
        members = [g for g, s in enumerate(shadow) if s is state]
        assert table.groups_in(state) == members
        assert table.count(state) == len(members)
    assert sum(table.count(state) for state in Residency) == len(shadow)
    assert table.groups_in(*Residency) == list(range(len(shadow)))


@pytest.mark.parametrize("seed", range(4))
def test_random_legal_transitions_are_accepted_and_counted(seed):
    """Thousands of random legal moves (each group follows the table from HOME): every one is accepted, and
    the members and counts per state match a shadow copy after each."""
    rng = random.Random(seed)
    table = ResidencyTable(NAMES)
    shadow = [Residency.HOME] * len(NAMES)
    visited = {Residency.HOME}
    for _ in range(5000):
        g = rng.randrange(len(NAMES))
        new = rng.choice(sorted(TRANSITIONS[shadow[g]], key=lambda s: s.value))
        table.move(g, new)
        shadow[g] = new
        visited.add(new)
        _check_bookkeeping(table, shadow)
    assert visited == set(Residency)


@pytest.mark.parametrize("seed", range(4))
def test_random_illegal_transitions_raise_and_change_nothing(seed):
    """Between random legal moves, random illegal ones: each raises RuntimeError naming the group (index and
    name), its state and the state refused, and leaves the table as it was."""
    rng = random.Random(100 + seed)
    table = ResidencyTable(NAMES)
    shadow = [Residency.HOME] * len(NAMES)
    refused = 0
    for _ in range(3000):
        g = rng.randrange(len(NAMES))
        old = shadow[g]
        illegal = sorted(set(Residency) - TRANSITIONS[old] - {old}, key=lambda s: s.value)
        if illegal and rng.random() < 0.5:
            new = rng.choice(illegal)
            with pytest.raises(RuntimeError) as raised:
                table.move(g, new)
            message = str(raised.value)
            assert re.search(rf"\bgroup {g} \({re.escape(NAMES[g] or '<root>')}\)", message), message
            assert f"from {old.value} to {new.value}" in message, message
            refused += 1
        else:
            new = rng.choice(sorted(TRANSITIONS[old], key=lambda s: s.value))
            table.move(g, new)
            shadow[g] = new
        _check_bookkeeping(table, shadow)
    assert refused > 500


def test_staying_in_a_state_is_no_change():
    table = ResidencyTable(NAMES)
    table.move(2, Residency.HOME)
    table.move(2, Residency.RESIDENT)
    table.move(2, Residency.RESIDENT)
    assert table[2] is Residency.RESIDENT and table.count(Residency.RESIDENT) == 1


def _reachable(start: Residency, edges: dict[Residency, frozenset[Residency]]) -> set[Residency]:
    seen, todo = {start}, deque([start])
    while todo:
        for new in edges[todo.popleft()]:
            if new not in seen:
                seen.add(new)
                todo.append(new)
    return seen


def test_the_table_covers_every_state_and_each_can_go_home():
    """Every state has its row, no row names itself, every state is reachable from HOME (where every group
    starts) and has an exit, and HOME is reachable from every state. Every state with device memory can be
    released directly (``release`` moves any of them home), to HOME or to AWAITING_UPDATE."""
    assert set(TRANSITIONS) == set(Residency)
    assert all(state not in targets and targets for state, targets in TRANSITIONS.items())
    assert _reachable(Residency.HOME, TRANSITIONS) == set(Residency)
    backwards = {state: frozenset(s for s, targets in TRANSITIONS.items() if state in targets)
                 for state in Residency}
    assert _reachable(Residency.HOME, backwards) == set(Residency)
    for state in set(Residency) - RELEASED:
        assert {Residency.HOME, Residency.AWAITING_UPDATE} <= TRANSITIONS[state], state


def test_the_families_of_states():
    """The sets the code tests membership in: released, fetching and on the device partition the states; kept,
    offered and lent ones are on the device; a use leaves the kept ones (the table lets each go to a state
    outside KEPT_STATES other than home)."""
    assert RELEASED | ON_DEVICE | {Residency.FETCHING} == set(Residency)
    assert not RELEASED & ON_DEVICE and Residency.FETCHING not in RELEASED | ON_DEVICE
    assert KEPT_STATES | OFFERED_STATES | LENT_STATES <= ON_DEVICE
    assert Residency.RESIDENT not in KEPT_STATES | OFFERED_STATES | LENT_STATES
    for state in KEPT_STATES:
        assert TRANSITIONS[state] - KEPT_STATES - RELEASED


def _check_engine_states(weights) -> None:
    """What the table says matches the bytes on the device, the kept set and the update events."""
    table = weights.residency
    on_device = [g for g in range(len(weights.groups)) if table[g] not in RELEASED]
    assert weights.resident_groups() == on_device
    assert weights.resident_bytes == sum(weights.nbytes(g) for g in on_device)
    assert weights.kept() == set(table.groups_in(*KEPT_STATES))
    assert not table.groups_in(*OFFERED_STATES)  # offers end with the backward_step that made them
    # a fetch of a HOME group waits for no update (it does not look): none may be due
    assert not [g for g in table.groups_in(Residency.HOME) if weights._handoff.update_due(g)]


@pytest.mark.parametrize("tied", [False, True])
def test_training_that_keeps_and_lends_leaves_the_table_consistent(tied, tmp_path):
    """fp32 with params and optimizer on NVMe on the CPU device, where groups are kept through their update and
    lent to it: after each forward and each step, of both kinds, the table matches the device bytes and the
    kept set, no offer outlives its backward_step, no HOME group has an update due, and once the updates are
    joined none is due for any group. The table went through the kept and the lent states."""
    pytest.importorskip("transformers", reason="builds a small Llama")
    from engine_reference import batches, loss_of, tiny_llama

    data = batches("llama", 6, micro=1)
    config = offload.Config(device="cpu", dtype="fp32", params="nvme", optimizer="nvme", nvme_dir=tmp_path,
                            prefetch_layers=1)
    seen: set[Residency] = set()
    with offload.Engine(tiny_llama(layers=4, tied=tied), config, lr=1e-3) as engine:
        weights = engine.weights
        groups = range(len(weights.groups))
        for i, step in enumerate(data):
            loss = loss_of("llama", engine, step[0])
            seen.update(weights.residency[g] for g in groups)
            _check_engine_states(weights)
            if i % 3 == 2:
                engine.backward(loss)
                engine.step()
            else:
                engine.backward_step(loss)
            seen.update(weights.residency[g] for g in groups)
            _check_engine_states(weights)
        engine.synchronize()
        assert not [g for g in groups if weights._handoff.update_due(g)]
        state = engine.state_dict()
    assert {Residency.HOME, Residency.AWAITING_UPDATE, Residency.KEPT_LENT} <= seen
    assert all(torch.isfinite(v).all() for v in state.values())
