"""Cold copies of one file written past the page cache (``O_DIRECT``) against ``cp`` + ``sync``:
piece size, writes in flight, and whether the buffer is on huge pages. Prints each run's wall
and CPU time and the write requests the disk got (``/proc/diskstats``): their count and mean
size show how the kernel cut the writes.

    sudo python bench/direct_writes.py FILE [--configs "cp+sync;16,1,1;16,1,0;4,2,0"] [--repeat 3]

A config ``P,D,H`` copies with pieces of P MiB, D writes in flight (threads), H=1 for a buffer
of huge pages (private memory with ``MADV_HUGEPAGE``), H=0 for mmap's default (shared
anonymous memory: 4 KiB pages). Each piece is read 1 MiB at a time with both CRCs, as the
engine does. The page cache is dropped before every run (root), the output is fallocated,
fsynced and deleted; configs alternate in each repeat. Output goes beside FILE's bench
directory (``--out``).
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardconv.util.checksums import crc32, crc32c  # noqa: E402

HUGE = 2 << 20
STEP = 1 << 20


def _disk_writes(device: str) -> tuple[int, int]:
    """(write requests completed, sectors written) of ``device`` so far."""
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] == device:
            return int(f[7]), int(f[9])
    return 0, 0


def _device(path: Path) -> str:
    """The whole-disk name (``vda``) holding ``path``, for /proc/diskstats."""
    dev = os.stat(path).st_dev
    link = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    return link.parent.name if (link / "partition").exists() else link.name


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _buffer(size: int, huge: bool) -> memoryview:
    if not huge:
        return memoryview(mmap.mmap(-1, size))
    m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(m)) % HUGE
    m.madvise(mmap.MADV_HUGEPAGE, skip, size)
    return memoryview(m)[skip:skip + size]


def _direct(src: Path, out: Path, piece: int, depth: int, huge: bool) -> None:
    size = src.stat().st_size
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.posix_fallocate(fd, 0, size)
    dfd = os.open(out, os.O_WRONLY | os.O_DIRECT)
    slots = depth + 1
    buf = _buffer(piece * slots, huge)
    views = [buf[k * piece:(k + 1) * piece] for k in range(slots)]
    free, flight = deque(range(slots)), deque[tuple[Future[int], int]]()
    src_fd = os.open(src, os.O_RDONLY)
    with ThreadPoolExecutor(depth) as pool:
        for off in range(0, size, piece):
            os.posix_fadvise(src_fd, off, piece, os.POSIX_FADV_WILLNEED)
            while not free or len(flight) >= depth:
                done, slot = flight.popleft()
                done.result()
                free.append(slot)
            slot = free.popleft()
            n = min(piece, size - off)
            v = views[slot][:n]
            for j in range(0, n, STEP):
                sub = v[j:j + STEP]
                os.preadv(src_fd, [sub], off + j)
                crc32c(sub)
                crc32(sub)
            whole = n // 4096 * 4096
            if n > whole:
                os.pwrite(fd, v[whole:], off + whole)
            if whole:
                flight.append((pool.submit(os.pwrite, dfd, v[:whole], off), slot))
            else:
                free.append(slot)
        for done, _ in flight:
            done.result()
    os.fsync(fd)
    for f in (src_fd, dfd, fd):
        os.close(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path)
    p.add_argument("--configs", default="cp+sync;16,1,1;16,1,0;4,2,0")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "direct-writes.out")
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: every run starts with the page cache dropped")
    configs = a.configs.split(";")
    device = _device(a.out.parent)
    runs: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(a.repeat):
        for c in configs:
            a.out.unlink(missing_ok=True)
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            time.sleep(0.5)
            (ios0, sec0), c0, t0 = _disk_writes(device), _cpu(), time.monotonic()
            if c == "cp+sync":
                subprocess.run(["cp", "--reflink=never", str(a.file), str(a.out)], check=True)
                subprocess.run(["sync"], check=True)
            else:
                piece, depth, huge = (int(x) for x in c.split(","))
                _direct(a.file, a.out, piece << 20, depth, bool(huge))
            wall, cpu = time.monotonic() - t0, _cpu() - c0
            ios, sec = (x - y for x, y in zip(_disk_writes(device), (ios0, sec0)))
            runs[c].append(wall)
            print(f"r{r + 1} {c}: {wall:.2f} s, {cpu:.2f} CPU s, {ios} write requests of {sec / 2 / max(ios, 1):.0f} KiB "
                  f"on average, load {os.getloadavg()[0]:.1f}", flush=True)
    a.out.unlink(missing_ok=True)
    print("| config | wall s (median) | min-max s |\n|---|---:|---:|")
    for c in configs:
        print(f"| {c} | {statistics.median(runs[c]):.2f} | {min(runs[c]):.2f}-{max(runs[c]):.2f} |")


if __name__ == "__main__":
    main()
