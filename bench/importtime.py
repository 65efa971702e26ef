"""Where a shardconv command's start-up goes: ``python -X importtime`` of the command,
best of ``--repeat`` runs per module, the modules with the largest cumulative import time
(and whether ``ml_dtypes``, TensorFlow, JAX or TensorStore were imported at all).

    .venv/bin/python bench/importtime.py                       # ls of the 5-tensor SavedModel
    .venv/bin/python bench/importtime.py --top 20 -- convert SRC DEST.npz

Run it twice: the first run warms the interpreter's bytecode and the page cache; the
issue-15 figure for ``shardconv ls`` excludes that cold first run.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SMALL = REPO / "tests" / "data" / "tf-serving" / "saved_model_half_plus_two_cpu" / "00000123"
HEAVY = ("ml_dtypes", "tensorflow", "jax", "tensorstore", "orbax", "zarr", "google.protobuf")
LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def profile(argv: list[str]) -> tuple[float, dict[str, tuple[int, int, int]]]:
    """Wall seconds of one run and, per module, (self us, cumulative us, nesting depth)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.strip().splitlines()[-1:]}")
    mods = {}
    for line in r.stderr.splitlines():
        m = LINE.match(line)
        if m:
            mods[m.group(4)] = (int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2)
    return wall, mods


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="runs; each module's best is kept (default 5)")
    p.add_argument("--top", type=int, default=12, help="modules to list (default 12)")
    p.add_argument("command", nargs="*", help="shardconv arguments (default: ls of the 5-tensor SavedModel)")
    a = p.parse_args(argv)
    cmd = ["-m", "shardconv", *(a.command or ["ls", str(SMALL)])]
    best: dict[str, tuple[int, int, int]] = {}
    walls = []
    for _ in range(a.repeat):
        wall, mods = profile(cmd)
        walls.append(wall)
        for name, v in mods.items():
            best[name] = min(best.get(name, v), v, key=lambda x: x[1])
    total = sum(v[0] for v in best.values())
    print(f"python -X importtime {' '.join(cmd[:3])} ...: best wall {min(walls):.3f} s of {a.repeat}, "
          f"imports {total / 1e6:.3f} s (sum of each module's best self time), {len(best)} modules")
    heavy = [h for h in HEAVY if h in best]
    print("heavy libraries imported: " + (", ".join(f"{h} {best[h][1] / 1e6:.3f} s" for h in heavy) or "none"))
    print(f"{'cumulative s':>12}  {'self s':>7}  module")
    for name, (self_us, cum_us, _depth) in sorted(best.items(), key=lambda kv: -kv[1][1])[: a.top]:
        print(f"{cum_us / 1e6:12.3f}  {self_us / 1e6:7.3f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
