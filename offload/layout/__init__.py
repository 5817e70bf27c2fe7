"""How parameters are grouped and laid out in flat buffers."""

from offload.layout.flat_group import FlatGroup, Slot, build_flat_group
from offload.layout.partition import ModelPartition, ParamGroupSpec, partition_model

__all__ = ["FlatGroup", "ModelPartition", "ParamGroupSpec", "Slot", "build_flat_group", "partition_model"]
