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
from collections.abc import Callable
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


def _rename(r: Rule, v: Any, where: str, problems: list[str]) -> None:
    if not isinstance(v, str):
        problems.append(f"{where}: 'rename' must be a string")
        return
    r.rename = v
    try:
        _check_template(r.pattern, v)
    except (re.error, IndexError) as e:
        problems.append(f"{where}: bad rename template {v!r}: {e}")


def _cast(r: Rule, v: Any, where: str, problems: list[str]) -> None:
    if v not in NUMPY_DTYPES:
        problems.append(f"{where}: unknown cast dtype {v!r} (known: {', '.join(sorted(NUMPY_DTYPES))})")
    else:
        r.cast = v


def _transpose(r: Rule, v: Any, where: str, problems: list[str]) -> None:
    if not _int_list(v) or sorted(v) != list(range(len(v))):
        problems.append(f"{where}: 'transpose' must be a permutation like [1, 0], got {v!r}")
    else:
        r.transpose = tuple(v)


def _reshape(r: Rule, v: Any, where: str, problems: list[str]) -> None:
    if not _int_list(v) or sum(1 for x in v if x == -1) > 1 or any(x < -1 for x in v):
        problems.append(f"{where}: 'reshape' must be a list of sizes with at most one -1, got {v!r}")
    else:
        r.reshape = tuple(v)


def _group(r: Rule, k: str, spec: dict[str, Any], axis: int, where: str, problems: list[str]) -> None:
    """``stack``/``concat``: several inputs into one at positions the ``index`` template gives."""
    r.group, r.group_axis, r.group_index = k, axis, spec.get("index")
    if not isinstance(r.group_index, str):
        problems.append(f"{where}: '{k}.index' must be a template (e.g. '\\\\1') giving each input's position")
    if r.rename is None:
        problems.append(f"{where}: '{k}' needs 'rename' (the name of the combined tensor)")


def _split(r: Rule, k: str, spec: dict[str, Any], axis: int, where: str, problems: list[str]) -> None:
    """``split``: one input into named parts of the given sizes along ``axis``."""
    sizes, names = spec.get("sizes"), spec.get("names")
    if not _int_list(sizes) or not sizes or any(s <= 0 for s in sizes):
        problems.append(f"{where}: 'split.sizes' must be a list of positive sizes")
    elif not isinstance(names, list) or len(names) != len(sizes) or not all(isinstance(n, str) for n in names):
        problems.append(f"{where}: 'split.names' must list one name per size")
    else:
        r.split = {"axis": axis, "sizes": list(sizes), "names": list(names)}


def _unstack(r: Rule, k: str, spec: dict[str, Any], axis: int, where: str, problems: list[str]) -> None:
    r.unstack_axis = axis


#: Per-key validators of a rule's transforms, in the order their problems are reported; each
#: sets its field of the Rule or appends a problem.
_TRANSFORMS: dict[str, Callable[[Rule, Any, str, list[str]], None]] = {
    "rename": _rename, "cast": _cast, "transpose": _transpose, "reshape": _reshape}
#: The structural transforms (at most one per rule), validated after the others.
_STRUCTURAL: dict[str, Callable[[Rule, str, dict[str, Any], int, str, list[str]], None]] = {
    "stack": _group, "concat": _group, "split": _split, "unstack": _unstack}


def _structural(r: Rule, raw: dict[str, Any], where: str, problems: list[str]) -> None:
    """The one stack/concat/split/unstack of a rule, if any: a table with an integer ``axis``."""
    found = [k for k in _STRUCTURAL if k in raw]
    if len(found) > 1:
        problems.append(f"{where}: only one of stack/concat/split/unstack per rule, got {found}")
        return
    if not found:
        return
    k = found[0]
    spec = raw[k]
    if isinstance(spec, bool) and spec and k in ("stack", "unstack"):
        spec = {}
    if not isinstance(spec, dict):
        problems.append(f"{where}: '{k}' must be a table like {{axis = 0, ...}}")
        return
    axis = spec.get("axis", 0)
    if not isinstance(axis, int) or isinstance(axis, bool):
        problems.append(f"{where}: '{k}.axis' must be an integer")
        axis = 0
    _STRUCTURAL[k](r, k, spec, axis, where, problems)


def _parse_rule(i: int, raw: Any, problems: list[str]) -> Rule | None:
    """Rule ``i`` from its dict, or None when it cannot be used at all (problems say why)."""
    where = f"rule {i}"
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a table/dict, got {type(raw).__name__}")
        return None
    unknown = set(raw) - KEYS
    if unknown:
        problems.append(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(KEYS - {'note'})})")
    if "match" not in raw or not isinstance(raw["match"], str):
        problems.append(f"{where}: needs a 'match' regex string")
        return None
    try:
        r = Rule(i, re.compile(raw["match"]), raw=raw)
    except re.error as e:
        problems.append(f"{where}: invalid regex {raw['match']!r}: {e}")
        return None
    if raw.get("drop"):
        extra = set(raw) - {"match", "drop", "note"}
        if extra:
            problems.append(f"{r.label}: 'drop' cannot be combined with {sorted(extra)}")
        r.drop = True
        return r
    for key, check in _TRANSFORMS.items():
        if key in raw:
            check(r, raw[key], r.label, problems)
    _structural(r, raw, r.label, problems)
    return r


def parse_rules(rules: list[dict[str, Any]] | None, options: dict[str, Any] | None = None) -> RuleSet:
    """Validate rule dicts and a rules file's ``[options]``.

    Returns: the RuleSet. Raises: PlanError listing every problem at once."""
    problems: list[str] = []
    out = [r for i, raw in enumerate(rules or [], start=1) if (r := _parse_rule(i, raw, problems)) is not None]
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
        import tomli as tomllib  # type: ignore[no-redef, unused-ignore]

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
