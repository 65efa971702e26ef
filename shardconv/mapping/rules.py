"""Mapping rules as data: a TOML file or a Python list of dicts, applied in order.

Each rule has ``match`` (a regex that must match the whole current name) and at
most one action: ``drop = true``; or a rename (``rename``, a ``re`` template with
``\\1`` / ``\\g<name>``) with optional per-tensor transforms ``reshape``,
``transpose`` (a permutation), one of ``stack``/``concat`` (several inputs into
one; ``{axis, index}`` where ``index`` is a template giving each input's
position) or ``split``/``unstack`` (one input into several), and ``cast``. The
first rule that matches a name decides it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PlanError, UsageError
from ..frontend import MAPPING_OPTIONS, option_name
from ..util.dtypes import NUMPY_DTYPES

KEYS = {"match", "rename", "drop", "cast", "transpose", "reshape", "stack", "concat", "split", "unstack", "note"}
OPTION_KEYS = set(MAPPING_OPTIONS) - {"rules", "preset"}


@dataclass
class Rule:
    index: int
    pattern: re.Pattern
    rename: str | None = None
    drop: bool = False
    cast: str | None = None
    transpose: tuple[int, ...] | None = None
    reshape: tuple[int, ...] | None = None
    group: str | None = None          # "stack" or "concat"
    group_axis: int = 0
    group_index: str | None = None
    split: dict[str, Any] | None = None   # {"axis", "sizes", "names"}
    unstack_axis: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"rule {self.index} (match {self.pattern.pattern!r})"


@dataclass
class RuleSet:
    rules: list[Rule]
    options: dict[str, Any]

    def first_match(self, name: str) -> tuple[Rule, re.Match] | None:
        for r in self.rules:
            m = r.pattern.fullmatch(name)
            if m:
                return r, m
        return None


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def parse_rules(rules: list[dict[str, Any]] | None, options: dict[str, Any] | None = None) -> RuleSet:
    """Validate rule dicts; every problem is reported at once (PlanError)."""
    problems: list[str] = []
    out: list[Rule] = []
    for i, raw in enumerate(rules or [], start=1):
        where = f"rule {i}"
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a table/dict, got {type(raw).__name__}")
            continue
        unknown = set(raw) - KEYS
        if unknown:
            problems.append(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(KEYS - {'note'})})")
        if "match" not in raw or not isinstance(raw["match"], str):
            problems.append(f"{where}: needs a 'match' regex string")
            continue
        try:
            pattern = re.compile(raw["match"])
        except re.error as e:
            problems.append(f"{where}: invalid regex {raw['match']!r}: {e}")
            continue
        r = Rule(i, pattern, raw=raw)
        where = r.label
        if raw.get("drop"):
            extra = set(raw) - {"match", "drop", "note"}
            if extra:
                problems.append(f"{where}: 'drop' cannot be combined with {sorted(extra)}")
            r.drop = True
            out.append(r)
            continue
        if "rename" in raw:
            if not isinstance(raw["rename"], str):
                problems.append(f"{where}: 'rename' must be a string")
            else:
                r.rename = raw["rename"]
                try:
                    _check_template(pattern, r.rename)
                except (re.error, IndexError) as e:
                    problems.append(f"{where}: bad rename template {r.rename!r}: {e}")
        if "cast" in raw:
            if raw["cast"] not in NUMPY_DTYPES:
                problems.append(f"{where}: unknown cast dtype {raw['cast']!r} (known: {', '.join(sorted(NUMPY_DTYPES))})")
            else:
                r.cast = raw["cast"]
        if "transpose" in raw:
            if not _int_list(raw["transpose"]) or sorted(raw["transpose"]) != list(range(len(raw["transpose"]))):
                problems.append(f"{where}: 'transpose' must be a permutation like [1, 0], got {raw['transpose']!r}")
            else:
                r.transpose = tuple(raw["transpose"])
        if "reshape" in raw:
            v = raw["reshape"]
            if not _int_list(v) or sum(1 for x in v if x == -1) > 1 or any(x < -1 for x in v):
                problems.append(f"{where}: 'reshape' must be a list of sizes with at most one -1, got {v!r}")
            else:
                r.reshape = tuple(v)
        structural = [k for k in ("stack", "concat", "split", "unstack") if k in raw]
        if len(structural) > 1:
            problems.append(f"{where}: only one of stack/concat/split/unstack per rule, got {structural}")
        elif structural:
            k = structural[0]
            spec = raw[k]
            if isinstance(spec, bool) and spec and k in ("stack", "unstack"):
                spec = {}
            if not isinstance(spec, dict):
                problems.append(f"{where}: '{k}' must be a table like {{axis = 0, ...}}")
            else:
                axis = spec.get("axis", 0)
                if not isinstance(axis, int) or isinstance(axis, bool):
                    problems.append(f"{where}: '{k}.axis' must be an integer")
                    axis = 0
                if k in ("stack", "concat"):
                    r.group, r.group_axis, r.group_index = k, axis, spec.get("index")
                    if not isinstance(r.group_index, str):
                        problems.append(f"{where}: '{k}.index' must be a template (e.g. '\\\\1') giving each input's position")
                    if r.rename is None:
                        problems.append(f"{where}: '{k}' needs 'rename' (the name of the combined tensor)")
                elif k == "split":
                    sizes, names = spec.get("sizes"), spec.get("names")
                    if not _int_list(sizes) or not sizes or any(s <= 0 for s in sizes):
                        problems.append(f"{where}: 'split.sizes' must be a list of positive sizes")
                    elif not isinstance(names, list) or len(names) != len(sizes) or not all(isinstance(n, str) for n in names):
                        problems.append(f"{where}: 'split.names' must list one name per size")
                    else:
                        r.split = {"axis": axis, "sizes": list(sizes), "names": list(names)}
                else:
                    r.unstack_axis = axis
        out.append(r)
    opts = dict(options or {})
    unknown = set(opts) - OPTION_KEYS
    if unknown:
        problems.append(f"options: unknown key(s) {sorted(unknown)} (known: {sorted(OPTION_KEYS)})")
    if problems:
        raise PlanError(problems)
    return RuleSet(out, opts)


def _check_template(pattern: re.Pattern, template: str) -> None:
    groups = pattern.groups
    for m in re.finditer(r"\\(\d+)|\\g<(\w+)>", template):
        ref = m.group(1) or m.group(2)
        if ref.isdigit():
            if int(ref) > groups:
                raise re.error(f"refers to group {ref} but the pattern has {groups}")
        elif ref not in pattern.groupindex:
            raise re.error(f"refers to unknown group {ref!r}")


def load_rules_file(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rules and options from a TOML file: ``[[rules]]`` tables and an optional ``[options]``."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{p}: rules file not found") from None
    except IsADirectoryError:
        raise UsageError(f"{p}: is a directory; {option_name('rules')} takes a TOML file") from None
    except OSError as e:
        raise UsageError(f"{p}: cannot read the rules file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise PlanError([f"{p}: not valid TOML: not UTF-8 ({e.reason} at byte {e.start})"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanError([f"{p}: not valid TOML: {e}"]) from None
    unknown = set(data) - {"rules", "options", "description"}
    if unknown:
        raise PlanError([f"{p}: unknown top-level key(s) {sorted(unknown)}; use [[rules]] and [options]"])
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise PlanError([f"{p}: 'rules' must be an array of tables ([[rules]])"])
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise PlanError([f"{p}: 'options' must be a table ([options])"])
    return rules, dict(options)


def _regex_char(c: str) -> str:
    if c.isascii() and (c.isalnum() or c in "_/-<>=:;,!@#%&~`\" "):
        return c
    if c in ".^$*+?{}[]\\|()":
        return "\\" + c
    if c.isprintable() and not c.isascii() and not 0xD800 <= ord(c) <= 0xDFFF:
        return c
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def rename_rule(name: str, new: str) -> str:
    """A one-line TOML rule renaming exactly ``name`` to ``new`` (a plain name), for messages:
    ``[[rules]] match = '...' rename = '...'``. The match regex escapes every character a TOML
    literal string cannot hold (quotes, control characters) as a regex escape."""
    match = "".join(map(_regex_char, name))
    return f"[[rules]] match = '{match}' rename = '{new}'"


PRESET_DIR = Path(__file__).with_name("presets")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    path = PRESET_DIR / f"{name}.toml"
    if not isinstance(name, str) or path.parent != PRESET_DIR or not path.is_file():
        raise UsageError(f"unknown preset {name!r} (known: {', '.join(preset_names())})")
    return load_rules_file(path)
