"""The name-mapping layer: source names -> output tensors, checked before any byte moves.

``build_plan(source, MappingOptions(rules=..., prefer_ema=...))`` reads no values;
``MappingOptions`` (``options``) is the one model of the mapping options, shared by the
planner, the Python API and the command line. Rules are data (TOML or a list of dicts, see
``rules``), presets ship in ``presets/``; roles (``roles``) say what each tensor is to the
model. Transforms run chunk by chunk through ``assemble.Assemble``.

Layer: imports ``core``, ``sources`` (the ``Source`` contract and TF metric containers) and
below; ``sinks`` and the front ends import this package, never the reverse.

The names below are imported on first use (PEP 562): ``shardconv ls`` imports ``mapping.roles``
alone, and the planner brings NumPy (through ``assemble``), which a listing does not need.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .options import MappingOptions
    from .planner import build_plan, cast_problem
    from .rules import load_preset, load_rules_file, parse_rules, preset_names

__all__ = ["MappingOptions", "build_plan", "cast_problem", "load_preset", "load_rules_file", "parse_rules",
           "preset_names"]

_HOMES = {"MappingOptions": "options", "build_plan": "planner", "cast_problem": "planner", "load_preset": "rules",
          "load_rules_file": "rules", "parse_rules": "rules", "preset_names": "rules"}


def __getattr__(name: str) -> Any:
    """``name`` from the submodule that defines it, imported now."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{home}", __name__), name)
