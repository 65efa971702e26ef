"""File-descriptor I/O with one-line errors: positional reads and writes, early writeback,
fsync (of a file, a directory or a whole tree) and the CRC of a byte range.

Sources open their inputs with ``open_read``; sinks write with ``pwrite_all``, size with
``truncate`` and make their output durable with ``fsync_file`` / ``fsync_tree``. Every
``OSError`` becomes a ``DestinationError`` (``DurabilityError`` for a failed fsync) or the
caller's error class, naming the path: the CLI prints it on one line.

``start_writeback`` asks the kernel to begin writing a just-written range to
disk (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, asynchronous). Dirty
pages then never pile up, so neither the kernel's throttling nor the final
fsync stalls: a durable conversion runs at the speed of a plain copy.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any

from ..errors import DestinationError, DurabilityError, FormatError, SourceError
from .checksums import crc32
from .units import format_size

_SYNC_FILE_RANGE_WRITE = 2
#: Bytes read at a time by ``range_crc``.
READ_BLOCK = 1 << 20
#: Threads ``fsync_tree`` uses: fsyncs of distinct files overlap on any device.
FSYNC_THREADS = 4


def check_free_space(where: str | os.PathLike[str], need: int) -> None:
    """DestinationError if the filesystem holding ``where`` has less than ``need`` bytes free
    (for an unprivileged user: ``statvfs``'s available blocks, what ``shutil.disk_usage``
    reports, without importing shutil and its bz2/lzma on every command)."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise DestinationError(f"{where}: needs {format_size(need)} for the output, only {format_size(free)} free")


def libc_function(name: str) -> Any:
    """The C library's function ``name`` (errno kept for ``ctypes.get_errno``), or None where
    there is none. Looked up in the running interpreter, which links the C library:
    ``ctypes.util.find_library`` would run ``ldconfig``, about 30 ms of every command."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):
        return None


def _load_sync_file_range() -> Any:
    if not hasattr(os, "posix_fadvise"):  # not Linux
        return None
    fn = libc_function("sync_file_range")
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start (do not wait for) writeback of a range; a no-op where unsupported."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class Writeback:
    """Starts writeback of what a sink writes in batches: one ``sync_file_range`` per ``batch``
    bytes written contiguously to a file, not one per write (measured: one per 256 KiB piece
    costs about a quarter more system time than one per 16 MiB). What is left in a batch is
    written by the final fsync or the kernel."""

    def __init__(self, batch: int = 16 << 20) -> None:
        self.batch = batch
        self._runs: dict[int, list[int]] = {}

    def wrote(self, fd: int, offset: int, nbytes: int) -> None:
        """``nbytes`` were written at ``offset`` of ``fd``."""
        run = self._runs.get(fd)
        if run is not None and run[1] == offset:
            run[1] += nbytes
        else:
            if run is not None:
                start_writeback(fd, run[0], run[1] - run[0])
            run = self._runs[fd] = [offset, offset + nbytes]
        if run[1] - run[0] >= self.batch:
            start_writeback(fd, run[0], run[1] - run[0])
            del self._runs[fd]


def pread_exact(fd: int, out: memoryview, offset: int, file: object, tensor: str) -> None:
    """Fill ``out`` from ``offset`` of ``fd`` (continuing after short reads).

    Raises: SourceError on a read error, FormatError if the file ends first (both name the
    file and the tensor being read)."""
    done = 0
    while done < len(out):
        try:
            got = os.preadv(fd, [out[done:]], offset + done)
        except OSError as e:
            raise SourceError(f"{file}: read error in tensor {tensor!r}: {e.strerror}") from None
        if got == 0:
            raise FormatError(f"{file}: file ends inside tensor {tensor!r} (truncated?)")
        done += got


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
    """fsync an open file or directory. On failure the page cache may have dropped our data,
    so nothing written so far is trusted again: the DurabilityError makes the engine discard
    the partial output."""
    try:
        os.fsync(fd)
    except OSError as e:
        raise DurabilityError(f"{path}: fsync failed ({e.strerror}); the partial output was discarded, "
                              "rerun to write it again") from None


def fsync_path(path: str | os.PathLike[str], directory: bool = False) -> None:
    """fsync a file, or a directory (so the renames into it survive a power loss), by path."""
    what = "the directory" if directory else "the file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0))
    except OSError as e:
        raise DurabilityError(f"{path}: cannot open {what} to fsync it ({e.strerror}); the partial output was "
                              "discarded, rerun to write it again") from None
    try:
        fsync_file(fd, path)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so the renames into it survive a power loss."""
    fsync_path(path, directory=True)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under ``root`` (links are not followed), a few at a
    time: one pass at the end makes an output written without syncing (TensorStore, TF) durable."""
    def refuse(e: OSError) -> None:
        raise DurabilityError(f"{e.filename}: cannot list it to fsync it ({e.strerror}); the partial output was "
                              "discarded, rerun to write it again") from None

    paths: list[tuple[str, bool]] = []
    for d, _dirs, names in os.walk(root, onerror=refuse):
        paths += [(os.path.join(d, n), False) for n in names if not os.path.islink(os.path.join(d, n))]
        paths.append((d, True))
    from concurrent.futures import ThreadPoolExecutor  # here: it imports logging, ~10 ms

    with ThreadPoolExecutor(FSYNC_THREADS) as pool:
        list(pool.map(lambda p: fsync_path(*p), paths))


def _load_fallocate() -> Any:
    fn = libc_function("fallocate")
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def preallocate(fd: int, size: int) -> None:
    """Allocate the first ``size`` bytes of a new output's blocks now, in one extent where the
    filesystem can, instead of block by block as writeback finds them (ext4's delayed
    allocation): measured 14% less CPU for a 1 GiB copy with fsync (bench/copy_paths.py).
    Best effort: where the filesystem cannot (``EOPNOTSUPP``) or the space is not there, the
    writes that follow allocate, or fail, as they would have. No emulation by writing zeros
    (``posix_fallocate`` falls back to that)."""
    if _fallocate is not None and size > 0:
        _fallocate(fd, 0, 0, size)


def truncate(fd: int, size: int, path: object) -> None:
    """Set the file's size (sparse where it grows); a failure names the file."""
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        raise DestinationError(f"{path}: cannot size the output to {size} bytes: {e.strerror}") from None


def open_read(path: str | os.PathLike[str], error: type[Exception], what: str = "") -> int:
    """Open read-only (the user's input is never modified); failures become ``error``."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise error(f"{path}: {what or 'file'} not found") from None
    except OSError as e:
        raise error(f"{path}: cannot open {what or 'file'}: {e.strerror}") from None


def range_crc(file: int | str | os.PathLike[str], offset: int, length: int,
              crc_fn: Callable[..., int] = crc32) -> int | None:
    """CRC32 (or ``crc_fn``'s checksum) of bytes [offset, offset+length) of ``file`` (an open
    descriptor or a path), read ``READ_BLOCK`` bytes at a time. None if they cannot all be
    read (a missing or short file, a read error): a journaled chunk that did not reach the
    disk intact, so the caller redoes it."""
    try:
        fd = file if isinstance(file, int) else os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        buf = bytearray(min(max(length, 1), READ_BLOCK))
        view = memoryview(buf)
        crc = done = 0
        while done < length:
            n = os.preadv(fd, [view[: min(len(buf), length - done)]], offset + done)
            if n <= 0:
                return None
            crc = crc_fn(view[:n], crc)
            done += n
        return crc
    except OSError:
        return None
    finally:
        if not isinstance(file, int):
            os.close(fd)
