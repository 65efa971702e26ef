"""Scale-out benchmark: one conversion split over workers (docs/scale-out.md).

Part 1, real I/O: an npz checkpoint of --size GiB converted to npz by one process, by
``--workers 2`` (a local process pool) and by ``--scheduler local:2`` (a Dask
LocalCluster started inside the run), against ``cp`` of the same file, in the same run.
Peak RSS is the largest single process of the tree (``/usr/bin/time``), i.e. per worker.

Part 2, throttled source: every worker's reads limited to --rate MB/s (a sleep per read,
installed by a ``sitecustomize`` this script puts on the workers' PYTHONPATH: no product
code knows about it), so the speedup at N = 1, 2, 4, 8 workers shows what splitting gives
when the medium, not the CPU, is the limit (object stores, network file systems). It also
measures the cost model's parameters: start-up, planning, per-task overhead and finalize.

    python bench/scale.py --size 4 --rate 100 --workers 1,2,4,8
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import run_measured  # noqa: E402

PY = sys.executable
GiB = 1 << 30


def write_source(path: Path, gib: float) -> int:
    """An npz of float32 tensors totalling ``gib`` GiB (64 MiB each, the last smaller)."""
    if path.exists():
        return path.stat().st_size
    rng = np.random.default_rng(0)
    total = int(gib * GiB) // 4
    arrays, k = {}, 0
    while total > 0:
        n = min(total, 16 << 20)
        arrays[f"layer_{k:04d}/kernel"] = rng.standard_normal(n, dtype=np.float32).reshape(-1, 1024)
        total -= n
        k += 1
    np.savez(path, **arrays)
    return path.stat().st_size


def _convert_cmd(src: Path, dest: Path, budget: str, extra: list[str], share: int | None = None) -> list[str]:
    code = textwrap.dedent(f"""
        import sys, shardconv
        from shardconv.util.units import parse_size
        from shardconv.workers import Job, convert, client_for
        kw = {{"share_bytes": {share!r}}}
        extra = {extra!r}
        if extra and extra[0] == "--scheduler":
            client, close = client_for(extra[1]); kw["client"] = client
        elif extra:
            kw["workers"] = int(extra[1])
        if len(kw) > 1:
            job = Job(src={str(src)!r}, dest={str(dest)!r}, max_memory=parse_size({budget!r}))
            r = convert(job, **kw)
        else:
            r = shardconv.convert({str(src)!r}, {str(dest)!r}, max_memory={budget!r})
        print(r.seconds)
    """)
    return [PY, "-c", code]


def _clean(dest: Path) -> None:
    for p in dest.parent.glob(dest.name + "*"):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def real_io(work: Path, gib: float, budget: str, repeat: int) -> list[dict]:
    src = work / "src.npz"
    size = write_source(src, gib)
    rows = []
    variants = [("cp", None), ("1 process", []), ("--workers 2", ["--workers", "2"]),
                ("--scheduler local:2", ["--scheduler", "local:2"])]
    for rep in range(repeat):
        for name, extra in variants:
            dest = work / "out.npz"
            _clean(dest)
            argv = ["cp", str(src), str(dest)] if extra is None else _convert_cmd(src, dest, budget, extra)
            m = run_measured(argv)
            rows.append({"row": name, "repeat": rep, "wall_s": m.wall_s, "cpu_s": m.cpu_s,
                         "peak_process_mib": (m.time_maxrss_kib or 0) / 1024, "load": m.load_before,
                         "error": m.error, "bytes": size})
    _clean(work / "out.npz")
    return rows




def throttled(work: Path, gib: float, budget: str, rate: float, counts: list[int],
              share: int) -> tuple[list[dict], dict]:
    """Wall time at each worker count with every read limited to ``rate`` MB/s per worker,
    plus the phases of the cost model measured in-process."""
    src = work / "src.npz"
    write_source(src, gib)
    from shardconv.testing import throttle

    env = {**os.environ, **throttle.sitecustomize(work / "throttle"), throttle.ENV: str(rate)}
    rows = []
    for n in counts:
        dest = work / "out.npz"
        _clean(dest)
        m = run_measured(_convert_cmd(src, dest, budget, ["--workers", str(n)], share), env=env)
        rows.append({"workers": n, "wall_s": m.wall_s, "peak_process_mib": (m.time_maxrss_kib or 0) / 1024,
                     "load": m.load_before, "error": m.error})
    _clean(work / "out.npz")
    return rows, phases(work, src, budget)


def phases(work: Path, src: Path, budget: str) -> dict:
    """Start-up, plan, prepare, one empty-ish task and finalize, timed in one process."""
    code = textwrap.dedent(f"""
        import json, time
        t0 = time.monotonic()
        import shardconv
        from shardconv.util.units import parse_size
        from shardconv.core import distributed
        from shardconv.workers import Job, _build, share_task
        t_import = time.monotonic() - t0
        job = Job(src={str(src)!r}, dest={str(work / 'phase.npz')!r},
                  max_memory=parse_size({budget!r}))
        t = time.monotonic(); source, plan, sink = _build(job); t_plan = time.monotonic() - t
        t = time.monotonic()
        table = distributed.prepare(plan, sink, job.dest, max_memory=job.max_memory, share_bytes=1 << 30)
        t_prepare = time.monotonic() - t
        digest = plan.digest()
        t = time.monotonic()
        for s in table.shares:
            share_task(job, s.index, digest)
        t_shares = time.monotonic() - t
        t = time.monotonic(); share_task(job, 0, digest); t_task = time.monotonic() - t  # all chunks kept: overhead
        _, plan, sink = _build(job)
        t = time.monotonic(); distributed.finalize(plan, sink, job.dest); t_finalize = time.monotonic() - t
        print(json.dumps(dict(import_s=t_import, plan_s=t_plan, prepare_s=t_prepare, shares_s=t_shares,
                              shares=len(table.shares), rerun_task_s=t_task, finalize_s=t_finalize,
                              bytes=plan.total_bytes)))
    """)
    _clean(work / "phase.npz")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout
    _clean(work / "phase.npz")
    t = time.monotonic()
    subprocess.run([PY, "-c", "from concurrent.futures import ProcessPoolExecutor as P\n"
                    "from multiprocessing import get_context\n"
                    "import shardconv.workers\n"
                    "with P(2, mp_context=get_context('spawn')) as p: list(p.map(abs, [1, 2]))"], check=True)
    return {**json.loads(out.strip().splitlines()[-1]), "pool_start_s": time.monotonic() - t}


def _table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=4, help="checkpoint size in GiB (default 4)")
    ap.add_argument("--max-memory", default="256MiB")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--rate", type=float, default=100, help="throttled read rate per worker, MB/s (default 100)")
    ap.add_argument("--throttled-size", type=float, default=1, help="GiB for the throttled part (default 1)")
    ap.add_argument("--workers", default="1,2,4,8", help="worker counts of the throttled part")
    ap.add_argument("--share-size", type=float, default=64, help="MiB per share in the throttled part (default 64)")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="shardconv-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# scale-out bench, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"--max-memory {args.max_memory}")
    if not args.skip_real:
        rows = real_io(work / "real", args.size, args.max_memory, args.repeat) if (work / "real").mkdir(
            exist_ok=True) is None else []
        cp = min(r["wall_s"] for r in rows if r["row"] == "cp")
        for r in rows:
            r["x_cp"] = r["wall_s"] / cp
        print(f"\n## real I/O, {args.size} GiB npz -> npz\n")
        print(_table(rows, ["row", "repeat", "wall_s", "x_cp", "cpu_s", "peak_process_mib", "load", "error"]))
    (work / "thr").mkdir(exist_ok=True)
    counts = [int(x) for x in args.workers.split(",")]
    rows, ph = throttled(work / "thr", args.throttled_size, args.max_memory, args.rate, counts,
                         int(args.share_size * (1 << 20)))
    base = next(r["wall_s"] for r in rows if r["workers"] == counts[0])
    for r in rows:
        r["speedup"] = base / r["wall_s"]
    print(f"\n## throttled source: {args.throttled_size} GiB, reads limited to {args.rate} MB/s per worker, "
          f"{args.share_size:g} MiB shares\n")
    print(_table(rows, ["workers", "wall_s", "speedup", "peak_process_mib", "load", "error"]))
    print("\n## cost-model parameters (one process)\n")
    print(json.dumps(ph, indent=1))
    shutil.rmtree(work, ignore_errors=True) if args.workdir is None else None


if __name__ == "__main__":
    main()
