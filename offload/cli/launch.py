"""Launch: the rank this process is when started by ``torchrun`` (or any launcher that sets its variables).

``torchrun --nproc-per-node N -m offload train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in the environment. ``start`` joins them into the default process
group (gloo for the CPU device, NCCL for CUDA, each rank on the GPU of its ``LOCAL_RANK``), and the engine then
partitions its state over them (Note [rank shards]). Without those variables, or with ``WORLD_SIZE=1``, it
is a single process and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from offload.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module initialised the process group (and destroys it in ``stop``)

    @property
    def main(self) -> bool:
        """The rank that prints and writes what only one should."""
        return self.rank == 0

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global ``batch`` (every rank builds the same one from the seed)."""
        rows = batch.shape[0] // self.world
        return batch[self.rank * rows:(self.rank + 1) * rows]

    def mean(self, value: float) -> float:
        """The mean over ranks of ``value`` (a collective with several ranks)."""
        if self.world == 1:
            return value
        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        total = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.item() / self.world

    # Note [one rank tokenizes]: every rank needs the same token files, and tokenizing is CPU-heavy: rank 0
    # does it (into the cache when there is one), the others wait at a barrier and then run the same call, which
    # finds the cache and maps it. Without a cache (scratch space) each rank tokenizes into its own scratch
    # directory after the barrier: slower, never wrong. A failure on rank 0 is raised there before the barrier;
    # the other ranks are then stopped by torchrun when rank 0 exits.
    def first_on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the main rank first, then on the others (Note [one rank tokenizes])."""
        if self.world == 1:
            return fn()
        result = fn() if self.main else None
        dist.barrier()
        return result if self.main else fn()

    def stop(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def start(device: str, batch: int) -> Launch:
    """Joins the ranks ``torchrun`` started (see the module docstring); checks that ``batch`` (the global batch)
    splits evenly over them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Launch()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if batch % world:
        raise ConfigError(f"--batch: {batch} sequences do not split evenly over {world} ranks (WORLD_SIZE)")
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return Launch(rank=rank, world=world, local_rank=local_rank, owns_group=owns)
