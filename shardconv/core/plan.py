"""The plan: every output tensor, where its bytes come from, decided before any value is read.

An output tensor has a ``Producer`` that fills any byte range of it from source
reads. The identity ``Copy`` is the only producer the core needs; the mapping
layer adds casts, transposes, stacks and splits through the same interface.
"""
from __future__ import annotations

import json
import math
import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any

from ..util.dtypes import itemsize
from .types import Segment

if TYPE_CHECKING:  # the contract only; core never imports a source at run time
    from ..sources.base import Source

#: ``read(source_tensor, offset, out)``: fill ``out`` from the source, returning its checksum segments.
ReadFn = Callable[[str, int, memoryview], list[Segment]]


class Producer(ABC):
    """Computes an output tensor's bytes from source tensors, one byte range at a time."""

    __slots__ = ()  # a subclass may have slots only (``Copy``), or a ``__dict__`` as usual

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


@dataclass(slots=True)
class Copy(Producer):
    """The output is the source tensor's bytes, unchanged. (Slotted, as ``OutputTensor``.)"""

    source: str

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        """The one source tensor (a property: 100 000 copies are made where ``plan`` lists a big index)."""
        return (self.source,)

    def fill(self, offset: int, out: memoryview, read: ReadFn) -> list[Segment]:
        return read(self.source, offset, out)

    def describe(self) -> dict[str, Any]:
        return {"op": "copy", "from": self.source}


@dataclass(slots=True)
class OutputTensor:
    """An output: its name, dtype, shape, and the producer of its bytes. (Slotted: ``plan`` of
    100 000 tensors makes one each, and ``copies`` makes them without ``__init__``.)"""

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


def copies(names: list[str], dtypes: list[str], shapes: list[tuple[int, ...]], sources: list[str]) -> list[OutputTensor]:
    """``[OutputTensor(n, d, s, Copy(src)) for ...]``, made all at once: each instance from
    ``object.__new__``, then each slot set by a C-level ``map`` of its descriptor (what both
    ``__init__``s do, one instance at a time: 3x as long, for the 100 000 outputs of a big index).
    Where the classes are not the plain slotted dataclasses that assumes, by their constructors."""
    if not _BULK:
        return list(map(OutputTensor, names, dtypes, shapes, map(Copy, sources)))
    producers = list(map(object.__new__, repeat(Copy, len(sources))))
    any(map(Copy.__dict__["source"].__set__, producers, sources))  # each returns None: any() runs all
    outputs = list(map(object.__new__, repeat(OutputTensor, len(names))))
    columns: list[list[Any]] = [names, dtypes, shapes, producers]
    for name, column in zip(_OUTPUT_FIELDS, columns):
        any(map(OutputTensor.__dict__[name].__set__, outputs, column))
    return outputs


_OUTPUT_FIELDS = ("name", "dtype", "shape", "producer")


def _plain_slotted(cls: type, names: tuple[str, ...]) -> bool:
    """True where ``cls`` is a dataclass of exactly the fields ``names``, each in a slot of its own,
    whose ``__init__`` does nothing else (no ``__post_init__``)."""
    from dataclasses import fields, is_dataclass
    from types import MemberDescriptorType

    return (is_dataclass(cls) and tuple(f.name for f in fields(cls)) == names
            and getattr(cls, "__slots__", None) == names and not hasattr(cls, "__post_init__")
            and all(type(cls.__dict__.get(n)) is MemberDescriptorType for n in names))


_BULK = _plain_slotted(OutputTensor, _OUTPUT_FIELDS) and _plain_slotted(Copy, ("source",))


@dataclass
class Plan:
    source: Source
    outputs: list[OutputTensor]
    #: (source tensor, reason) for every source tensor that is not written.
    dropped: list[tuple[str, str]] = field(default_factory=list)
    #: Options that change output bytes (recorded; a resume with others is refused).
    options: dict[str, Any] = field(default_factory=dict)
    #: What the mapping did that a user should know (shown by ``plan`` and ``convert``).
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    def describe(self) -> list[dict[str, Any]]:
        return [o.describe() for o in self.outputs]

    def leave_out(self, why: Callable[[OutputTensor], str | None]) -> Plan:
        """This plan without the outputs ``why`` gives a reason for (a sink's ``leave_out``):
        their source tensors join ``dropped`` with that reason."""
        keep, dropped = [], list(self.dropped)
        for o in self.outputs:
            reason = why(o)
            if reason is None:
                keep.append(o)
            else:
                dropped.extend((name, reason) for name in o.producer.inputs)
        if len(keep) == len(self.outputs):
            return self
        return Plan(self.source, keep, dropped, self.options, list(self.notes))

    def digest(self) -> str:
        blob = json.dumps({"outputs": self.describe(), "options": self.options}, sort_keys=True).encode()
        import hashlib  # here: OpenSSL's start-up is 10 ms that most commands do not need

        return hashlib.sha256(blob).hexdigest()


#: Whatever can make a name unsafe: a control character or backslash, a leading, trailing or
#: doubled ``/``, a ``.`` or ``..`` component. A name without any is fine (one search, not a loop).
_MAYBE_UNSAFE = re.compile(r"[\x00-\x1f\\]|^/|/$|//|(?:^|/)\.\.?(?:/|$)")


def output_sizes(outputs: Sequence[OutputTensor]) -> list[int]:
    """Each output's ``nbytes``, computed once per distinct (shape, dtype) (100 000 outputs share a few)."""
    keys = list(zip(map(_SHAPE, outputs), map(_DTYPE, outputs)))
    sizes = {k: math.prod(k[0]) * itemsize(k[1]) for k in set(keys)}
    return list(map(sizes.__getitem__, keys))


_SHAPE, _DTYPE = operator.attrgetter("shape"), operator.attrgetter("dtype")

#: What ``names_safe`` looks for in the names joined by newlines: a leading, trailing or doubled
#: ``/`` (at a newline: a name's end), and a component that starts with a dot.
_SUSPECT_JOINS = ("\n/", "/\n", "//", "/.", "\n.")


def names_safe(names: Sequence[str]) -> bool:
    """True where ``check_name`` finds nothing wrong with any of ``names``, decided at once for all
    of them: none empty, all joined by newlines hold no other control character nor backslash (one
    ``bytes.translate``), no ``/`` at a name's start or end nor ``//``, and no part starting with a
    ``.`` (a ``.`` or ``..`` part would). False says only that some name needs ``check_name``."""
    if not names or not all(names):
        return not names
    text = "\n".join(names)
    if text[0] in "/." or text[-1] == "/" or any(s in text for s in _SUSPECT_JOINS):
        return False
    raw = text.encode("utf-8", "surrogatepass")
    return raw.count(b"\n") == len(names) - 1 and len(raw.translate(None, _UNSAFE_BYTES)) == len(raw)


#: Control characters but the newline, and the backslash: in UTF-8 each is that one byte, and no
#: byte of another character's encoding is one of them.
_UNSAFE_BYTES = bytes(range(10)) + bytes(range(11, 32)) + b"\\"


def check_name(name: str) -> str | None:
    """Why an output name is unsafe as a path component sequence, or None if it is fine."""
    if name and _MAYBE_UNSAFE.search(name) is None:
        return None
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


@dataclass(frozen=True)
class Chunk:
    """Output bytes [offset, offset+length) of output tensor ``index``."""

    index: int
    offset: int
    length: int


def chunk_plan(outputs: list[OutputTensor], chunk_bytes: int,
               grid: Callable[[OutputTensor], Sequence[int]] | None = None) -> list[Chunk]:
    """Split every output into chunks of at most ``chunk_bytes``, each a hyper-rectangle:
    a run of whole rows where a row fits, otherwise the same rule applied inside each row.
    ``grid(output)`` is a sink's own chunk shape (e.g. Zarr's); along each axis a run then
    holds a multiple of the grid's extent where it can, so an output chunk is a union of
    whole grid cells whenever ``chunk_bytes`` holds one cell (``Sink.min_chunk_bytes``).
    Rectangles map onto Zarr chunks and TF slice specs."""
    chunks: list[Chunk] = []
    for i, o in enumerate(outputs):
        if o.nbytes == 0:
            chunks.append(Chunk(i, 0, 0))
            continue
        cells = tuple(grid(o)) if grid else ()
        for off, length in _rectangles(o.shape, itemsize(o.dtype), 0, chunk_bytes, cells):
            chunks.append(Chunk(i, off, length))
    return chunks


def _rectangles(shape: tuple[int, ...], isz: int, base: int, chunk_bytes: int,
                cells: tuple[int, ...]) -> list[tuple[int, int]]:
    if not shape:
        return [(base, isz)]
    row = math.prod(shape[1:]) * isz
    multiple = max(1, cells[0]) if cells else 1
    out: list[tuple[int, int]] = []
    if row <= chunk_bytes or len(shape) == 1:
        rows = max(1, chunk_bytes // row)
        if rows >= multiple:
            rows -= rows % multiple
        for r in range(0, shape[0], rows):
            out.append((base + r * row, min(rows, shape[0] - r) * row))
        return out
    for r in range(shape[0]):
        out.extend(_rectangles(shape[1:], isz, base + r * row, chunk_bytes, cells[1:]))
    return out


def chunk_region(shape: tuple[int, ...], isz: int, offset: int, length: int) -> tuple[slice, ...]:
    """The index (tuple of slices) of the rectangle a chunk from ``chunk_plan`` covers."""
    if not shape:
        return ()
    strides = [math.prod(shape[k + 1:]) * isz for k in range(len(shape))]
    index: list[slice] = []
    pos = offset
    for k, stride in enumerate(strides):
        start = pos // stride
        pos -= start * stride
        if length >= stride or k == len(shape) - 1:
            n = length // stride
            return tuple(index) + (slice(start, start + n),) + tuple(slice(0, d) for d in shape[k + 1:])
        index.append(slice(start, start + 1))
    raise AssertionError("unreachable")
