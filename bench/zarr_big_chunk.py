"""Zarr sources whose single chunk is far larger than the budget, measured from outside.

    .venv/bin/python bench/zarr_big_chunk.py [--sizes 256,1024] [--max-memory 64MiB] [--workdir bench/out]

For each size (MiB) a Zarr v3 array of int32 in one chunk is written by zarr-python
(zstd, level 0 as zarr-python defaults; values in [0, 1000) so zstd has work to do), then
converted to npz at ``--max-memory``. Printed per size: wall time, peak RSS (bench/measure.py:
``/usr/bin/time`` and psutil, the larger), the RSS of ``shardconv ls`` on the same store
(the interpreter with TensorStore loaded), ``cp -r`` of the store in the same run and the
ratio, the time numcodecs takes to decode the chunk whole in memory (the floor for any
reader: zstd decoding is the work), MiB/s, and whether the peak stays within budget + ls baseline + 32 MiB. The output is
compared with zarr-python's read. A blosc store of the smallest size shows the refusal
naming the minimum budget (blosc chunks decode only whole).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from measure import run_measured  # noqa: E402

MIB = 1 << 20
SLACK = 32 * MIB


def write_store(path: Path, mib: int, codec: str) -> None:
    """A Zarr v3 store with one int32 array ``w`` of ``mib`` MiB in a single chunk."""
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    if (path / "w" / "zarr.json").exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    cols = 4096
    v = np.random.default_rng(8).integers(0, 1000, size=(mib * MIB // (4 * cols), cols), dtype=np.int32)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    comp = ZstdCodec() if codec == "zstd" else BloscCodec()
    g.create_array("w", shape=v.shape, dtype=v.dtype, chunks=v.shape, compressors=comp)[...] = v


def decode_seconds(store: Path) -> float:
    """numcodecs' zstd decoding of the whole chunk file, in this process."""
    import time

    import numcodecs

    data = (store / "w" / "c" / "0" / "0").read_bytes()
    t0 = time.perf_counter()
    numcodecs.Zstd().decode(data)
    return time.perf_counter() - t0


def same_as_zarr_python(store: Path, out: Path) -> bool:
    import zarr

    with np.load(out) as z:
        return bool(np.array_equal(z["w"], zarr.open_array(str(store / "w"), mode="r")[...]))


def bench_size(work: Path, mib: int, budget: str, budget_bytes: int, py: str) -> dict:
    store, out = work / f"zstd-{mib}MiB.zarr", work / "out"
    write_store(store, mib, "zstd")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    run_measured(["cp", "-r", "--reflink=never", str(store), str(out / "warm")])  # page cache warm
    cp = run_measured(["cp", "-r", "--reflink=never", str(store), str(out / "copy")])
    base = run_measured([py, "-m", "shardconv", "ls", str(store), "--quiet"])
    conv = run_measured([py, "-m", "shardconv", "convert", str(store), str(out / "o.npz"), "--max-memory", budget,
                         "--quiet"], timeout=3600)
    exact = conv.ok and same_as_zarr_python(store, out / "o.npz")
    decode = decode_seconds(store)
    shutil.rmtree(out, ignore_errors=True)
    peak, floor = (conv.peak_rss_kib or 0) * 1024, (base.peak_rss_kib or 0) * 1024
    return {"size MiB": mib, "wall s": conv.wall_s, "peak MiB": peak / MIB, "ls MiB": floor / MIB,
            "cp s": cp.wall_s, "x cp": conv.wall_s / cp.wall_s if cp.wall_s else None, "decode s": decode,
            "MiB/s": mib / conv.wall_s, "within": conv.ok and peak <= budget_bytes + floor + SLACK,
            "exact": exact, "error": conv.error}


def blosc_refusal(work: Path, mib: int, budget: str, py: str) -> str:
    store = work / f"blosc-{mib}MiB.zarr"
    write_store(store, mib, "blosc")
    m = run_measured([py, "-m", "shardconv", "convert", str(store), str(work / "blosc.npz"), "--max-memory", budget,
                      "--quiet"])
    return f"exit {m.rc}: {m.error or 'converted'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,1024", help="chunk sizes in MiB, comma-separated")
    ap.add_argument("--max-memory", default="64MiB")
    ap.add_argument("--workdir", default=str(BENCH_DIR / "out"))
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(BENCH_DIR.parent))
    from shardconv.util.units import parse_size

    work = Path(args.workdir) / "zarr_big_chunk"
    work.mkdir(parents=True, exist_ok=True)
    budget = parse_size(args.max_memory)
    rows = [bench_size(work, int(s), args.max_memory, budget, args.python) for s in args.sizes.split(",")]
    print(f"Zarr v3, one zstd chunk -> npz, --max-memory {args.max_memory} (peak allowed: budget + ls + 32 MiB)")
    print(f"{'size MiB':>8} {'wall s':>7} {'peak MiB':>8} {'ls MiB':>7} {'cp s':>6} {'x cp':>6} {'decode s':>8} "
          f"{'MiB/s':>7}  within exact")
    for r in rows:
        x = f"{r['x cp']:.1f}" if r["x cp"] else "-"
        print(f"{r['size MiB']:>8} {r['wall s']:>7.1f} {r['peak MiB']:>8.0f} {r['ls MiB']:>7.0f} {r['cp s']:>6.2f} "
              f"{x:>6} {r['decode s']:>8.1f} {r['MiB/s']:>7.0f}  {str(r['within']):6} {r['exact']}" + (f"  {r['error']}" if r["error"] else ""))
    smallest = min(int(s) for s in args.sizes.split(","))
    print(f"blosc, one {smallest} MiB chunk, --max-memory {args.max_memory}: "
          f"{blosc_refusal(work, smallest, args.max_memory, args.python)}")
    return 0 if all(r["within"] and r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
