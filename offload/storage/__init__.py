"""Where offloaded state lives: the bounded host pool (and, next, the NVMe swap store)."""

from offload.storage.host_pool import HostBuffer, HostPool, HostPoolStats
from offload.storage.io_engine import IoEngine, IoHandle

__all__ = ["HostBuffer", "HostPool", "HostPoolStats", "IoEngine", "IoHandle"]
