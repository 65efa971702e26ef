"""Records the byte ranges of files that a block of code reads, through every read path
Python code has: ``os.pread``/``preadv``/``read``/``readv``, file objects from ``open``
(``read``, ``readinto``, ``readline``, ...) and ``mmap`` (a mapping counts as reading all
it maps). Reads by native libraries (TensorStore, TensorFlow) are not seen.

The suites use it to show that listing a checkpoint reads none of its tensor data.
"""
from __future__ import annotations

import builtins
import io
import mmap
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

#: (device, inode) of a regular file.
FileKey = tuple[int, int]


class ReadLog:
    """Byte ranges read, as (file, offset, length)."""

    def __init__(self) -> None:
        self.reads: list[tuple[FileKey, int, int]] = []

    def add(self, fd: int, offset: int, nbytes: int) -> None:
        """Record ``nbytes`` read at ``offset`` of the file open as ``fd`` (regular files only)."""
        if nbytes <= 0:
            return
        try:
            st = os.fstat(fd)
        except OSError:
            return
        if stat.S_ISREG(st.st_mode):
            self.reads.append(((st.st_dev, st.st_ino), offset, nbytes))

    def overlap(self, other: ReadLog) -> int:
        """Bytes of this log's reads that lie in ranges ``other`` read (same file)."""
        total = 0
        for key, off, n in self.reads:
            for key2, off2, n2 in other.reads:
                if key == key2:
                    total += max(0, min(off + n, off2 + n2) - max(off, off2))
        return total

    def __len__(self) -> int:
        return len(self.reads)


class _RecordedFile:
    """A file object whose reads are recorded; everything else is passed through."""

    def __init__(self, f: Any, log: ReadLog) -> None:
        self._f = f
        self._log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _RecordedFile:
        self._f.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._f.__exit__(*exc)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.readline, self._f.read(0))

    def _recorded(self, method: str, *a: Any) -> Any:
        text = getattr(self._f, "buffer", None)  # a text file: count the bytes it took from its buffer
        start = (text or self._f).tell()
        got = getattr(self._f, method)(*a)
        if text is not None:
            n = text.tell() - start
        elif isinstance(got, list):
            n = sum(map(len, got))
        else:
            n = got if isinstance(got, int) else len(got or b"")
        self._log.add(self._f.fileno(), start, n)
        return got

    def read(self, *a: Any) -> Any:
        return self._recorded("read", *a)

    def read1(self, *a: Any) -> Any:
        return self._recorded("read1", *a)

    def readinto(self, b: Any) -> Any:
        return self._recorded("readinto", b)

    def readinto1(self, b: Any) -> Any:
        return self._recorded("readinto1", b)

    def readline(self, *a: Any) -> Any:
        return self._recorded("readline", *a)

    def readlines(self, *a: Any) -> Any:
        return self._recorded("readlines", *a)


def _patch_os(mp: pytest.MonkeyPatch, log: ReadLog) -> None:
    real_pread, real_preadv, real_read, real_readv = os.pread, os.preadv, os.read, os.readv

    def pread(fd: int, n: int, off: int) -> bytes:
        data = real_pread(fd, n, off)
        log.add(fd, off, len(data))
        return data

    def preadv(fd: int, bufs: Any, off: int, *a: Any) -> int:
        n = real_preadv(fd, bufs, off, *a)
        log.add(fd, off, n)
        return n

    def here(fd: int) -> int:
        try:
            return os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:
            return 0

    def read(fd: int, n: int) -> bytes:
        at = here(fd)
        data = real_read(fd, n)
        log.add(fd, at, len(data))
        return data

    def readv(fd: int, bufs: Any) -> int:
        at = here(fd)
        n = real_readv(fd, bufs)
        log.add(fd, at, n)
        return n

    for name, fn in (("pread", pread), ("preadv", preadv), ("read", read), ("readv", readv)):
        mp.setattr(os, name, fn)


def _patch_open_and_mmap(mp: pytest.MonkeyPatch, log: ReadLog) -> None:
    real_open, real_mmap = io.open, mmap.mmap

    def recorded_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        f = real_open(file, mode, *a, **k)
        return _RecordedFile(f, log) if "r" in mode or "+" in mode else f

    class RecordedMmap(real_mmap):  # type: ignore[misc,valid-type]
        def __new__(cls, fileno: int, length: int, *a: Any, **k: Any) -> Any:
            m = real_mmap.__new__(cls, fileno, length, *a, **k)
            offset = k.get("offset", a[-1] if len(a) >= 3 else 0)
            if fileno >= 0:
                log.add(fileno, offset, len(m))  # a mapping may read any of what it maps
            return m

    mp.setattr(builtins, "open", recorded_open)
    mp.setattr(io, "open", recorded_open)
    mp.setattr(mmap, "mmap", RecordedMmap)


@contextmanager
def record_reads() -> Iterator[ReadLog]:
    """Within the block, every file read by Python code is logged."""
    log = ReadLog()
    with pytest.MonkeyPatch.context() as mp:
        _patch_os(mp, log)
        _patch_open_and_mmap(mp, log)
        yield log
