"""Sinks: one module per output format, chosen by ``--to`` or the destination's suffix."""
from __future__ import annotations

import importlib
import importlib.util
import os
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


#: format name -> (module, class, destination suffixes); ``register`` adds one
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


def register(name: str, sink: type[Sink] | str, suffixes: tuple[str, ...] = ()) -> None:
    """Add output format ``name`` (``--to NAME``): ``sink`` is a Sink subclass or ``"module:Class"``;
    ``suffixes`` are destination suffixes that select it. The one line a new format needs
    (the built-in formats are lines of ``REGISTRY``).

    Returns: None. Raises: UsageError if ``name`` is taken by another sink."""
    if isinstance(sink, str):
        module, _, cls = sink.partition(":")
    else:
        module, cls = sink.__module__, sink.__qualname__
    entry = (module, cls, tuple(s.lower() for s in suffixes))
    if REGISTRY.get(name, entry) != entry:
        raise UsageError(f"output format {name!r} is already registered ({REGISTRY[name][0]})")
    REGISTRY[name] = entry


def unregister(name: str) -> None:
    """Remove output format ``name`` (for tests that register their own). Returns: None."""
    REGISTRY.pop(name, None)


def sink_class(to: str) -> Any:
    """The class (or factory) registered for output format ``to``, its module imported.

    Returns: a Sink subclass or factory. Raises: UsageError for an unknown format."""
    if to not in REGISTRY:
        raise UsageError(f"unknown output format {to!r} (known: {', '.join(REGISTRY)})")
    module, cls, _ = REGISTRY[to]
    return getattr(importlib.import_module(module, __name__), cls)


def format_for(dest: Any, to: str | None = None) -> str:
    """The output format ``to`` names, or else the one ``dest``'s suffix selects.

    Returns: a registered format name. Raises: UsageError if neither tells it."""
    if to is not None:
        if to not in REGISTRY:
            raise UsageError(f"unknown output format {to!r} (known: {', '.join(REGISTRY)})")
        return to
    suffix = Path(str(dest)).suffix.lower()
    matches = [name for name, (_, _, sfx) in REGISTRY.items() if suffix in sfx]
    if not matches:
        raise UsageError(f"{dest}: cannot tell the output format from the suffix {suffix!r}; "
                         f"pass {option_name('to')} ({', '.join(REGISTRY)})")
    return matches[0]


def sink_for(dest: Any, to: str | None = None, **options: Any) -> Sink:
    """A sink for ``dest``: format ``to`` or the one its suffix selects, with ``options``
    (strings are parsed as on the command line: ``max_file_size="5GB"``).

    Returns: the sink (nothing written). Raises: UsageError for an unknown format or an
    option it does not take or refuses; MissingDependencyError is raised by ``require``."""
    to = format_for(dest, to)
    cls = sink_class(to)
    return cls(cls.Options.build(to, options))


#: Modules (comma-separated) imported when the registry loads; each registers its sinks with ``register``.
PLUGINS_ENV = "SHARDCONV_PLUGINS"


def load_plugins(names: str | None = None) -> None:
    """Import the modules ``names`` (default ``$SHARDCONV_PLUGINS``) lists, comma-separated: a
    format kept outside shardconv registers itself there (``register(...)`` at the end of its
    module), for the command line as for Python.

    Returns: None. Raises: UsageError naming a module that cannot be imported."""
    for module in filter(None, (m.strip() for m in (os.environ.get(PLUGINS_ENV, "") if names is None
                                                     else names).split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UsageError(f"{PLUGINS_ENV}: cannot import the sink module {module!r} ({e})") from None


__all__ = ["Sink", "sink_for", "sink_class", "format_for", "register", "unregister", "load_plugins", "require", "REGISTRY",
           "REQUIRES"]

load_plugins()
