"""TensorFlow bundle index entries: ``BundleEntryProto`` decoding and the slice keys
partitioned tensors are stored under (``EncodeTensorNameSlice``).

Byte format only: what a checkpoint says, checked for well-formedness (dtype known,
no negative dimension, offset or size). Which files to open and what the values
mean is ``sources/tf_bundle.py``'s business.
"""
from __future__ import annotations

import re
from itertools import repeat
from typing import NamedTuple

from ..errors import FormatError, ShardconvError, UnsupportedError
from ..util.dtypes import TF_DTYPE_NAMES_UNSUPPORTED, TF_DTYPES
from .wire import as_int64, fields

#: The index key of a TF2 checkpoint's object graph.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


# ----------------------------------------------------------------- slice keys

def _num_increasing(v: int) -> bytes:
    b = v.to_bytes((v.bit_length() + 7) // 8, "big") if v else b""
    return bytes([len(b)]) + b



def _escape(s: bytes) -> bytes:
    out = bytearray()
    for c in s:
        if c == 0:
            out += b"\x00\xff"
        elif c == 0xFF:
            out += b"\xff\x00"
        else:
            out.append(c)
    return bytes(out)


_HEADER_BITS = [(0, 0), (0x80, 0), (0xC0, 0), (0xE0, 0), (0xF0, 0), (0xF8, 0),
                (0xFC, 0), (0xFE, 0), (0xFF, 0), (0xFF, 0x80), (0xFF, 0xC0)]


def _signed_num_increasing(v: int) -> bytes:
    x = ~v if v < 0 else v
    if x < 64:
        return bytes([(0x80 ^ v) & 0xFF])
    length = x.bit_length() // 7 + 1
    buf = bytearray((b"\xff\xff" if v < 0 else b"\x00\x00") + (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big"))
    begin = buf[10 - length:]
    begin[0] ^= _HEADER_BITS[length][0]
    begin[1] ^= _HEADER_BITS[length][1]
    return bytes(begin)


def slice_key(name: str, extents: list[tuple[int, int]]) -> bytes:
    """TensorFlow's ``EncodeTensorNameSlice``: the key a partition is stored under.

    ``extents`` are (start, length) with length -1 for a full extent.
    """
    out = _num_increasing(0) + _escape(name.encode()) + b"\x00\x01" + _num_increasing(len(extents))
    for start, length in extents:
        out += _signed_num_increasing(start) + _signed_num_increasing(length)
    return out


# ----------------------------------------------------------------- entries

class Entry(NamedTuple):
    """A tensor's BundleEntryProto. (A NamedTuple: one per tensor, and ``EntryReader.many`` makes
    a block's at once from its columns with ``map``, which no class with an ``__init__`` allows.)"""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int | None          # masked, as stored
    slices: tuple[list[tuple[int, int]], ...]  # (start, length|-1) per dim, per slice; () if not partitioned


def parse_shape(buf: memoryview, what: str) -> tuple[int, ...]:
    dims = []
    for num, wt, val in fields(buf, what):
        if num == 2 and wt == 2:
            size = 0
            for n2, w2, v2 in fields(val, what):
                if n2 == 1 and w2 == 0:
                    size = as_int64(v2)
            dims.append(size)
        elif num == 3 and wt == 0 and val:
            raise UnsupportedError(f"{what}: shape of unknown rank")
    return tuple(dims)


def parse_slice(buf: memoryview, what: str) -> list[tuple[int, int]]:
    extents = []
    for num, wt, val in fields(buf, what):
        if num == 1 and wt == 2:
            start, length = 0, -1
            for n2, w2, v2 in fields(val, what):
                if n2 == 1 and w2 == 0:
                    start = as_int64(v2)
                elif n2 == 2 and w2 == 0:
                    length = as_int64(v2)
            extents.append((start, length))
    return extents


def parse_entry(name: str, value: bytes, where: str) -> Entry:
    what = f"{where}: entry for tensor {name!r}"
    dtype_enum = 0
    shape: tuple[int, ...] = ()
    shard = offset = size = 0
    crc = None
    slices = []
    for num, wt, val in fields(value, what):
        if num == 1 and wt == 0:
            dtype_enum = val
        elif num == 2 and wt == 2:
            shape = parse_shape(val, what)
        elif num == 3 and wt == 0:
            shard = as_int64(val)
        elif num == 4 and wt == 0:
            offset = as_int64(val)
        elif num == 5 and wt == 0:
            size = as_int64(val)
        elif num == 6 and wt == 5:
            crc = val
        elif num == 7 and wt == 2:
            slices.append(parse_slice(val, what))
    if dtype_enum in TF_DTYPES:
        dtype = TF_DTYPES[dtype_enum]
    elif dtype_enum in TF_DTYPE_NAMES_UNSUPPORTED:
        raise UnsupportedError(f"{where}: tensor {name!r} has dtype {TF_DTYPE_NAMES_UNSUPPORTED[dtype_enum]}, which shardconv does not support")
    else:
        raise FormatError(f"{where}: tensor {name!r} has unknown dtype enum {dtype_enum}")
    for d in shape:
        if d < 0:
            raise FormatError(f"{where}: tensor {name!r} has negative dimension in shape {list(shape)}")
    if offset < 0 or size < 0 or shard < 0:
        raise FormatError(f"{where}: tensor {name!r} has negative shard/offset/size ({shard}/{offset}/{size})")
    return Entry(name, dtype, shape, shard, offset, size, crc, tuple(slices))


# The form TensorFlow serializes a BundleEntryProto in: dtype (1 byte), shape, then the
# optional shard_id, offset, size and crc32c, in field order. A varint of at most 9 bytes
# is below 2**63, so never negative as an int64.
_VARINT63 = rb"([\x80-\xff]{0,8}[\x00-\x7f])"
_CANONICAL_TAIL = re.compile(rb"(?:\x18%s)?(?:\x20%s)?(?:\x28%s)?(?:\x35(.{4}))?" % ((_VARINT63,) * 3), re.S)
#: A whole entry in that form: the dtype tag, then (group 1) the dtype, the shape's tag and length
#: and its dimensions (each one field of size, or empty for 0), then the tail's four groups.
_CANONICAL = re.compile(rb"\x08([\x01-\x7f]\x12[\x00-\x7f](?:\x12(?:\x00|[\x02-\x0a]\x08[\x80-\xff]{0,8}[\x00-\x7f]))*)"
                        + _CANONICAL_TAIL.pattern, re.S)


def _uvarint(raw: bytes | None) -> int:
    """The value of a varint matched whole by ``_VARINT63`` (None, an absent field: 0)."""
    if raw is None:
        return 0
    n = len(raw)
    if n == 1:
        return raw[0]
    if n == 2:  # offsets below 16 KiB
        return (raw[0] & 0x7F) | raw[1] << 7
    if n == 3:  # ... below 2 MiB
        return (raw[0] & 0x7F) | (raw[1] & 0x7F) << 7 | raw[2] << 14
    value = 0
    for i, b in enumerate(raw):
        value |= (b & 0x7F) << (7 * i)
    return value


#: ``EntryReader.columns``: dtypes, shapes, shards, offsets, sizes, crcs, and the Entries
#: decoded one by one, by index (None and 0 in the columns there).
Columns = tuple[list["str | None"], list["tuple[int, ...] | None"], list[int], list[int], list[int],
                list["int | None"], dict[int, Entry]]


class EntryReader:
    """Decodes the BundleEntryProtos of one index, fast for the form TensorFlow writes.

    That form is matched by one regex over the fields after the shape, and each distinct
    shape is decoded once. Anything else (fields in another order, repeated or unknown
    fields, slices, long varints, a shape that is malformed or has a negative dimension,
    an unknown dtype) goes to the strict field-by-field ``parse_entry``, which decides
    every error, so results and errors are those of ``parse_entry`` alone.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self._shapes: dict[bytes, tuple[int, ...] | None] = {}
        self._heads: dict[bytes, tuple[str, tuple[int, ...]] | tuple[()]] = {}

    def __call__(self, name: str, value: bytes) -> Entry:
        if len(value) >= 4 and value[0] == 0x08 and value[1] < 0x80 and value[2] == 0x12 and value[3] < 0x80:
            stop = 4 + value[3]
            dtype = TF_DTYPES.get(value[1])
            shape = self._shape(value[4:stop]) if stop <= len(value) else None
            m = _CANONICAL_TAIL.fullmatch(value, stop) if shape is not None else None
            if m is not None and dtype is not None and shape is not None:
                shard, offset, size, crc = m.groups()
                return Entry(name, dtype, shape, 0 if shard is None else _uvarint(shard), _uvarint(offset),
                             size[0] if size is not None and len(size) == 1 else _uvarint(size),
                             None if crc is None else int.from_bytes(crc, "little"), ())
        return parse_entry(name, value, self.where)

    def many(self, names: list[str], values: list[bytes]) -> list[Entry]:
        """``[self(name, value) for ...]``, for 100 000 entries: the Entries made from ``columns``
        by one ``map``, those it decoded one by one put in their places."""
        cols = self.columns(names, values)
        out = list(map(tuple.__new__, repeat(Entry), zip(names, *cols[:-1], repeat(())))) \
            if len(names) == len(values) else []
        for i, e in cols[-1].items():
            out[i] = e
        return out

    def columns(self, names: list[str], values: list[bytes]) -> Columns:
        """The fields of ``[self(name, value) for ...]`` but name and slices, as columns (dtypes,
        shapes, shards, offsets, sizes, crcs), and by index the Entries of the values ``self`` has
        decoded (None and 0 in the columns there). Each value in TensorFlow's form is matched whole
        by ``_CANONICAL`` and decoded into the columns (each distinct dtype and shape checked once,
        by ``_head``); anything else goes through ``self`` in its turn, so the entries and the first
        error are those of ``self`` alone."""
        dtypes: list[str | None] = []
        shapes: list[tuple[int, ...] | None] = []
        shards: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        crcs: list[int | None] = []
        odd: dict[int, Entry] = {}
        heads, head_of, full = self._heads, self._head, _CANONICAL.fullmatch
        for value in values:
            m = full(value)
            if m is not None:
                h, shard, offset, size, crc = m.groups()
                head = heads.get(h) or head_of(h)
                if head:
                    dtypes.append(head[0])
                    shapes.append(head[1])
                    shards.append(0 if shard is None else _uvarint(shard))
                    n = len(offset) if offset is not None else 0
                    x = int.from_bytes(offset, "little") if n else 0  # below 2 MiB inline, as _uvarint
                    offsets.append(x if n < 2 else (x & 0x7F) | (x >> 1 & 0x3F80) if n == 2 else
                                   (x & 0x7F) | (x >> 1 & 0x3F80) | (x >> 2 & 0x1FC000) if n == 3 else
                                   _uvarint(offset))
                    sizes.append(size[0] if size is not None and len(size) == 1 else _uvarint(size))
                    crcs.append(None if crc is None else int.from_bytes(crc, "little"))
                    continue
            i = len(dtypes)
            odd[i] = self(names[i], value)
            for column in (dtypes, shapes, crcs):
                column.append(None)
            for numbers in (shards, offsets, sizes):
                numbers.append(0)
        return dtypes, shapes, shards, offsets, sizes, crcs, odd

    def _head(self, raw: bytes) -> tuple[str, tuple[int, ...]] | tuple[()]:
        """(dtype, shape) of the dtype and shape fields ``raw`` (after the dtype field's tag): a
        known dtype, the shape's length (one byte) and the shape as ``_shape`` reads it, as
        ``__call__``'s fast path takes them; () for anything else. Remembered per distinct ``raw``."""
        dtype = TF_DTYPES.get(raw[0]) if raw[0] < 0x80 and raw[1] == 0x12 and raw[2] < 0x80 else None
        shape = self._shape(raw[3:]) if dtype is not None and len(raw) == 3 + raw[2] else None
        head: tuple[str, tuple[int, ...]] | tuple[()] = (dtype, shape) if dtype is not None and shape is not None else ()
        self._heads[raw] = head
        return head

    def _shape(self, raw: bytes) -> tuple[int, ...] | None:
        """The TensorShapeProto ``raw`` as ``parse_shape`` reads it; None where it is
        malformed or has a negative dimension (``parse_entry`` then says why)."""
        try:
            return self._shapes[raw]
        except KeyError:
            pass
        try:
            shape: tuple[int, ...] | None = parse_shape(memoryview(raw), self.where)
        except ShardconvError:
            shape = None
        if shape is not None and any(d < 0 for d in shape):
            shape = None
        self._shapes[raw] = shape
        return shape
