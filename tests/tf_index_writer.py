"""A minimal writer of TensorFlow bundle indexes, for crafting malformed ones.

Real checkpoints come from TensorFlow (tests/tf_fixtures.py); this writer exists
only to produce the hostile cases TensorFlow never writes (absurd shapes,
offsets past the file, duplicate keys, bad compression). It follows the layout
documented in docs/design.md; the encoders it shares with shardconv's own writer
(varints, protobuf fields, block trailers) come from ``shardconv.formats.bundleformat``.
"""
from __future__ import annotations

import struct

import cramjam

from shardconv.formats.bundleformat import MAGIC, field_bytes, field_fixed32, field_varint, trailer, varint
from shardconv.util.checksums import crc32c, mask


def entry(dtype: int, shape: list[int], shard: int = 0, offset: int = 0, size: int = 0, crc: int | None = None) -> bytes:
    dims = b"".join(field_bytes(2, field_varint(1, d)) for d in shape)
    out = field_varint(1, dtype) + field_bytes(2, dims)
    if shard:
        out += field_varint(3, shard)
    if offset:
        out += field_varint(4, offset)
    out += field_varint(5, size)
    if crc is not None:
        out += field_fixed32(6, crc)
    return out


def header(num_shards: int = 1, endianness: int = 0) -> bytes:
    out = field_varint(1, num_shards)
    if endianness:
        out += field_varint(2, endianness)
    return out + field_bytes(3, field_varint(1, 1))


def block(items: list[tuple[bytes, bytes]]) -> bytes:
    """Entries without prefix sharing, one restart point."""
    body = b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in items)
    return body + struct.pack("<I", 0) + struct.pack("<I", 1)


def _with_trailer(data: bytes, ctype: int, bad_crc: bool = False) -> bytes:
    end = bytearray(trailer(data, ctype))
    end[1] ^= 1 if bad_crc else 0  # the CRC's lowest bit
    return data + bytes(end)


def index(items: list[tuple[bytes, bytes]], *, snappy: bool = False, raw_data_block: bytes | None = None,
          magic: int = MAGIC) -> bytes:
    """A whole .index file: one data block holding ``items`` (in the order given)."""
    data = block(items)
    if raw_data_block is not None:
        stored, ctype = raw_data_block, 1
    elif snappy:
        stored, ctype = bytes(cramjam.snappy.compress_raw(data)), 1
    else:
        stored, ctype = data, 0
    out = _with_trailer(stored, ctype)
    last_key = items[-1][0] if items else b""
    idx = block([(last_key + b"\xff", varint(0) + varint(len(stored)))])
    idx_off = len(out)
    out += _with_trailer(idx, 0)
    meta_off = len(out)
    out += _with_trailer(struct.pack("<II", 0, 1), 0)  # empty metaindex block
    handles = varint(meta_off) + varint(4) + varint(idx_off) + varint(len(idx))
    footer = handles + bytes(40 - len(handles)) + struct.pack("<Q", magic)
    return out + footer


def tensor_bytes_crc(data: bytes) -> int:
    return mask(crc32c(data))
