"""The name-mapping layer: source names -> output tensors, checked before any byte moves.

``build_plan(source, rules, prefer_ema=..., drop_optimizer=...)`` reads no values;
rules are data (TOML or a list of dicts, see ``rules``), presets ship in
``presets/``. Transforms run chunk by chunk through ``assemble.Assemble``.
"""
from __future__ import annotations

from .planner import build_plan, cast_problem
from .rules import load_preset, load_rules_file, parse_rules, preset_names

__all__ = ["build_plan", "cast_problem", "load_preset", "load_rules_file", "parse_rules", "preset_names"]
