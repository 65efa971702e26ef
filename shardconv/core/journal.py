"""The journal of a partial output: what was planned and which chunks are durable.

JSON lines: a header (source fingerprint, plan digest, chunk size), then one
record per chunk, appended once the sink has written that chunk's bytes (handed
them to the kernel), and now and then a durable mark ``{"d": N}``, appended once
the sink has synced the chunks of the first N records. A resume on the same boot
as the run that wrote the journal (the header's ``boot``) keeps every journaled
chunk as it is: nothing the killed process wrote was lost. After a restart it keeps
the chunks a mark vouches for and re-checks every later one against the output.
A torn last line (killed mid-write) is ignored.
docs/journal-format.md is the specification.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DestinationError, ResumeError
from ..frontend import option
from ..util import safefs

FORMAT = "shardconv-journal"
VERSION = 1


def boot_id() -> str | None:
    """This boot of the machine (Linux's ``boot_id``; SHARDCONV_TEST_BOOT_ID for tests), or None.

    While the machine has not restarted, every chunk a killed run wrote is in the page cache or
    on disk: a resume on the same boot keeps its journaled chunks without reading them."""
    test = os.environ.get("SHARDCONV_TEST_BOOT_ID")
    if test:
        return test
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def is_mark(record: dict[str, Any]) -> bool:
    """True for a durable mark ``{"d": N}`` (not a chunk record)."""
    return "d" in record and "i" not in record


def durable_prefix(records: list[dict[str, Any]]) -> int:
    """How many chunk records, from the first, the last valid durable mark vouches for: their
    bytes were synced before the mark was written. A mark counting more chunk records than
    precede it is ignored (0 if there is no valid mark).

    Returns: a count. Raises: nothing."""
    seen = trusted = 0
    for rec in records:
        if not is_mark(rec):
            seen += 1
            continue
        n = rec.get("d")
        if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= seen:
            trusted = max(trusted, n)
    return trusted


class Journal:
    """The journal file ``DEST.partial/journal.jsonl``: read back (``load``), rewritten at the
    start of a run (``start``), then appended to as chunks are written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def load(self) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """(header, records) of an existing journal, or None if there is none."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ResumeError(f"{self.path}: cannot read the journal ({e.strerror}); "
                              f"rerun with {option('restart')}") from None
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ResumeError(f"{self.path}: cannot read the journal ({e.strerror}); "
                              f"rerun with {option('restart')}") from None
        lines = data.split(b"\n")
        if lines and lines[-1] != b"":
            lines = lines[:-1]  # torn last line: the chunk it recorded is redone
        lines = [ln for ln in lines if ln]
        if not lines:
            return None
        try:
            header = json.loads(lines[0])
            records = [json.loads(ln) for ln in lines[1:]]
        except (ValueError, UnicodeDecodeError):
            raise ResumeError(f"{self.path}: journal is damaged; rerun with {option('restart')}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ResumeError(f"{self.path}: not a journal this version of shardconv can resume; "
                              f"rerun with {option('restart')}")
        size = header.get("chunk_bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ResumeError(f"{self.path}: journal header has no valid chunk size; rerun with {option('restart')}")
        return header, [r for r in records if isinstance(r, dict)]

    def start(self, header: dict[str, Any], records: Sequence[dict[str, Any]] = (), durable: bool = True) -> None:
        """Write a fresh journal (header plus records kept from a verified resume).

        ``durable=False`` (``--no-fsync``) skips its fsync: a resume re-checks every
        journaled chunk against the output anyway, so a lost journal only costs redoing work."""
        lines = [json.dumps({"format": FORMAT, "version": VERSION, **header}, sort_keys=True).encode()]
        lines += [json.dumps(r, separators=(",", ":")).encode() for r in records]
        safefs.write_atomic(self.path, b"\n".join(lines) + b"\n", durable)
        self._fd = safefs.open_file(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, record: dict[str, Any]) -> None:
        """Append one chunk's record (one ``write``: a kill tears at most this last line)."""
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        view = memoryview(line)
        try:
            while len(view):  # a short write (a nearly full disk) is finished, never left torn mid-file
                view = view[os.write(self._fd, view):]
        except OSError as e:
            raise DestinationError(f"{self.path}: cannot append to the journal: {e.strerror}") from None

    def close(self) -> None:
        """Close the journal (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def describe_changes(old: Any, new: Any, path: str = "", out: list[str] | None = None, limit: int = 5) -> list[str]:
    """Human-readable differences between two fingerprints (first few only)."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            p = f"{path}/{k}" if path else str(k)
            if path == "files":  # a source's input files, by relative path
                if old.get(k) != new.get(k):
                    out.append(_file_change(k, old.get(k), new.get(k)))
            elif k not in old:
                out.append(f"{p} added")
            elif k not in new:
                out.append(f"{p} removed")
            else:
                describe_changes(old[k], new[k], p, out, limit)
            if len(out) >= limit:
                break
    elif old != new:
        out.append(f"{path}: {old!r} -> {new!r}")
    return out


def _file_change(name: str, old: Any, new: Any) -> str:
    """One input file's change, named (quoted): added, removed, or which stats differ."""
    if old is None:
        return f"file {name!r} appeared"
    if new is None:
        return f"file {name!r} was removed"
    if isinstance(old, dict) and isinstance(new, dict):
        what = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        return f"file {name!r} changed ({', '.join(what)})"
    return f"file {name!r} changed"
