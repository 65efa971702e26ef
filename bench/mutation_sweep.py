"""Mutation sweep: convert many corrupted copies of a real TensorFlow checkpoint.

Every case must end in exactly one of two ways: the original values (the
mutation hit bytes nothing depends on), or a one-line error with a non-zero exit
and nothing at the destination. Never a hang, a traceback, wrong values, a
modified input, or memory beyond --max-memory plus the interpreter baseline.

usage: python bench/mutation_sweep.py [--cases 200] [--max-memory 64MiB] [--json OUT]
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASELINE_KIB = 60 * 1024   # interpreter + numpy + shardconv, with margin


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def mutate(data: bytearray, rng: random.Random) -> tuple[bytearray, str]:
    kind = rng.choice(["truncate", "bitflip", "bitflip", "bitflips", "zero16"])
    if kind == "truncate":
        return data[: rng.randrange(len(data))], kind
    if kind in ("bitflip", "bitflips"):
        for _ in range(1 if kind == "bitflip" else rng.randint(2, 16)):
            p = rng.randrange(len(data))
            data[p] ^= 1 << rng.randrange(8)
        return data, kind
    p = rng.randrange(len(data))
    data[p:p + 16] = bytes(len(data[p:p + 16]))
    return data, kind


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--max-memory", default="64MiB")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--json", type=Path, help="write the summary here")
    args = ap.parse_args()
    budget_kib = int(args.max_memory.rstrip("MiB")) * 1024 if args.max_memory.endswith("MiB") else 64 * 1024
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="shardconv-sweep-"))
    try:
        base = work / "base"
        subprocess.run([py, str(ROOT / "tests" / "tf_fixtures.py"), "big", str(base), "--mib", "2", "--shards", "2",
                        "--no-reference"], check=True)
        prefix = base / "model.ckpt"
        files = sorted(p.name for p in base.iterdir() if p.name.startswith("model.ckpt"))
        ref = work / "ref.npz"
        subprocess.run([py, "-m", "shardconv", "convert", str(prefix), str(ref), "--quiet"], check=True)
        with np.load(ref) as z:
            want = {k: z[k].tobytes() for k in z.files}
        rng = random.Random(args.seed)
        counts: collections.Counter = collections.Counter()
        by_file: collections.Counter = collections.Counter()
        failures = []
        peak_kib = 0
        for i in range(args.cases):
            d = work / f"case{i}"
            shutil.copytree(base, d)
            target = d / rng.choice(files)
            data, kind = mutate(bytearray(target.read_bytes()), rng)
            target.write_bytes(bytes(data))
            before = _digest(d)
            out = d / "out.npz"
            cmd = ["/usr/bin/time", "-f", "%M", py, "-m", "shardconv", "convert", str(d / "model.ckpt"), str(out),
                   "--quiet", "--max-memory", args.max_memory]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                failures.append((i, kind, target.name, "hang"))
                continue
            lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("Command exited")]
            rss = int(lines.pop())
            peak_kib = max(peak_kib, rss)
            problems = []
            if {k: v for k, v in _digest(d).items() if k in before} != before:
                problems.append("input modified")
            if rss > budget_kib + BASELINE_KIB:
                problems.append(f"peak RSS {rss} KiB")
            if p.returncode == 0:
                with np.load(out) as z:
                    got = {k: z[k].tobytes() for k in z.files}
                outcome = "original values" if got == want else "WRONG VALUES"
                if got != want:
                    problems.append("wrong values")
            else:
                outcome = "one-line error"
                if out.exists() or Path(str(out) + ".shardconv.json").exists():
                    problems.append("output left at the destination")
                if len(lines) != 1 or not lines[0].startswith("shardconv: error: ") or "Traceback" in p.stderr:
                    problems.append("not a one-line error: " + p.stderr[-300:])
            counts[outcome] += 1
            by_file[(kind, target.name.split(".")[-1][:10], outcome)] += 1
            if problems:
                failures.append((i, kind, target.name, "; ".join(problems)))
            shutil.rmtree(d)
        summary = {"cases": args.cases, "max_memory": args.max_memory, "outcomes": dict(counts),
                   "peak_rss_mib": round(peak_kib / 1024, 1), "failures": failures}
        print(f"{args.cases} mutated copies, --max-memory {args.max_memory}:")
        for k, v in sorted(counts.items()):
            print(f"  {v:4d}  {k}")
        print(f"  peak RSS of any run: {peak_kib / 1024:.0f} MiB; failures: {len(failures)}")
        for f in failures:
            print("  FAIL", f)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
        return 1 if failures else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
