"""Where offloaded state lives: the bounded host pool, the I/O engine, and the swap store on NVMe."""

from offload.storage.host_pool import HostBuffer, HostPool, HostPoolStats
from offload.storage.io_engine import IoEngine, IoHandle
from offload.storage.swap_store import SwapFile, SwapStore, clean_stale_runs

__all__ = ["HostBuffer", "HostPool", "HostPoolStats", "IoEngine", "IoHandle", "SwapFile", "SwapStore",
           "clean_stale_runs"]
