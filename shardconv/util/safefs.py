"""Every path shardconv creates, opens for writing, renames or removes at a destination.

Three rules, kept here so that no caller can forget one:

- **No link is followed that shardconv did not make.** Files are opened with
  ``O_NOFOLLOW``; a staging directory is opened with ``O_DIRECTORY|O_NOFOLLOW`` and
  must belong to this user; removal never descends through a link (a link is
  removed as a link, its target is never touched).
- **Nothing is replaced unless asked.** Publishing without ``overwrite`` uses
  ``renameat2(RENAME_NOREPLACE)``, which fails if anything appeared at the
  destination meanwhile. Where the kernel or filesystem lacks it, a file is
  hard-linked into place and its staged name unlinked (``link`` never replaces),
  and a directory is renamed right after an ``lstat`` check: ``rename(2)`` can
  replace only an *empty* directory, so the remaining window can cost nothing
  but an empty directory created in that instant.
- **Failures are one line.** ``OSError`` becomes ``DestinationError`` (or
  ``DurabilityError`` for a failed fsync, from ``fileio``) naming the path.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import DestinationError
from ..frontend import option
from .fileio import fsync_dir as fsync_dir  # re-exported: callers find every path operation here
from .fileio import fsync_file, libc_function
from .fileio import fsync_path as fsync_path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
#: errno values meaning "renameat2 or its flag is not supported here": fall back.
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


def _load_renameat2():
    fn = libc_function("renameat2")
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def lstat(path: str | os.PathLike) -> os.stat_result | None:
    """``os.lstat``, or None if nothing (not even a dangling link) is there."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise DestinationError(f"{path}: cannot look at it: {e.strerror}") from None


def list_dir(fd: int, label: object) -> list[str]:
    """Names in the directory open as ``fd``; a failure names ``label``."""
    try:
        return os.listdir(fd)
    except OSError as e:
        raise DestinationError(f"{label}: cannot list: {e.strerror}") from None


def kind(st: os.stat_result | None) -> str:
    """"missing", "link", "directory", "file", or "special" (fifo, socket, device)."""
    if st is None:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return "link"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    return "file" if stat.S_ISREG(st.st_mode) else "special"


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if anything (a dangling link too) is at ``dst``."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _UNSUPPORTED:
            raise OSError(err, os.strerror(err), os.fspath(dst))
    if kind(lstat(src)) == "directory":
        if lstat(dst) is not None:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
        os.rename(src, dst)  # can replace only an empty directory made in this instant
    else:
        os.link(src, dst, follow_symlinks=False)
        os.unlink(src)


def publish(src: Path, dst: Path, overwrite: bool, aside: Path) -> None:
    """Move the staged ``src`` to ``dst``.

    Without ``overwrite`` nothing at ``dst`` is ever replaced (DestinationError). With it,
    what is at ``dst`` is replaced: a file or link atomically by a file; otherwise the old
    entry is first renamed to ``aside`` (a link as a link: its target is never touched)
    and removed once the new one is in place."""
    try:
        if not overwrite:
            rename_noreplace(src, dst)
            return
        old = kind(lstat(dst))
        if old == "missing" or (old in ("file", "link") and kind(lstat(src)) == "file"):
            os.replace(src, dst)
            return
        remove(aside)
        os.rename(dst, aside)
        try:
            rename_noreplace(src, dst)
        except OSError:
            os.rename(aside, dst)
            raise
        remove(aside)
    except FileExistsError:
        raise DestinationError(f"{dst}: appeared while this run was converting and is not replaced without "
                               f"{option('overwrite')}; the finished output is kept: rerun with "
                               f"{option('overwrite')} to publish it") from None
    except OSError as e:
        raise DestinationError(f"{dst}: cannot move the finished output into place: {e.strerror}") from None


def remove(path: str | os.PathLike, dir_fd: int | None = None, label: object = None) -> None:
    """Remove ``path`` if present: a directory with what it holds, never through a link
    (``shutil.rmtree`` works by file descriptors here), anything else as an entry. Errors
    name ``label`` (the full path where ``path`` is relative to ``dir_fd``)."""
    try:
        st = os.lstat(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        raise DestinationError(f"{label or path}: cannot remove: {e.strerror}") from None
    try:
        if stat.S_ISDIR(st.st_mode):
            import shutil  # here: it imports bz2 and lzma, which no command needs at start-up

            shutil.rmtree(path, dir_fd=dir_fd)  # type: ignore[call-arg]  # typeshed lacks dir_fd
        else:
            os.unlink(path, dir_fd=dir_fd)
    except OSError as e:
        raise DestinationError(f"{label or path}: cannot remove: {e.strerror}") from None


def make_dir(path: Path) -> None:
    """Create directory ``path``, or accept one already there that is a directory, not a link."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if kind(lstat(path)) != "directory":
            raise DestinationError(f"{path}: exists and is not a directory shardconv made (a {kind(lstat(path))}); "
                                   "remove it") from None
    except OSError as e:
        raise DestinationError(f"{path}: cannot create: {e.strerror}") from None


def open_file(path: str | os.PathLike, flags: int, mode: int = 0o644, dir_fd: int | None = None,
              label: object = None) -> int:
    """``os.open`` that refuses to follow a link at ``path`` (``O_NOFOLLOW``); one-line errors
    naming ``label`` (the full path where ``path`` is relative to ``dir_fd``)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DestinationError(f"{label or path}: is a symbolic link; shardconv does not write through a link "
                                   "it did not make (remove it)") from None
        raise DestinationError(f"{label or path}: cannot open for writing: {e.strerror}") from None


def write_file(path: str | os.PathLike[str], data: bytes, fsync: bool) -> None:
    """Create or truncate ``path`` (never through a link) and write ``data``; fsync if asked."""
    fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        view = memoryview(data)
        while len(view):
            try:
                view = view[os.write(fd, view):]
            except OSError as e:
                raise DestinationError(f"{path}: write failed: {e.strerror}") from None
        if fsync:
            fsync_file(fd, path)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically: written (and with ``fsync`` fsynced) to
    ``PATH.tmp``, then renamed over it, so a reader or a killed run sees the old file or the
    new one, never a torn one. (Fsyncing the directory is the caller's, once per directory.)"""
    tmp = path.with_name(path.name + ".tmp")
    write_file(tmp, data, fsync)
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise DestinationError(f"{path}: cannot write: {e.strerror}") from None


def write_json(path: Path, obj: Any, fsync: bool = True) -> None:
    """``obj`` as indented JSON with sorted keys (deterministic bytes), written atomically
    (``write_atomic``): the one way shardconv writes a manifest, an index or a state file."""
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), fsync)


def open_own_dir(path: Path) -> tuple[int, bool]:
    """Create ``path`` (mode 0700) or open the existing one, as (directory fd, created).

    Refuses a symbolic link, a non-directory, and a directory of another user: a planted
    ``DEST.partial`` is never entered, let alone emptied."""
    created = True
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        created = False
    except FileNotFoundError:
        raise DestinationError(f"{path.parent}: destination directory does not exist") from None
    except OSError as e:
        raise DestinationError(f"{path}: cannot create: {e.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        what = {"link": "is a symbolic link", "missing": "vanished"}.get(kind(lstat(path)), "is not a directory")
        raise DestinationError(f"{path}: {what}; shardconv stages only in a directory it made "
                               f"(remove it{'' if e.errno in (errno.ELOOP, errno.ENOTDIR) else f': {e.strerror}'})") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise DestinationError(f"{path}: belongs to another user (uid {st.st_uid}); shardconv stages only in a "
                               "directory it made (remove it)")
    return fd, created


def same_entry(path: Path, fd: int) -> bool:
    """True if ``path`` (not followed) is still the directory open as ``fd``."""
    st, own = lstat(path), os.fstat(fd)
    return st is not None and stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def outside(path: str, root: str) -> bool:
    """True unless ``path`` is ``root`` or inside it (both already resolved)."""
    return path != root and not path.startswith(root.rstrip(os.sep) + os.sep)


def where_written(path: Path) -> str:
    """``path`` with its directory resolved but not its last component (never followed)."""
    return os.path.join(os.path.realpath(path.parent), path.name)
