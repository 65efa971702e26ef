"""Selection and a global cast, as mapping options: ``include`` / ``exclude`` (globs matched
against the names ``ls`` shows; ``*`` also matches ``/``) and ``dtype`` (every floating-point
tensor cast to it, unless a rule casts it). They come from the command line (``--include``,
``--exclude``, ``--dtype``), the Python API or a rules file's ``[options]``, and are recorded
with the plan's other options (resume, verify)."""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from ..frontend import option
from ..util.dtypes import NUMPY_DTYPES

FLOAT_DTYPES = tuple(sorted(d for d in NUMPY_DTYPES if d.startswith(("float", "bfloat"))))


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def check_options(opts: dict[str, Any]) -> list[str]:
    """Problems with ``include``, ``exclude`` and ``dtype`` in ``opts`` (normalizing a lone glob to a list)."""
    problems = []
    for k in ("include", "exclude"):
        v = opts.get(k)
        if isinstance(v, str):
            opts[k] = [v]
        elif v is not None and not (isinstance(v, (list, tuple)) and all(isinstance(g, str) for g in v)):
            problems.append(f"{k} must be a glob or a list of globs, got {v!r}")
        elif v is not None:
            opts[k] = list(v)
    d = opts.get("dtype")
    if d is not None and not is_float(d):
        problems.append(f"dtype {d!r} is not a floating-point dtype (known: {', '.join(FLOAT_DTYPES)})")
    return problems


def select(items: list, opts: dict[str, Any], dropped: list[tuple[str, str]]) -> list:
    """``items`` (with ``.name`` and ``.src.dtype``) an include glob matches (when there are any) and
    no exclude glob does; the others join ``dropped``. Floating-point items kept get ``.cast``."""
    include, exclude = opts.get("include") or [], opts.get("exclude") or []
    if not include and not exclude:  # no globs (the default): every item stays, with no pattern tried
        if opts.get("dtype"):
            for it in items:
                if is_float(it.src.dtype):
                    it.cast = opts["dtype"]
        return list(items)
    keep = []
    for it in items:
        hit = next((g for g in exclude if fnmatchcase(it.name, g)), None)
        if include and not any(fnmatchcase(it.name, g) for g in include):
            dropped.append((it.name, f"matches no {option('include')} pattern"))
        elif hit is not None:
            dropped.append((it.name, f"excluded by {option('exclude', hit)}"))
        else:
            if opts.get("dtype") and is_float(it.src.dtype):
                it.cast = opts["dtype"]
            keep.append(it)
    return keep
