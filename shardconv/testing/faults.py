"""Faults injected into the ``os`` functions themselves (not shardconv's wrappers), so every
caller is hit: a full disk on ``os.pwrite``, an I/O error on ``os.fsync``, an ``os.open`` or
``os.replace`` that fails. A ``Fault`` is plain data (``asdict`` / ``Fault(**d)``), so a test
helper that converts in another process (a TensorFlow worker) can install the same faults
there with ``injected`` and send back the counts.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

#: The functions a fault can replace, and how each call names its path.
FD_FUNCTIONS = ("pwrite", "write", "fsync")
PATH_FUNCTIONS = ("open", "replace", "rename")


@dataclass(frozen=True)
class Fault:
    """``os.<fn>`` fails with ``err`` on the calls whose path contains ``path`` and not
    ``exclude`` (an empty string matches every call), from the ``after + 1``-th such call
    on; ``after=None`` only counts them. The path of ``pwrite``/``write``/``fsync`` is the
    file the descriptor names; of ``open`` its path (joined to ``dir_fd``'s); of
    ``replace``/``rename`` the destination."""

    fn: str
    err: int = errno.EIO
    after: int | None = 0
    path: str = ""
    exclude: str = ""

    def matches(self, where: str) -> bool:
        """True if a call on ``where`` is one this fault counts."""
        return self.path in where and not (self.exclude and self.exclude in where)


def fd_path(fd: int) -> str:
    """The path an open descriptor names (Linux ``/proc``), or "" where it cannot be told."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _where(fn: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    if fn in FD_FUNCTIONS:
        return fd_path(args[0])
    if fn == "open":
        path = os.fsdecode(args[0])
        dir_fd = kwargs.get("dir_fd")
        return os.path.join(fd_path(dir_fd), path) if dir_fd is not None and not os.path.isabs(path) else path
    return os.fsdecode(args[1] if len(args) > 1 else kwargs.get("dst", ""))


def _wrap(fault: Fault, real: Callable[..., Any], counts: list[int], k: int) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if fault.matches(_where(fault.fn, args, kwargs)):
            counts[k] += 1
            if fault.after is not None and counts[k] > fault.after:
                raise OSError(fault.err, os.strerror(fault.err))
        return real(*args, **kwargs)
    return call


@contextmanager
def injected(faults: list[Fault]) -> Iterator[list[int]]:
    """Within the block ``faults`` are installed; yields, per fault, how many calls it matched."""
    counts = [0] * len(faults)
    with pytest.MonkeyPatch.context() as mp:
        for k, fault in enumerate(faults):
            if fault.fn not in FD_FUNCTIONS + PATH_FUNCTIONS:
                raise ValueError(f"no fault for os.{fault.fn}")
            mp.setattr(os, fault.fn, _wrap(fault, getattr(os, fault.fn), counts, k))
        yield counts
