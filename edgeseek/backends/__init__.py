"""Implementations of the seam in models/backend.py: what a forward pass asks of the hardware."""
from .cpu import CPUBackend

__all__ = ["CPUBackend"]
