"""Run one command and measure its wall time and peak memory from outside.

Two independent sources of peak RSS:

* ``/usr/bin/time -f '%M %e' -o FILE``: the kernel's ``ru_maxrss`` of the
  command as reported by ``wait4`` (the largest RSS any single process of the
  tree reached, in KiB; exact, no sampling gap).
* psutil sampling every ``interval`` seconds of the *sum* of RSS over every
  descendant of ``/usr/bin/time`` (so a converter that spawns worker processes
  is charged for all of them; ``/usr/bin/time`` itself is not counted). The
  process tree is re-listed every ``tree_every`` samples, RSS of the known
  processes is read every sample (listing the tree costs ~1.3 ms, reading one
  RSS ~20 us, so sampling costs about 1-2 % of one core).

``peak_rss_kib`` is the max of the two. Wall time is measured here with
``time.perf_counter`` around ``Popen`` .. ``wait`` (the sampler runs in a
separate thread, so the wait returns as soon as the child exits);
``/usr/bin/time``'s own ``%e`` (10 ms resolution) is kept as ``time_wall_s``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil

TIME_BIN = "/usr/bin/time"


@dataclasses.dataclass
class Measurement:
    argv: list[str]
    rc: int | None
    wall_s: float
    time_wall_s: float | None
    time_maxrss_kib: int | None
    psutil_peak_kib: int | None
    psutil_samples: int
    peak_rss_kib: int | None
    peak_source: str | None  # "time", "psutil" or "both" (equal)
    error: str | None  # None on success, else a one-line reason
    stderr_tail: str

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class _Sampler(threading.Thread):
    """Samples the summed RSS of all descendants of ``root_pid``."""

    def __init__(self, root_pid: int, interval: float, tree_every: int):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval = interval
        self.tree_every = max(1, tree_every)
        self.stop_event = threading.Event()
        self.peak = 0
        self.samples = 0
        self._procs: dict[int, psutil.Process] = {}

    def _refresh_tree(self, root: psutil.Process) -> None:
        try:
            kids = root.children(recursive=True)
        except psutil.Error:
            return
        fresh = {}
        for k in kids:
            fresh[k.pid] = self._procs.get(k.pid, k)
        self._procs = fresh

    def run(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
        except psutil.Error:
            return
        n = 0
        while True:
            if n % self.tree_every == 0 or not self._procs:
                self._refresh_tree(root)
            n += 1
            total = 0
            for p in list(self._procs.values()):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            if self._procs:
                self.samples += 1
                if total > self.peak:
                    self.peak = total
            if self.stop_event.wait(self.interval):
                return


def _first_error_line(stderr: str) -> str:
    """First informative line of stderr: the first non-empty line, except that
    for a Python traceback the last non-empty line (the exception) is used."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if not lines:
        return ""
    if lines[0].startswith("Traceback"):
        return lines[-1]
    return lines[0]


def _parse_time_file(path: Path) -> tuple[int | None, float | None]:
    try:
        text = path.read_text()
    except OSError:
        return None, None
    # GNU time prepends "Command exited with non-zero status N" / "Command
    # terminated by signal N" lines; the format line is the last one.
    for line in reversed(text.splitlines()):
        parts = line.split()
        if len(parts) == 2:
            try:
                return int(parts[0]), float(parts[1])
            except ValueError:
                continue
    return None, None


def run_measured(argv: list[str], *, cwd: str | os.PathLike | None = None,
                 env: dict | None = None, timeout: float | None = None,
                 interval: float = 0.02, tree_every: int = 5,
                 tmpdir: str | os.PathLike | None = None) -> Measurement:
    """Run ``argv`` under ``/usr/bin/time`` with psutil sampling; never raises
    for a failing command (the failure is in ``Measurement.error``)."""
    argv = [str(a) for a in argv]
    with tempfile.TemporaryDirectory(prefix="bench-measure-", dir=tmpdir) as td:
        time_out = Path(td) / "time.txt"
        err_path = Path(td) / "stderr.txt"
        full = [TIME_BIN, "-f", "%M %e", "-o", str(time_out), "--", *argv]
        error = None
        rc = None
        with open(err_path, "wb") as err_f:
            t0 = time.perf_counter()
            try:
                proc = subprocess.Popen(full, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=err_f)
            except OSError as e:
                return Measurement(argv, None, 0.0, None, None, None, 0, None, None,
                                   f"could not start: {e}", "")
            sampler = _Sampler(proc.pid, interval, tree_every)
            sampler.start()
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Kill the whole tree we started (children of /usr/bin/time first).
                try:
                    for k in psutil.Process(proc.pid).children(recursive=True):
                        try:
                            k.kill()
                        except psutil.Error:
                            pass
                except psutil.Error:
                    pass
                proc.kill()
                rc = proc.wait()
                error = f"timeout after {timeout:g} s"
            wall = time.perf_counter() - t0
            sampler.stop_event.set()
            sampler.join()
        stderr = err_path.read_text(errors="replace")
        maxrss, twall = _parse_time_file(time_out)
    # /usr/bin/time writes its own "Command exited with non-zero status" only
    # to -o, so stderr is the command's alone.
    if error is None and rc != 0:
        line = _first_error_line(stderr)
        error = line if line else f"exit status {rc}"
    ps_peak = sampler.peak // 1024 if sampler.samples else None
    cands = [v for v in (maxrss, ps_peak) if v is not None]
    peak = max(cands) if cands else None
    if peak is None:
        src = None
    elif maxrss == ps_peak:
        src = "both"
    elif peak == maxrss:
        src = "time"
    else:
        src = "psutil"
    tail = "\n".join(stderr.splitlines()[-20:])
    return Measurement(argv, rc, wall, twall, maxrss, ps_peak, sampler.samples,
                       peak, src, error, tail)


if __name__ == "__main__":  # tiny manual check: python bench/measure.py CMD...
    import json
    import sys

    print(json.dumps(run_measured(sys.argv[1:]).to_json(), indent=1))
