"""Where an output is built before it is committed: ``DEST.partial/``.

Holds the lock (``flock``, released by the kernel if the process dies, so a
stale lock from a killed run is taken over safely), the journal and the output
under construction. Commit is fsync + atomic rename; nothing at ``DEST`` ever
looks complete before it is.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from .errors import DestinationError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Staging:
    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.dir = dest.with_name(dest.name + ".partial")
        self.out = self.dir / dest.name
        self.journal_path = self.dir / "journal.jsonl"
        self._lock_fd = -1
        self.previous_pid: int | None = None

    def acquire(self) -> None:
        """Create the staging directory and take the lock, or refuse naming the holder."""
        try:
            self.dir.mkdir(parents=False, exist_ok=True)
        except FileNotFoundError:
            raise DestinationError(f"{self.dest.parent}: destination directory does not exist") from None
        except OSError as e:
            raise DestinationError(f"{self.dir}: cannot create: {e.strerror}") from None
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DestinationError(f"{self.dest}: another shardconv (pid {holder}) is writing this destination") from None
        old = os.pread(fd, 32, 0).decode(errors="replace").strip()
        self.previous_pid = int(old) if old.isdigit() else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def has_partial(self) -> bool:
        return self.journal_path.exists()

    def reset(self) -> None:
        """Discard a partial output (keeps the lock)."""
        for p in self.dir.iterdir():
            if p.name == "lock":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def commit(self, moves: list[tuple[Path, Path]], overwrite: bool, fsync: bool = True) -> None:
        """Rename staged paths to their final places; the last move is the main output.
        With ``fsync`` the directories renamed into are fsynced, so the renames survive a power loss."""
        for src, dst in moves:
            if dst.is_dir() and not dst.is_symlink():
                if not overwrite:
                    raise DestinationError(f"{dst}: exists; pass --overwrite to replace it")
                old = self.dir / ".replaced"
                os.replace(dst, old)
                os.replace(src, dst)
                shutil.rmtree(old)
            else:
                os.replace(src, dst)
        if fsync:
            for parent in sorted({dst.parent for _, dst in moves} | {self.dest.parent}):
                fsync_dir(parent)

    def release(self, remove: bool) -> None:
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
