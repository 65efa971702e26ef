"""Writes that go past the page cache (Linux ``O_DIRECT``) for the page-aligned part of a large
write, the rest written as usual.

Why: a buffered write copies each byte into the page cache, and the fsync that makes the output
durable then writes those pages back, in this process. With ``O_DIRECT`` the device takes the
bytes straight from our buffer: one copy fewer and no writeback. Measured copying 4 GiB cold
from a buffer of huge pages (``core.budget.HUGE``; bench/direct_writes.py, bench/README.md
"Writing past the page cache"): 1.1 CPU s and 5.3 s against 5.0 CPU s and 8.0 s for ``cp``
and ``sync``. A conversion also leaves the page cache to what the machine was using, instead
of filling it with output nobody reads soon.

Only a range whose file offset, length and memory address are all multiples of ``ALIGN`` goes
direct; a page is never written both ways, so the page cache never holds a stale copy of a page
the device got directly. Where the filesystem refuses ``O_DIRECT`` (``EINVAL`` on open or on a
write: tmpfs before Linux 6.6, some FUSE and network filesystems), that file is written buffered
from then on. Any other error is a write error, as for a buffered write. Where the kernel gives
no transparent huge pages (``huge_pages``), nothing goes direct.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os

from ..errors import DestinationError
from .fileio import Writeback, pwrite_all

#: Offsets, lengths and addresses of direct writes are multiples of this (a page; every common
#: device's logical block size divides it).
ALIGN = 4096
#: Writes shorter than this go buffered whole: for them a direct write saves little and waits
#: for the device.
MIN_BYTES = 256 << 10
_O_DIRECT = getattr(os, "O_DIRECT", 0)
#: Whether the kernel gives transparent huge pages: "always [madvise] never", the one in use
#: bracketed.
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.cache
def huge_pages() -> bool:
    """Whether memory advised ``MADV_HUGEPAGE`` gets huge pages (the setting is "always" or
    "madvise"). Without them a direct write reaches the disk cut into short requests and was
    slower than the page cache's writeback (bench/README.md, "Writing past the page cache"),
    so files are then written through the page cache."""
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def address(view: memoryview) -> int | None:
    """The memory address of ``view``'s first byte, or None where it cannot be told (a
    read-only or empty buffer)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


class UncachedWrites:
    """A second descriptor with ``O_DIRECT`` per output file (opened on first use through
    ``/proc/self/fd``, so it names the very file the sink opened), and the writes that use it."""

    def __init__(self) -> None:
        #: Whether anything goes direct in this process (``O_DIRECT`` and huge pages there).
        self.enabled = bool(_O_DIRECT) and huge_pages()
        # the sink's descriptor -> (its direct one or -1: none, the file's device and inode)
        self._fds: dict[int, tuple[int, int, int]] = {}

    def write(self, fd: int, data: memoryview, offset: int, path: object) -> tuple[int, int]:
        """Write the page-aligned middle of ``data`` (to go at ``offset`` of ``fd``) directly.

        Returns: (where the middle starts in ``data``, its length): the caller writes what is
        before and after it as usual; (0, 0) if nothing went direct. Raises: DestinationError
        on a write error, naming the file and offset."""
        n = len(data)
        if n < MIN_BYTES or not self.enabled:
            return 0, 0
        head = -offset % ALIGN
        length = (n - head) // ALIGN * ALIGN
        addr = address(data)
        if length <= 0 or addr is None or (addr + head) % ALIGN:
            return 0, 0
        dfd = self._direct_fd(fd)
        if dfd < 0:
            return 0, 0
        done = 0
        middle = data[head:head + length]
        while done < length:
            try:
                done += os.pwrite(dfd, middle[done:], offset + head + done)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise DestinationError(f"{path}: write failed at offset {offset + head + done}: "
                                           f"{e.strerror}") from None
                self._refuse(fd)  # the filesystem's rules differ: buffered from here on
                break
            if done % ALIGN:
                break  # a short write off the alignment: the rest goes buffered
        done -= done % ALIGN
        return (head, done) if done else (0, 0)

    def pwrite(self, fd: int, data: memoryview, offset: int, path: object, writeback: Writeback | None = None,
               direct: bool = True) -> None:
        """Write all of ``data`` at ``offset`` of ``fd``: its page-aligned middle directly where
        it can (and ``direct``: the caller's policy), the rest through the page cache (told to
        ``writeback``, if given, to be written back early). Raises: DestinationError on a write
        error, naming the file and offset."""
        start, n = self.write(fd, data, offset, path) if direct else (0, 0)
        for a, b in ((0, start), (start + n, len(data))) if n else ((0, len(data)),):
            if b > a:
                pwrite_all(fd, data[a:b], offset + a, path)
                if writeback is not None:
                    writeback.wrote(fd, offset + a, b - a)

    def _direct_fd(self, fd: int) -> int:
        """The direct descriptor for ``fd``: checked to name the same file on every call, as a
        sink may close a file and open another that gets the same number."""
        st = os.fstat(fd)
        known = self._fds.get(fd)
        if known is not None and known[1:] == (st.st_dev, st.st_ino):
            return known[0]
        if known is not None and known[0] >= 0:
            os.close(known[0])
        try:
            dfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | _O_DIRECT | os.O_CLOEXEC)
        except OSError:
            dfd = -1  # no /proc, or the filesystem refuses O_DIRECT: buffered
        self._fds[fd] = (dfd, st.st_dev, st.st_ino)
        return dfd

    def _refuse(self, fd: int) -> None:
        dfd, dev, ino = self._fds[fd]
        if dfd >= 0:
            os.close(dfd)
        self._fds[fd] = (-1, dev, ino)

    def close(self) -> None:
        """Close the direct descriptors (before the sink closes its own: same numbers may be
        reused)."""
        for dfd, _, _ in self._fds.values():
            if dfd >= 0:
                os.close(dfd)
        self._fds.clear()
