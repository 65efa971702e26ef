"""shardconv benchmark: wall time, CPU time and peak memory of conversions, measured from
outside the process and compared with `cp` of the same files in the same run.

    python bench/run.py                            # 1 and 4 GiB, 3 repeats, default rows, warm cache
    python bench/run.py --cold                     # drop the page cache before every timed run (root)
    python bench/run.py --busy                     # one CPU hog per core during every timed run
    python bench/run.py --sizes 0.25 --repeat 1    # smoke run: every default row once, ~3 min
    python bench/run.py --rows all --markdown      # every row, table as markdown

Inputs are written once per size into the work directory and reused: a TF1 sharded
Saver checkpoint (tests/tf_fixtures.py), a TF2 object-based checkpoint
(bench/tf2_checkpoint.py), an Orbax checkpoint (OCDBT + zstd, written by
orbax-checkpoint through bench/jax_rows.py), and TF indexes of 20 000 / 100 000 tiny
tensors (bench/index_listing.py). In each repeat every row runs once, rows alternating,
each as a child process under /usr/bin/time with psutil sampling its RSS (measure.py).
Each row's output goes to a fresh scratch directory, deleted and synced after the run,
untimed. Progress goes to stderr, the table to stdout, everything to WORKDIR/results.json.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from machine import Hogs, can_drop_caches, drop_caches  # noqa: E402
from measure import Measurement, run_measured  # noqa: E402

PY = "{py}"
GIB = 1 << 30
MIB = 1 << 20

# ---------------------------------------------------------------------------
# Rows. Placeholders in an argv template: {py} the Python running this script (or
# --python), {src} the row's input (checkpoint prefix or directory), {out} a fresh empty
# directory for the output (deleted after the run), {max_memory} the --max-memory
# string, {bench} this directory; an argument that is exactly "{files}" expands to the
# input's files. Adding a row is one line.


@dataclass(frozen=True)
class Row:
    label: str
    input: str  # tf | tf2 | orbax | index:<kind>:<count> | "" (no input)
    kind: str  # baseline | converter | resume | naive | footprint | listing
    argv: list[str] = field(hash=False)


def _cp(inp: str, label: str) -> Row:
    return Row(label, inp, "baseline", ["cp", "--reflink=never", "--", "{files}", "{out}/"])


def _cp_sync(inp: str, label: str) -> Row:
    return Row(label, inp, "baseline", ["sh", "-c", 'd=$1; shift; cp --reflink=never -- "$@" "$d"/ && sync -- "$d"/*',
                                        "sh", "{out}", "{files}"])


#: Baselines of each input: (cp, cp + fsync of every copied file). The x cp and x cp+sync
#: columns of a row divide by the baselines of its input, measured in the same run.
BASELINES = {
    "tf": (_cp("tf", "cp"), _cp_sync("tf", "cp+sync")),
    "tf2": (_cp("tf2", "cp tf2"), _cp_sync("tf2", "cp+sync tf2")),
    "orbax": (Row("cp -r orbax", "orbax", "baseline", ["cp", "-r", "--reflink=never", "--", "{src}", "{out}/"]),
              Row("cp -r+sync orbax", "orbax", "baseline",
                  ["sh", "-c", 'cp -r --reflink=never -- "$1" "$2"/ && find "$2" -type f -exec sync -- {{}} +',
                   "sh", "{src}", "{out}"])),
}
INPUT_ORDER = ("tf", "tf2", "orbax")

_CONVERT = [PY, "-m", "shardconv", "convert", "{src}"]
_MEM = ["--max-memory", "{max_memory}", "--quiet"]
CONVERTER_ROWS = [
    Row("npz", "tf", "converter", _CONVERT + ["{out}/model.npz"] + _MEM),
    Row("resume", "tf", "resume", _CONVERT + ["{out}/model.npz"] + _MEM),
    Row("npz-nofsync", "tf", "converter", _CONVERT + ["{out}/model.npz", "--no-fsync"] + _MEM),
    Row("npz-split", "tf", "converter", _CONVERT + ["{out}/model", "--to", "npz", "--max-file-size", "1GiB"] + _MEM),
    Row("safetensors", "tf", "converter", _CONVERT + ["{out}/model.safetensors"] + _MEM),
    Row("zarr", "tf", "converter", _CONVERT + ["{out}/model.zarr"] + _MEM),
    Row("zarr-zstd", "tf", "converter", _CONVERT + ["{out}/model.zarr", "--compression", "zstd"] + _MEM),
    Row("savedmodel", "tf", "converter", _CONVERT + ["{out}/savedmodel", "--to", "savedmodel"] + _MEM),
    Row("tf-checkpoint", "tf", "converter", _CONVERT + ["{out}/ckpt", "--to", "tf-checkpoint"] + _MEM),
    Row("tf2-npz", "tf2", "converter", _CONVERT + ["{out}/model.npz"] + _MEM),
    Row("orbax-npz", "orbax", "converter", _CONVERT + ["{out}/model.npz"] + _MEM),
    Row("naive", "tf", "naive", [PY, "{bench}/naive_npz.py", "{src}", "{out}/model.npz"]),
]
DEFAULT_ROWS = "npz,resume,zarr-zstd,tf2-npz,orbax-npz"
#: The resume row kills a conversion (SHARDCONV_TEST_KILL=journal:K) once this share of
#: the bytes is journaled, then times the rerun that resumes it.
RESUME_AT = 0.9

# Size-independent rows, run before the sized ones, rows alternating in each repeat.
SMALL = REPO / "tests" / "data" / "tf-serving" / "saved_model_half_plus_two_cpu" / "00000123"
FOOTPRINT_ROWS = [
    Row("import tensorflow", "", "footprint", [PY, "-c", "import tensorflow"]),
    Row("import shardconv", "", "footprint", [PY, "-c", "import shardconv"]),
    Row("import numpy", "", "footprint", [PY, "-c", "import numpy"]),
    Row("import ml_dtypes", "", "footprint", [PY, "-c", "import ml_dtypes"]),
    Row("ls small", "", "footprint", [PY, "-m", "shardconv", "ls", str(SMALL)]),
]
DEFAULT_LISTING = "20000,100000"
DEFAULT_LISTING_KINDS = "tf1,tf2"

#: Rows whose process imports a big library: their budget check allows that library's
#: import footprint, measured in this run by the named footprint row, plus LIBRARY_SLACK
#: (issue 7: peak <= TF import + --max-memory + 100 MiB).
LIBRARY_ROWS = {"savedmodel": "import tensorflow"}
LIBRARY_SLACK = 100 * MIB


def listing_rows(counts: list[int], kinds: list[str]) -> list[Row]:
    """``ls`` and ``plan`` of each index (written by bench/index_listing.py)."""
    rows = []
    for count in counts:
        short = f"{count // 1000}k" if count % 1000 == 0 else str(count)
        for kind in kinds:
            name = short if kind == "tf1" else f"{kind} {short}"
            for cmd in ("ls", "plan"):
                rows.append(Row(f"{cmd} {name}", f"index:{kind}:{count}", "listing",
                                [PY, "-m", "shardconv", cmd, "{src}"]))
    return rows


# ---------------------------------------------------------------------------
# helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def parse_bytes(s: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", s)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 256MiB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def expand(argv: list[str], ctx: dict, files: list[str]) -> list[str]:
    out = []
    for a in argv:
        if a == "{files}":
            out.extend(files)
        else:
            out.append(a.format(**ctx))
    return out


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total


def tree_digest(path: Path) -> str:
    """sha256 over every file's relative path and bytes under ``path`` (sorted)."""
    h = hashlib.sha256()
    buf = bytearray(4 * MIB)
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(root, n)
            h.update(os.path.relpath(p, path).encode() + b"\0")
            with open(p, "rb", buffering=0) as f:
                while k := f.readinto(buf):
                    h.update(memoryview(buf)[:k])
    return h.hexdigest()


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def warm_cache(files: list[str]) -> float:
    """Read every file once (into one reused buffer); returns seconds."""
    buf = bytearray(16 * MIB)
    mv = memoryview(buf)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(mv):
                pass
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------
# inputs: {"src", "files", "bytes", ...} per input name


def generator_argv(py: str, outdir: Path, mib: float, shards: int) -> list[str]:
    """The TF1 checkpoint writer: TensorFlow itself, through the tests' fixture script."""
    return [py, str(REPO / "tests" / "tf_fixtures.py"), "big", str(outdir),
            "--mib", f"{mib:g}", "--shards", str(shards), "--no-reference"]


def checkpoint_info(ckdir: Path) -> dict | None:
    idx = ckdir / "reference" / "index.json"
    if not (ckdir / "bench-ok").exists() or not idx.exists():
        return None
    index = json.loads(idx.read_text())
    prefix = ckdir / index["prefix"]
    data = sorted(str(p) for p in prefix.parent.glob(prefix.name + ".data-*"))
    index_file = str(prefix) + ".index"
    if not data or not os.path.exists(index_file):
        return None
    files = data + [index_file]
    tensors = {}
    for name, t in index.get("tensors", {}).items():
        n = 1
        for d in t.get("shape", []):
            n *= int(d)
        item = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int32": 4,
                "int64": 8}.get(t.get("dtype", "float32"), 4)
        tensors[name] = n * item
    largest = max(tensors.items(), key=lambda kv: kv[1]) if tensors else ("?", 0)
    return {"dir": str(ckdir), "src": str(prefix), "files": files, "shards": len(data),
            "bytes": sum(os.path.getsize(f) for f in files), "tensors": len(tensors),
            "largest_name": largest[0], "largest_bytes": largest[1],
            "generator": (ckdir / "bench-ok").read_text().strip()}


def _write_once(final: Path, argv: list[str], env: dict, what: str, marker: str) -> None:
    """Run a writer into ``final``.tmp (which ``argv`` names) and rename it to ``final``
    with a ``bench-ok`` marker, so an interrupted write is never reused."""
    tmp = final.with_name(final.name + ".tmp")
    remove(tmp)
    remove(final)
    log(f"{what}: writing into {final} ...")
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        remove(tmp)
        tail = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or [f"rc {r.returncode}"]
        raise SystemExit(f"could not write {what}: {tail[0]}")
    (tmp / "bench-ok").write_text(marker + "\n")
    tmp.rename(final)
    log(f"  written in {time.perf_counter() - t0:.1f} s")


def _check_disk(workdir: Path, nbytes: float) -> None:
    free = shutil.disk_usage(workdir).free
    if free < nbytes:
        raise SystemExit(f"not enough disk in {workdir}: {nbytes / GIB:.1f} GiB needed, {free / GIB:.1f} GiB free")


def ensure_tf1(workdir: Path, size_gib: float, shards: int, py: str, env: dict) -> dict:
    ckdir = workdir / f"ckpt-fixtures-{size_gib * 1024:g}MiB-{shards}sh"
    if checkpoint_info(ckdir) is None:
        _check_disk(workdir, size_gib * GIB * 1.1 + GIB)
        tmp = ckdir.with_name(ckdir.name + ".tmp")
        _write_once(ckdir, generator_argv(py, tmp, size_gib * 1024, shards), env,
                    f"TF1 checkpoint {size_gib:g} GiB", "fixtures")
    info = checkpoint_info(ckdir)
    if info is None:
        raise SystemExit(f"could not write a checkpoint into {ckdir}")
    return {**info, "generator": f"tests/tf_fixtures.py big (TF1 sharded Saver, {shards} shards)"}


def ensure_tf2(workdir: Path, size_gib: float, py: str, env: dict) -> dict:
    d = workdir / f"tf2-{size_gib * 1024:g}MiB"
    if not (d / "bench-ok").exists():
        _check_disk(workdir, size_gib * GIB * 1.1 + GIB)
        tmp = d.with_name(d.name + ".tmp")
        _write_once(d, [py, str(BENCH_DIR / "tf2_checkpoint.py"), str(tmp), "--mib", f"{size_gib * 1024:g}"],
                    env, f"TF2 checkpoint {size_gib:g} GiB", "tf2_checkpoint")
    files = sorted(str(p) for p in d.glob("ckpt.*"))
    return {"dir": str(d), "src": str(d / "ckpt"), "files": files, "bytes": sum(map(os.path.getsize, files)),
            "generator": "bench/tf2_checkpoint.py (tf.train.Checkpoint.write of tf.Module variables)"}


def ensure_orbax(workdir: Path, size_gib: float, py: str, env: dict) -> dict:
    import jax_rows  # imports this module as ``run``; only needed for this input

    if not (workdir / f"jax-inputs-{size_gib * 1024:g}MiB" / "bench-ok").exists():
        _check_disk(workdir, size_gib * GIB * 2.2 + GIB)  # the Orbax checkpoint and an npz of the same tree
    inp = jax_rows.ensure_inputs(workdir, size_gib, py, {**env, "XLA_FLAGS": jax_rows.XLA_FLAGS})
    return {**inp["orbax"], "largest_bytes": inp["largest_bytes"],
            "generator": "orbax.checkpoint.StandardCheckpointer (OCDBT, zstd), 8 host devices (bench/jax_rows.py)"}


def ensure_index(workdir: Path, kind: str, count: int, py: str) -> dict:
    import index_listing

    if kind == "tf1":
        prefix = index_listing.ensure_checkpoint(workdir, count, py)
    else:
        prefix = index_listing.ensure_checkpoint(workdir, count, py, kind)
    files = sorted(str(p) for p in prefix.parent.glob(prefix.name + ".*"))
    return {"src": str(prefix), "files": files, "bytes": sum(map(os.path.getsize, files)), "tensors": count}


# ---------------------------------------------------------------------------
# running rows


class RowResult:
    def __init__(self, row: Row, size_gib: float | None):
        self.row = row
        self.label = row.label
        self.kind = row.kind
        self.size_gib = size_gib
        self.runs: list[dict] = []
        self.error: str | None = None
        self.identical: list[bool] = []  # resume row: output == the npz row's, per repeat

    def add(self, m: Measurement, out_bytes: int | None) -> None:
        d = m.to_json()
        d["out_bytes"] = out_bytes
        self.runs.append(d)
        if m.error and self.error is None:
            self.error = m.error

    def summary(self, cp: dict | None, cp_sync: dict | None, budget: int | None,
                in_bytes: int | None) -> dict:
        """Medians over the successful runs, and the ratios to this input's baselines."""
        ok = [r for r in self.runs if r["error"] is None]
        s: dict = {"label": self.label, "kind": self.kind, "size_gib": self.size_gib, "in_bytes": in_bytes,
                   "status": "ok" if self.error is None and ok else f"failed: {self.error}",
                   "repeats": len(self.runs), "loads": [r.get("load_before") for r in self.runs]}
        if self.error is not None or not ok:
            return s
        walls = [r["wall_s"] for r in ok]
        wall = statistics.median(walls)
        s.update(wall_s=wall, wall_s_min=min(walls), wall_s_max=max(walls))
        cpus = [r["cpu_s"] for r in ok if r.get("cpu_s") is not None]
        cpu = statistics.median(cpus) if cpus else None
        s["cpu_s"] = cpu
        s["cpu_s_per_gib"] = cpu / (in_bytes / GIB) if cpu is not None and in_bytes else None
        s["cpu_x_cp"] = cpu / cp["cpu_s"] if cpu is not None and cp and cp.get("cpu_s") else None
        machines = [r["machine_cpu_s"] for r in ok if r.get("machine_cpu_s") is not None]
        s["machine_cpu_s"] = statistics.median(machines) if machines else None
        base = cp_sync.get("machine_cpu_s") if cp_sync else None
        s["mcpu_x_cp_sync"] = s["machine_cpu_s"] / base if s["machine_cpu_s"] is not None and base else None
        s["x_cp"] = wall / cp["wall_s"] if cp and cp.get("wall_s") else None
        s["x_cp_sync"] = wall / cp_sync["wall_s"] if cp_sync and cp_sync.get("wall_s") else None
        peaks = [r["peak_rss_kib"] for r in ok if r["peak_rss_kib"] is not None]
        if peaks:
            best = max(ok, key=lambda r: r["peak_rss_kib"] or 0)
            s.update(peak_rss_mib=max(peaks) / 1024, peak_source=best["peak_source"])
            if budget is not None:
                s["within_budget"] = max(peaks) * 1024 <= budget
        outs = [r["out_bytes"] for r in ok if r.get("out_bytes")]
        s["out_ratio"] = in_bytes / statistics.median(outs) if in_bytes and outs else None  # in/out bytes
        if self.identical:
            s["identical"] = f"{sum(self.identical)}/{len(self.identical)}"
            if not all(self.identical):
                s["status"] = "failed: resumed output differs from the uninterrupted npz run"
        return s


@dataclass
class Runner:
    """Runs one row once: scratch directory, cache state, hogs, measurement, cleanup."""

    env: dict
    timeout: float
    interval: float
    tmpdir: Path
    scratch_root: Path
    cold: bool
    hogs: Hogs
    settle: float

    def scratch(self, label: str) -> Path:
        return self.scratch_root / re.sub(r"[^A-Za-z0-9_.+-]", "_", label)

    def run(self, res: RowResult, argv: list[str], files: list[str], *, cold: bool | None = None,
            pre: Callable[[Path], str | None] | None = None,
            post: Callable[[Path], None] | None = None) -> Measurement:
        """``pre(out)`` runs untimed before (a returned string fails the run), ``post(out)`` after."""
        out = self.scratch(res.label)
        remove(out)
        out.mkdir(parents=True)
        os.sync()
        problem = pre(out) if pre else None
        if problem:
            m = Measurement(argv, None, 0.0, None, None, None, 0, None, None, problem, "")
            res.add(m, None)
            remove(out)
            return m
        if (self.cold if cold is None else cold):
            drop_caches()
        elif files:
            warm_cache(files)
        with self.hogs.running():
            m = run_measured(argv, cwd=REPO, env=self.env, timeout=self.timeout, interval=self.interval,
                             tmpdir=self.tmpdir)
        out_bytes = dir_bytes(out)
        if m.ok and res.kind not in ("footprint", "listing") and out_bytes == 0:
            m.error = "exit 0 but no output written"
        if m.ok and post:
            post(out)
        res.add(m, out_bytes)
        remove(out)
        os.sync()  # don't let this run's writeback eat into the next run
        # Freeing a just-synced output keeps this VM's disk busy for a moment (discards);
        # without a pause the row that follows pays for the previous row's cleanup.
        time.sleep(self.settle)
        return m


def fmt_progress(tag: str, label: str, m: Measurement) -> str:
    if not m.ok:
        return f"{tag} {label}: FAILED: {m.error}"
    peak = f"{m.peak_rss_kib / 1024:.0f} MiB" if m.peak_rss_kib else "? MiB"
    cpu = f"{m.cpu_s:.2f} s CPU" if m.cpu_s is not None else "? s CPU"
    return f"{tag} {label}: {m.wall_s:.3f} s, {cpu}, {peak} ({m.peak_source}), load {m.load_before:.1f}"


# ---------------------------------------------------------------------------
# resume after a kill


def _journal_records(out: Path) -> list[tuple[int, int]]:
    """(chunk index, bytes) of every chunk record in the partial output's journal."""
    recs = []
    for journal in out.glob("*.partial/journal.jsonl"):
        for line in journal.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and isinstance(r.get("i"), int) and isinstance(r.get("n"), int):
                recs.append((r["i"], r["n"]))
    return recs


def _run_killed(argv: list[str], env: dict, point: str, timeout: float) -> str | None:
    """Run ``argv`` with SHARDCONV_TEST_KILL=point; None if it died of SIGKILL as asked."""
    r = subprocess.run(argv, cwd=REPO, env={**env, "SHARDCONV_TEST_KILL": point}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=timeout)
    if r.returncode == -9:
        return None
    tail = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:]
    return f"SHARDCONV_TEST_KILL={point}: exit {r.returncode}, not killed ({tail[0] if tail else 'no stderr'})"


def resume_kill_point(runner: Runner, argv_for: Callable[[Path], list[str]]) -> dict:
    """One untimed conversion killed after its last chunk is journaled (``finish``): its
    journal gives the chunk sizes, hence K such that ``journal:K`` leaves RESUME_AT of the
    bytes journaled."""
    out = runner.scratch("resume-probe")
    remove(out)
    out.mkdir(parents=True)
    try:
        problem = _run_killed(argv_for(out), runner.env, "finish", runner.timeout)
        recs = sorted(_journal_records(out))
    finally:
        remove(out)
        os.sync()
    if problem or not recs:
        return {"error": problem or "the killed run left no journal records"}
    total = sum(n for _i, n in recs)
    done = 0
    for i, n in recs:
        done += n
        if done >= RESUME_AT * total:
            return {"point": f"journal:{i}", "chunks_done": i + 1, "chunks": len(recs), "fraction": done / total}
    return {"error": "no chunk reaches the kill point"}


# ---------------------------------------------------------------------------
# table


COLUMNS = ["row", "input GiB", "wall s", "min-max s", "CPU s", "CPU s/GiB", "CPU x cp", "CPU x cp paired",
           "machine CPU s", "mCPU x cp+sync", "peak RSS MiB", "x cp", "x cp+sync", "load", "budget", "status"]
RIGHT = set(range(1, 14))


def table_cells(s: dict) -> list[str]:
    def f(key: str, fmt: str) -> str:
        v = s.get(key)
        return fmt.format(v) if v is not None else "-"

    budget = "-" if "within_budget" not in s else ("ok" if s["within_budget"] else "OVER")
    status = s["status"] if len(s["status"]) <= 90 else s["status"][:87] + "..."
    if s.get("identical") and status == "ok":
        status = f"ok, identical {s['identical']}"
    size = f"{s['in_bytes'] / GIB:.2f}" if s.get("in_bytes") and s["kind"] != "listing" else "-"
    spread = f"{s['wall_s_min']:.2f}-{s['wall_s_max']:.2f}" if s.get("wall_s_min") is not None else "-"
    loads = [x for x in s.get("loads", []) if x is not None]
    load = "-" if not loads else f"{min(loads):.1f}" + (f"-{max(loads):.1f}" if max(loads) > min(loads) else "")
    return [s["label"], size, f("wall_s", "{:.3f}"), spread, f("cpu_s", "{:.2f}"), f("cpu_s_per_gib", "{:.2f}"),
            f("cpu_x_cp", "{:.2f}"), f("cpu_x_cp_paired", "{:.2f}"), f("machine_cpu_s", "{:.2f}"),
            f("mcpu_x_cp_sync", "{:.2f}"),
            f("peak_rss_mib", "{:.0f}"), f("x_cp", "{:.2f}"), f("x_cp_sync", "{:.2f}"),
            load, budget, status]


def _columns(rows: list[dict]) -> tuple[list[int], list[list[str]]]:
    """Indexes of the columns to show (those with a value in some row) and every row's cells."""
    cells = [table_cells(s) for s in rows]
    keep = [i for i in range(len(COLUMNS)) if i in (0, len(COLUMNS) - 1) or any(c[i] != "-" for c in cells)]
    return keep, cells


def render_text(rows: list[dict]) -> str:
    keep, body = _columns(rows)
    cells = [[COLUMNS[i] for i in keep]] + [[c[i] for i in keep] for c in body]
    widths = [max(len(c[j]) for c in cells) for j in range(len(keep))]
    lines = []
    for n, c in enumerate(cells):
        parts = [c[j].rjust(widths[j]) if keep[j] in RIGHT else c[j].ljust(widths[j]) for j in range(len(c))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[dict]) -> str:
    keep, body = _columns(rows)
    out = ["| " + " | ".join(COLUMNS[i] for i in keep) + " |",
           "|" + "|".join("---:" if i in RIGHT else "---" for i in keep) + "|"]
    for c in body:
        out.append("| " + " | ".join(c[i].replace("|", "\\|") for i in keep) + " |")
    return "\n".join(out)


def code_version() -> str:
    """The commit the measured code is at, and whether shardconv/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "shardconv"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes in shardconv/" if dirty else "")


def header(results: dict) -> list[str]:
    """What the table was measured under: date, machine, cache, load, the command."""
    m = results["meta"]
    loads = "; ".join(f"{sec}: " + ", ".join(f"r{i + 1} {x:.2f}" for i, x in enumerate(v))
                      for sec, v in results["repeat_loads"].items())
    return [f"{m['date']}, {m['cpus']} CPUs, {m['mem_gib']:.0f} GiB RAM, Python {m['python']}, "
            f"--max-memory {m['max_memory']}; code {m['code']}",
            f"command: python bench/run.py {' '.join(m['argv'])}".rstrip(),
            f"page cache: {m['cache']}", m["busy"],
            f"load average (1 min) at the start of each repeat: {loads}"]


def notes(results: dict) -> list[str]:
    lines = []
    for key, inp in results["inputs"].items():
        extra = ""
        if inp.get("largest_bytes"):
            over = "over" if inp["largest_bytes"] > results["meta"]["max_memory_bytes"] else "not over"
            extra = f", largest tensor {inp['largest_bytes'] / MIB:.1f} MiB ({over} the budget)"
        lines.append(f"input {key}: {inp['bytes'] / MIB:.1f} MiB in {len(inp['files'])} files{extra}; "
                     f"written by {inp.get('generator', '?')}")
    for r in results["rows"]:
        where = f" at {r['size_gib']:g} GiB" if r.get("size_gib") is not None else ""
        if r.get("budget_rule"):
            lines.append(f"{r['label']}{where}: budget column checks peak RSS <= {r['budget_rule']}")
        if r.get("out_ratio") and "zstd" in r["label"]:
            lines.append(f"{r['label']}{where}: compression ratio {r['out_ratio']:.3f} (input bytes / output bytes)")
        if r.get("resume"):
            lines.append(f"{r['label']}{where}: {r['resume']}")
    m = results["meta"]
    lines.append(f"wall, CPU = medians of {m['repeat']}; CPU = user + sys of the child and its descendants "
                 f"(/usr/bin/time); CPU s/GiB per GiB of input; peak RSS = max over repeats of "
                 f"max(/usr/bin/time %M, psutil tree-sum every {m['interval_s'] * 1000:g} ms); x cp, CPU x cp = "
                 f"this row / the cp row of the same input in this run; CPU x cp paired = the median over the "
                 f"repeats of this row's CPU / the CPU of that repeat's cp run; machine CPU = busy CPU seconds of "
                 f"the whole machine during the run (/proc/stat, the bench's own left out): the row's plus the kernel's "
                 f"writeback threads (which write what cp leaves dirty, and what sync asks for) plus anything else "
                 f"running; "
                 f"mCPU x cp+sync = this row's / the cp+sync row's, the same durable work on both sides; "
                 f"load = 1-min load average before each run")
    return lines


# ---------------------------------------------------------------------------
# one section of the bench: rows alternating in each repeat


def run_section(runner: Runner, name: str, rows: list[Row], inputs: dict, ctx: dict, repeat: int,
                results: dict, size: float | None, resume: dict | None = None) -> dict[str, RowResult]:
    """``repeat`` times, every row once in order; returns each row's results."""
    res = {r.label: RowResult(r, size) for r in rows}
    loads = results["repeat_loads"].setdefault(name, [])
    for rep in range(repeat):
        loads.append(os.getloadavg()[0])
        digests: dict[str, str] = {}
        for row in rows:
            rr = res[row.label]
            if rr.error is not None:
                continue  # failed once: don't repeat, report the failure
            inp = inputs.get(row.input, {"src": "", "files": []})
            out = runner.scratch(row.label)
            argv = expand(row.argv, {**ctx, "src": inp["src"], "out": str(out)}, inp["files"])
            pre, post = _hooks(row, rr, runner, argv, resume, digests)
            cold = None if row.kind not in ("footprint", "listing") else False
            m = runner.run(rr, argv, inp["files"], cold=cold, pre=pre, post=post)
            log(fmt_progress(f"[{name} r{rep + 1}/{repeat}]", row.label, m))
    return res


def _hooks(row: Row, rr: RowResult, runner: Runner, argv: list[str], resume: dict | None,
           digests: dict[str, str]) -> tuple[Callable[[Path], str | None] | None, Callable[[Path], None] | None]:
    """The npz row records its output's digest; the resume row is killed first, then compared."""
    if row.label == "npz" and resume is not None:
        return None, lambda out: digests.__setitem__("npz", tree_digest(out))
    if row.kind != "resume":
        return None, None
    if not resume or "point" not in resume:
        return (lambda _out: (resume or {}).get("error", "no kill point")), None

    def pre(_out: Path) -> str | None:
        return _run_killed(argv, runner.env, resume["point"], runner.timeout)

    def post(out: Path) -> None:
        if "npz" in digests:
            rr.identical.append(tree_digest(out) == digests["npz"])

    return pre, post


# ---------------------------------------------------------------------------
# main


EPILOG = """\
rows (--rows, comma-separated; 'all' for every one):
  npz            TF1 sharded checkpoint -> one .npz (fsynced)
  resume         the npz conversion killed once RESUME_AT=90% of its bytes are journaled
                 (untimed), then the timed rerun that resumes it; output compared
                 byte for byte with the npz row's in the same repeat
  npz-nofsync, npz-split, safetensors, zarr, savedmodel, tf-checkpoint: TF1 -> those
  zarr-zstd      TF1 -> Zarr v3 with --compression zstd
  tf2-npz        TF2 object-based checkpoint -> npz
  orbax-npz      Orbax (OCDBT + zstd) -> npz, against cp -r of the Orbax directory
  naive          TensorFlow's reader + one np.savez (whole model in memory)
Every input gets its own cp and cp+sync rows. Before the sized rows: import shardconv,
import numpy, import ml_dtypes, ls of a 5-tensor SavedModel (the fixed cost of a command), import tensorflow (only with
savedmodel or naive), and ls/plan of the --listing indexes (always warm).

quiet-machine re-run (as root, nothing else running):
  python bench/run.py --cold
  python bench/run.py --cold --busy
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,4", help="input sizes in GiB, comma-separated, or 'none' (default 1,4)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each row; tables show medians (default 3)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"rows, comma-separated, 'all' or 'none' (default {DEFAULT_ROWS})")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before every timed conversion (root only; otherwise the "
                        "header says the runs were warm). Default: inputs read into the cache before each run")
    p.add_argument("--busy", action="store_true",
                   help="one CPU hog per core (pinned) spinning during every timed run, stopped between runs")
    p.add_argument("--max-memory", default="256MiB", help="passed to the converter (default 256MiB)")
    p.add_argument("--listing", default=DEFAULT_LISTING,
                   help=f"tensor counts of the ls/plan rows, or 'none' (default {DEFAULT_LISTING})")
    p.add_argument("--listing-kinds", default=DEFAULT_LISTING_KINDS,
                   help=f"index kinds of the ls/plan rows: tf1 (SaveV2), tf2 (object graph) (default {DEFAULT_LISTING_KINDS})")
    p.add_argument("--skip-footprint", action="store_true", help="skip the import and 'ls small' rows")
    p.add_argument("--skip-naive", action="store_true", help="leave out the naive row even with --rows all")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--workdir", type=Path, default=BENCH_DIR / "out",
                   help="inputs (cached), scratch outputs, results.json (default bench/out)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds of pause after each run's cleanup (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed cp runs per size before the repeats (default 1)")
    p.add_argument("--shards", type=int, default=4, help="data shards of the TF1 checkpoint (default 4)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the Python rows")
    p.add_argument("--timeout", type=float, default=3600, help="per-run limit in seconds")
    p.add_argument("--interval", type=float, default=0.02, help="psutil sampling period, s")
    p.add_argument("--drop-checkpoints", action="store_true", help="delete each size's inputs when it is done")
    a = p.parse_args(argv)
    known = [r.label for r in CONVERTER_ROWS]
    if a.rows.strip() == "all":
        a.row_list = [r for r in CONVERTER_ROWS if not (a.skip_naive and r.kind == "naive")]
    else:
        want = [w.strip() for w in a.rows.split(",") if w.strip() and w.strip() != "none"]
        unknown = [w for w in want if w not in known]
        if unknown:
            p.error(f"unknown rows {unknown}; known: {known}")
        if "resume" in want and "npz" not in want:
            want.insert(0, "npz")  # the resume row is compared with the npz row
        a.row_list = [r for r in CONVERTER_ROWS if r.label in want and not (a.skip_naive and r.kind == "naive")]
    a.size_list = [] if a.sizes.strip() == "none" else [float(x) for x in a.sizes.split(",") if x.strip()]
    a.counts = [] if a.listing.strip() == "none" else [int(c) for c in a.listing.split(",") if c.strip()]
    a.kinds = [k.strip() for k in a.listing_kinds.split(",") if k.strip()]
    a.budget = parse_bytes(a.max_memory)
    if not os.access("/usr/bin/time", os.X_OK):
        p.error("/usr/bin/time (GNU time) is required")
    return a


def size_independent(runner: Runner, a: argparse.Namespace, ctx: dict, results: dict,
                     summaries: list[dict]) -> dict[str, int]:
    """Footprint and listing rows; returns the footprint rows' peak RSS (for LIBRARY_ROWS)."""
    needs_tf = any(r.label in LIBRARY_ROWS or r.kind == "naive" for r in a.row_list)
    footprint_rows = [r for r in FOOTPRINT_ROWS if needs_tf or r.label != "import tensorflow"]
    rows = ([] if a.skip_footprint else footprint_rows) + listing_rows(a.counts, a.kinds)
    if not rows:
        return {}
    inputs = {}
    for row in rows:
        if row.input.startswith("index:"):
            _, kind, count = row.input.split(":")
            inputs[row.input] = ensure_index(a.workdir, kind, int(count), a.python)
            results["inputs"][f"{kind} index of {count} tensors"] = {
                **inputs[row.input], "generator": f"bench/index_listing.py ({kind})"}
    for row in rows:
        if row.kind == "footprint":  # one untimed run: the libraries into the page cache
            subprocess.run(expand(row.argv, {**ctx, "src": "", "out": ""}, []), cwd=REPO, env=runner.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = run_section(runner, "imports+listing", rows, inputs, ctx, a.repeat, results, None)
    footprint = {}
    for row in rows:
        s = res[row.label].summary(None, None, None, None)
        summaries.append({**s, "runs": res[row.label].runs})
        if row.kind == "footprint" and s.get("peak_rss_mib"):
            footprint[row.label] = int(s["peak_rss_mib"] * MIB)
    return footprint


def sized(runner: Runner, a: argparse.Namespace, size: float, ctx: dict, results: dict,
          summaries: list[dict], footprint: dict[str, int]) -> None:
    """Every selected row at one input size, with the baselines of the inputs they use."""
    used = [i for i in INPUT_ORDER if any(r.input == i for r in a.row_list)]
    build = {"tf": lambda: ensure_tf1(a.workdir, size, a.shards, a.python, runner.env),
             "tf2": lambda: ensure_tf2(a.workdir, size, a.python, runner.env),
             "orbax": lambda: ensure_orbax(a.workdir, size, a.python, runner.env)}
    inputs = {i: build[i]() for i in used}
    for i in used:
        results["inputs"][f"{i} {size:g} GiB"] = inputs[i]
    _check_disk(a.workdir, max([inp["bytes"] for inp in inputs.values()], default=0) * 1.2 + GIB)
    rows = [r for i in used for r in (*BASELINES[i], *[r for r in a.row_list if r.input == i])]
    resume = None
    if any(r.kind == "resume" for r in rows):
        row = next(r for r in rows if r.kind == "resume")
        resume = resume_kill_point(runner, lambda out: expand(
            row.argv, {**ctx, "src": inputs[row.input]["src"], "out": str(out)}, inputs[row.input]["files"]))
        log(f"resume: kill point {resume}")
    for w in range(a.warmup if used else 0):  # the first write after an input is written is often slow
        cp, inp = BASELINES[used[0]][0], inputs[used[0]]
        argv = expand(cp.argv, {**ctx, "src": inp["src"], "out": str(runner.scratch(cp.label))}, inp["files"])
        m = runner.run(RowResult(cp, size), argv, inp["files"])
        log(fmt_progress(f"[{size:g} GiB warm-up {w + 1}/{a.warmup}]", cp.label, m))
    res = run_section(runner, f"{size:g} GiB", rows, inputs, ctx, a.repeat, results, size, resume)
    _summarize_size(a, rows, res, inputs, resume, summaries, footprint)
    if a.drop_checkpoints:
        for inp in inputs.values():
            remove(Path(inp["dir"]))


def paired_ratio(runs: list[dict], cp_runs: list[dict]) -> float | None:
    """Median over the repeats of this row's CPU over the CPU of the ``cp`` run of the same
    repeat (rows alternate within a repeat): it follows the machine when it drifts during a
    run, which the ratio of the medians does not (``cp``'s own CPU here: 1.7-3.7 s for 4 GiB)."""
    ratios = [r["cpu_s"] / c["cpu_s"] for r, c in zip(runs, cp_runs)
              if r["error"] is None and c["error"] is None and r.get("cpu_s") and c.get("cpu_s")]
    return statistics.median(ratios) if ratios else None


def _summarize_size(a: argparse.Namespace, rows: list[Row], res: dict[str, RowResult], inputs: dict,
                    resume: dict | None, summaries: list[dict], footprint: dict[str, int]) -> None:
    base = {i: tuple(res[b.label].summary(None, None, None, None) for b in BASELINES[i]) for i in inputs}
    by_label = {}
    for row in rows:
        lib = LIBRARY_ROWS.get(row.label)
        allowed = a.budget + footprint[lib] + LIBRARY_SLACK if lib in footprint else a.budget
        cp, cps = base[row.input]
        s = res[row.label].summary(cp, cps, allowed if row.kind in ("converter", "resume") else None,
                                   inputs[row.input]["bytes"])
        if lib in footprint:
            s["budget_rule"] = (f"--max-memory {a.max_memory} + {lib} {footprint[lib] / MIB:.0f} MiB "
                                f"(this run) + {LIBRARY_SLACK // MIB} MiB = {allowed / MIB:.0f} MiB")
        if row.kind != "baseline":
            s["cpu_x_cp_paired"] = paired_ratio(res[row.label].runs, res[BASELINES[row.input][0].label].runs)
        by_label[row.label] = {**s, "runs": res[row.label].runs}
    full, rs = by_label.get("npz"), by_label.get("resume")
    if rs and resume and "point" in resume and full and rs.get("wall_s") and full.get("wall_s"):
        cpu = (f", {100 * rs['cpu_s'] / full['cpu_s']:.0f}% of its CPU" if rs.get("cpu_s") and full.get("cpu_s")
               else "")
        rs["resume"] = (f"killed at {resume['point']} ({resume['chunks_done']} of {resume['chunks']} chunks, "
                        f"{100 * resume['fraction']:.1f}% of the bytes journaled); the resuming run took "
                        f"{100 * rs['wall_s'] / full['wall_s']:.0f}% of the npz row's wall{cpu}; output identical "
                        f"to the npz row's in {rs.get('identical', '0/0')} repeats")
    summaries.extend(by_label.values())


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the CPU hogs are killed on the way out
    a.workdir = a.workdir.resolve()
    a.workdir.mkdir(parents=True, exist_ok=True)
    scratch_root, tmpdir = a.workdir / "scratch", a.workdir / "tmp"
    for d in (scratch_root, tmpdir):
        remove(d)
        d.mkdir()
    env = {**os.environ}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    # An installed package has its bytecode compiled (pip does it); a checkout run with
    # PYTHONDONTWRITEBYTECODE set would compile every module on every run (0.2-0.35 CPU s).
    subprocess.run([a.python, "-m", "compileall", "-q", str(REPO / "shardconv")], check=True, env=env)
    ctx = {"py": a.python, "max_memory": a.max_memory, "bench": str(BENCH_DIR)}
    droppable, why = can_drop_caches()
    cold = a.cold and droppable
    cache = ("cold: dropped (sync; echo 3 > drop_caches) before every timed conversion and cp; "
             "listing and import rows warm" if cold else
             f"WARM: --cold asked but the cache cannot be dropped ({why}); inputs read before each run"
             if a.cold else "warm: inputs read into the page cache before each run")
    import psutil

    results: dict = {"meta": {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
        "platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "mem_gib": psutil.virtual_memory().total / GIB, "argv": sys.argv[1:] if argv is None else argv,
        "sizes_gib": a.size_list, "repeat": a.repeat, "max_memory": a.max_memory, "max_memory_bytes": a.budget,
        "interval_s": a.interval, "cache": cache, "busy": "busy: no", "code": code_version()},
        "repeat_loads": {}, "inputs": {}, "rows": []}
    summaries: list[dict] = []
    with Hogs() as hogs:
        if a.busy:
            hogs.start()
            results["meta"]["busy"] = hogs.describe()
        runner = Runner(env, a.timeout, a.interval, tmpdir, scratch_root, cold, hogs, a.settle)
        log(f"{cache}; {results['meta']['busy']}")
        out_json = a.workdir / "results.json"
        footprint = size_independent(runner, a, ctx, results, summaries)
        results["rows"] = summaries
        out_json.write_text(json.dumps(results, indent=1, default=str))
        for size in a.size_list:
            sized(runner, a, size, ctx, results, summaries, footprint)
            out_json.write_text(json.dumps(results, indent=1, default=str))
    remove(scratch_root)
    remove(tmpdir)
    report(results, summaries, a.markdown)
    log(f"results: {out_json}")
    return 0


def report(results: dict, summaries: list[dict], markdown: bool) -> None:
    """Header, then one table for the import and listing rows and one for the sized rows, then notes."""
    render = render_markdown if markdown else render_text
    bullet = "- " if markdown else ""
    print("\n".join(bullet + line for line in header(results)))
    print()
    for part in ([s for s in summaries if s["kind"] in ("footprint", "listing")],
                 [s for s in summaries if s["kind"] not in ("footprint", "listing")]):
        if part:
            print(render(part))
            print()
    print("\n".join(bullet + line for line in notes(results)))


if __name__ == "__main__":
    sys.exit(main())
