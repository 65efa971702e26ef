"""TensorStore plumbing shared by the Zarr sink and source: lazy import, one process-wide
context, destinations as kvstore specs, and store errors as one-line shardconv errors.

Destinations are a local path or a URL: ``file://PATH``, ``memory://NAME``,
``s3://BUCKET/PATH``, ``gs://BUCKET/PATH``. Credentials come from the usual
environment (TensorStore's own lookup: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``/``AWS_PROFILE``/``~/.aws``; ``GOOGLE_APPLICATION_CREDENTIALS`` or
gcloud's default credentials). For S3-compatible servers the endpoint comes from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (as boto3 reads them) and the region from
``AWS_REGION``/``AWS_DEFAULT_REGION``.

Importing this module does not import TensorStore; ``tensorstore()`` does.
"""
from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import MissingDependencyError, ShardconvError

#: URL schemes shardconv passes to TensorStore (``file`` is treated as a local path).
SCHEMES = ("s3", "gs", "gcs", "memory", "file")
#: RSS TensorStore adds to a conversion (measured: bench/run.py zarr vs npz rows, 4 GiB, 256 MiB budget).
TENSORSTORE_BYTES = 50 << 20

_PAYLOAD = re.compile(r" \[[\w.\- ]+=")
_lock = threading.Lock()
_contexts: dict[bool, Any] = {}

E = TypeVar("E", bound=ShardconvError)


def tensorstore(what: str = "Zarr input/output") -> Any:
    """Import TensorStore, or say which extra installs it."""
    try:
        import tensorstore as ts
    except ImportError:
        raise MissingDependencyError("tensorstore", "zarr", what) from None
    return ts


def context(durable: bool = True) -> Any:
    """The process-wide TensorStore context (one per durability setting).

    Both share one parent, so a ``memory://`` store written by the sink is the one the
    source reads in the same process. The cache pool is left at 0 bytes: nothing is
    cached beyond the chunks of the read or write in flight (memory stays bounded).
    ``durable=False`` turns off TensorStore's per-file fsync (``--no-fsync``).
    """
    ts = tensorstore()
    with _lock:
        if True not in _contexts:
            _contexts[True] = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        if not durable and False not in _contexts:
            _contexts[False] = ts.Context(ts.Context.Spec({"file_io_sync": False}), parent=_contexts[True])
        return _contexts[durable]


def scheme(dest: str | os.PathLike) -> str | None:
    """The URL scheme of ``dest`` (``s3``, ``gs``, ...) or None for a plain path."""
    s = os.fspath(dest)
    if not isinstance(s, str) or "://" not in s:
        return None
    head = s.split("://", 1)[0].lower()
    return head if head in SCHEMES else head or None


def is_remote(dest: str | os.PathLike) -> bool:
    """True for a destination that is not a local path (``file://`` counts as local)."""
    sch = scheme(dest)
    return sch is not None and sch != "file"


def local_path(dest: str | os.PathLike) -> Path:
    """A local destination as an absolute path (``file://`` prefix removed)."""
    s = os.fspath(dest)
    if scheme(s) == "file":
        s = s.split("://", 1)[1]
    return Path(s).absolute()


def normalize_url(url: str) -> str:
    """``url`` with a lower-case scheme and no trailing slash (one name per destination)."""
    sch, rest = url.split("://", 1)
    return f"{sch.lower()}://{rest.rstrip('/')}"


def kvstore_spec(dest: str | os.PathLike) -> dict[str, Any]:
    """The TensorStore kvstore spec for a local path or URL; ``path`` ends with ``/``."""
    from ..errors import UsageError

    sch = scheme(dest)
    if sch is None or sch == "file":
        return {"driver": "file", "path": str(local_path(dest)) + "/"}
    url = normalize_url(os.fspath(dest))
    rest = url.split("://", 1)[1]
    if sch == "memory":
        return {"driver": "memory", "path": rest + "/" if rest else ""}
    bucket, _, path = rest.partition("/")
    if not bucket:
        raise UsageError(f"{url}: no bucket in the URL (expected {sch}://BUCKET/PATH)")
    path = path + "/" if path else ""
    if sch == "s3":
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": path}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            spec["endpoint"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            spec["aws_region"] = region
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            # Keys in the environment: use them, without the default chain's probing of ~/.aws
            # (which logs errors to stderr when those files do not exist).
            spec["aws_credentials"] = {"type": "environment"}
        return spec
    if sch in ("gs", "gcs"):
        return {"driver": "gcs", "bucket": bucket, "path": path}
    raise UsageError(f"{url}: unsupported URL scheme {sch!r} (use a path, file://, memory://, s3:// or gs://)")


def first_line(e: BaseException) -> str:
    """A TensorStore error as one line (status code kept, source locations dropped)."""
    text = str(e).strip() or type(e).__name__
    line = text.splitlines()[0]
    payload = _PAYLOAD.search(line)  # " [http_response_body='...']", " [source locations=...]"
    if payload:
        line = line[: payload.start()]
    return line[:400]


def wrap(cls: type[E], where: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a TensorStore (or OS) failure becomes ``cls("WHERE: one line")``."""
    try:
        return fn()
    except ShardconvError:
        raise
    except (ValueError, OSError, RuntimeError, TimeoutError) as e:
        raise cls(f"{where}: {first_line(e)}") from None
