"""Sinks: one module per output format, chosen by ``--to`` or the destination's suffix."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from ..errors import UsageError


def __getattr__(name: str) -> Any:
    """``Sink`` on first use: the registry below is read by ``shardconv --help``, which imports no NumPy."""
    if name == "Sink":
        from .base import Sink

        return Sink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: format name -> (module, class, destination suffixes)
REGISTRY: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "npz": (".npz", "NpzSink", (".npz",)),
    "safetensors": (".safetensors", "SafetensorsSink", (".safetensors",)),
    "savedmodel": (".savedmodel", "SavedModelSink", ()),
    "tf-checkpoint": (".savedmodel", "TFCheckpointSink", ()),
    "zarr": (".zarr", "ZarrSink", (".zarr",)),
}


def sink_for(dest: str | Path, to: str | None = None, **options: Any) -> Sink:
    if to is None:
        suffix = Path(dest).suffix.lower()
        matches = [name for name, (_, _, sfx) in REGISTRY.items() if suffix in sfx]
        if not matches:
            raise UsageError(f"{dest}: cannot tell the output format from the suffix {suffix!r}; "
                             f"pass --to ({', '.join(REGISTRY)})")
        to = matches[0]
    if to not in REGISTRY:
        raise UsageError(f"unknown output format {to!r} (known: {', '.join(REGISTRY)})")
    module, cls, _ = REGISTRY[to]
    factory = getattr(importlib.import_module(module, __name__), cls)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        raise UsageError(f"output format {to!r} does not take the option(s) {', '.join(sorted(options))}") from None
    return factory(**options)


__all__ = ["Sink", "sink_for", "REGISTRY"]
