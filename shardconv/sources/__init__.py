"""Sources: one module per input format, chosen by probing what the user points at.

Format modules are imported only when probed or used, so heavy libraries
(JAX, TensorStore) load only for the formats that need them.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from ..core.types import Segment, TensorInfo, Unit
from ..errors import SourceError, UsageError
from ..frontend import option_name
from .base import Source


class Format(NamedTuple):
    """A source format: its name, the module of its class, and its probe (a function of
    ``probe_module``: ``probes`` for all but TF, so probing imports no reader)."""

    name: str
    module: str
    probe_module: str
    probe: str
    cls: str


#: Every source format. Probes look at content, are cheap, never raise, and claim disjoint
#: inputs (tests/test_probes.py checks both), so the order here decides nothing.
REGISTRY: list[Format] = [
    Format("npz-split", ".npz", ".probes", "is_split_npz", "SplitNpzSource"),
    Format("npz", ".npz", ".probes", "is_npz", "NpzSource"),
    Format("safetensors-split", ".safetensors", ".probes", "is_split_safetensors", "SplitSafetensorsSource"),
    Format("safetensors", ".safetensors", ".probes", "is_safetensors", "SafetensorsSource"),
    Format("tf", ".tf_bundle", ".tf_bundle", "is_tf_bundle", "TFBundleSource"),
    Format("zarr", ".zarr", ".probes", "is_zarr", "ZarrSource"),
    Format("orbax", ".orbax", ".probes", "is_orbax", "OrbaxSource"),
    Format("t5x", ".t5x", ".probes", "is_t5x", "T5xSource"),
    Format("flax-msgpack", ".flax_msgpack", ".probes", "is_flax_msgpack", "FlaxMsgpackSource"),
    Format("jax-tree", ".jax_tree", ".probes", "is_pytree", "JaxTreeSource"),
]

#: Formats whose probes take in-memory objects (not paths); only these are probed for them.
OBJECT_FORMATS: tuple[str, ...] = ("jax-tree",)


def _load(module: str, attr: str) -> Any:
    return getattr(importlib.import_module(module, __name__), attr)


def _instantiate(name: str, module: str, cls: str, src: Any, options: dict[str, Any]) -> Source:
    """``cls(src, **options)``, refusing options the format does not take (e.g. ``--step``
    on a single-file format) with a message instead of a TypeError."""
    klass = _load(module, cls)
    params = inspect.signature(klass.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in options if k not in params]
        if unknown:
            flags = ", ".join(option_name(k) for k in unknown)
            raise UsageError(f"{src}: {flags} does not apply to a {name} checkpoint")
    return klass(src, **options)


def detect(src: Any) -> list[str]:
    """The formats whose probes claim ``src`` (one for any checkpoint; none for anything else).

    Returns: format names in REGISTRY order. Raises: nothing (probes never raise)."""
    in_memory = not isinstance(src, (str, bytes, os.PathLike))
    return [f.name for f in REGISTRY
            if (f.name in OBJECT_FORMATS) == in_memory and _load(f.probe_module, f.probe)(src)]


def open_source(src: Any, *, format: str | None = None, step: int | None = None, **options: Any) -> Source:
    """Open a checkpoint path (or an in-memory object, where a format supports it).

    ``step``: the step of a directory of several (None: the latest); other ``options`` go to
    the format's class (``item``, ``allow_missing_chunks``); None values count as not given.

    Returns: the open Source (close it, or use it as a context manager). Raises: SourceError
    (nothing readable there, or two formats claim it), UsageError (an option the format does
    not take), and what the format's class raises on opening."""
    if isinstance(src, Source):
        return src
    options = {k: v for k, v in {"step": step, **options}.items() if v is not None}
    if format is not None:
        for f in REGISTRY:
            if f.name == format:
                return _instantiate(f.name, f.module, f.cls, src, options)
        raise SourceError(f"unknown source format {format!r} (known: {', '.join(f.name for f in REGISTRY)})")
    if isinstance(src, (str, os.PathLike)) and "://" not in os.fspath(src):  # URLs: probed below
        p = Path(src)
        if not p.exists() and not Path(str(p) + ".index").exists():
            raise SourceError(f"{p}: no such file or directory")
    found = detect(src)
    if len(found) > 1:
        raise SourceError(f"{src}: could be any of {', '.join(found)}; say which with format=")
    if found:
        f = next(f for f in REGISTRY if f.name == found[0])
        return _instantiate(f.name, f.module, f.cls, src, options)
    if isinstance(src, (str, os.PathLike)) and "://" not in os.fspath(src) and Path(src).is_dir():
        _refuse_parent_of_checkpoints(Path(src))
    raise SourceError(f"{src}: not a checkpoint shardconv can read (tried: {', '.join(f.name for f in REGISTRY)})")


def _is_checkpoint(path: Path) -> bool:
    """True if any path format's probe takes ``path``."""
    return bool(detect(path))


def _refuse_parent_of_checkpoints(p: Path, limit: int = 200) -> None:
    """A directory that is no checkpoint but holds checkpoint directories (``runs/a``,
    ``runs/b``; SavedModel versions ``1/``, ``2/``): an error listing them, saying which to pass."""
    try:
        children = sorted(c for c in p.iterdir() if c.is_dir())[:limit]
    except OSError:
        return
    found = [c.name for c in children if _is_checkpoint(c)]
    if not found:
        return
    found.sort(key=lambda n: (0, int(n), n) if n.isdigit() else (1, 0, n))
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    newest = " (the newest)" if all(n.isdigit() for n in found) else ""
    raise SourceError(f"{p}: not a checkpoint itself but holds {len(found)} checkpoint "
                      f"director{'y' if len(found) == 1 else 'ies'} ({shown}); pass one of them, "
                      f"e.g. {p / found[-1]}{newest}")


def resolution_note(src: Any, source: Source, step: int | None = None) -> str | None:
    """One line saying which step a directory (or TF's ``checkpoint`` state file) opened,
    for the CLI to print; None where ``src`` names the checkpoint itself or ``step`` chose it."""
    if step is not None or not isinstance(src, (str, os.PathLike)) or "://" in os.fspath(src):
        return None
    given = Path(os.path.abspath(src))
    if not (given.is_dir() or given.name == "checkpoint"):
        return None
    base = given if given.is_dir() else given.parent
    try:
        parts = Path(os.path.abspath(source.location)).relative_to(base).parts
    except ValueError:
        return None
    m = re.search(r"(?:^|[-_])(\d+)$", parts[0]) if parts else None
    if m is None:
        return None
    shown = (Path(src) if given.is_dir() else Path(src).parent) / parts[0]
    return f"{src}: opened step {int(m.group(1))} ({shown}); --step N opens another"


__all__ = ["REGISTRY", "Format", "Segment", "Source", "TensorInfo", "Unit", "detect", "open_source", "resolution_note"]
