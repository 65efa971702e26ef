"""CPU and wall time of the ways the engine can move verbatim bytes from a source file to an
output file, with both checksums the conversion needs (CRC32C of the source, CRC32 of the
output), against a ``cp``-like loop without checksums. Chooses the direct path's piece size
(``core.pipeline.PIECE``) and the sinks' writeback batch (``util.fileio.Writeback``).

    python bench/copy_paths.py [--input FILE ...] [--mib 1024] [--repeat 3] [--fsync] [--rows A,B]

Without ``--input`` it writes a file of random float32 bytes in the work directory. The page
cache holds the input (it is read once first); the output is fsynced in the rows that say so.
Times are medians of the repeats; CPU is user + system of this process (RUSAGE_SELF).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardconv.util.checksums import crc32, crc32c  # noqa: E402
from shardconv.util.fileio import start_writeback  # noqa: E402

CHUNK = 16 << 20


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cp(files: list[str], out: int, piece: int, **_: object) -> None:
    """``cp`` (coreutils 9.1, ``--reflink=never``): read into a 128 KiB buffer, write it; no checksum."""
    buf = memoryview(bytearray(piece))
    pos = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        while n := os.readv(fd, [buf]):
            os.pwrite(out, buf[:n], pos)
            pos += n
        os.close(fd)


def _copy_file_range(files: list[str], out: int, **_: object) -> None:
    """An in-kernel copy, no byte in user space; no checksum. (``cp`` of coreutils 9.1 with
    ``--reflink=never``, the bench's baseline, does not use it: it reads and writes 128 KiB at a
    time, as the cp-like row does; checked with strace.)"""
    pos = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        size = os.fstat(fd).st_size
        while size:
            n = os.copy_file_range(fd, out, size, offset_dst=pos)
            pos, size = pos + n, size - n
        os.close(fd)


def _pieces(files: list[str], out: int, piece: int, writeback: str = "chunk", batch: int = CHUNK,
            allocate: bool = False, **_: object) -> None:
    """The direct path: per piece read, CRC32C, CRC32, write; writeback per piece, per
    ``batch`` bytes ("chunk") or never ("none": the kernel's flusher threads or the fsync do it)."""
    buf = memoryview(bytearray(piece))
    pos = started = 0
    if allocate:  # the output's blocks allocated at once, not by delayed allocation at writeback
        os.posix_fallocate(out, 0, sum(os.path.getsize(f) for f in files))
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            end, a, b = min(size, off + CHUNK), 0, 0
            while off < end:
                v = buf[: min(piece, end - off)]
                os.preadv(fd, [v], off)
                a, b = crc32c(v, a), crc32(v, b)
                os.pwrite(out, v, pos)
                if writeback == "piece":
                    start_writeback(out, pos, len(v))
                pos, off = pos + len(v), off + len(v)
            if writeback == "chunk" and pos - started >= batch:
                start_writeback(out, started, pos - started)
                started = pos
        os.close(fd)


def _mapped(files: list[str], out: int, piece: int, **_: object) -> None:
    """CRCs over an ``mmap`` of the source (no copy out), the bytes copied in the kernel by
    ``copy_file_range``, a piece at a time (not used: a source truncated while mapped kills
    the process with SIGBUS instead of a one-line error)."""
    import mmap

    pos = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        size = os.fstat(fd).st_size
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        view = memoryview(m)
        a = b = 0
        for k in range(0, size, piece):
            v = view[k:k + piece]
            a, b = crc32c(v, a), crc32(v, b)
            v.release()
            n = os.copy_file_range(fd, out, min(piece, size - k), offset_src=k, offset_dst=pos)
            pos += n
        view.release()
        m.close()
        os.close(fd)


def _mapped_write(files: list[str], out: int, piece: int, window: int = CHUNK, populate: bool = False,
                  **_: object) -> None:
    """CRCs over an ``mmap`` of a source window, then ``pwrite`` from the mapping: one copy of
    each byte (page cache to page cache), as ``cp`` makes, plus the loads of the two CRCs."""
    import mmap

    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    pos = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        size = os.fstat(fd).st_size
        for w in range(0, size, window):
            n = min(window, size - w)
            m = mmap.mmap(fd, n, flags=flags, prot=mmap.PROT_READ, offset=w)
            view = memoryview(m)
            a = b = 0
            for k in range(0, n, piece):
                v = view[k:k + piece]
                a, b = crc32c(v, a), crc32(v, b)
                os.pwrite(out, v, pos)
                pos += len(v)
                v.release()
            view.release()
            m.close()
            start_writeback(out, pos - n, n)
        os.close(fd)


def _buffered(files: list[str], out: int, piece: int = CHUNK, **_: object) -> None:
    """The buffered path: read a whole 16 MiB chunk, CRC32C it, CRC32 it, write it."""
    buf = memoryview(bytearray(CHUNK))
    pos = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            v = buf[: min(CHUNK, size - off)]
            os.preadv(fd, [v], off)
            crc32c(v)
            crc32(v)
            os.pwrite(out, v, pos)
            start_writeback(out, pos, len(v))
            pos, off = pos + len(v), off + len(v)
        os.close(fd)


ROWS: list[tuple[str, Callable[..., None], dict[str, object]]] = [
    ("cp-like 128 KiB, no CRC", _cp, {"piece": 128 << 10}),
    ("copy_file_range, no CRC", _copy_file_range, {}),
    ("pieces 128 KiB", _pieces, {"piece": 128 << 10}),
    ("pieces 256 KiB", _pieces, {"piece": 256 << 10}),
    ("pieces 512 KiB", _pieces, {"piece": 512 << 10}),
    ("pieces 1 MiB", _pieces, {"piece": 1 << 20}),
    ("pieces 256 KiB, writeback per piece", _pieces, {"piece": 256 << 10, "writeback": "piece"}),
    ("pieces 256 KiB, no writeback", _pieces, {"piece": 256 << 10, "writeback": "none"}),
    ("pieces 1 MiB, writeback per 64 MiB", _pieces, {"piece": 1 << 20, "batch": 64 << 20}),
    ("pieces 1 MiB, writeback per 256 MiB", _pieces, {"piece": 1 << 20, "batch": 256 << 20}),
    ("pieces 1 MiB, no writeback", _pieces, {"piece": 1 << 20, "writeback": "none"}),
    ("pieces 1 MiB, output fallocated", _pieces, {"piece": 1 << 20, "allocate": True}),
    ("mmap CRCs + copy_file_range 1 MiB", _mapped, {"piece": 1 << 20}),
    ("mmap 16 MiB windows, CRCs + pwrite 1 MiB", _mapped_write, {"piece": 1 << 20}),
    ("mmap 16 MiB windows populated, CRCs + pwrite 1 MiB", _mapped_write, {"piece": 1 << 20, "populate": True}),
    ("mmap 16 MiB windows, CRCs + pwrite 256 KiB", _mapped_write, {"piece": 256 << 10}),
    ("16 MiB buffer (the old path)", _buffered, {}),
    ("pieces 4 MiB", _pieces, {"piece": 4 << 20}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="*", help="input files (default: a random file of --mib MiB)")
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--fsync", action="store_true", help="fsync the output in every row (timed)")
    p.add_argument("--rows", help="only the rows whose names contain one of these comma-separated "
                   "strings (the first row, the baseline, always runs)")
    a = p.parse_args()
    rows = [r for k, r in enumerate(ROWS) if k == 0 or not a.rows or any(w in r[0] for w in a.rows.split(","))]
    a.workdir.mkdir(parents=True, exist_ok=True)
    files = a.input or [str(_random_input(a.workdir, a.mib))]
    total = sum(os.path.getsize(f) for f in files)
    for f in files:  # warm the page cache
        with open(f, "rb") as h:
            while h.read(1 << 24):
                pass
    out_path = a.workdir / "copy-paths.out"
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in rows}
    for _ in range(a.repeat):
        for name, fn, kw in rows:  # rows alternate in each repeat, so drift hits them alike
            out_path.unlink(missing_ok=True)
            os.sync()
            time.sleep(0.5)
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            c0, t0 = _cpu(), time.monotonic()
            fn(files, out, **kw)
            if a.fsync:
                os.fsync(out)
            times[name].append((_cpu() - c0, time.monotonic() - t0))
            os.close(out)
    out_path.unlink(missing_ok=True)
    gib = total / (1 << 30)
    base = statistics.median(c for c, _ in times[ROWS[0][0]])
    print(f"{gib:.2f} GiB, {a.repeat} repeats, fsync {'on' if a.fsync else 'off'}, load {os.getloadavg()[0]:.1f}")
    print("| row | CPU s/GiB | x cp-like CPU | wall s/GiB |\n|---|---:|---:|---:|")
    for name, _, _ in rows:
        cpu = statistics.median(c for c, _ in times[name])
        wall = statistics.median(w for _, w in times[name])
        print(f"| {name} | {cpu / gib:.3f} | {cpu / base:.2f} | {wall / gib:.3f} |")


def _random_input(workdir: Path, mib: int) -> Path:
    path = workdir / f"copy-paths-{mib}MiB.bin"
    if not path.exists() or path.stat().st_size != mib << 20:
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
    return path


if __name__ == "__main__":
    main()
