"""The plan: every output tensor, where its bytes come from, decided before any value is read.

An output tensor has a ``Producer`` that fills any byte range of it from source
reads. The identity ``Copy`` is the only producer the core needs; the mapping
layer adds casts, transposes, stacks and splits through the same interface.
"""
from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

from .dtypes import itemsize
from .errors import PlanError
from .sources.base import Segment, Source, TensorInfo

#: ``read(source_tensor, offset, out)``: fill ``out`` from the source, returning its checksum segments.
ReadFn = Callable[[str, int, memoryview], list[Segment]]


class Producer(ABC):
    """Computes an output tensor's bytes from source tensors, one byte range at a time."""

    #: Source tensors this producer reads.
    inputs: tuple[str, ...] = ()

    @abstractmethod
    def fill(self, offset: int, out: memoryview, read: ReadFn) -> list[Segment]:
        """Fill ``out`` with output bytes [offset, offset+len(out)); return segments read."""

    def scratch_bytes(self, chunk_bytes: int) -> int:
        """Extra memory one ``fill`` of ``chunk_bytes`` needs beyond the output buffer."""
        return 0

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Plain-data description: recorded in journals and manifests, shown by ``plan``."""


@dataclass
class Copy(Producer):
    """The output is the source tensor's bytes, unchanged."""

    source: str

    def __post_init__(self) -> None:
        self.inputs = (self.source,)

    def fill(self, offset: int, out: memoryview, read: ReadFn) -> list[Segment]:
        return read(self.source, offset, out)

    def describe(self) -> dict[str, Any]:
        return {"op": "copy", "from": self.source}


@dataclass
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    producer: Producer

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * itemsize(self.dtype) if self.shape else self.nbytes

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), **self.producer.describe()}


@dataclass
class Plan:
    source: Source
    outputs: list[OutputTensor]
    #: (source tensor, reason) for every source tensor that is not written.
    dropped: list[tuple[str, str]] = field(default_factory=list)
    #: Options that change output bytes (recorded; a resume with others is refused).
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    def describe(self) -> list[dict[str, Any]]:
        return [o.describe() for o in self.outputs]

    def digest(self) -> str:
        blob = json.dumps({"outputs": self.describe(), "options": self.options}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def check_name(name: str) -> str | None:
    """Why an output name is unsafe as a path component sequence, or None if it is fine."""
    if not name:
        return "empty name"
    if "\x00" in name:
        return "contains NUL"
    if name.startswith("/") or "\\" in name:
        return "absolute path or backslash"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return f"path component {part!r}"
    if any(ord(c) < 32 for c in name):
        return "control character"
    return None


def identity_plan(source: Source, *, include: Callable[[TensorInfo], bool] | None = None,
                  options: dict[str, Any] | None = None) -> Plan:
    """Every array tensor copied under its own name; string tensors dropped (arrays only)."""
    outputs: list[OutputTensor] = []
    dropped: list[tuple[str, str]] = []
    problems: list[str] = []
    for t in source.tensors():
        if include is not None and not include(t):
            dropped.append((t.name, "not selected"))
            continue
        if t.is_string:
            dropped.append((t.name, "string tensor (array outputs hold numbers only)"))
            continue
        why = check_name(t.name)
        if why:
            problems.append(f"{source.location}: tensor name {t.name!r} is unsafe as an output name ({why})")
            continue
        outputs.append(OutputTensor(t.name, t.dtype, t.shape, Copy(t.name)))
    if problems:
        raise PlanError(problems)
    return Plan(source, outputs, dropped, dict(options or {}))


@dataclass(frozen=True)
class Chunk:
    """Output bytes [offset, offset+length) of output tensor ``index``."""

    index: int
    offset: int
    length: int


def chunk_plan(outputs: list[OutputTensor], chunk_bytes: int) -> list[Chunk]:
    """Split every output into chunks of at most ``chunk_bytes``: whole rows where a row
    fits, otherwise pieces of one row (never crossing a row), element-aligned."""
    chunks: list[Chunk] = []
    for i, o in enumerate(outputs):
        n = o.nbytes
        if n == 0:
            chunks.append(Chunk(i, 0, 0))
            continue
        row = o.row_bytes or n
        isz = itemsize(o.dtype)
        if row <= chunk_bytes:
            step = (chunk_bytes // row) * row
            for off in range(0, n, step):
                chunks.append(Chunk(i, off, min(step, n - off)))
        else:
            step = max(isz, (chunk_bytes // isz) * isz)
            for r in range(0, n, row):
                for off in range(r, r + row, step):
                    chunks.append(Chunk(i, off, min(step, r + row - off)))
    return chunks
