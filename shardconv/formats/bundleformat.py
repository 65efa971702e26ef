"""Writing TensorFlow's bundle format (the reader is ``sources/tf_bundle.py`` + ``sources/sstable.py``).

What TensorFlow's ``BundleWriter`` writes (tensorflow/core/util/tensor_bundle), byte for
byte: the protobuf messages of the ``.index`` (``BundleHeaderProto`` under key ``""``, a
``BundleEntryProto`` per tensor, proto3 defaults left out), string tensors' layout in a
``.data`` file, and the LevelDB-style table of ``tensorflow/core/lib/io/table_builder.cc``:
uncompressed data blocks of prefix-compressed keys with a restart point every 16 keys,
a new block once one reaches 256 KiB, an empty metaindex block, an index block whose keys
are the shortest separators between blocks, each block followed by its 5-byte trailer,
and the 48-byte footer. No TensorFlow, no protobuf library.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from ..util.checksums import crc32c, mask
from ..util.dtypes import TF_DTYPES

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
#: table::Options defaults as TensorFlow's bundle writer uses them.
BLOCK_SIZE = 256 << 10
RESTART_INTERVAL = 16
#: ``TensorBundle`` format version (kTensorBundleVersion), written as the header's producer.
BUNDLE_VERSION = 1

#: Canonical dtype name -> ``DataType`` enum (the plain types; quantized ones read as these).
TF_DTYPE_CODES: dict[str, int] = {}
for _code, _name in TF_DTYPES.items():
    TF_DTYPE_CODES.setdefault(_name, _code)


# --------------------------------------------------------------------------- protobuf wire

def varint(v: int) -> bytes:
    """Base-128 varint of ``v`` (negative values as their 64-bit two's complement)."""
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def field_varint(num: int, v: int) -> bytes:
    return varint(num << 3) + varint(v)


def field_bytes(num: int, b: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(b)) + b


def field_fixed32(num: int, v: int) -> bytes:
    return varint(num << 3 | 5) + struct.pack("<I", v)


def _opt_varint(num: int, v: int) -> bytes:
    """A proto3 scalar: left out when it is zero."""
    return field_varint(num, v) if v else b""


def shape_proto(shape: Sequence[int]) -> bytes:
    """``TensorShapeProto``: one ``Dim`` (field 2) per dimension, its size in field 1."""
    return b"".join(field_bytes(2, _opt_varint(1, d)) for d in shape)


def slice_proto(extents: Sequence[tuple[int, int]]) -> bytes:
    """``TensorSliceProto``: one ``Extent`` per dimension (start, length; length -1 = all)."""
    return b"".join(field_bytes(1, b"" if n == -1 else _opt_varint(1, s) + field_varint(2, n)) for s, n in extents)


def entry(dtype: str, shape: Sequence[int], *, shard: int = 0, offset: int = 0, size: int = 0,
          crc: int | None = None, slices: Sequence[Sequence[tuple[int, int]]] = ()) -> bytes:
    """A serialized ``BundleEntryProto``; ``crc`` is the masked CRC32C of the stored bytes."""
    out = field_varint(1, TF_DTYPE_CODES[dtype]) + field_bytes(2, shape_proto(shape))
    out += _opt_varint(3, shard) + _opt_varint(4, offset) + _opt_varint(5, size)
    if crc:
        out += field_fixed32(6, crc)
    return out + b"".join(field_bytes(7, slice_proto(s)) for s in slices)


def header(num_shards: int = 1) -> bytes:
    """``BundleHeaderProto``: shard count, little-endian (0, left out), version {producer: 1}."""
    return field_varint(1, num_shards) + field_bytes(3, field_varint(1, BUNDLE_VERSION))


def string_tensor(elements: Sequence[bytes]) -> tuple[bytes, int]:
    """A string tensor as the data file holds it, and the CRC32C its entry stores (unmasked).

    Varint lengths, then the masked CRC32C of the lengths taken as little-endian uint32
    (uint64 past 2**32-1), then the bytes. The entry's CRC covers lengths (as integers), the
    4 checksum bytes and the bytes."""
    crc = 0
    for e in elements:
        crc = crc32c(len(e).to_bytes(4 if len(e) <= 0xFFFFFFFF else 8, "little"), crc)
    parts = [varint(len(e)) for e in elements]
    if elements:
        check = struct.pack("<I", mask(crc))
        crc = crc32c(check, crc)
        parts.append(check)
    for e in elements:
        crc = crc32c(e, crc)
    return b"".join(parts) + b"".join(elements), crc


def string_elements(data: bytes, count: int) -> list[bytes]:
    """The ``count`` elements of a string tensor stored as ``string_tensor`` lays it out
    (the inverse; the 4 checksum bytes are skipped). ValueError if ``data`` is not that."""
    lengths, pos = [], 0
    for _ in range(count):
        n = shift = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ValueError("string tensor: truncated length")
            b = data[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        lengths.append(n)
    pos += 4 if count else 0
    out = []
    for n in lengths:
        out.append(bytes(data[pos:pos + n]))
        pos += n
    if pos != len(data):
        raise ValueError("string tensor: lengths do not add up to its size")
    return out


# --------------------------------------------------------------------------- the table

def shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key k with start <= k < limit (table_builder.cc's FindShortestSeparator)."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def short_successor(key: bytes) -> bytes:
    """A short key >= ``key`` (FindShortSuccessor): its first non-0xff byte, incremented."""
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


class BlockBuilder:
    """One block: prefix-compressed entries (shared, unshared, value length as varints),
    a full key every ``interval`` entries, then the restart offsets and their count."""

    def __init__(self, interval: int = RESTART_INTERVAL) -> None:
        self.interval = interval
        self.buf = bytearray()
        self.restarts = [0]
        self.count = 0
        self.last = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count < self.interval:
            n = min(len(key), len(self.last))
            while shared < n and key[shared] == self.last[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.count = 0
        self.buf += varint(shared) + varint(len(key) - shared) + varint(len(value))
        self.buf += key[shared:] + value
        self.last = key
        self.count += 1

    def size(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def empty(self) -> bool:
        return not self.buf

    def finish(self) -> bytes:
        return bytes(self.buf) + b"".join(struct.pack("<I", r) for r in self.restarts) + \
            struct.pack("<I", len(self.restarts))


def trailer(block: bytes, ctype: int = 0) -> bytes:
    """The 5 bytes after a block: its compression type and the masked CRC32C of block + type."""
    return bytes([ctype]) + struct.pack("<I", mask(crc32c(bytes([ctype]), crc32c(block))))


class TableWriter:
    """Streams an SSTable through ``write``: ``add`` keys in increasing order, then ``finish``.
    Holds one data block (at most about ``BLOCK_SIZE``) and the index block in memory."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self.offset = 0
        self._data = BlockBuilder()
        self._index = BlockBuilder(interval=1)  # as LevelDB: every index key whole
        self._pending: tuple[int, int] | None = None   # handle of the last flushed block
        self._last = b""
        self._started = False

    def _block(self, block: bytes) -> tuple[int, int]:
        handle = (self.offset, len(block))
        self._write(block + trailer(block))
        self.offset += len(block) + 5
        return handle

    def _index_entry(self, key: bytes) -> None:
        assert self._pending is not None
        off, size = self._pending
        self._index.add(key, varint(off) + varint(size))
        self._pending = None

    def add(self, key: bytes, value: bytes) -> None:
        if self._started and key <= self._last:
            raise ValueError(f"table keys out of order: {key!r} after {self._last!r}")
        if self._pending is not None:
            self._index_entry(shortest_separator(self._last, key))
        self._data.add(key, value)
        self._last, self._started = key, True
        if self._data.size() >= BLOCK_SIZE:
            self._flush()

    def _flush(self) -> None:
        if self._data.empty():
            return
        self._pending = self._block(self._data.finish())
        self._data = BlockBuilder()

    def finish(self) -> int:
        """Last data block, metaindex, index block and footer; returns the table's size."""
        self._flush()
        if self._pending is not None:
            self._index_entry(short_successor(self._last))
        meta = self._block(BlockBuilder().finish())
        index = self._block(self._index.finish())
        handles = varint(meta[0]) + varint(meta[1]) + varint(index[0]) + varint(index[1])
        self._write(handles + bytes(FOOTER_SIZE - 8 - len(handles)) + struct.pack("<Q", MAGIC))
        self.offset += FOOTER_SIZE
        return self.offset
