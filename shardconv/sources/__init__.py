"""Sources: one module per input format, chosen by probing what the user points at.

Format modules are imported only when probed or used, so heavy libraries
(JAX, TensorStore) load only for the formats that need them.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from ..errors import SourceError
from .base import Segment, Source, TensorInfo, Unit

#: (format name, module, probe function, class). Probes must be cheap and never raise.
REGISTRY: list[tuple[str, str, str, str]] = [
    ("npz", ".npz", "is_npz", "NpzSource"),
    ("tf", ".tf_bundle", "is_tf_bundle", "TFBundleSource"),
    ("zarr", ".zarr", "is_zarr", "ZarrSource"),
    ("flax-msgpack", ".flax_msgpack", "is_flax_msgpack", "FlaxMsgpackSource"),
]


def _load(module: str, attr: str) -> Any:
    return getattr(importlib.import_module(module, __name__), attr)


def open_source(src: Any, *, format: str | None = None, **options: Any) -> Source:
    """Open a checkpoint path (or an in-memory object, where a format supports it)."""
    if isinstance(src, Source):
        return src
    names = [r[0] for r in REGISTRY]
    if format is not None:
        for name, module, _, cls in REGISTRY:
            if name == format:
                return _load(module, cls)(src, **options)
        raise SourceError(f"unknown source format {format!r} (known: {', '.join(names)})")
    if isinstance(src, (str, os.PathLike)) and "://" not in os.fspath(src):  # URLs: probed below
        p = Path(src)
        if not p.exists() and not Path(str(p) + ".index").exists():
            raise SourceError(f"{p}: no such file or directory")
    for name, module, probe, cls in REGISTRY:
        try:
            hit = _load(module, probe)(src)
        except Exception:
            hit = False
        if hit:
            return _load(module, cls)(src, **options)
    raise SourceError(f"{src}: not a checkpoint shardconv can read (tried: {', '.join(names)})")


__all__ = ["Segment", "Source", "TensorInfo", "Unit", "open_source", "REGISTRY"]
