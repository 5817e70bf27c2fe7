"""The training engine: model wrapping, gradient streaming and the offloaded optimizer step."""

from offload.engine.engine import Engine
from offload.engine.types import EngineStats, StepInfo

__all__ = ["Engine", "EngineStats", "StepInfo"]
