"""The mapping options, one model for the planner, the Python API and the command line.

``MappingOptions`` holds what the user gave (None: not given); ``resolve`` loads the preset
and the rules file it names and merges their ``[options]`` under the explicit ones, keeping
where each value came from for messages (``preset keras-ema``, ``--drop-optimizer``).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..frontend import MAPPING_OPTIONS, option

#: Values of the switches no one gave.
DEFAULTS: dict[str, Any] = {"prefer_ema": False, "drop_optimizer": False, "allow_unmapped": False, "names": "model"}

RulesArg = str | os.PathLike[str] | list[dict[str, Any]] | None


@dataclass(frozen=True)
class MappingOptions:
    """The mapping options as given; None means not given (a rules file's ``[options]`` or the
    default applies). Field names are ``frontend.MAPPING_OPTIONS``, the keyword arguments of
    ``shardconv.convert``/``plan``/``verify`` and, with dashes, the command-line flags."""

    rules: RulesArg = None                       # a TOML file, or a list of rule dicts
    preset: str | None = None                    # a shipped rule set (its rules come first)
    prefer_ema: bool | None = None
    drop_optimizer: bool | None = None
    allow_unmapped: bool | None = None
    names: str | None = None                     # "model" or "keys"
    include: str | list[str] | None = None       # globs on the names ``ls`` shows
    exclude: str | list[str] | None = None
    dtype: str | None = None                     # cast every floating-point tensor no rule casts

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MappingOptions:
        """From keyword arguments or an ``argparse`` namespace's ``vars``; keys that are not
        mapping options are refused, None values count as not given.

        Raises: UsageError naming the unknown options."""
        unknown = sorted(k for k in values if k not in MAPPING_OPTIONS)
        if unknown:
            raise UsageError(f"unknown mapping option(s) {', '.join(unknown)} (known: {', '.join(MAPPING_OPTIONS)})")
        return cls(**{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_args(cls, args: Any) -> MappingOptions:
        """From a parsed command line: each option's attribute, missing ones not given."""
        return cls(**{k: getattr(args, k, None) for k in MAPPING_OPTIONS})

    def given(self) -> dict[str, Any]:
        """The options given (not None), by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class Resolved:
    """The rules and the option values a plan is built with: each switch from the explicit
    options, else the rules' ``[options]``, else ``DEFAULTS``."""

    rules: list[dict[str, Any]] = field(default_factory=list)
    file_options: dict[str, Any] = field(default_factory=dict)   # [options] of preset and rules file
    overrides: dict[str, Any] = field(default_factory=dict)      # given explicitly
    origins: dict[str, str] = field(default_factory=dict)        # option -> where it came from

    def by(self, name: str) -> str:
        """How to name option ``name`` in a message: as given, or its source."""
        return self.origins.get(name, option(name))


def resolve(opts: MappingOptions) -> Resolved:
    """Load ``opts``' preset and rules file; explicit switches override their ``[options]``.

    Raises: UsageError (unknown preset), FormatError (a rules file that is not valid TOML)."""
    from .rules import load_preset, load_rules_file

    out = Resolved()
    if opts.preset:
        r, o = load_preset(opts.preset)
        _add(out, r, o, f"preset {opts.preset}")
    if isinstance(opts.rules, (str, os.PathLike)):
        r, o = load_rules_file(Path(opts.rules))
        _add(out, r, o, f"rules file {os.path.basename(opts.rules)}")
    elif opts.rules:
        out.rules += list(opts.rules)
    out.overrides = {k: v for k, v in opts.given().items() if k not in ("rules", "preset")}
    out.origins.update({k: option(k, v) for k, v in out.overrides.items()})
    return out


def _add(out: Resolved, rules: list[dict[str, Any]], options: dict[str, Any], origin: str) -> None:
    out.rules += rules
    out.file_options.update(options)
    out.origins.update(dict.fromkeys(options, origin))
