"""What bounds Orbax (OCDBT + zstd) -> npz: each stage of the conversion timed alone on
the same checkpoint, in one run, so their ratios to ``cp -r`` can be read side by side.

    .venv/bin/python bench/orbax_floor.py ORBAX_DIR [--repeat 2] [--scratch DIR]

Stages (wall and CPU = user + sys of this process and its threads; the input is read
once first, so every stage reads from the page cache):

- ``cp -r``: ``cp -r --reflink=never`` of the directory (the acceptance's yardstick);
- ``zstd 1 thread``: every chunk value decoded alone (libzstd through chunkstream's
  decoder, pread 1 MiB at a time from the data files): the decoding floor on one core;
- ``tensorstore read``: TensorStore's own read of every array into memory, one array at
  a time (its thread pool decodes), nothing written;
- ``shardconv read``: ``OrbaxSource.read_into`` of every tensor into one 16 MiB buffer
  (what the engine's reader does), nothing written;
- ``convert``: ``python -m shardconv convert DIR OUT.npz --max-memory 256MiB --quiet``
  in a child (imports included, output fsynced).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MIB = 1 << 20


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def timed(fn: Callable[[], object], child: bool = False) -> tuple[float, float]:
    """(wall s, CPU s) of ``fn``: this process's CPU, or its children's for a subprocess."""
    who = resource.RUSAGE_CHILDREN if child else resource.RUSAGE_SELF
    c0, t0 = _cpu(who), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu(who) - c0


def chunk_values(d: Path) -> list[tuple[str, int, int] | bytes]:
    from shardconv.formats.ocdbt_index import OcdbtIndex

    ix = OcdbtIndex(d)
    ix.locate("")  # builds the index
    out: list[tuple[str, int, int] | bytes] = []
    for key in sorted(ix._map or {}):
        if not key.endswith((".zarray", "zarr.json")):
            loc = ix.locate(key)
            if loc is not None:
                out.append(loc)
    return out


def zstd_alone(values: list[tuple[str, int, int] | bytes]) -> None:
    from shardconv.formats import chunkstream as cs

    dec, out, src = cs._ZstdDecoder(), memoryview(bytearray(4 * MIB)), bytearray(MIB)
    fds: dict[str, int] = {}
    for v in values:
        dec.reset()
        if isinstance(v, bytes):
            dec.decode(v, 0, out)
            continue
        path, off, n = v
        fd = fds.setdefault(path, os.open(path, os.O_RDONLY))
        cpos, at, pend = 0, 0, memoryview(src)[:0]
        while True:
            if at >= len(pend) and cpos < n:
                k = os.preadv(fd, [memoryview(src)[:min(MIB, n - cpos)]], off + cpos)
                pend, at, cpos = memoryview(src)[:k], 0, cpos + k
            used, made = dec.decode(pend, at, out)
            at += used
            if not used and not made:
                break
    for fd in fds.values():
        os.close(fd)


def tensorstore_read(d: Path) -> None:
    import tensorstore as ts

    from shardconv.sources.orbax import OrbaxSource

    ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "cache_pool#ocdbt": {"total_bytes_limit": 4 * MIB}})
    src = OrbaxSource(d)
    with src:
        for a in src._arrays.values():
            ts.open(a.spec, context=ctx, read=True).result().read().result()


def shardconv_read(d: Path) -> None:
    from shardconv.sources.orbax import OrbaxSource

    buf = memoryview(bytearray(16 * MIB))
    with OrbaxSource(d) as src:
        for t in src.tensors():
            if t.dtype == "string":
                continue
            for off in range(0, t.nbytes, len(buf)):
                src.read_into(t.name, off, buf[:min(len(buf), t.nbytes - off)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("orbax_dir", type=Path)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--scratch", type=Path, default=None, help="where cp and convert write (default: a temp dir)")
    a = ap.parse_args()
    d = a.orbax_dir.resolve()
    scratch = Path(tempfile.mkdtemp(prefix="orbax-floor-", dir=a.scratch))
    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    values = chunk_values(d)
    subprocess.run(["cat", *[str(p) for p in d.rglob("*") if p.is_file()]], stdout=subprocess.DEVNULL, check=True)

    def cp() -> None:
        subprocess.run(["cp", "-r", "--reflink=never", "--", str(d), str(scratch / "cp")], check=True)
        shutil.rmtree(scratch / "cp")

    def convert() -> None:
        subprocess.run([sys.executable, "-m", "shardconv", "convert", str(d), str(scratch / "o.npz"),
                        "--max-memory", "256MiB", "--quiet"], cwd=REPO, check=True)
        os.unlink(scratch / "o.npz")

    stages = [("cp -r", cp, True), ("zstd 1 thread", lambda: zstd_alone(values), False),
              ("tensorstore read", lambda: tensorstore_read(d), False),
              ("shardconv read", lambda: shardconv_read(d), False), ("convert", convert, True)]
    print(f"{d}: {size / MIB:.0f} MiB in {len(values)} chunk values; load {os.getloadavg()[0]:.1f}")
    try:
        for r in range(a.repeat):
            base = None
            for name, fn, child in stages:
                load = os.getloadavg()[0]
                wall, cpu = timed(fn, child)
                base = base or wall
                print(f"r{r + 1} {name:17s} wall {wall:6.2f} s ({wall / base:4.1f}x cp -r)  CPU {cpu:6.2f} s  "
                      f"load {load:.1f}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
