"""A slow medium, for tests and benchmarks: every read of an npz source limited to a rate.

``install()`` patches ``NpzSource.read_into`` in this process when
``$SHARDCONV_TEST_READ_MBPS`` is set. ``sitecustomize(directory)`` writes a
``sitecustomize.py`` there that installs it, so worker processes started with that
directory on ``PYTHONPATH`` (a process pool, Dask workers) read slowly too, while no
product code knows about it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "SHARDCONV_TEST_READ_MBPS"


def install() -> None:
    """Limit every ``NpzSource`` read in this process to ``$SHARDCONV_TEST_READ_MBPS`` MB/s.
    The source then offers no raw ranges: the engine's direct copy reads files itself, and
    would not be slowed."""
    rate = float(os.environ.get(ENV) or 0) * 1e6
    if rate <= 0:
        return
    from ..sources.npz import NpzSource

    read = NpzSource.read_into

    def throttled(self, name, offset, out):
        t0 = time.monotonic()
        segments = read(self, name, offset, out)
        left = len(out) / rate - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)
        return segments

    NpzSource.read_into = throttled  # type: ignore[method-assign]
    NpzSource.raw_range = lambda self, name, offset, length: None  # type: ignore[method-assign]


def sitecustomize(directory: Path) -> dict[str, str]:
    """Write ``directory/sitecustomize.py`` installing the throttle; returns the environment
    additions (``PYTHONPATH``) that make child processes load it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text("from shardconv.testing.throttle import install\ninstall()\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH", "")]))}
