"""Small result records of the engine: StepInfo (one optimizer step) and EngineStats (running totals)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepInfo:
    """What one ``engine.step()`` did.

    ``step`` counts optimizer steps from 1 (a skipped step does not count). ``grad_norm`` is the global L2 norm
    of the unscaled gradients before clipping (inf or nan when they overflowed). ``loss_scale`` is the scale the
    next ``backward`` multiplies the loss by (fp16; 1.0 otherwise). Times are wall-clock seconds: ``time_s``
    the whole call, ``adam_s`` inside the native Adam, ``io_wait_s`` blocked on NVMe transfers. Bytes count
    this step only.
    """

    step: int
    grad_norm: float
    skipped: bool
    loss_scale: float
    time_s: float
    adam_s: float
    io_wait_s: float
    nvme_bytes_read: int
    nvme_bytes_written: int
    grad_bytes_to_host: int
    groups_on_nvme: int
    overlapped: bool = False  # the update continues in the background (offloaded parameters); adam_s and
                              # io_wait_s are then 0 here and go to EngineStats when it completes


@dataclass(frozen=True)
class EngineStats:
    """Running totals since the engine was built. Device bytes count parameters only (trainable and frozen);
    NVMe bytes count optimizer state and (with ``params="nvme"``) weights, not the initial writes."""

    device_param_bytes: int
    device_param_bytes_peak: int
    host_bytes_in_use: int
    host_bytes_peak: int
    host_memory_limit: int | None
    nvme_bytes_read: int
    nvme_bytes_written: int
    optimizer_adam_s: float       # total seconds in the native Adam, over completed steps
    optimizer_io_wait_s: float    # total seconds the optimizer waited for NVMe, over completed steps
    gradients_on_nvme: bool       # the fp32 gradient accumulators live on NVMe (host budget below 4 B/param)
    optimizer_groups_on_host: int
    optimizer_groups_on_nvme: int
    fetch_wait_s: float = 0.0     # total seconds compute waited for offloaded weights (0 with params="device")
    rank: int = 0                 # this process's rank and the number of ranks sharing the state: every
    world_size: int = 1           # host/NVMe figure above is this rank's (1/world_size of each group's state)
    steps_during_backward: int = 0  # backward_step calls whose updates overlapped the backward
