"""Where an output is built before it is committed: ``DEST.partial/``.

Holds the lock (``flock``, released by the kernel if the process dies, so a
stale lock from a killed run is taken over safely), the journal and the output
under construction. Commit is fsync + atomic rename; nothing at ``DEST`` ever
looks complete before it is, and nothing already at ``DEST`` is replaced
without ``overwrite``.

Every path operation goes through ``safefs``: a ``DEST.partial`` or ``lock`` that is a
symbolic link, or that shardconv did not make, is refused, never followed or emptied.
"""
from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from ..errors import DestinationError
from ..frontend import option
from ..util import safefs

__all__ = ["Staging"]

LOCK = "lock"


class Staging:
    """``DEST.partial/`` of one destination: lock, journal and the output being built."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.dir = dest.with_name(dest.name + ".partial")
        self.out = self.dir / dest.name
        self.journal_path = self.dir / "journal.jsonl"
        self._lock_fd = -1
        self._dir_fd = -1
        #: True if this run made ``DEST.partial`` (removed again if it fails before journaling).
        self.created = False

    def acquire(self) -> None:
        """Create the staging directory and take the lock, or refuse naming the holder."""
        self._dir_fd, self.created = safefs.open_own_dir(self.dir)
        try:
            names = safefs.list_dir(self._dir_fd, self.dir)
            if not self.created and names and LOCK not in names:
                raise DestinationError(f"{self.dir}: exists, holds files and has no lock: shardconv did not make "
                                       "it; move it away or choose another destination")
            self._lock_fd = self._open_lock()
        except BaseException:
            os.close(self._dir_fd)
            self._dir_fd = -1
            if self.created:  # refused before anything was staged: leave nothing behind
                try:
                    os.rmdir(self.dir)
                except OSError:
                    pass
            raise

    def _open_lock(self) -> int:
        """Open (never through a link) and ``flock`` the lock file; write our pid into it."""
        path = self.dir / LOCK
        fd = safefs.open_file(LOCK, os.O_RDWR | os.O_CREAT, 0o644, dir_fd=self._dir_fd, label=path)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
                raise DestinationError(f"{path}: is not a lock file shardconv made (a special file, a hard link or "
                                       "another user's); remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise DestinationError(f"{self.dest}: another shardconv (pid {holder}) is writing this "
                                       "destination") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise DestinationError(f"{path}: cannot take the lock: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check(self) -> None:
        if not safefs.same_entry(self.dir, self._dir_fd):
            raise DestinationError(f"{self.dir}: was replaced while this run held it; nothing more is done there")

    def has_leftovers(self) -> bool:
        """True if anything beside the lock is in the staging directory."""
        return any(name != LOCK for name in safefs.list_dir(self._dir_fd, self.dir))

    def reset(self) -> None:
        """Discard a partial output (keeps the lock). Only the staging directory's own
        entries go; a link among them is removed as a link."""
        self._check()
        # The journal first: if removing the rest fails, nothing in it is ever resumed.
        for name in sorted(safefs.list_dir(self._dir_fd, self.dir), key=lambda n: n != self.journal_path.name):
            if name != LOCK:
                safefs.remove(name, dir_fd=self._dir_fd, label=self.dir / name)

    def commit(self, moves: list[tuple[Path, Path]], overwrite: bool, fsync: bool = True) -> None:
        """Rename staged paths to their final places; the last move is the main output.

        Without ``overwrite`` the main output never replaces anything that appeared at
        its place meanwhile (checked before the companions move, and by the rename itself).
        Companions (sidecar manifests) are shardconv's own and are replaced. With ``fsync``
        the directories renamed into are fsynced, so the renames survive a power loss."""
        self._check()
        if moves and not overwrite and safefs.lstat(moves[-1][1]) is not None:
            raise DestinationError(f"{moves[-1][1]}: appeared while this run was converting and is not replaced "
                                   f"without {option('overwrite')}; the finished output is kept: rerun with "
                                   f"{option('overwrite')} to publish it")
        aside = self.dir / ".replaced"
        for k, (src, dst) in enumerate(moves):
            safefs.publish(src, dst, overwrite or k < len(moves) - 1, aside)
        if fsync:
            for parent in sorted({dst.parent for _, dst in moves} | {self.dest.parent}):
                safefs.fsync_dir(parent)

    def release(self, remove: bool) -> None:
        """Unlock; with ``remove`` also delete the staging directory (never through a link)."""
        if remove and self._dir_fd >= 0 and safefs.same_entry(self.dir, self._dir_fd):
            try:
                self.reset()
                os.unlink(LOCK, dir_fd=self._dir_fd)  # last: a DEST.partial with files has a lock
                os.rmdir(self.dir)
            except (OSError, DestinationError):
                pass  # a leftover DEST.partial costs nothing; the next run takes it over
        for attr in ("_lock_fd", "_dir_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
