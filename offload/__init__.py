"""offload: train models larger than GPU memory on one machine.

Parameter and optimizer state live in host RAM or on NVMe; a native SIMD Adam updates the fp32 state on the
CPU. See README.md for the concepts and the configuration reference.
"""

from offload.checkpoint import export
from offload.config import Config, IOConfig
from offload.engine import Engine, EngineStats, StepInfo
from offload.engine.hf_save import save_pretrained
from offload.engine.pretrained import load_pretrained
from offload.errors import CheckpointError, ConfigError, MemoryBudgetError, OffloadedWeightError
from offload.layout.meta_init import init_empty
from offload.optim.cpu_adam import CPUAdam
from offload.timeline import Timeline

__all__ = ["CPUAdam", "CheckpointError", "Config", "ConfigError", "Engine", "EngineStats", "IOConfig", "MemoryBudgetError",
           "OffloadedWeightError", "StepInfo", "Timeline", "__version__", "export", "init_empty", "load_pretrained",
           "save_pretrained"]
__version__ = "0.1.0"
