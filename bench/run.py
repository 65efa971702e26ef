"""shardconv benchmark: speed and peak memory, measured from outside the process.

    .venv/bin/python bench/run.py [--sizes 1,4] [--repeat 3] [--rows npz,npz-nofsync]
                                  [--max-memory 256MiB] [--skip-naive] [--markdown]

For each checkpoint size (GiB) a TF1 sharded checkpoint is written once into
the work directory (cached between invocations), its files are read once to
warm the page cache, and then, ``--repeat`` times, every row below is run as a
child process under ``/usr/bin/time`` with psutil sampling (see measure.py).
Each row's output goes to a fresh scratch directory that is deleted (and the
deletion synced) after the run, untimed. Progress goes to stderr, the table to
stdout, everything to ``WORKDIR/results.json``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from measure import Measurement, run_measured  # noqa: E402

PY = "{py}"

# ---------------------------------------------------------------------------
# Rows: (label, argv template). Placeholders: {py} the Python running this
# script (or --python), {src} the checkpoint prefix, {out} a fresh empty
# directory for the output (deleted after the run), {max_memory} the
# --max-memory string, {bench} this directory; an argument that is exactly
# "{files}" expands to the checkpoint's .data-* and .index files.
# Adding a row is one line.

BASELINE_ROWS = [
    ("cp", ["cp", "--reflink=never", "--", "{files}", "{out}/"]),
    ("cp+sync", ["sh", "-c", 'd=$1; shift; cp --reflink=never -- "$@" "$d"/ && sync -- "$d"/*',
                 "sh", "{out}", "{files}"]),
]

_CONVERT = [PY, "-m", "shardconv", "convert", "{src}"]
CONVERTER_ROWS = [
    ("npz", _CONVERT + ["{out}/model.npz", "--max-memory", "{max_memory}", "--quiet"]),
    ("npz-nofsync", _CONVERT + ["{out}/model.npz", "--max-memory", "{max_memory}", "--quiet",
                                "--no-fsync"]),
    ("npz-split", _CONVERT + ["{out}/model", "--to", "npz", "--max-file-size", "1GiB", "--max-memory",
                              "{max_memory}", "--quiet"]),
    ("safetensors", _CONVERT + ["{out}/model.safetensors", "--max-memory", "{max_memory}", "--quiet"]),
    ("zarr", _CONVERT + ["{out}/model.zarr", "--max-memory", "{max_memory}", "--quiet"]),
    ("zarr-zstd", _CONVERT + ["{out}/model.zarr", "--compression", "zstd", "--max-memory", "{max_memory}", "--quiet"]),
    ("savedmodel", _CONVERT + ["{out}/savedmodel", "--to", "savedmodel",
                               "--max-memory", "{max_memory}", "--quiet"]),
    ("tf-checkpoint", _CONVERT + ["{out}/ckpt", "--to", "tf-checkpoint",
                                  "--max-memory", "{max_memory}", "--quiet"]),
]
DEFAULT_ROWS = "npz,npz-nofsync,zarr"
#: Pause after each run's cleanup (see run_row); --settle changes it.
SETTLE_S = 2.0

NAIVE_ROWS = [
    ("naive tf+np.savez", [PY, "{bench}/naive_npz.py", "{src}", "{out}/model.npz"]),
]

# Size-independent rows (run once per repeat, before the checkpoints).
FOOTPRINT_ROWS = [
    ("import tensorflow", [PY, "-c", "import tensorflow"]),
    ("import shardconv", [PY, "-c", "import shardconv"]),
]

GIB = 1 << 30
MIB = 1 << 20

#: Rows whose process imports a big library: their budget check allows that library's
#: import footprint, measured in this run by the named footprint row, plus LIBRARY_SLACK
#: (issue 7: peak <= TF import + --max-memory + 100 MiB).
LIBRARY_ROWS = {"savedmodel": "import tensorflow"}
LIBRARY_SLACK = 100 * MIB


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
# checkpoints


def generator_argv(py: str, outdir: Path, mib: float, shards: int) -> list[str]:
    """The checkpoint writer: TensorFlow itself, through the tests' fixture script."""
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
    return {
        "dir": str(ckdir),
        "prefix": str(prefix),
        "files": files,
        "shards": len(data),
        "bytes": sum(os.path.getsize(f) for f in files),
        "tensors": len(tensors),
        "largest_name": largest[0],
        "largest_bytes": largest[1],
        "generator": (ckdir / "bench-ok").read_text().strip(),
    }


def ensure_checkpoint(workdir: Path, size_gib: float, shards: int, py: str, env: dict) -> dict:
    mib = size_gib * 1024
    ckdir = workdir / f"ckpt-fixtures-{mib:g}MiB-{shards}sh"
    info = checkpoint_info(ckdir)
    if info:
        log(f"checkpoint {size_gib:g} GiB: reusing {ckdir}")
        return info
    errors = []
    tmp = ckdir.with_name(ckdir.name + ".tmp")
    remove(tmp)
    remove(ckdir)
    need = size_gib * GIB * 1.1 + GIB
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"not enough disk for a {size_gib:g} GiB checkpoint ({free / GIB:.1f} GiB free)")
    argv = generator_argv(py, tmp, mib, shards)
    log(f"checkpoint {size_gib:g} GiB: writing with TensorFlow ({' '.join(argv[1:3])} ...)")
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode == 0:
        (tmp / "bench-ok").write_text("fixtures\n")
        tmp.rename(ckdir)
        info = checkpoint_info(ckdir)
        if info is not None:
            info["write_s"] = time.perf_counter() - t0
            log(f"  wrote {info['bytes'] / MIB:.1f} MiB in {info['write_s']:.1f} s")
            return info
        errors.append("wrote no usable checkpoint")
    else:
        errors += [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or [f"rc {r.returncode}"]
        remove(tmp)
    raise SystemExit("could not write a checkpoint: " + "; ".join(errors))


# ---------------------------------------------------------------------------
# running rows


class RowResult:
    def __init__(self, label: str, kind: str, size_gib: float | None):
        self.label = label
        self.kind = kind  # baseline | converter | naive | footprint
        self.size_gib = size_gib
        self.runs: list[dict] = []
        self.error: str | None = None

    def add(self, m: Measurement, out_bytes: int | None) -> None:
        d = m.to_json()
        d["out_bytes"] = out_bytes
        self.runs.append(d)
        if m.error and self.error is None:
            self.error = m.error

    def summary(self, cp: float | None, cp_sync: float | None, budget: int,
                data_bytes: int | None) -> dict:
        ok = [r for r in self.runs if r["error"] is None]
        s = {"label": self.label, "kind": self.kind, "size_gib": self.size_gib,
             "status": "ok" if self.error is None and ok else f"failed: {self.error}",
             "repeats": len(self.runs)}
        if self.error is None and ok:
            walls = [r["wall_s"] for r in ok]
            peaks = [r["peak_rss_kib"] for r in ok if r["peak_rss_kib"] is not None]
            wall = statistics.median(walls)
            s.update(wall_s=wall, wall_s_min=min(walls), wall_s_max=max(walls))
            if peaks:
                best = max(ok, key=lambda r: r["peak_rss_kib"] or 0)
                s.update(peak_rss_mib=max(peaks) / 1024, peak_source=best["peak_source"])
            s["x_cp"] = wall / cp if cp else None
            s["x_cp_sync"] = wall / cp_sync if cp_sync else None
            s["gib_per_s"] = data_bytes / GIB / wall if data_bytes and wall > 0 else None
            outs = [r["out_bytes"] for r in ok if r.get("out_bytes")]
            s["out_ratio"] = data_bytes / statistics.median(outs) if data_bytes and outs else None  # in/out bytes
            if self.kind == "converter" and peaks:
                s["within_budget"] = max(peaks) * 1024 <= budget
        return s


def run_row(res: RowResult, argv: list[str], scratch: Path, env: dict, timeout: float,
            interval: float, tmpdir: Path) -> Measurement:
    remove(scratch)
    scratch.mkdir(parents=True)
    os.sync()
    m = run_measured(argv, cwd=REPO, env=env, timeout=timeout, interval=interval,
                     tmpdir=tmpdir)
    out_bytes = dir_bytes(scratch)
    if m.ok and res.kind != "footprint" and out_bytes == 0:
        m.error = "exit 0 but no output written"
    res.add(m, out_bytes)
    remove(scratch)
    os.sync()  # don't let this run's writeback eat into the next run
    # Freeing a just-synced output keeps this VM's disk busy for a moment (discards);
    # without a pause the row that follows pays for the previous row's cleanup.
    time.sleep(SETTLE_S)
    return m


def fmt_progress(tag: str, label: str, m: Measurement) -> str:
    if not m.ok:
        return f"{tag} {label}: FAILED: {m.error}"
    peak = f"{m.peak_rss_kib / 1024:.0f} MiB" if m.peak_rss_kib else "? MiB"
    return f"{tag} {label}: {m.wall_s:.3f} s, {peak} ({m.peak_source})"


# ---------------------------------------------------------------------------
# table


COLUMNS = ["row", "size GiB", "wall s", "min-max s", "peak RSS MiB", "x cp", "x cp+sync", "GiB/s",
           "budget", "status"]


def table_cells(s: dict) -> list[str]:
    def f(key, fmt):
        v = s.get(key)
        return fmt.format(v) if v is not None else "-"

    budget = "-"
    if "within_budget" in s:
        budget = "ok" if s["within_budget"] else "OVER"
    status = s["status"]
    if len(status) > 90:
        status = status[:87] + "..."
    size = f"{s['size_gib']:g}" if s["size_gib"] is not None else "-"
    spread = "-"
    if s.get("wall_s_min") is not None:
        spread = f"{s['wall_s_min']:.2f}-{s['wall_s_max']:.2f}"
    return [s["label"], size, f("wall_s", "{:.3f}"), spread, f("peak_rss_mib", "{:.0f}"),
            f("x_cp", "{:.2f}"), f("x_cp_sync", "{:.2f}"), f("gib_per_s", "{:.2f}"),
            budget, status]


def render_text(rows: list[dict]) -> str:
    cells = [COLUMNS] + [table_cells(s) for s in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    right = {1, 2, 3, 4, 5, 6, 7}
    lines = []
    for n, c in enumerate(cells):
        parts = [c[i].rjust(widths[i]) if i in right else c[i].ljust(widths[i])
                 for i in range(len(c))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[dict]) -> str:
    right = {1, 2, 3, 4, 5, 6, 7}
    out = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join("---:" if i in right else "---" for i in range(len(COLUMNS))) + "|"]
    for s in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in table_cells(s)) + " |")
    return "\n".join(out)


def notes(results: dict) -> list[str]:
    lines = []
    budget = results["meta"]["max_memory_bytes"]
    for key, ck in results["checkpoints"].items():
        over = "over" if ck["largest_bytes"] > budget else "NOT over"
        lines.append(
            f"{key} GiB checkpoint: {ck['bytes'] / MIB:.1f} MiB in {ck['shards']} data shards, "
            f"{ck['tensors']} tensors, largest {ck['largest_name']} "
            f"{ck['largest_bytes'] / MIB:.1f} MiB ({over} the "
            f"{results['meta']['max_memory']} budget); generator {ck['generator']}; "
            f"page-cache read {ck['warm_gib_per_s']:.2f} GiB/s")
    for r in results["rows"]:
        if r.get("budget_rule"):
            lines.append(f"{r['label']} at {r['size_gib']:g} GiB: budget column checks peak RSS <= {r['budget_rule']}")
        if r.get("out_ratio") and "zstd" in r["label"]:
            lines.append(f"{r['label']} at {r['size_gib']:g} GiB: compression ratio {r['out_ratio']:.3f} (checkpoint bytes / output bytes)")
    m = results["meta"]
    lines.append(f"wall = median of {m['repeat']}; peak RSS = max over repeats of "
                 f"max(/usr/bin/time %M, psutil tree-sum sampled every "
                 f"{m['interval_s'] * 1000:g} ms); x cp = wall / cp wall of the same size "
                 f"in this run; {m['cpus']} CPUs, {m['mem_gib']:.0f} GiB RAM")
    return lines


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    global SETTLE_S
    all_conv = [r[0] for r in CONVERTER_ROWS]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,4",
                   help="checkpoint sizes in GiB, comma-separated (default 1,4)")
    p.add_argument("--workdir", type=Path, default=BENCH_DIR / "out",
                   help="checkpoints (cached), scratch outputs, results.json (default bench/out)")
    p.add_argument("--max-memory", default="256MiB", help="passed to the converter")
    p.add_argument("--repeat", type=int, default=3, help="runs per row; wall is the median")
    p.add_argument("--rows", default=DEFAULT_ROWS,
                   help=f"converter rows, comma-separated, or 'all' ({', '.join(all_conv)}); "
                        f"default {DEFAULT_ROWS}; 'none' for baselines only")
    p.add_argument("--skip-naive", action="store_true", help="skip the TF + np.savez baseline")
    p.add_argument("--skip-footprint", action="store_true",
                   help="skip the 'import tensorflow' / 'import shardconv' rows")
    p.add_argument("--settle", type=float, default=SETTLE_S,
                   help="seconds to pause after each run's cleanup, so one row's disk work does not land on the next")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs of the cp row per size before the timed repeats "
                        "(the first write after a checkpoint is written is often slow)")
    p.add_argument("--shards", type=int, default=4, help="data shards per checkpoint")
    p.add_argument("--python", default=sys.executable, help="interpreter for the Python rows")
    p.add_argument("--timeout", type=float, default=3600, help="per-run limit in seconds")
    p.add_argument("--interval", type=float, default=0.02, help="psutil sampling period, s")
    p.add_argument("--drop-checkpoints", action="store_true",
                   help="delete each checkpoint after its size is done (default: keep as cache)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    a = p.parse_args(argv)
    SETTLE_S = a.settle

    sizes = [float(x) for x in a.sizes.split(",") if x.strip()]
    budget = parse_bytes(a.max_memory)
    if a.rows.strip() == "all":
        conv = list(CONVERTER_ROWS)
    elif a.rows.strip() in ("", "none"):
        conv = []
    else:
        want = [r.strip() for r in a.rows.split(",") if r.strip()]
        unknown = [w for w in want if w not in all_conv]
        if unknown:
            p.error(f"unknown rows {unknown}; known: {all_conv}")
        conv = [r for w in want for r in CONVERTER_ROWS if r[0] == w]
    if not os.access("/usr/bin/time", os.X_OK):
        p.error("/usr/bin/time (GNU time) is required")

    workdir = a.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    scratch_root = workdir / "scratch"
    remove(scratch_root)
    scratch_root.mkdir()
    tmpdir = workdir / "tmp"
    remove(tmpdir)
    tmpdir.mkdir()

    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    ctx_base = {"py": a.python, "max_memory": a.max_memory, "bench": str(BENCH_DIR)}

    import psutil

    results: dict = {
        "meta": {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(), "platform": platform.platform(),
            "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "mem_gib": psutil.virtual_memory().total / GIB,
            "argv": sys.argv[1:] if argv is None else argv,
            "sizes_gib": sizes, "repeat": a.repeat, "warmup": a.warmup, "max_memory": a.max_memory,
            "max_memory_bytes": budget, "interval_s": a.interval, "shards": a.shards,
            "workdir": str(workdir),
        },
        "checkpoints": {},
        "rows": [],
    }
    summaries: list[dict] = []  # for the table
    summaries_full: list[dict] = []  # the same plus every run, for results.json
    footprint_bytes: dict[str, int] = {}  # footprint row -> peak RSS (for LIBRARY_ROWS)
    out_json = workdir / "results.json"

    def save():
        results["rows"] = summaries_full
        out_json.write_text(json.dumps(results, indent=1, default=str))

    # --- footprint rows (size-independent) -------------------------------
    if not a.skip_footprint:
        log("footprint rows (one untimed warm-up each, so the libraries are in the page cache)")
        for label, tmpl in FOOTPRINT_ROWS:
            argv_ = expand(tmpl, {**ctx_base, "src": "", "out": ""}, [])
            subprocess.run(argv_, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            res = RowResult(label, "footprint", None)
            for r in range(a.repeat):
                m = run_row(res, argv_, scratch_root / "footprint", env, a.timeout,
                            a.interval, tmpdir)
                log(fmt_progress(f"[r{r + 1}/{a.repeat}]", label, m))
                if not m.ok:
                    break
            s = res.summary(None, None, budget, None)
            summaries.append(s)
            summaries_full.append({**s, "runs": res.runs})
            if s.get("peak_rss_mib"):
                footprint_bytes[label] = int(s["peak_rss_mib"] * MIB)
        save()

    # --- per size ----------------------------------------------------------
    for size in sizes:
        ck = ensure_checkpoint(workdir, size, a.shards, a.python, env)
        files = ck["files"]
        ck["first_read_s"] = warm_cache(files)  # maybe from disk
        ck["warm_s"] = warm_cache(files)  # second read: from the page cache
        ck["warm_gib_per_s"] = ck["bytes"] / GIB / ck["warm_s"] if ck["warm_s"] else 0.0
        results["checkpoints"][f"{size:g}"] = ck
        free = shutil.disk_usage(workdir).free
        if free < ck["bytes"] * 1.2 + GIB:
            raise SystemExit(f"not enough free disk for outputs ({free / GIB:.1f} GiB)")

        rows = ([("baseline", r) for r in BASELINE_ROWS] + [("converter", r) for r in conv]
                + ([] if a.skip_naive else [("naive", r) for r in NAIVE_ROWS]))
        res = {label: RowResult(label, kind, size) for kind, (label, _t) in rows}
        for w in range(a.warmup):
            label, tmpl = BASELINE_ROWS[0]
            out = scratch_root / "warmup"
            argv_ = expand(tmpl, {**ctx_base, "src": ck["prefix"], "out": str(out)}, files)
            m = run_row(RowResult(label, "baseline", size), argv_, out, env, a.timeout,
                        a.interval, tmpdir)
            log(fmt_progress(f"[{size:g} GiB warm-up {w + 1}/{a.warmup}]", label, m))
        for r in range(a.repeat):
            warm_cache(files)
            for kind, (label, tmpl) in rows:
                rr = res[label]
                if rr.error is not None:
                    continue  # failed once: don't repeat, report the failure
                out = scratch_root / re.sub(r"[^A-Za-z0-9_.+-]", "_", label)
                argv_ = expand(tmpl, {**ctx_base, "src": ck["prefix"], "out": str(out)}, files)
                m = run_row(rr, argv_, out, env, a.timeout, a.interval, tmpdir)
                log(fmt_progress(f"[{size:g} GiB r{r + 1}/{a.repeat}]", label, m))
        cp = res["cp"].summary(None, None, budget, None).get("wall_s")
        cps = res["cp+sync"].summary(None, None, budget, None).get("wall_s")
        for _kind, (label, _t) in rows:
            lib = LIBRARY_ROWS.get(label)
            allowed = budget + footprint_bytes[lib] + LIBRARY_SLACK if lib in footprint_bytes else budget
            s = res[label].summary(cp, cps, allowed, ck["bytes"])
            if lib in footprint_bytes:
                s["budget_rule"] = (f"--max-memory {a.max_memory} + {lib} {footprint_bytes[lib] / MIB:.0f} MiB "
                                    f"(this run) + {LIBRARY_SLACK // MIB} MiB = {allowed / MIB:.0f} MiB")
            summaries.append(s)
            summaries_full.append({**s, "runs": res[label].runs})
        save()
        if a.drop_checkpoints:
            remove(Path(ck["dir"]))

    remove(scratch_root)
    remove(tmpdir)
    save()
    if a.markdown:
        print(render_markdown(summaries))
        print()
        for line in notes(results):
            print(f"- {line}")
    else:
        print(render_text(summaries))
        print()
        for line in notes(results):
            print(line)
    log(f"results: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
