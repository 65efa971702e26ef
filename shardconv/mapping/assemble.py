"""One producer for every layout transform: an output tensor assembled from pieces.

A piece takes a box of an input (viewed with any shape of the same size, i.e. a
reshape), permutes its axes (transpose) and places it at a box of the output;
the values are cast to the output dtype on the way. Copy, cast, transpose,
reshape, split, unstack, stack and concat are all pieces. Filling an output chunk
(a rectangle) reads only the input rectangles it needs, in contiguous runs, into
one reusable scratch buffer charged to the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.plan import Producer, ReadFn, chunk_region
from ..core.types import Segment
from ..util.dtypes import itemsize, numpy_dtype

if TYPE_CHECKING:  # NumPy is imported where a chunk is assembled: a plain copy never needs it
    import numpy as np

Box = tuple[tuple[int, int], ...]
#: Above this many contiguous runs per read, segments are not reported and the
#: engine verifies the input's checksum with one sequential pass instead.
MAX_REPORTED_RUNS = 64


@dataclass
class Piece:
    input: str
    view: tuple[int, ...]     # the input's shape as this piece sees it (same element count)
    box: Box                  # (start, stop) per view axis
    perm: tuple[int, ...]     # axes of the boxed array, in output order
    out_box: Box              # (start, stop) per output axis

    @property
    def p_shape(self) -> tuple[int, ...]:
        return tuple(self.box[a][1] - self.box[a][0] for a in self.perm)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"from": self.input}
        if any(lo != 0 or hi != n for (lo, hi), n in zip(self.box, self.view)):
            d["box"] = [list(b) for b in self.box]
        if self.perm != tuple(range(len(self.perm))):
            d["perm"] = list(self.perm)
        d["view"] = list(self.view)
        d["at"] = [list(b) for b in self.out_box]
        return d


def _nonunit(shape: tuple[int, ...]) -> list[int]:
    return [i for i, n in enumerate(shape) if n != 1]


def check_piece(piece: Piece, out_shape: tuple[int, ...]) -> str | None:
    """Why a piece is inconsistent, or None."""
    if sorted(piece.perm) != list(range(len(piece.view))):
        return f"permutation {list(piece.perm)} does not fit {len(piece.view)} axes"
    if len(piece.box) != len(piece.view) or len(piece.out_box) != len(out_shape):
        return "box rank mismatch"
    for (lo, hi), n in zip(piece.box, piece.view):
        if not 0 <= lo <= hi <= n:
            return f"box {list(piece.box)} outside {list(piece.view)}"
    for (lo, hi), n in zip(piece.out_box, out_shape):
        if not 0 <= lo <= hi <= n:
            return f"output box {list(piece.out_box)} outside {list(out_shape)}"
    p = piece.p_shape
    o = tuple(hi - lo for lo, hi in piece.out_box)
    if [p[i] for i in _nonunit(p)] != [o[i] for i in _nonunit(o)]:
        return f"piece of shape {list(p)} cannot fill output box of shape {list(o)}"
    return None


def read_rect(read: ReadFn, name: str, shape: tuple[int, ...], isz: int, box: Box,
              dest: np.ndarray) -> tuple[list[Segment], bool]:
    """Read box ``box`` of C-order tensor ``name`` (seen as ``shape``) into ``dest``
    (C-contiguous, the box's shape). Returns (segments, complete) where complete
    is False when too many runs were read to report their checksums."""
    import numpy as np

    nd = len(shape)
    flat = dest.reshape(-1).view(np.uint8)
    if nd == 0:
        return read(name, 0, flat.data), True
    k = nd - 1
    while k > 0 and box[k] == (0, shape[k]):
        k -= 1
    inner = math.prod(shape[k + 1:]) * isz
    run = (box[k][1] - box[k][0]) * inner
    if run == 0 or flat.size == 0:
        return [], True
    strides = [math.prod(shape[i + 1:]) * isz for i in range(nd)]
    outer = [range(lo, hi) for lo, hi in box[:k]]
    nruns = math.prod(len(r) for r in outer)
    report = nruns <= MAX_REPORTED_RUNS
    segs: list[Segment] = []
    pos = 0
    for idx in np.ndindex(*[len(r) for r in outer]) if outer else [()]:
        off = sum((outer[i][j]) * strides[i] for i, j in enumerate(idx)) + box[k][0] * strides[k]
        got = read(name, off, flat[pos:pos + run].data)
        if report:
            segs.extend(got)
        pos += run
    return segs, report


@dataclass
class Assemble(Producer):
    out_shape: tuple[int, ...]
    out_dtype: str
    pieces: list[Piece]
    in_dtypes: dict[str, str]
    ops: list[str] = field(default_factory=list)   # what the user asked for, for reports
    _scratch: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.inputs = tuple(dict.fromkeys(p.input for p in self.pieces))

    def scratch_bytes(self, chunk_bytes: int) -> int:
        out_isz = itemsize(self.out_dtype)
        widest = max(itemsize(d) for d in self.in_dtypes.values())
        return -(-chunk_bytes * widest // out_isz)

    def describe(self) -> dict[str, Any]:
        return {"op": "+".join(self.ops) or "assemble", "pieces": [p.describe() for p in self.pieces]}

    def _buffer(self, nbytes: int) -> np.ndarray:
        import numpy as np

        if self._scratch is None or self._scratch.size < nbytes:
            self._scratch = np.empty(nbytes, np.uint8)
        return self._scratch[:nbytes]

    def fill(self, offset: int, out: memoryview, read: ReadFn) -> list[Segment]:
        import numpy as np

        out_isz = itemsize(self.out_dtype)
        rect = chunk_region(self.out_shape, out_isz, offset, len(out))
        rect_shape = tuple(s.stop - s.start for s in rect)
        out_arr = np.frombuffer(out, dtype=numpy_dtype(self.out_dtype)).reshape(rect_shape)
        segs: list[Segment] = []
        self.unreported: set[str] = getattr(self, "unreported", set())
        for piece in self.pieces:
            inter = []
            for s, (lo, hi) in zip(rect, piece.out_box):
                a, b = max(s.start, lo), min(s.stop, hi)
                if a >= b:
                    break
                inter.append((a, b))
            else:
                self._fill_piece(piece, tuple(inter), rect, out_arr, read, segs)
        return segs

    def _fill_piece(self, piece: Piece, inter: Box, rect: tuple[slice, ...], out_arr: np.ndarray,
                    read: ReadFn, segs: list[Segment]) -> None:
        import numpy as np

        p_shape = piece.p_shape
        o_nonunit = _nonunit(tuple(hi - lo for lo, hi in piece.out_box))
        p_nonunit = _nonunit(p_shape)
        p_ranges = [(0, 1)] * len(p_shape)
        for pa, oa in zip(p_nonunit, o_nonunit):
            lo = piece.out_box[oa][0]
            p_ranges[pa] = (inter[oa][0] - lo, inter[oa][1] - lo)
        v_box: list[tuple[int, int]] = [(0, 0)] * len(piece.view)
        for j, ax in enumerate(piece.perm):
            start = piece.box[ax][0]
            v_box[ax] = (start + p_ranges[j][0], start + p_ranges[j][1])
        in_dtype = numpy_dtype(self.in_dtypes[piece.input])
        v_shape = tuple(hi - lo for lo, hi in v_box)
        tmp = self._buffer(math.prod(v_shape) * in_dtype.itemsize).view(in_dtype).reshape(v_shape)
        got, complete = read_rect(read, piece.input, piece.view, in_dtype.itemsize, tuple(v_box), tmp)
        segs.extend(got)
        if not complete:
            self.unreported.add(piece.input)
        block = tmp.transpose(piece.perm)
        # the trailing Ellipsis keeps a 0-d output a view (``arr[()]`` would be a NumPy scalar)
        dest = out_arr[tuple(slice(lo - s.start, hi - s.start) for (lo, hi), s in zip(inter, rect)) + (Ellipsis,)]
        np.copyto(dest, block.reshape(dest.shape), casting="unsafe")
