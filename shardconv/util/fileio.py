"""Positional file I/O shared by sinks: full writes, and early writeback.

``start_writeback`` asks the kernel to begin writing a just-written range to
disk (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, asynchronous). Dirty
pages then never pile up, so neither the kernel's throttling nor the final
fsync stalls: a durable conversion runs at the speed of a plain copy.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

from ..errors import DestinationError, DurabilityError

_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range():
    if not hasattr(os, "posix_fadvise"):  # not Linux
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start (do not wait for) writeback of a range; a no-op where unsupported."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int, path: object) -> None:
    """Write all of ``data`` at ``offset``; a failure names the file and offset."""
    view = memoryview(data)
    while len(view):
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as e:
            raise DestinationError(f"{path}: write failed at offset {offset}: {e.strerror}") from None
        view = view[n:]
        offset += n


def fsync_file(fd: int, path: object) -> None:
    """fsync; on failure the page cache may have dropped our data, so nothing written
    so far is trusted again (the engine discards the partial output)."""
    try:
        os.fsync(fd)
    except OSError as e:
        raise DurabilityError(f"{path}: fsync failed ({e.strerror}); the partial output was discarded, "
                              "rerun to write it again") from None


def truncate(fd: int, size: int, path: object) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        raise DestinationError(f"{path}: cannot size the output to {size} bytes: {e.strerror}") from None


def open_read(path: object, error: type[Exception], what: str = "") -> int:
    """Open read-only (the user's input is never modified); failures become ``error``."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise error(f"{path}: {what or 'file'} not found") from None
    except OSError as e:
        raise error(f"{path}: cannot open {what or 'file'}: {e.strerror}") from None
