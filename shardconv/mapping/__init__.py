"""The name-mapping layer: source names -> output tensors, checked before any byte moves.

``build_plan(source, MappingOptions(rules=..., prefer_ema=...))`` reads no values;
``MappingOptions`` (``options``) is the one model of the mapping options, shared by the
planner, the Python API and the command line. Rules are data (TOML or a list of dicts, see
``rules``), presets ship in ``presets/``; roles (``roles``) say what each tensor is to the
model. Transforms run chunk by chunk through ``assemble.Assemble``.

Layer: imports ``core``, ``sources`` (the ``Source`` contract and TF metric containers) and
below; ``sinks`` and the front ends import this package, never the reverse.
"""
from __future__ import annotations

from .options import MappingOptions
from .planner import build_plan, cast_problem
from .rules import load_preset, load_rules_file, parse_rules, preset_names

__all__ = ["MappingOptions", "build_plan", "cast_problem", "load_preset", "load_rules_file", "parse_rules",
           "preset_names"]
