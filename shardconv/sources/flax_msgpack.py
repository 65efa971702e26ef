"""flax ``to_bytes`` msgpack files and t5x msgpack ``checkpoint`` files, read lazily.

The file is walked once with ``pread`` through a small window: maps give the
``/``-joined names, and each array (flax ext type 1 = ndarray, 3 = numpy scalar,
and flax's ``__msgpack_chunked_array__`` dicts for arrays over 1 GiB) is recorded
as a byte range of the file, never loaded. Every declared length is checked
against the file size before anything is read; nesting depth is bounded.
A leaf that is a TensorStore spec (t5x's TensorStore checkpoints) is an array stored
beside the file; ``formats.tensorstore_arrays.t5x_array`` resolves it (read through TensorStore). So is a
``PLACEHOLDER://name`` string (legacy Orbax ``checkpoint`` files: the array is the Zarr
array ``name/`` beside the file).
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.plan import check_name
from ..core.types import Segment, TensorInfo
from ..errors import FormatError, SourceError, UnsupportedError
from ..formats.tensorstore_arrays import (
    TsArray,
    TsReader,
    array_dirs,
    cache_bytes,
    is_tensorstore_spec,
    placeholder_array,
    reader_bytes,
    t5x_array,
)
from ..util.dtypes import NUMPY_DTYPES, dtype_name, is_ml_dtype, itemsize
from ..util.fileio import open_read
from .base import Source, walk_files

MAX_DEPTH = 64
WINDOW = 1 << 16
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
#: Legacy Orbax ``checkpoint`` leaves naming an array written beside the file (orbax.checkpoint.utils).
PLACEHOLDER_PREFIXES = ("PLACEHOLDER://", "AGGREGATED://")


@dataclass
class _Bin:
    offset: int
    length: int


@dataclass
class _Ext:
    code: int
    offset: int
    length: int


@dataclass
class _Leaf:
    dtype: str
    shape: tuple[int, ...]
    pieces: list[tuple[int, int]] = field(default_factory=list)  # (file offset, bytes)
    inline: bytes | None = None
    external: TsArray | None = None  # a t5x array stored beside the file


class _Reader:
    """msgpack values from a file, bins and exts as (offset, length) without reading them."""

    def __init__(self, fd: int, size: int, where: str) -> None:
        self.fd, self.size, self.where = fd, size, where
        self.pos = 0
        self._win_start = 0
        self._win = b""
        self.keys: list[str] = []  # path of the value being parsed, for messages

    def _err(self, msg: str) -> FormatError:
        at = f" (in {'/'.join(self.keys)!r})" if self.keys else ""
        return FormatError(f"{self.where}: corrupt msgpack at byte {self.pos}{at}: {msg}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self._err(f"needs {n} bytes but the file ends at {self.size} (truncated?)")
        end = self.pos + n
        if not (self._win_start <= self.pos and end <= self._win_start + len(self._win)):
            self._win_start = self.pos
            self._win = os.pread(self.fd, max(n, WINDOW), self.pos)
        out = self._win[self.pos - self._win_start:end - self._win_start]
        self.pos = end
        return out

    def skip(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self._err(f"declares {n} bytes but the file ends at {self.size} (truncated?)")
        start = self.pos
        self.pos += n
        return start

    def _count(self, n: int, what: str) -> int:
        if n > self.size - self.pos:  # every element takes at least one byte
            raise self._err(f"{what} of {n} elements cannot fit in the rest of the file")
        return n

    def value(self, depth: int = 0) -> Any:
        """The next msgpack value; bins and exts as (offset, length), containers nested at most MAX_DEPTH."""
        if depth > MAX_DEPTH:
            raise self._err(f"nesting deeper than {MAX_DEPTH}")
        b = self.take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self._array(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self._str(b & 0x1F)
        if b in (0xDC, 0xDD):
            return self._array(int.from_bytes(self.take(2 if b == 0xDC else 4), "big"), depth)
        if b in (0xDE, 0xDF):
            return self._map(int.from_bytes(self.take(2 if b == 0xDE else 4), "big"), depth)
        return self._scalar(b)

    def _scalar(self, b: int) -> Any:
        """A value of type byte ``b`` that holds no other values (nil, bool, numbers, str, bin, ext)."""
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        if b in (0xC4, 0xC5, 0xC6):
            n = int.from_bytes(self.take(1 << (b - 0xC4)), "big")
            return _Bin(self.skip(n), n)
        if b in (0xC7, 0xC8, 0xC9):
            n = int.from_bytes(self.take(1 << (b - 0xC7)), "big")
            code = struct.unpack("b", self.take(1))[0]
            return _Ext(code, self.skip(n), n)
        if b in (0xCA, 0xCB):
            return struct.unpack(">f" if b == 0xCA else ">d", self.take(4 if b == 0xCA else 8))[0]
        if 0xCC <= b <= 0xCF:
            return int.from_bytes(self.take(1 << (b - 0xCC)), "big")
        if 0xD0 <= b <= 0xD3:
            return int.from_bytes(self.take(1 << (b - 0xD0)), "big", signed=True)
        if 0xD4 <= b <= 0xD8:
            code = struct.unpack("b", self.take(1))[0]
            n = 1 << (b - 0xD4)
            return _Ext(code, self.skip(n), n)
        if 0xD9 <= b <= 0xDB:
            return self._str(int.from_bytes(self.take(1 << (b - 0xD9)), "big"))
        raise self._err(f"invalid type byte 0x{b:02x}")

    def _str(self, n: int) -> str:
        if n > 1 << 20:
            raise self._err(f"string of {n} bytes")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise self._err("string is not UTF-8") from None

    def _array(self, n: int, depth: int) -> list[Any]:
        return [self._keyed(i, depth) for i in range(self._count(n, "array"))]

    def _keyed(self, key: Any, depth: int) -> Any:
        self.keys.append(str(key))
        v = self.value(depth + 1)
        self.keys.pop()
        return v

    def _map(self, n: int, depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for _ in range(self._count(n, "map")):
            k = self.value(depth + 1)
            if isinstance(k, (_Bin, _Ext, list, dict)):
                raise self._err("map key is not a string or number")
            if k in out:
                raise self._err(f"duplicate key {k!r}")
            out[k] = self._keyed(k, depth)
        return out


class FlaxMsgpackSource(Source):
    format = "flax-msgpack"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd = open_read(self.path, SourceError)
        try:
            size = os.fstat(self._fd).st_size
            self._reader = _Reader(self._fd, size, str(self.path))
            tree = self._reader.value()
            if self._reader.pos != size:
                raise FormatError(f"{self.path}: {size - self._reader.pos} bytes after the msgpack value")
            if not isinstance(tree, dict):
                raise FormatError(f"{self.path}: top level is not a map")
            self._leaves: dict[str, _Leaf] = {}
            self._ts_reader: Any = None
            self._walk(tree, "")
        except BaseException:
            os.close(self._fd)
            raise
        self._infos = [TensorInfo(n, l.dtype, l.shape, math.prod(l.shape) * itemsize(l.dtype))
                       for n, l in self._leaves.items()]

    @property
    def location(self) -> str:
        return str(self.path)

    def _walk(self, node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node.get(_CHUNKED) is True:
            self._add(prefix, self._chunked(node, prefix))
            return
        if is_tensorstore_spec(node):
            a = t5x_array(node, self.path.parent, prefix, str(self.path))
            self._add(prefix, _Leaf(a.dtype, a.shape, external=a))
            return
        if isinstance(node, dict):
            for k, v in node.items():
                self._walk(v, f"{prefix}/{k}" if prefix else str(k))
            return
        if isinstance(node, list):
            for i, v in enumerate(node):
                self._walk(v, f"{prefix}/{i}" if prefix else str(i))
            return
        if isinstance(node, str):
            self._text(prefix, node)
            return
        self._add(prefix, self._leaf(node, prefix))

    def _text(self, name: str, value: str) -> None:
        """A string leaf: a legacy Orbax placeholder is the array stored beside the file
        (checkpoints written before Orbax's ``_METADATA``); other strings are not arrays."""
        if value.startswith(PLACEHOLDER_PREFIXES):
            a = placeholder_array(value.split("://", 1)[1], self.path.parent, name, str(self.path))
            self._add(name, _Leaf(a.dtype, a.shape, external=a))

    def _add(self, name: str, leaf: _Leaf | None) -> None:
        if leaf is None:
            return
        why = check_name(name)
        if why:
            raise FormatError(f"{self.path}: leaf name {name!r} is unsafe ({why})")
        self._leaves[name] = leaf

    def _leaf(self, v: Any, name: str) -> _Leaf | None:
        if isinstance(v, bool):
            return _Leaf("bool", (), inline=np.bool_(v).tobytes())
        if isinstance(v, int):
            if not -(1 << 63) <= v < 1 << 63:
                raise FormatError(f"{self.path}: integer leaf {name!r} does not fit int64")
            return _Leaf("int64", (), inline=np.int64(v).tobytes())
        if isinstance(v, float):
            return _Leaf("float64", (), inline=np.float64(v).tobytes())
        if isinstance(v, _Ext):
            return self._ext(v, name)
        if v is None or isinstance(v, str) or isinstance(v, _Bin):
            return None  # not an array (t5x stores e.g. None for empty optimizer states)
        raise FormatError(f"{self.path}: unexpected leaf {name!r}")

    def _ext(self, e: _Ext, name: str) -> _Leaf:
        if e.code == _EXT_COMPLEX:
            r = _Reader(self._fd, e.offset + e.length, str(self.path))
            r.pos = e.offset
            pair = r.value()
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, (int, float)) for x in pair)):
                raise FormatError(f"{self.path}: complex leaf {name!r} is malformed")
            return _Leaf("complex128", (), inline=np.complex128(complex(*pair)).tobytes())
        if e.code not in (_EXT_NDARRAY, _EXT_SCALAR):
            raise FormatError(f"{self.path}: leaf {name!r} uses unknown msgpack ext code {e.code}")
        r = _Reader(self._fd, e.offset + e.length, str(self.path))
        r.pos = e.offset
        tpl = r.value(MAX_DEPTH - 3)
        if not (isinstance(tpl, list) and len(tpl) == 3 and isinstance(tpl[0], list) and isinstance(tpl[2], _Bin)):
            raise FormatError(f"{self.path}: array {name!r} is not (shape, dtype, bytes)")
        shape, dname, data = tpl
        if isinstance(dname, _Bin):
            dname = os.pread(self._fd, min(dname.length, 64), dname.offset).decode("ascii", "replace")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise FormatError(f"{self.path}: array {name!r} has invalid shape {shape!r}")
        try:
            dtype = dname if isinstance(dname, str) and is_ml_dtype(dname) and dname in NUMPY_DTYPES \
                else dtype_name(np.dtype(dname))
        except (TypeError, UnsupportedError):
            raise UnsupportedError(f"{self.path}: array {name!r} has unsupported dtype {dname!r}") from None
        nbytes = math.prod(shape) * itemsize(dtype)
        if nbytes != data.length:
            raise FormatError(f"{self.path}: array {name!r} declares shape {shape} of {dtype} ({nbytes} bytes) "
                              f"but holds {data.length}")
        return _Leaf(dtype, tuple(shape), [(data.offset, data.length)] if nbytes else [])

    def _chunked(self, node: dict, name: str) -> _Leaf:
        try:
            shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
            chunks = [self._ext(node["chunks"][str(i)], f"{name}/chunks/{i}") for i in range(len(node["chunks"]))]
        except (KeyError, TypeError, AttributeError):
            raise FormatError(f"{self.path}: chunked array {name!r} is malformed") from None
        dtypes = {c.dtype for c in chunks}
        total = sum(p[1] for c in chunks for p in c.pieces)
        if len(dtypes) != 1 or not all(isinstance(d, int) and d >= 0 for d in shape) or \
                total != math.prod(shape) * itemsize(next(iter(dtypes))):
            raise FormatError(f"{self.path}: chunked array {name!r} pieces do not add up to shape {list(shape)}")
        return _Leaf(dtypes.pop(), shape, [p for c in chunks for p in c.pieces])

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def input_files(self) -> list[str]:
        """The msgpack file and, for t5x, every file of the arrays stored beside it."""
        external = [leaf.external for leaf in self._leaves.values() if leaf.external is not None]
        if not external:
            return [os.path.abspath(self.path)]
        return [os.path.abspath(self.path), *walk_files(*array_dirs(external))]

    def read_into(self, name: str, offset: int, out: memoryview) -> list[Segment]:
        leaf = self._entry(self._leaves, name)
        nbytes = math.prod(leaf.shape) * itemsize(leaf.dtype)
        out = self._region(name, offset, out, nbytes)
        if leaf.inline is not None:
            out[:] = leaf.inline[offset:offset + len(out)]
            return []
        if leaf.external is not None:
            if self._ts_reader is None:
                self._ts_reader = TsReader(cache_bytes(l.external for l in self._leaves.values()
                                                       if l.external is not None))
            self._ts_reader.read(leaf.external, offset, out)
            return []
        pos, done = 0, 0
        for start, length in leaf.pieces:
            lo, hi = max(offset, pos), min(offset + len(out), pos + length)
            if lo < hi:
                n = os.preadv(self._fd, [out[done:done + hi - lo]], start + lo - pos)
                if n != hi - lo:
                    raise FormatError(f"{self.path}: file ends inside array {name!r} (truncated?)")
                done += n
            pos += length
        return []

    def baseline_bytes(self) -> int:
        external = [leaf.external for leaf in self._leaves.values() if leaf.external is not None]
        if not external:
            return 0
        return reader_bytes(external)

    def close(self) -> None:
        if getattr(self, "_ts_reader", None) is not None:
            self._ts_reader.close()
            self._ts_reader = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
