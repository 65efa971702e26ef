"""The machine around a benchmark run: the page cache (dropped for ``--cold``) and a
fixed CPU load (``--busy``: one spinning process pinned to each core).

Both are set up and torn down by the bench itself, so a run says exactly what it
measured: a cold run drops the page cache before every timed command (root only; a
bench that cannot drop it says the runs were warm), a busy run keeps one CPU hog per
core running during every timed command and stopped between them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

DROP_CACHES = "/proc/sys/vm/drop_caches"
#: The hog: a pure user-space loop, no memory traffic, no system calls.
HOG_CODE = "while True: pass"


def can_drop_caches() -> tuple[bool, str]:
    """Whether this process may drop the page cache, and if not, why."""
    if os.geteuid() != 0:
        return False, "not root"
    if not os.access(DROP_CACHES, os.W_OK):
        return False, f"{DROP_CACHES} is not writable"
    return True, ""


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``: clean pages, dentries and inodes go."""
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


class Hogs:
    """One CPU-bound process per core, each pinned to its core, stopped (SIGSTOP)
    except inside :meth:`running`. Started by :meth:`start`, killed by :meth:`stop`
    (also on exit from a ``with`` block)."""

    def __init__(self, cores: list[int] | None = None) -> None:
        self.cores = cores if cores is not None else sorted(os.sched_getaffinity(0))
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        for core in self.cores:
            p = subprocess.Popen([sys.executable, "-S", "-c", HOG_CODE], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append(p)
            os.kill(p.pid, signal.SIGSTOP)
            os.sched_setaffinity(p.pid, {core})

    def _signal(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, sig)

    @contextmanager
    def running(self) -> Iterator[None]:
        """The hogs spin for the duration of the block (nothing happens without hogs)."""
        self._signal(signal.SIGCONT)
        try:
            yield
        finally:
            self._signal(signal.SIGSTOP)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs = []

    def __enter__(self) -> Hogs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> str:
        return (f"busy: {len(self.cores)} CPU hogs (`python -c '{HOG_CODE}'`, one pinned to each core) "
                f"running during every timed command") if self.procs else "busy: no"
