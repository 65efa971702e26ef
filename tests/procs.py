"""Running shardconv in a child process and measuring it from outside."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil


def shardconv_cmd(*args: str | os.PathLike) -> list[str]:
    return [sys.executable, "-m", "shardconv", *map(str, args)]


def run_cli(*args: str | os.PathLike, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(shardconv_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def peak_rss(argv: list[str], env: dict | None = None, timeout: float = 300) -> tuple[int, int]:
    """Run ``argv``; return (exit code, peak RSS in bytes) sampled every 5 ms with psutil."""
    proc = psutil.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        env={**os.environ, **(env or {})})
    peak = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(argv)
        time.sleep(0.005)
    proc.wait()
    return proc.returncode, peak


def tree_digest(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) -> its bytes' sha256."""
    import hashlib

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).digest() for p in files}


def assert_python_runs(code: str) -> None:
    """Run ``code`` in a fresh interpreter (nothing this test process imported counts) and
    require it to exit 0, showing its stderr otherwise."""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def baseline_rss(src: str | os.PathLike) -> int:
    """Peak RSS of ``shardconv ls SRC`` with the libraries a conversion loads (NumPy, ml_dtypes)
    imported first (``ls`` alone imports neither): what a conversion holds above it is its buffers."""
    code = "import sys, numpy, ml_dtypes; from shardconv.cli import main; sys.exit(main(['ls', sys.argv[1], '--quiet']))"
    rc, rss = peak_rss([sys.executable, "-c", code, str(src)])
    assert rc == 0
    return rss
