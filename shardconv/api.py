"""The Python API; the CLI is a thin layer over these functions (``verify`` is in ``shardconv.verify``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .core import engine
from .core.plan import Plan
from .core.types import TensorInfo
from .errors import DestinationError
from .frontend import DEFAULT_MAX_MEMORY
from .progress import ProgressArg
from .sinks import require, sink_for
from .sources import Source, open_source
from .util.units import parse_size

__all__ = ["DEFAULT_MAX_MEMORY", "convert", "list_tensors", "make_plan", "plan"]


def step_option(step: int | None) -> dict[str, Any]:
    """``open_source``'s keyword for ``step``: none when it is None (the latest step).

    Returns: a dict for ``**``. Raises: nothing."""
    return {} if step is None else {"step": step}


def list_tensors(src: Any, **source_options: Any) -> list[TensorInfo]:
    """Every tensor of a checkpoint (name, dtype, shape, bytes), reading no values."""
    with open_source(src, **source_options) as s:
        return s.tensors()


def make_plan(source: Source, rules: str | os.PathLike | list[dict[str, Any]] | None = None, *,
              preset: str | None = None, prefer_ema: bool | None = None, drop_optimizer: bool | None = None,
              allow_unmapped: bool | None = None, names: str | None = None,
              include: str | list[str] | None = None, exclude: str | list[str] | None = None,
              dtype: str | None = None) -> Plan:
    """The plan for ``source``: names and roles, EMA/optimizer switches, selection, then rules.

    ``rules`` is a TOML file path or a list of rule dicts; ``preset`` names a shipped
    rule set (its rules come first). Explicit switches override a rule file's [options].
    ``include`` / ``exclude``: globs (``*`` also matches ``/``) on the names ``list_tensors``
    and ``shardconv ls`` show, keeping only names an include matches and no exclude does;
    ``dtype``: cast every floating-point tensor no rule casts (e.g. ``"bfloat16"``).
    """
    from .mapping import build_plan, load_preset, load_rules_file

    rule_list: list[dict[str, Any]] = []
    options: dict[str, Any] = {}
    origins: dict[str, str] = {}  # where each option of a preset or rules file came from, for messages
    if preset:
        r, o = load_preset(preset)
        rule_list += r
        options.update(o)
        origins.update(dict.fromkeys(o, f"preset {preset}"))
    if isinstance(rules, (str, os.PathLike)):
        r, o = load_rules_file(Path(rules))
        rule_list += r
        options.update(o)
        origins.update(dict.fromkeys(o, f"rules file {os.path.basename(rules)}"))
    elif rules:
        rule_list += list(rules)
    return build_plan(source, rule_list or None, options=options, origins=origins, prefer_ema=prefer_ema,
                      drop_optimizer=drop_optimizer, allow_unmapped=allow_unmapped, names=names,
                      include=include, exclude=exclude, dtype=dtype)


def plan(src: Any, *, step: int | None = None, **mapping: Any) -> Plan:
    """The plan a conversion would follow; reads no tensor values.

    Returns: the Plan (its source closed: the plan describes, it does not convert). Raises:
    UsageError, SourceError, FormatError, PlanError."""
    with open_source(src, **step_option(step)) as source:
        return make_plan(source, **mapping)


def convert(src: Any, dest: str | os.PathLike, *, to: str | None = None, max_memory: str | int = DEFAULT_MAX_MEMORY,
            overwrite: bool = False, restart: bool = False, fsync: bool = True, progress: ProgressArg = False,
            step: int | None = None, sink_options: dict[str, Any] | None = None,
            **mapping: Any) -> engine.Result:
    """Convert a checkpoint to ``dest`` within ``max_memory``; resumes an interrupted run.

    ``progress``: ``True`` draws a bar (a widget in a notebook), a callable is called as
    ``progress(done_bytes, total_bytes)`` as the output is written.

    Mapping arguments (``rules``, ``preset``, ``prefer_ema``, ``drop_optimizer``,
    ``allow_unmapped``, ``names``, ``include``, ``exclude``, ``dtype``) are those of ``make_plan``.
    """
    with open_source(src, **step_option(step)) as source:
        plan = make_plan(source, **mapping)
        sink = sink_for(dest, to, **(sink_options or {}))
        require(sink.name)
        plan = plan.leave_out(sink.leave_out)
        created = _make_parents(dest)
        try:
            return engine.run(plan, sink, dest, max_memory=parse_size(max_memory), overwrite=overwrite,
                              restart=restart, fsync=fsync, progress=progress)
        except BaseException:
            _remove_empty(created)  # refused or failed before anything was left in them
            raise


def _make_parents(dest: str | os.PathLike) -> list[Path]:
    """Create the missing parent directories of a local ``dest`` (``mkdir -p``, as a TF
    Serving ``models/NAME/`` needs); return those created, deepest first."""
    from .formats import tsio

    if tsio.is_remote(dest):
        return []
    missing = []
    p = tsio.local_path(dest).parent
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue
        except OSError as e:
            _remove_empty(missing)
            raise DestinationError(f"{d}: cannot create the destination's directory: {e.strerror}") from None
    return missing


def _remove_empty(dirs: list[Path]) -> None:
    """Remove ``dirs`` (deepest first) while they are empty."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            return
