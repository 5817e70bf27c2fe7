"""OptimizerStateStore: where each group's fp32 master weights and Adam moments live, in host RAM or on NVMe.

A group's optimizer state is one run of ``3 * numel`` fp32 values, ``master | exp_avg | exp_avg_sq``, laid
out the same in a host buffer and in a swap file (each part a whole number of 4 KiB pages, see FlatGroup), so a
group on NVMe is brought in with one read into a staging buffer, and the Adam pass does not care where the
state came from. Placement is decided per group (DESIGN.md "Placement is decided per group").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from offload.layout.flat_group import FlatGroup
from offload.storage.host_pool import HostBuffer, HostPool
from offload.storage.swap_store import SwapFile, SwapStore

STATE_PARTS = 3       # master, exp_avg, exp_avg_sq
STAGING_SLOTS = 3     # read(j+1) || Adam(j) || write(j-1): see Note [state pipeline] in group_stepper.py
FP32_BYTES = 4


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
        return STATE_PARTS * self.group.numel * FP32_BYTES


def split_state(state_flat: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(master, exp_avg, exp_avg_sq) views of a group's fp32 state run (a staging slot may be longer)."""
    return state_flat[:numel], state_flat[numel:2 * numel], state_flat[2 * numel:3 * numel]


def plan_placement(groups: list[FlatGroup], on_nvme: bool, budget_left: int | None) -> list[StatePlacement]:
    """HOST for every group when ``on_nvme`` is False. Otherwise NVME for every group when ``budget_left`` is
    None, and else HOST for the groups, in order, whose state fits in ``budget_left`` bytes once the staging
    slots for the rest are paid for; NVME for the others."""
    if not on_nvme:
        return [StatePlacement.HOST] * len(groups)
    if budget_left is None:
        return [StatePlacement.NVME] * len(groups)
    sizes = [STATE_PARTS * g.numel * FP32_BYTES for g in groups]
    if sum(sizes) <= budget_left:
        return [StatePlacement.HOST] * len(groups)
    left = budget_left - STAGING_SLOTS * max(sizes)  # room for the largest group in every staging slot
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

    def __init__(self, pool: HostPool, swap: SwapStore | None, largest_nvme_group_numel: int,
                 slots: int = STAGING_SLOTS) -> None:
        """``slots``: staging buffers for NVMe groups (fewer than STAGING_SLOTS only when there are fewer
        NVMe groups than that), each large enough for the largest NVMe group."""
        self.pool = pool
        self.swap = swap
        self.states: list[GroupState] = []
        if largest_nvme_group_numel and swap is None:
            raise ValueError("OptimizerStateStore: groups placed on NVMe need a SwapStore")
        slot_bytes = STATE_PARTS * largest_nvme_group_numel * FP32_BYTES
        self.staging: list[HostBuffer] = [pool.allocate(slot_bytes, f"optimizer staging {i}")
                                          for i in range(slots)] if slot_bytes else []

    def add(self, group: FlatGroup, where: StatePlacement, master: torch.Tensor) -> GroupState:
        nbytes = STATE_PARTS * group.numel * FP32_BYTES
        if where is StatePlacement.HOST:
            state_host = self.pool.allocate(nbytes, f"optimizer state {group.name or '<root>'}")
            master_host, _, _ = split_state(state_host.view(torch.float32), group.numel)
            master_host.copy_(master)  # the moments start at zero: the pool's fresh pages are zero-filled
            state = GroupState(group, where, state_host, None)
        else:
            state_nvme = self.swap.create(f"optimizer state {group.index}", nbytes)
            staging = self.staging[0].view(torch.float32)[:STATE_PARTS * group.numel]
            master_stage, m_stage, v_stage = split_state(staging, group.numel)
            master_stage.copy_(master)
            m_stage.zero_()
            v_stage.zero_()
            self.swap.wait(self.swap.write(state_nvme, 0, staging))
            state = GroupState(group, where, None, state_nvme)
        self.states.append(state)
        return state

    def read_master(self, state: GroupState) -> torch.Tensor:
        """A new fp32 CPU tensor with the group's master weights. For an NVMe group this reads through staging
        slot 0, so it must not run while a step is in progress."""
        if state.placement is StatePlacement.HOST:
            return split_state(state.state_host.view(torch.float32), state.group.numel)[0].clone()
        master_stage = self.staging[0].view(torch.float32)[:state.group.numel]
        self.swap.wait(self.swap.read(state.state_nvme, 0, master_stage))
        return master_stage.clone()

    def close(self) -> None:
        for state in self.states:
            if state.state_host is not None:
                self.pool.release(state.state_host)
        for slot in self.staging:
            self.pool.release(slot)
        self.states.clear()
        self.staging.clear()
