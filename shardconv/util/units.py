"""Byte sizes as users write them ("256MiB", "1.5G", "4096").

K, M, G, T are binary, as Docker's ``--memory`` and Java's ``-Xmx`` read them (1G = 1024 MiB);
KB, MB, GB, TB are decimal (1GB = 1000**3); KiB, MiB, GiB, TiB binary. Case does not matter."""
from __future__ import annotations

import re

from ..errors import UsageError

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1000, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40,
}


def parse_size(text: str | int) -> int:
    """Parse a byte size: K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB of 1000."""
    if isinstance(text, int):
        if text <= 0:
            raise UsageError(f"size must be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot read size {text!r}: use e.g. 512MiB, 2G (binary), 2GB (decimal) or a number of bytes")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return value


def format_size(n: int | float) -> str:
    """Human-readable binary size, e.g. 1.5 GiB."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
