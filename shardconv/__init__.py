"""shardconv: convert large checkpoints between formats without holding the model in memory.

Pipeline: source (reads regions) -> plan (names, transforms) -> engine (budget,
journal) -> sink (writes chunks). TensorFlow, JAX and TensorStore are imported
only by the modules that need them, when they are used.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .api import convert, list_tensors, open_source, verify  # noqa: E402

__all__ = ["convert", "list_tensors", "open_source", "verify", "__version__"]
