"""The ``.npy`` header: written by the NPZ sink, parsed (strictly) by the NPZ source.

bfloat16 and float8 cannot be named in a header; like ``np.save`` and
big_vision we write them as raw void (``<V2``/``<V1``) and record the true dtype
in the manifest.
"""
from __future__ import annotations

import ast
import math
import struct
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, UnsupportedError
from ..util.dtypes import dtype_name, is_ml_dtype, itemsize, numpy_dtype

if TYPE_CHECKING:
    import numpy as np

MAGIC = b"\x93NUMPY"
ALIGN = 64
#: numpy refuses larger headers by default; so do we.
MAX_HEADER_LEN = 10000


#: ``np.lib.format.dtype_to_descr`` of each NumPy dtype we write, so writing an .npy header
#: needs no NumPy (a direct copy never imports it; tests/test_npyformat.py checks the table).
_DESCRS: dict[str, str] = {
    "bool": "|b1", "int8": "|i1", "uint8": "|u1", "int16": "<i2", "uint16": "<u2", "int32": "<i4",
    "uint32": "<u4", "int64": "<i8", "uint64": "<u8", "float16": "<f2", "float32": "<f4", "float64": "<f8",
    "complex64": "<c8", "complex128": "<c16",
}


def descr_of(dtype: str) -> str:
    """What ``np.save`` writes: ml_dtypes become raw void of their size (``<V2``)."""
    if is_ml_dtype(dtype):
        return f"<V{itemsize(dtype)}"
    descr = _DESCRS.get(dtype)
    if descr is None:
        numpy_dtype(dtype)  # raises UnsupportedError for names without an array type
        raise UnsupportedError(f"dtype {dtype!r} has no .npy descr")
    return descr


def header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The exact header ``np.save`` writes for a C-order array (version 1.0, or 2.0 if long)."""
    d = f"{{'descr': {descr_of(dtype)!r}, 'fortran_order': False, 'shape': {tuple(int(x) for x in shape)!r}, }}"
    for version, fmt in (((1, 0), "<H"), ((2, 0), "<I")):
        prefix = len(MAGIC) + 2 + struct.calcsize(fmt)
        hlen = len(d) + 1
        pad = (ALIGN - (prefix + hlen) % ALIGN) % ALIGN
        if version == (1, 0) and hlen + pad >= 1 << 16:
            continue
        return MAGIC + bytes(version) + struct.pack(fmt, hlen + pad) + d.encode("latin1") + b" " * pad + b"\n"
    raise AssertionError("unreachable")


def _read_dict(read: Callable[[int], bytes], where: str, max_header: int) -> tuple[dict[str, Any], int]:
    """The header's dict literal (checked to hold exactly descr, fortran_order, shape) and the
    header's total length in bytes."""
    head = read(len(MAGIC) + 2)
    if len(head) < len(MAGIC) + 2 or head[: len(MAGIC)] != MAGIC:
        raise FormatError(f"{where}: not an .npy array (bad magic {head[:6]!r})")
    major, minor = head[6], head[7]
    if (major, minor) == (1, 0):
        fmt = "<H"
    elif (major, minor) in ((2, 0), (3, 0)):
        fmt = "<I"
    else:
        raise FormatError(f"{where}: unknown .npy version {major}.{minor}")
    raw = read(struct.calcsize(fmt))
    if len(raw) != struct.calcsize(fmt):
        raise FormatError(f"{where}: truncated .npy header")
    (hlen,) = struct.unpack(fmt, raw)
    if hlen > max_header:
        raise FormatError(f"{where}: .npy header declares {hlen} bytes, over the {max_header}-byte limit")
    text = read(hlen)
    if len(text) != hlen:
        raise FormatError(f"{where}: truncated .npy header ({len(text)} of {hlen} bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. invalid escapes in a hostile header
            d = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin1"))
    except (SyntaxError, ValueError, UnicodeDecodeError, MemoryError, RecursionError):
        raise FormatError(f"{where}: .npy header is not a Python literal: {text[:80]!r}") from None
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise FormatError(f"{where}: .npy header must have exactly descr, fortran_order, shape: {d!r:.120}")
    return d, len(MAGIC) + 2 + struct.calcsize(fmt) + hlen


def _dtype(descr: Any, where: str) -> np.dtype | None:
    """The header's dtype: None for raw void (ml_dtypes saved by NumPy); refused when it is
    structured, holds objects, is big-endian or is not a number."""
    if not isinstance(descr, str):
        raise UnsupportedError(f"{where}: structured dtype {descr!r:.80} is not supported")
    import numpy as np  # here, not at the top: writing headers needs no NumPy

    try:
        dt = np.dtype(descr)
    except TypeError:
        raise FormatError(f"{where}: unknown dtype descr {descr!r}") from None
    if dt.hasobject:
        raise UnsupportedError(f"{where}: holds Python objects (pickled data); shardconv never unpickles")
    if dt.kind == "V":
        return None
    if dt.byteorder == ">":
        raise UnsupportedError(f"{where}: big-endian dtype {descr!r} is not supported")
    try:
        dtype_name(dt)  # raises for dtypes we do not handle (str, datetime, ...)
    except UnsupportedError:
        raise UnsupportedError(f"{where}: dtype {descr!r} is not supported (numbers only)") from None
    return dt


def parse_header(read: Callable[[int], bytes], where: str,
                 max_header: int = MAX_HEADER_LEN) -> tuple[np.dtype | None, str, tuple[int, ...], bool, int]:
    """Parse a header with ``read(n) -> bytes``, checks in a fixed order.

    Returns (numpy dtype or None for void, descr, shape, fortran_order, header length).
    Raises FormatError (malformed) or UnsupportedError (a dtype shardconv does not read).
    """
    d, total = _read_dict(read, where, max_header)
    shape = d["shape"]
    if not isinstance(shape, tuple) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
        raise FormatError(f"{where}: bad .npy shape {shape!r}")
    if not isinstance(d["fortran_order"], bool):
        raise FormatError(f"{where}: bad fortran_order {d['fortran_order']!r}")
    return _dtype(d["descr"], where), d["descr"], shape, d["fortran_order"], total


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
