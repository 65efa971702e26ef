"""Where an output goes, and what the engine tells a sink when it opens one.

``Destination`` is owned by the engine: it parses what the caller gave (a local path,
``file://PATH``, or an object-store URL such as ``s3://BUCKET/PATH``) once, so nothing
else tests for ``"://"``. A local output is staged in ``DEST.partial/`` beside it; an
object-store output has no rename, so its lock and journal live in a local state
directory (``state_dir()``) and the sink writes the URL's keys directly.

``SinkContext`` is everything the engine decides before a sink opens its output
(durability, chunk size, whether a partial output is attached to), passed to
``Sink.open`` instead of attributes set on the sink beforehand.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DestinationError
from ..formats import tsio

if TYPE_CHECKING:  # the contract only
    from ..sources.base import Source

#: Environment variable naming the state directory of object-store outputs.
STATE_ENV = "SHARDCONV_STATE_DIR"


def state_dir() -> Path:
    """Where locks and journals of object-store outputs live: ``$SHARDCONV_STATE_DIR``, else
    ``$XDG_STATE_HOME/shardconv``, else ``~/.local/state/shardconv``.

    Returns: an absolute path (not created here)."""
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env).absolute()
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base).absolute() / "shardconv"


@dataclass(frozen=True)
class Destination:
    """An output's place: a local path or an object-store URL.

    ``given`` is what the caller wrote; ``url`` the normalized URL (None for a local path,
    ``file://`` included); ``path`` the local path the engine stages at (``DEST.partial/``
    beside it): the output itself when local, a per-URL path under ``state_dir()`` when not.
    """

    given: str
    url: str | None
    path: Path

    @classmethod
    def parse(cls, dest: str | os.PathLike[str] | Destination) -> Destination:
        """The destination ``dest`` names. Pure: creates nothing (see ``make_state_dir``).

        Returns: a Destination. Raises: nothing for any string or path."""
        if isinstance(dest, Destination):
            return dest
        given = os.fspath(dest)
        if not tsio.is_remote(given):
            return cls(given, None, tsio.local_path(given))
        url = tsio.normalize_url(given)
        base = url.split("://", 1)[1].rsplit("/", 1)[-1] or "store"
        import hashlib

        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return cls(given, url, state_dir() / "remote" / f"{base}-{digest}")

    @property
    def is_url(self) -> bool:
        """True for an object-store URL (no local file at the output's place, no rename)."""
        return self.url is not None

    @property
    def label(self) -> str:
        """How messages name the destination: the URL, else the absolute local path."""
        return self.url if self.url is not None else str(self.path)

    @property
    def shown(self) -> str | Path:
        """What results report: the text given for any URL form (``file://`` too), else the path."""
        return self.given if tsio.scheme(self.given) else self.path

    def make_state_dir(self) -> None:
        """Create the local directory an object-store output's lock and journal go in.

        Returns: None. Raises: DestinationError if it cannot be created."""
        if not self.is_url:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DestinationError(f"{self.path.parent}: cannot create the local state directory for {self.url} "
                                   f"({e.strerror}); set {STATE_ENV}") from None


@dataclass(frozen=True)
class SinkContext:
    """What the engine decided before opening a sink's output.

    ``dest``: where the output is published. ``durable``: the run ends with fsync (a sink may
    start writing data back as it goes; ``finish`` fsyncs what it wrote). ``chunk_bytes``: the
    engine's chunk size (sizes a sink's scratch buffers; 0 when unknown). ``resume``: attach to
    the partial output an earlier ``prepare`` made (in this process or another) instead of
    preparing a new one. ``source``: the plan's source, for a sink that carries format metadata
    over from it (a TF checkpoint's object graph); a sink reads nothing else from it.
    """

    dest: Destination
    durable: bool = True
    chunk_bytes: int = 0
    resume: bool = False
    source: Source | None = None
