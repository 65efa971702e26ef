"""The sink interface: accept output tensors as byte chunks, in any order, then finish.

A sink lays out its output from the plan alone (``open``), writes chunks where
they belong (``write`` returns a small receipt the journal keeps, e.g. a CRC),
re-checks a journaled chunk on resume (``check``), and on ``finish`` writes what
depends on all chunks (zip directory, metadata) and returns the renames that
publish the result.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from ..core.plan import Chunk, OutputTensor


class Sink(ABC):
    #: Format name used in ``--to`` and manifests.
    name: str = "?"
    #: Set by the engine before ``open``: the run ends with fsync, so a sink may start
    #: writing data back to disk as it goes (it only pays off when the data must reach disk).
    durable: bool = True
    #: Set by the engine before ``open``: its chunk size (sizes a sink's own scratch buffers).
    chunk_bytes: int = 0
    #: Set by the engine before ``open``: the plan's source, for a sink that carries format
    #: metadata over from it (a TF checkpoint's object graph); read nothing else from it.
    source: Any = None
    #: What the main output is at its final path: "file" or "directory". Checked before the
    #: first byte: ``--overwrite`` replaces an output of the same kind only.
    output_kind: str = "directory"

    def options(self) -> dict[str, Any]:
        """Options that change the output bytes; a resume with different ones is refused."""
        return {}

    def final_paths(self, dest: Path) -> list[Path]:
        """Every path the committed output occupies (the main output last)."""
        return [dest]

    def local_dest(self, dest: str | os.PathLike) -> Path:
        """The local path the engine stages at (``DEST.partial/``: lock, journal, output).

        ``dest`` itself for local outputs. A sink writing to an object store (a URL) keeps
        the URL and returns a path in a local state directory: the lock and journal live
        there, and ``finish`` returns no renames (the sink marks completion itself).
        """
        return Path(dest).absolute()

    def exists(self, dest: Path) -> bool:
        """True if anything is at the main output's place, a dangling link too (refused without
        ``overwrite``)."""
        return any(os.path.lexists(p) for p in self.final_paths(dest)[-1:])

    def row_multiple(self, output: OutputTensor) -> int:
        """Chunks of ``output`` should hold a multiple of this many rows (the sink's own
        chunk grid along axis 0); the engine honours it where the budget allows."""
        return 1

    def baseline_bytes(self) -> int:
        """Memory the sink's libraries take once loaded (e.g. TensorFlow), for estimates."""
        return 0

    def leave_out(self, output: OutputTensor) -> str | None:
        """Why this format cannot hold ``output`` (a dtype it has no code for), or None. Such
        outputs are left out of the plan with that reason, shown by ``plan`` and ``convert``."""
        return None

    def check_outputs(self, outputs: list[OutputTensor]) -> list[str]:
        """Problems with names, dtypes or shapes this format cannot hold, one line each.

        Called before anything is written (no lock, no ``DEST.partial``), so a refusal
        leaves nothing behind."""
        return []

    def scratch_slots(self) -> int:
        """Chunk-sized buffers the sink needs beside the pool (charged to the budget)."""
        return 0

    @abstractmethod
    def open(self, out: Path, outputs: list[OutputTensor], resume: bool) -> None:
        """Prepare ``out`` (inside the staging directory) for ``outputs``.

        With ``resume`` the existing bytes are kept; the layout must be a pure
        function of ``outputs`` and ``options()`` so both runs agree.
        """

    @abstractmethod
    def write(self, chunk: Chunk, data: memoryview) -> Any:
        """Store one chunk; return a JSON-able receipt (journaled)."""

    @abstractmethod
    def check(self, chunk: Chunk, receipt: Any) -> bool:
        """True if a chunk journaled by an earlier run is intact in the partial output."""

    @abstractmethod
    def finish(self, receipts: list[tuple[Chunk, Any]], manifest: dict[str, Any], fsync: bool,
               dest: Path) -> list[tuple[Path, Path]]:
        """Complete the output; return (staged path, final path) renames, main output last."""

    def close(self) -> None:
        pass
