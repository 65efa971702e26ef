"""Minimal readers for protobuf wire format and varints, strict about bounds.

Only what checkpoint metadata needs: varints, length-delimited fields, fixed32/64.
Every read checks it stays inside the buffer; a violation raises FormatError.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import FormatError

INT64_MAX = (1 << 63) - 1

#: What the readers take: any bytes-like object indexable to ints.
Bytes = bytes | bytearray | memoryview


def read_varint(buf: Bytes, pos: int, limit: int | None = None, what: str = "varint") -> tuple[int, int]:
    """Decode a base-128 varint (at most 10 bytes) at ``pos``; returns (value, new pos)."""
    end = len(buf) if limit is None else limit
    if pos < end:
        b = buf[pos]
        if b < 0x80:  # most varints in checkpoint metadata are one byte
            return b, pos + 1
    result = 0
    shift = 0
    for _ in range(10):
        if pos >= end:
            raise FormatError(f"truncated {what}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if result >> 64:
                raise FormatError(f"{what} overflows 64 bits")
            return result, pos
        shift += 7
    raise FormatError(f"{what} longer than 10 bytes")


def as_int64(v: int) -> int:
    """A uint64 as the int64 it encodes (two's complement)."""
    return v - (1 << 64) if v >= (1 << 63) else v


def fields(buf: Bytes, what: str = "message") -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value) for each field of a serialized message.

    Varints are ints, fixed32/64 are ints, length-delimited values are memoryviews (typed
    ``Any``: which one a field holds is known from its wire type).
    """
    mv = memoryview(buf)
    pos = 0
    end = len(mv)
    while pos < end:
        val: Any
        key, pos = read_varint(mv, pos, end, f"{what} field key")
        num, wt = key >> 3, key & 7
        if num == 0:
            raise FormatError(f"{what}: field number 0")
        if wt == 0:
            val, pos = read_varint(mv, pos, end, f"{what} field {num}")
        elif wt == 1:
            if pos + 8 > end:
                raise FormatError(f"{what}: truncated fixed64 field {num}")
            val = int.from_bytes(mv[pos:pos + 8], "little")
            pos += 8
        elif wt == 2:
            n, pos = read_varint(mv, pos, end, f"{what} field {num} length")
            if n > end - pos:
                raise FormatError(f"{what}: field {num} declares {n} bytes, only {end - pos} remain")
            val = mv[pos:pos + n]
            pos += n
        elif wt == 5:
            if pos + 4 > end:
                raise FormatError(f"{what}: truncated fixed32 field {num}")
            val = int.from_bytes(mv[pos:pos + 4], "little")
            pos += 4
        else:
            raise FormatError(f"{what}: unsupported wire type {wt} for field {num}")
        yield num, wt, val


def packed_varints(buf: memoryview, what: str) -> list[int]:
    """The varints of a packed repeated field."""
    out = []
    pos = 0
    while pos < len(buf):
        v, pos = read_varint(buf, pos, len(buf), what)
        out.append(v)
    return out
