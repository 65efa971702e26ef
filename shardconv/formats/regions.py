"""Byte ranges of C-order arrays as boxes: how array-store sources (Zarr, Orbax, t5x,
in-memory pytrees) turn the engine's flat byte ranges into the rectangular reads their
libraries offer."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np


def flat_boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[tuple[slice, ...]]:
    """Elements [lo, hi) of a C-order array as at most 2*ndim-1 boxes, in order."""
    if lo >= hi:
        return []
    if not shape:
        return [()]
    inner = math.prod(shape[1:])
    r0, o0 = divmod(lo, inner)
    r1, o1 = divmod(hi, inner)
    whole = tuple(slice(0, d) for d in shape[1:])
    if r0 == r1:
        return [(slice(r0, r0 + 1),) + b for b in flat_boxes(shape[1:], o0, o1)]
    out: list[tuple[slice, ...]] = []
    if o0:
        out += [(slice(r0, r0 + 1),) + b for b in flat_boxes(shape[1:], o0, inner)]
        r0 += 1
    if r1 > r0:
        out.append((slice(r0, r1),) + whole)
    if o1:
        out += [(slice(r1, r1 + 1),) + b for b in flat_boxes(shape[1:], 0, o1)]
    return out


def box_views(shape: tuple[int, ...], npdt: np.dtype, lo: int, hi: int,
              out: memoryview) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """(box, the part of ``out`` that box fills, as an array of the box's shape) for
    elements [lo, hi); ``out`` holds exactly those elements."""
    pos = 0
    for box in flat_boxes(shape, lo, hi):
        bshape = tuple(s.stop - s.start for s in box)
        n = math.prod(bshape) * npdt.itemsize
        yield box, np.frombuffer(out[pos:pos + n], dtype=npdt).reshape(bshape)
        pos += n


def read_bytes_by_elements(offset: int, out: memoryview, isz: int,
                           read_elements: Callable[[int, int, memoryview], None]) -> None:
    """Fill ``out`` with bytes [offset, offset+len(out)) through ``read_elements(lo, hi,
    buf)``, which reads whole elements; a range that splits an element goes through a
    scratch buffer of the enclosing elements (at most the range plus two elements)."""
    if not len(out):
        return
    lo, hi = offset // isz, -(-(offset + len(out)) // isz)
    if lo * isz == offset and hi * isz == offset + len(out):
        read_elements(lo, hi, out)
    else:
        tmp = bytearray((hi - lo) * isz)
        read_elements(lo, hi, memoryview(tmp))
        out[:] = tmp[offset - lo * isz: offset - lo * isz + len(out)]
