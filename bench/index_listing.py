"""Listing speed of big TensorFlow indexes: ``shardconv ls`` and ``shardconv plan`` of
checkpoints of many small tensors, timed as whole commands (child processes, interpreter
start-up and imports included) and in-process (open the source and list its tensors),
best of ``--repeat`` in wall and in CPU seconds (user + sys: steadier than wall on a
shared machine), with the load average around each row.

    .venv/bin/python bench/index_listing.py [--counts 20000,100000] [--kinds tf1,tf2] [--repeat 5]
                                            [--trees DIR,DIR] [--markdown] [--json FILE]
                                            [--workdir bench/out] [--python PY]

Checkpoints are written once per count and kind by TensorFlow in a child process: ``tf1``
is ``tf.raw_ops.SaveV2`` of float32[4] tensors named ``model/layer_NNNNN/wK``, ten per
layer, into ``WORKDIR/index-<count>/``; ``tf2`` is ``tf.train.Checkpoint.write`` of the
same values as ``tf.Variable``s in one ``tf.Module`` per layer (so its index holds the
object graph, which names them) into ``WORKDIR/index-tf2-<count>/``. Each is reused while
its ``bench-ok`` marker is there. A ``small`` row lists a 5-tensor SavedModel from tests/data: the fixed cost of
a command. Each tree's ``shardconv/`` is byte-compiled first (``compileall``), as an installed package is: a
checkout run with ``PYTHONDONTWRITEBYTECODE`` set would otherwise compile every module on every run. ``--trees`` compares source trees (say a checkout of the commit before a change
and one after it): every command runs with its tree as working directory, so ``python -m
shardconv`` imports that tree's package, and the trees alternate within each repeat. See bench/README.md ("Listing big indexes").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SMALL = REPO / "tests" / "data" / "tf-serving" / "saved_model_half_plus_two_cpu" / "00000123"

WRITER = r"""
import sys
import tensorflow as tf
prefix, n, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if kind == "tf1":
    names = [f"model/layer_{i // 10:05d}/w{i % 10}" for i in range(n)]
    tensors = [tf.constant([i, i + 1, i + 2, i + 3], tf.float32) for i in range(n)]
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * n, tensors=tensors)
else:  # tf2: n - 1 variables in modules of ten, and the object graph
    root, layers = tf.Module(), []
    for i in range(n - 1):
        if i % 10 == 0:
            layers.append(tf.Module(name=f"layer_{i // 10:05d}"))
        setattr(layers[-1], f"w{i % 10}",
                tf.Variable([i, i + 1, i + 2, i + 3], dtype=tf.float32, name=f"model/layer_{i // 10:05d}/w{i % 10}"))
    root.layers = layers
    tf.train.Checkpoint(model=root).write(prefix)
"""

IN_PROCESS = r"""
import sys, time
from shardconv.sources import open_source
best, best_cpu = float("inf"), float("inf")
for _ in range(int(sys.argv[2])):
    t, c = time.perf_counter(), time.process_time()
    with open_source(sys.argv[1]) as s:
        n = len(s.tensors())
    best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
print(n, best, best_cpu)
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> float:
    return os.getloadavg()[0]


def ensure_checkpoint(workdir: Path, count: int, py: str, kind: str = "tf1") -> Path:
    """The prefix of a checkpoint of ``count`` tensors (``kind`` tf1: SaveV2, tf2: an object
    graph and ``count - 1`` variables), written once."""
    d = workdir / (f"index-{count}" if kind == "tf1" else f"index-{kind}-{count}")
    if (d / "bench-ok").is_file():
        return d / "model.ckpt"
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"writing {count} {kind} tensors with TensorFlow into {d} ...")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([py, "-c", WRITER, str(tmp / "model.ckpt"), str(count), kind], check=True, env=env)
    (tmp / "bench-ok").write_text(f"{count}\n")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d / "model.ckpt"


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_once(argv: list[str], tree: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``argv`` in ``tree`` (output discarded); a failure
    stops the bench."""
    t, c = time.perf_counter(), _children_cpu()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tree)
    wall, cpu = time.perf_counter() - t, _children_cpu() - c
    if r.returncode:
        raise SystemExit(f"{' '.join(argv)} failed in {tree} ({r.returncode}): {r.stderr.decode()[-500:]}")
    return wall, cpu


def in_process_once(py: str, src: Path, tree: Path) -> tuple[float, float]:
    """Best wall and CPU seconds of two listings of ``src`` in one interpreter (the second pays no imports)."""
    out = subprocess.run([py, "-c", IN_PROCESS, str(src), "2"], check=True, capture_output=True,
                         text=True, cwd=tree).stdout.split()
    return float(out[1]), float(out[2])


def measure(label: str, tensors: int | str, run, trees: list[Path], repeat: int) -> list[dict]:
    """``repeat`` runs of ``run(tree)`` for each tree, the trees alternating within each repeat;
    one row per tree: best and median wall, best CPU, the load average range over its runs."""
    walls: dict[Path, list[float]] = {t: [] for t in trees}
    cpus: dict[Path, list[float]] = {t: [] for t in trees}
    loads: dict[Path, list[float]] = {t: [] for t in trees}
    for _ in range(repeat):
        for tree in trees:
            loads[tree].append(loadavg())
            wall, cpu = run(tree)
            walls[tree].append(wall)
            cpus[tree].append(cpu)
            loads[tree].append(loadavg())
    rows = []
    for tree in trees:
        load = (min(loads[tree]), max(loads[tree]))
        row = {"row": label, "tree": tree.name, "tensors": tensors, "best": min(walls[tree]),
               "median": statistics.median(walls[tree]), "cpu": min(cpus[tree]), "load": load}
        log(f"{label:<28} {tree.name:<12} {tensors!s:>7}  best {row['best']:.3f} s  cpu {row['cpu']:.3f} s  "
            f"load {load[0]:.1f}-{load[1]:.1f}")
        rows.append(row)
    return rows


def rows_for(src: Path, count: int | str, py: str, trees: list[Path], repeat: int, kind: str = "tf1") -> list[dict]:
    cli = [py, "-m", "shardconv"]
    rows = []
    for cmd in ("ls", "plan"):
        rows += measure(f"shardconv {cmd} ({kind})", count, lambda tree, cmd=cmd: run_once(cli + [cmd, str(src)], tree),
                        trees, repeat)
    rows += measure(f"in-process listing ({kind})", count, lambda tree: in_process_once(py, src, tree), trees, repeat)
    return rows


def render(rows: list[dict], markdown: bool) -> str:
    head = ["row", "tree", "tensors", "best wall s", "median wall s", "best CPU s", "load avg (1 min)"]
    cells = [[r["row"], r["tree"], str(r["tensors"]), f"{r['best']:.3f}", f"{r['median']:.3f}",
              f"{r['cpu']:.3f}", f"{r['load'][0]:.1f}-{r['load'][1]:.1f}"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|---:|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    return "\n".join("  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))
                     for c in [head] + cells)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="20000,100000", help="tensor counts, comma-separated")
    p.add_argument("--kinds", default="tf1,tf2", help="checkpoint kinds: tf1 (SaveV2), tf2 (object graph)")
    p.add_argument("--repeat", type=int, default=5, help="runs per row; the table shows the best and the median")
    p.add_argument("--trees", default=str(REPO),
                   help="source trees to compare, comma-separated (each row alternates them); default this one")
    p.add_argument("--workdir", type=Path, default=BENCH_DIR / "out")
    p.add_argument("--python", default=sys.executable, help="interpreter for the rows and the TF writer")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c]
    kinds = [k for k in args.kinds.split(",") if k]
    trees = [Path(t).resolve() for t in args.trees.split(",") if t]
    prefixes = {(n, k): ensure_checkpoint(args.workdir.resolve(), n, args.python, k) for n in counts for k in kinds}
    for tree in trees:  # as installed: with PYTHONDONTWRITEBYTECODE set every run would compile every module
        subprocess.run([args.python, "-m", "compileall", "-q", str(tree / "shardconv")], check=True)
    cli = [args.python, "-m", "shardconv"]
    rows = measure("shardconv ls (small)", 5, lambda tree: run_once(cli + ["ls", str(SMALL)], tree), trees, args.repeat)
    for n in counts:
        for k in kinds:
            rows += rows_for(prefixes[n, k], n, args.python, trees, args.repeat, k)
    print(render(rows, args.markdown))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
