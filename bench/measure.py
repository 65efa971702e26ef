"""Run one command and measure its wall time, CPU time and peak memory from outside.

Two independent sources of peak RSS:

* ``/usr/bin/time -f '%M %e %U %S' -o FILE``: the kernel's ``ru_maxrss`` of the
  command as reported by ``wait4`` (the largest RSS any single process of the
  tree reached, in KiB; exact, no sampling gap), and the user and system CPU
  seconds of the command and every descendant it waited for.
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
CPU seconds (``cpu_s`` = user + sys) come from ``/usr/bin/time``; the
``getrusage(RUSAGE_CHILDREN)`` delta around the wait (which also counts
``/usr/bin/time`` itself, a millisecond or so) is kept as ``rusage_cpu_s``.
The 1-minute load average just before the start is kept as ``load_before``.

``machine_cpu_s`` is the CPU time the whole machine spent while the command ran (busy time of
every CPU in ``/proc/stat``, less this process's own, i.e. the sampler's): the command's, plus
the kernel's writeback threads (a ``sync`` or a flusher thread writes what ``cp`` left dirty; a
process that ``fsync``s pays for its writeback itself, so ``/usr/bin/time`` alone favours the one
that leaves it to the kernel), plus anything else running. Only a quiet machine gives a clean
figure; ``None`` where ``/proc/stat`` cannot be read.
"""

from __future__ import annotations

import dataclasses
import os
import resource
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
    user_s: float | None = None
    sys_s: float | None = None
    cpu_s: float | None = None  # user + sys, from /usr/bin/time
    rusage_cpu_s: float | None = None  # getrusage(RUSAGE_CHILDREN) delta
    load_before: float | None = None  # 1-minute load average at the start
    machine_cpu_s: float | None = None  # busy CPU seconds of the whole machine during the run

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


@dataclasses.dataclass
class _TimeFile:
    maxrss_kib: int | None = None
    wall_s: float | None = None
    user_s: float | None = None
    sys_s: float | None = None


def _parse_time_file(path: Path) -> _TimeFile:
    """The ``%M %e %U %S`` line GNU time wrote (it prepends "Command exited with
    non-zero status N" / "Command terminated by signal N" lines; the format line is last)."""
    try:
        text = path.read_text()
    except OSError:
        return _TimeFile()
    for line in reversed(text.splitlines()):
        parts = line.split()
        if len(parts) == 4:
            try:
                return _TimeFile(int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3]))
            except ValueError:
                continue
    return _TimeFile()


def _machine_busy() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all CPUs; idle and iowait left out)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    guest = sum(fields[8:10])  # counted in user/nice already
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill the whole tree we started (children of /usr/bin/time first)."""
    try:
        for k in psutil.Process(proc.pid).children(recursive=True):
            try:
                k.kill()
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    proc.kill()


def _peak(maxrss: int | None, ps_peak: int | None) -> tuple[int | None, str | None]:
    """The larger of the two peak sources, and which one it was."""
    cands = [v for v in (maxrss, ps_peak) if v is not None]
    if not cands:
        return None, None
    peak = max(cands)
    if maxrss == ps_peak:
        return peak, "both"
    return peak, "time" if peak == maxrss else "psutil"


def run_measured(argv: list[str], *, cwd: str | os.PathLike | None = None,
                 env: dict | None = None, timeout: float | None = None,
                 interval: float = 0.02, tree_every: int = 5,
                 tmpdir: str | os.PathLike | None = None) -> Measurement:
    """Run ``argv`` under ``/usr/bin/time`` with psutil sampling; never raises
    for a failing command (the failure is in ``Measurement.error``)."""
    argv = [str(a) for a in argv]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-measure-", dir=tmpdir) as td:
        time_out = Path(td) / "time.txt"
        err_path = Path(td) / "stderr.txt"
        full = [TIME_BIN, "-f", "%M %e %U %S", "-o", str(time_out), "--", *argv]
        error = None
        with open(err_path, "wb") as err_f:
            cpu0 = _children_cpu()
            busy0, self0 = _machine_busy(), _self_cpu()
            t0 = time.perf_counter()
            try:
                proc = subprocess.Popen(full, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=err_f)
            except OSError as e:
                return Measurement(argv, None, 0.0, None, None, None, 0, None, None,
                                   f"could not start: {e}", "", load_before=load)
            sampler = _Sampler(proc.pid, interval, tree_every)
            sampler.start()
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(proc)
                rc = proc.wait()
                error = f"timeout after {timeout:g} s"
            except BaseException:  # interrupted: leave no command running behind us
                _kill_tree(proc)
                proc.wait()
                raise
            wall = time.perf_counter() - t0
            rusage_cpu = _children_cpu() - cpu0
            sampler.stop_event.set()
            sampler.join()
            busy1 = _machine_busy()
            machine = (busy1 - busy0 - (_self_cpu() - self0)) if busy0 is not None and busy1 is not None else None
        stderr = err_path.read_text(errors="replace")
        tf = _parse_time_file(time_out)
    # /usr/bin/time writes its own "Command exited with non-zero status" only
    # to -o, so stderr is the command's alone.
    if error is None and rc != 0:
        error = _first_error_line(stderr) or f"exit status {rc}"
    ps_peak = sampler.peak // 1024 if sampler.samples else None
    peak, src = _peak(tf.maxrss_kib, ps_peak)
    cpu = tf.user_s + tf.sys_s if tf.user_s is not None and tf.sys_s is not None else None
    tail = "\n".join(stderr.splitlines()[-20:])
    return Measurement(argv, rc, wall, tf.wall_s, tf.maxrss_kib, ps_peak, sampler.samples,
                       peak, src, error, tail, tf.user_s, tf.sys_s, cpu, rusage_cpu, load, machine)


if __name__ == "__main__":  # tiny manual check: python bench/measure.py CMD...
    import json
    import sys

    print(json.dumps(run_measured(sys.argv[1:]).to_json(), indent=1))
