"""Checkpoints: atomic versioned directories of safetensors files, and export to a plain weights file."""

from offload.checkpoint.exporter import export

__all__ = ["export"]
