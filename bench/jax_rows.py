"""JAX-input benchmark rows: Orbax -> npz, Orbax -> Zarr and big_vision npz -> Zarr,
measured from outside like bench/run.py (wall time, peak RSS), against ``cp`` of the
same input and against Orbax's own restore + ``np.savez``.

    .venv/bin/python bench/jax_rows.py [--sizes 1,4] [--repeat 3] [--max-memory 256MiB]
                                       [--skip-naive] [--markdown] [--workdir bench/out]

Inputs are written once per size into the work directory (cached): an Orbax checkpoint
saved by ``orbax.checkpoint.StandardCheckpointer`` with its defaults (OCDBT, Zarr,
zstd) of a model-shaped tree of float32 and bfloat16 arrays sharded over 8 CPU devices
(a chunk per shard, as multi-device training saves them), and the same tree as a
big_vision-style flat ``np.savez`` (bfloat16 stored as ``<V2``). Every row runs with
8 host devices (``XLA_FLAGS``) so the naive restore finds the devices the checkpoint
was saved from. Uses bench/run.py's measuring and table code.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import run as benchrun  # noqa: E402
from machine import Hogs  # noqa: E402

GIB, MIB = 1 << 30, 1 << 20
XLA_FLAGS = "--xla_force_host_platform_device_count=8"
PY = "{py}"
_CONVERT = [PY, "-m", "shardconv", "convert"]

#: (label, input kind, kind, argv). {src}: the input (Orbax directory or .npz), {out}: scratch dir.
ROWS = [
    ("cp orbax", "orbax", "baseline", ["cp", "-r", "--reflink=never", "--", "{src}", "{out}/"]),
    ("orbax->npz", "orbax", "converter", _CONVERT + ["{src}", "{out}/model.npz", "--max-memory", "{max_memory}",
                                                     "--quiet"]),
    ("orbax->zarr", "orbax", "converter", _CONVERT + ["{src}", "{out}/model.zarr", "--max-memory", "{max_memory}",
                                                      "--quiet"]),
    ("naive orbax restore+np.savez", "orbax", "naive", [PY, "{bench}/naive_orbax_npz.py", "{src}", "{out}/model.npz"]),
    ("cp npz", "npz", "baseline", ["cp", "--reflink=never", "--", "{src}", "{out}/"]),
    ("npz->zarr", "npz", "converter", _CONVERT + ["{src}", "{out}/model.zarr", "--max-memory", "{max_memory}",
                                                  "--quiet"]),
]


def model_shapes(total: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of a transformer-shaped tree of about ``total`` bytes:
    a bfloat16 embedding (~1/8), then layers of float32 and bfloat16 kernels."""
    out: list[tuple[str, tuple[int, ...], str]] = []
    d = 1024
    vocab = max(8, (total // 8) // (d * 2) // 8 * 8)
    out.append(("params/embedding", (vocab, d), "bfloat16"))
    used = vocab * d * 2
    i = 0
    while used < total:
        layer: list[tuple[str, tuple[int, ...], str]] = [(f"params/layer_{i}/attn/qkv", (d, 3 * d), "float32"),
                 (f"params/layer_{i}/attn/out", (d, d), "float32"),
                 (f"params/layer_{i}/mlp/up", (d, 4 * d), "bfloat16"),
                 (f"params/layer_{i}/mlp/down", (4 * d, d), "bfloat16"),
                 (f"params/layer_{i}/norm/scale", (d,), "float32")]
        out += layer
        used += sum(4 * s[0] * (s[1] if len(s) > 1 else 1) if dt == "float32" else
                    2 * s[0] * (s[1] if len(s) > 1 else 1) for _, s, dt in layer)
        i += 1
    out.append(("step", (), "int32"))
    return out


def write_inputs(outdir: Path, mib: float) -> None:
    """Child process: the Orbax checkpoint (sharded over 8 devices) and the npz of the same tree."""
    import jax
    import ml_dtypes
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("d",))
    rng = np.random.default_rng(0)
    tree: dict = {}
    # np.savez's own member layout, one array at a time (so the host never holds the whole tree twice)
    with zipfile.ZipFile(outdir / "model.npz", "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, shape, dt in model_shapes(int(mib * MIB)):
            v = rng.random(shape, dtype=np.float32) - 0.5 if shape else np.asarray(1234, np.int32)
            v = v.astype(ml_dtypes.bfloat16 if dt == "bfloat16" else dt)
            with z.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, v, allow_pickle=False)
            spec = P("d") if shape and shape[0] % 8 == 0 else P()
            node = tree
            *path, leaf = name.split("/")
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = jax.device_put(v, NamedSharding(mesh, spec))
            del v
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(outdir / "orbax", tree)


def ensure_inputs(workdir: Path, size: float, py: str, env: dict) -> dict:
    d = workdir / f"jax-inputs-{size * 1024:g}MiB"
    if not (d / "bench-ok").exists():
        benchrun.remove(d)
        d.mkdir(parents=True)
        benchrun.log(f"inputs {size:g} GiB: writing the Orbax checkpoint and npz into {d}")
        t0 = time.perf_counter()
        r = subprocess.run([py, __file__, "--write-inputs", str(d), "--mib", f"{size * 1024:g}"], cwd=REPO,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode:
            raise SystemExit("could not write the inputs: " + (r.stderr.strip().splitlines() or ["?"])[-1])
        (d / "bench-ok").write_text("orbax StandardCheckpointer + np.savez\n")
        benchrun.log(f"  wrote in {time.perf_counter() - t0:.1f} s")
    orbax_files = [str(p) for p in (d / "orbax").rglob("*") if p.is_file()]
    return {
        "dir": str(d),
        "orbax": {"src": str(d / "orbax"), "files": orbax_files, "bytes": sum(map(os.path.getsize, orbax_files))},
        "npz": {"src": str(d / "model.npz"), "files": [str(d / "model.npz")],
                "bytes": os.path.getsize(d / "model.npz")},
        "largest_bytes": max(2 * s[0] * s[1] if dt == "bfloat16" else 4 * s[0] * s[1]
                             for _, s, dt in model_shapes(int(size * GIB)) if len(s) == 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,4", help="input sizes in GiB, comma-separated (default 1,4)")
    p.add_argument("--workdir", type=Path, default=BENCH_DIR / "out")
    p.add_argument("--max-memory", default="256MiB")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rows", default="all", help="comma-separated labels, or 'all'")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--write-inputs", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--mib", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.write_inputs:
        write_inputs(a.write_inputs, a.mib)
        return 0
    rows = [benchrun.Row(label, src_kind, kind, tmpl) for label, src_kind, kind, tmpl in ROWS
            if (a.rows == "all" or label in a.rows.split(",")) and not (a.skip_naive and kind == "naive")]
    workdir = a.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    scratch, tmpdir = workdir / "jax-scratch", workdir / "jax-tmp"
    for x in (scratch, tmpdir):
        benchrun.remove(x)
        x.mkdir()
    env = {**os.environ, "XLA_FLAGS": XLA_FLAGS, "PYTHONDONTWRITEBYTECODE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    import psutil

    results: dict = {"meta": {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                              "host": platform.node(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                              "mem_gib": psutil.virtual_memory().total / GIB, "repeat": a.repeat,
                              "max_memory": a.max_memory, "interval_s": a.interval},
                     "inputs": {}, "rows": []}
    runner = benchrun.Runner(env, a.timeout, a.interval, tmpdir, scratch, False, Hogs(), 2.0)
    summaries = []
    for size in [float(x) for x in a.sizes.split(",") if x.strip()]:
        summaries += run_size(runner, a, rows, size, env, results)
        (workdir / "jax-results.json").write_text(json.dumps(results, indent=1, default=str))
    benchrun.remove(scratch)
    benchrun.remove(tmpdir)
    print(benchrun.render_markdown(summaries) if a.markdown else benchrun.render_text(summaries))
    print()
    for key, inp in results["inputs"].items():
        print(f"- {key} GiB: Orbax checkpoint {inp['orbax']['bytes'] / MIB:.0f} MiB in {len(inp['orbax']['files'])} "
              f"files, npz {inp['npz']['bytes'] / MIB:.0f} MiB; largest tensor {inp['largest_bytes'] / MIB:.0f} MiB "
              f"(a chunk per shard of 8: {inp['largest_bytes'] / 8 / MIB:.0f} MiB)")
    print(f"- x cp = wall / wall of cp of the same input in this run; wall = median of {a.repeat}; "
          f"budget column: peak RSS <= --max-memory {a.max_memory}")
    return 0


def run_size(runner: benchrun.Runner, a: argparse.Namespace, rows: list[benchrun.Row], size: float, env: dict,
             results: dict) -> list[dict]:
    """Every row ``a.repeat`` times at one size, rows alternating; their summaries."""
    budget = benchrun.parse_bytes(a.max_memory)
    inp = ensure_inputs(a.workdir.resolve(), size, a.python, env)
    results["inputs"][f"{size:g}"] = inp
    res = {row.label: benchrun.RowResult(row, size) for row in rows}
    for r in range(a.repeat):
        for row in rows:
            if res[row.label].error is not None:
                continue
            ctx = {"py": a.python, "max_memory": a.max_memory, "bench": str(BENCH_DIR),
                   "src": inp[row.input]["src"], "out": str(runner.scratch(row.label))}
            m = runner.run(res[row.label], benchrun.expand(row.argv, ctx, []), inp[row.input]["files"])
            benchrun.log(benchrun.fmt_progress(f"[{size:g} GiB r{r + 1}/{a.repeat}]", row.label, m))
    cps = {k: res[f"cp {k}"].summary(None, None, None, None) if f"cp {k}" in res else None for k in ("orbax", "npz")}
    out = []
    for row in rows:
        s = res[row.label].summary(cps[row.input], None, budget if row.kind == "converter" else None,
                                   inp[row.input]["bytes"])
        out.append(s)
        results["rows"].append({**s, "runs": res[row.label].runs})
    return out


if __name__ == "__main__":
    sys.exit(main())
