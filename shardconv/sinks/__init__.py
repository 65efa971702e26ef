"""Sinks: one module per output format, chosen by ``--to`` or the destination's suffix."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MissingDependencyError, UsageError
from ..frontend import option_name

if TYPE_CHECKING:
    from .base import Sink


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
    "tf-checkpoint": (".tf_checkpoint", "tf_checkpoint_sink", ()),
    "zarr": (".zarr", "ZarrSink", (".zarr",)),
}

_TF = ("tensorflow", "tf", "TensorFlow output (--to savedmodel / tf-checkpoint)")
#: format name -> (module, extra, what): the optional library a format writes with. ``plan`` and
#: ``convert`` check it is installed (``require``) before anything is written.
REQUIRES: dict[str, tuple[str, str, str]] = {
    "savedmodel": _TF,
    "zarr": ("tensorstore", "zarr", "Zarr output"),
}


def require(to: str) -> None:
    """Raise MissingDependencyError (one line with the ``pip install`` to run) if the library
    output format ``to`` writes with is not installed. Imports nothing."""
    if to not in REQUIRES:
        return
    module, extra, what = REQUIRES[to]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependencyError(module, extra, what)


def sink_for(dest: str | Path, to: str | None = None, **options: Any) -> Sink:
    if to is None:
        suffix = Path(dest).suffix.lower()
        matches = [name for name, (_, _, sfx) in REGISTRY.items() if suffix in sfx]
        if not matches:
            raise UsageError(f"{dest}: cannot tell the output format from the suffix {suffix!r}; "
                             f"pass {option_name('to')} ({', '.join(REGISTRY)})")
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


__all__ = ["Sink", "sink_for", "require", "REGISTRY", "REQUIRES"]
