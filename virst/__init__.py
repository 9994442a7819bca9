"""VIRST reference implementation: exact PyTorch modules, pipeline and CLI."""

from virst.config import VirstConfig, preset
from virst.errors import VirstError

__all__ = ["VirstConfig", "VirstError", "preset"]
