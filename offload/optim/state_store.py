"""OptimizerStateStore: where each group's fp32 master weights and Adam moments live, in host RAM or on NVMe.

A group's optimizer state is one run of ``3 * numel`` fp32 values, ``master | exp_avg | exp_avg_sq``, laid
out the same in a host buffer and in a swap file (each part a whole number of 4 KiB pages, see FlatGroup), so a
group on NVMe is brought in with one read into a staging buffer, and the Adam pass does not care where the
state came from. Placement is decided per group (DESIGN.md "Placement is decided per group"). With several
ranks every buffer here holds this rank's shard of the group only (Note [rank shards], flat_group.py):
``numel`` below is the shard's length and element k is the group's element ``lo + k``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from offload.layout.flat_group import FlatGroup
from offload.storage.host_pool import HostBuffer, HostPool
from offload.storage.io_engine import IoHandle
from offload.storage.swap_store import SwapFile, SwapStore

STATE_PARTS = 3       # master, exp_avg, exp_avg_sq
ALL_PARTS = tuple(range(STATE_PARTS))  # the parts of a state run, in their order
MOMENTS = ALL_PARTS[1:]                # exp_avg, exp_avg_sq: what a read needs when the master is in memory
STAGING_SLOTS = 6     # reads of chunks j+1..j+4 || Adam(j) || write(j-1): Note [state pipeline], group_stepper.py
SMALL_STAGING_SLOTS = 3  # for chunks under SMALL_CHUNK_BYTES, whose transfers are too short to need more in flight
SMALL_CHUNK_BYTES = 16 << 20
FP32_BYTES = 4
# NVMe state moves through staging in chunks of at most this many elements (48 MiB of state per slot), so a
# large group (an untied embedding or head) does not make the staging buffers large; six slots keep about
# 240 MB of reads in flight, enough for the disk. A multiple of 2048, so
# every part of every chunk is whole 4 KiB pages in the file.
CHUNK_ELEMENTS = 4 << 20


def staging_slots(largest_numel: int) -> int:
    """How many staging slots the pipeline uses when the largest NVMe group has ``largest_numel`` elements."""
    chunk_bytes = STATE_PARTS * FP32_BYTES * min(largest_numel, CHUNK_ELEMENTS)
    return STAGING_SLOTS if chunk_bytes >= SMALL_CHUNK_BYTES else SMALL_STAGING_SLOTS


def staging_bytes(largest_numel: int, parts: int = STATE_PARTS) -> int:
    """Host bytes the staging slots take when the largest NVMe group has ``largest_numel`` elements of
    ``parts`` fp32 values each (3: master, m, v; 4 with the gradients): the planners' one formula."""
    chunk = min(largest_numel, CHUNK_ELEMENTS)
    return staging_slots(largest_numel) * HostPool.mapped_size(parts * FP32_BYTES * chunk)


def chunks(numel: int, chunk: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """[start, end) element ranges covering ``numel`` in pieces of at most ``chunk``."""
    return [(start, min(start + chunk, numel)) for start in range(0, numel, chunk)]


class StatePlacement(enum.Enum):
    HOST = "host"
    NVME = "nvme"


@dataclass(frozen=True)
class GroupState:
    """Where one group's optimizer state lives: ``state_host`` (HOST) or ``state_nvme`` (NVME), never both."""

    group: FlatGroup
    placement: StatePlacement
    state_host: HostBuffer | None
    state_nvme: SwapFile | None

    @property
    def nbytes(self) -> int:
        return STATE_PARTS * self.group.shard_numel * FP32_BYTES


def split_state(state_flat: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(master, exp_avg, exp_avg_sq) views of a group's fp32 state run (a staging slot may be longer)."""
    return state_flat[:numel], state_flat[numel:2 * numel], state_flat[2 * numel:3 * numel]


def plan_placement(groups: list[FlatGroup], on_nvme: bool, budget_left: int | None) -> list[StatePlacement]:
    """HOST for every group when ``on_nvme`` is False. Otherwise NVME for every group when ``budget_left`` is
    None, and else HOST for the groups, in order, whose state fits in ``budget_left`` bytes once the staging
    slots for the rest are paid for; NVME for the others.

    Note [which state stays in RAM]: groups are in the model's order of execution, so RAM goes to the first
    ones: the embedding and the first blocks. Their gradients come last in backward and the next forward needs
    them first, so with their state on NVMe their updates are the step's critical path: the forward waits
    while the disk reads and writes their state after backward (the "forward: wait" of
    ``bench/step_timeline.py``). The deep groups' state traffic overlaps the rest of backward instead."""
    if not on_nvme:
        return [StatePlacement.HOST] * len(groups)
    if budget_left is None:
        return [StatePlacement.NVME] * len(groups)
    sizes = [STATE_PARTS * g.shard_numel * FP32_BYTES for g in groups]
    if sum(sizes) <= budget_left:
        return [StatePlacement.HOST] * len(groups)
    left = budget_left - staging_bytes(max(g.shard_numel for g in groups))  # one chunk in every staging slot
    placement = []
    for size in sizes:
        if size <= left:
            placement.append(StatePlacement.HOST)
            left -= size
        else:
            placement.append(StatePlacement.NVME)
    return placement


class OptimizerStateStore:
    """Each group's state where its placement says, plus the staging slots that NVMe groups are stepped in.

    Groups are added one at a time (``add``) with their initial fp32 weights, so that building the store never
    needs the whole model's master weights at once. Moments start at zero.
    """

    def __init__(self, pool: HostPool, swap: SwapStore | None, nvme_numels: list[int],
                 grads_on_nvme: bool = False) -> None:
        """``nvme_numels``: the sizes of the groups that will be placed on NVMe. Their staging slots
        (``staging_slots``, fewer when there are fewer chunks) each hold one chunk of the largest of them
        (and of its gradients, which are read with it when ``grads_on_nvme``)."""
        self.pool = pool
        self.swap = swap
        self.states: list[GroupState] = []
        if nvme_numels and swap is None:
            raise ValueError("OptimizerStateStore: groups placed on NVMe need a SwapStore")
        largest = max(nvme_numels, default=0)
        self.chunk_elements = min(largest, CHUNK_ELEMENTS)
        self.parts = STATE_PARTS + (1 if grads_on_nvme else 0)
        chunk_count = sum(len(chunks(n, self.chunk_elements)) for n in nvme_numels)
        slots = min(chunk_count, staging_slots(largest)) if nvme_numels else 0
        slot_bytes = self.parts * self.chunk_elements * FP32_BYTES
        self.staging: list[HostBuffer] = [pool.allocate(slot_bytes, f"optimizer staging {i}")
                                          for i in range(slots)]

    def add(self, group: FlatGroup, where: StatePlacement, master: torch.Tensor | None) -> GroupState:
        """Group ``group``'s state in ``where``: master from ``master`` (this rank's shard, fp32; None: zeros, to
        be filled later), moments zero."""
        nbytes = STATE_PARTS * group.shard_numel * FP32_BYTES
        if where is StatePlacement.HOST:
            state_host = self.pool.allocate(nbytes, f"optimizer state {group.name or '<root>'}")
            master_host, _, _ = split_state(state_host.view(torch.float32), group.shard_numel)
            if master is not None:
                master_host.copy_(master)  # the moments start at zero: the pool's fresh pages are zero-filled
            state = GroupState(group, where, state_host, None)
        else:
            state = GroupState(group, where, None, self.swap.create(f"optimizer state {group.index}", nbytes))
            for start, end in (chunks(group.shard_numel, self.chunk_elements) if master is not None else []):
                staging = self.staging[0].view(torch.float32)[:STATE_PARTS * (end - start)]
                master_stage, m_stage, v_stage = split_state(staging, end - start)
                master_stage.copy_(master[start:end])
                m_stage.zero_()
                v_stage.zero_()
                for handle in self.transfer("write", state, start, end, staging):
                    self.swap.wait(handle)
        self.states.append(state)
        return state

    def read_master(self, state: GroupState) -> torch.Tensor:
        """A new fp32 CPU tensor with the group's master weights (this rank's shard); see ``read_parts``."""
        return self.read_parts(state, (0,))[0]

    def read_parts(self, state: GroupState, parts: tuple[int, ...]) -> list[torch.Tensor]:
        """New fp32 CPU tensors with the group's ``parts`` (0: master, 1: m, 2: v) of this rank's shard, in
        that order. For an NVMe group this reads through staging slot 0, chunk by chunk, so it must not run
        while a step is in progress."""
        numel = state.group.shard_numel
        if state.placement is StatePlacement.HOST:
            in_host = split_state(state.state_host.view(torch.float32), numel)
            return [in_host[part].clone() for part in parts]
        out = [torch.empty(numel, dtype=torch.float32) for _ in parts]
        for start, end in chunks(numel, self.chunk_elements):
            staging = self.staging[0].view(torch.float32)[:STATE_PARTS * (end - start)]
            for handle in self.transfer("read", state, start, end, staging, parts=parts):
                self.swap.wait(handle)
            staged = split_state(staging, end - start)
            for tensor, part in zip(out, parts):
                tensor[start:end].copy_(staged[part])
        return out

    def transfer(self, op: str, state: GroupState, start: int, end: int, staging: torch.Tensor,
                 grad_nvme: SwapFile | None = None, master: torch.Tensor | None = None,
                 parts: tuple[int, ...] = ALL_PARTS) -> list[IoHandle]:
        """Issues the read or write of elements [start, end) of an NVMe group's master, m and v, between the
        file (parts at 0, numel and 2 * numel elements) and ``staging`` (the same parts of ``end - start``
        elements back to back); a read also brings the gradients from ``grad_nvme`` into a fourth part.
        A read moves only ``parts`` (0: master, 1: m, 2: v), each into its place in ``staging``. The master may
        be in memory elsewhere (Note [master in memory], group_stepper.py): then a read leaves part 0 out, and a
        write takes part 0 from ``master`` (the chunk's ``end - start`` fp32 values, page-aligned) instead.
        Returns the handles."""
        n, numel = end - start, state.group.shard_numel
        submit = self.swap.read if op == "read" else self.swap.write
        handles = []
        for part in parts if op == "read" else ALL_PARTS:
            source = master if part == 0 and op == "write" and master is not None else staging[part * n:(part + 1) * n]
            handles.append(submit(state.state_nvme, (part * numel + start) * FP32_BYTES, source))
        if op == "read" and grad_nvme is not None:
            grad_part = staging[STATE_PARTS * n:(STATE_PARTS + 1) * n]
            handles.append(self.swap.read(grad_nvme, start * FP32_BYTES, grad_part))
        return handles

    def close(self) -> None:
        for state in self.states:
            if state.state_host is not None:
                self.pool.release(state.state_host)
        for slot in self.staging:
            self.pool.release(slot)
        self.states.clear()
        self.staging.clear()
