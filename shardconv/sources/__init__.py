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
from typing import Any

from ..core.types import Segment, TensorInfo, Unit
from ..errors import SourceError, UsageError
from .base import Source

#: (format name, module, probe function, class). Probes must be cheap and never raise.
REGISTRY: list[tuple[str, str, str, str]] = [
    ("npz-split", ".npz", "is_split_npz", "SplitNpzSource"),
    ("npz", ".npz", "is_npz", "NpzSource"),
    ("safetensors-split", ".safetensors", "is_split_safetensors", "SplitSafetensorsSource"),
    ("safetensors", ".safetensors", "is_safetensors", "SafetensorsSource"),
    ("tf", ".tf_bundle", "is_tf_bundle", "TFBundleSource"),
    ("zarr", ".zarr", "is_zarr", "ZarrSource"),
    ("orbax", ".orbax", "is_orbax", "OrbaxSource"),
    ("t5x", ".t5x", "is_t5x", "T5xSource"),  # before flax-msgpack: a t5x ``checkpoint`` file is msgpack too
    ("flax-msgpack", ".flax_msgpack", "is_flax_msgpack", "FlaxMsgpackSource"),
    ("jax-tree", ".jax_tree", "is_pytree", "JaxTreeSource"),
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
            flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
            raise UsageError(f"{src}: {flags} does not apply to a {name} checkpoint")
    return klass(src, **options)


def open_source(src: Any, *, format: str | None = None, **options: Any) -> Source:
    """Open a checkpoint path (or an in-memory object, where a format supports it)."""
    if isinstance(src, Source):
        return src
    names = [r[0] for r in REGISTRY]
    if format is not None:
        for name, module, _, cls in REGISTRY:
            if name == format:
                return _instantiate(name, module, cls, src, options)
        raise SourceError(f"unknown source format {format!r} (known: {', '.join(names)})")
    if isinstance(src, (str, os.PathLike)) and "://" not in os.fspath(src):  # URLs: probed below
        p = Path(src)
        if not p.exists() and not Path(str(p) + ".index").exists():
            raise SourceError(f"{p}: no such file or directory")
    in_memory = not isinstance(src, (str, bytes, os.PathLike))
    for name, module, probe, cls in REGISTRY:
        if in_memory and name not in OBJECT_FORMATS:
            continue
        try:
            hit = _load(module, probe)(src)
        except Exception:
            hit = False
        if hit:
            return _instantiate(name, module, cls, src, options)
    if not in_memory and "://" not in os.fspath(src) and Path(src).is_dir():
        _refuse_parent_of_checkpoints(Path(src))
    raise SourceError(f"{src}: not a checkpoint shardconv can read (tried: {', '.join(names)})")


def _is_checkpoint(path: Path) -> bool:
    """True if any path format's probe takes ``path``."""
    for name, module, probe, _ in REGISTRY:
        if name in OBJECT_FORMATS:
            continue
        try:
            if _load(module, probe)(path):
                return True
        except Exception:
            continue
    return False


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


__all__ = ["Segment", "Source", "TensorInfo", "Unit", "open_source", "resolution_note", "REGISTRY"]
