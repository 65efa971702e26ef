"""Counts of reliability cases for the README's table (scripts/reliability_report.py).

Tests call ``log_case`` after a case has passed; it appends one line to the file named
by ``SHARDCONV_CASE_LOG`` and does nothing when that is unset (ordinary test runs).
"""
from __future__ import annotations

import os


def log_case(kind: str, label: str) -> None:
    """Record that one case of ``kind`` (e.g. ``planted-link``) passed, for ``label`` (a sink or format)."""
    path = os.environ.get("SHARDCONV_CASE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{kind}\t{label}\n")
