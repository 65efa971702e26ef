"""Run a command; print its wall time and peak RSS, as the kernel accounts them for a child.

usage: python scripts/measure.py LABEL -- COMMAND ARGS...
"""
from __future__ import annotations

import resource
import subprocess
import sys
import time


def main() -> int:
    label = sys.argv[1]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    t0 = time.monotonic()
    rc = subprocess.call(cmd)
    wall = time.monotonic() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"{label}: {wall:.1f} s wall, peak RSS {peak_kib / 1024:.0f} MiB, exit {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
