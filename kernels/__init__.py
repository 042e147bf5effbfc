"""Kernels of ijepa-engine: one module per op, each with its PyTorch reference.

``kernels`` never imports ``engine``; the engine calls into these ops.
"""
from kernels.dispatch import BackendUnavailable, select  # noqa: F401
