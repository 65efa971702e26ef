"""shardconv: convert large checkpoints between formats without holding the model in memory.

Pipeline: source (reads regions) -> plan (names, transforms) -> engine (budget,
journal) -> sink (writes chunks). TensorFlow, JAX and TensorStore are imported
only by the modules that need them, when they are used; the API functions below
load on first use, so ``shardconv --help`` starts without NumPy.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_ERRORS = ("ShardconvError", "UsageError", "SourceError", "SourceChangedError", "FormatError", "ChecksumError",
           "UnsupportedError", "MissingDependencyError", "DestinationError", "DurabilityError", "ResumeError",
           "PlanError", "VerifyError", "BudgetError", "WorkerError")

#: Public name -> module it lives in (imported on first access).
_EXPORTS = {"convert": ".api", "finalize": ".api", "list_tensors": ".api", "open_source": ".api", "plan": ".api", "verify": ".verification",
            "make_plan": ".api", "JaxTreeSource": ".sources.jax_tree", **dict.fromkeys(_ERRORS, ".errors")}

__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shardconv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

