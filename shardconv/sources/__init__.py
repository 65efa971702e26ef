"""Sources: one module per input format, chosen by probing what the user points at.

Format modules are imported only when probed or used, so heavy libraries
(JAX, TensorStore) load only for the formats that need them.
"""
from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any

from ..errors import SourceError, UsageError
from .base import Segment, Source, TensorInfo, Unit

#: (format name, module, probe function, class). Probes must be cheap and never raise.
REGISTRY: list[tuple[str, str, str, str]] = [
    ("npz-split", ".npz", "is_split_npz", "SplitNpzSource"),
    ("npz", ".npz", "is_npz", "NpzSource"),
    ("safetensors-split", ".safetensors", "is_split_safetensors", "SplitSafetensorsSource"),
    ("safetensors", ".safetensors", "is_safetensors", "SafetensorsSource"),
    ("tf", ".tf_bundle", "is_tf_bundle", "TFBundleSource"),
    ("zarr", ".zarr", "is_zarr", "ZarrSource"),
    ("orbax", ".orbax", "is_orbax", "OrbaxSource"),
    ("t5x", ".orbax", "is_t5x", "T5xSource"),  # before flax-msgpack: a t5x ``checkpoint`` file is msgpack too
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
    raise SourceError(f"{src}: not a checkpoint shardconv can read (tried: {', '.join(names)})")


__all__ = ["Segment", "Source", "TensorInfo", "Unit", "open_source", "REGISTRY"]
