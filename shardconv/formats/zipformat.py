"""Zip64 records for STORED members: written by the NPZ sink, parsed by the NPZ source.

Every member uses zip64 extra fields from the start, so a member over 4 GiB
needs no special case, and timestamps are fixed (1980-01-01) so bytes are
deterministic.
"""
from __future__ import annotations

import struct

LOCAL_SIG = 0x04034B50
CENTRAL_SIG = 0x02014B50
EOCD_SIG = 0x06054B50
EOCD64_SIG = 0x06064B50
LOCATOR_SIG = 0x07064B50
VERSION = 45             # zip64
DOS_DATE = (0 << 9) | (1 << 5) | 1   # 1980-01-01
DOS_TIME = 0
UTF8_FLAG = 0x800
EXTERNAL_ATTR = 0o100644 << 16

LOCAL_FIXED = 30
CENTRAL_FIXED = 46
EOCD_FIXED = 22
EOCD64_FIXED = 56
LOCATOR_FIXED = 20


def _flags(name: bytes) -> int:
    try:
        name.decode("ascii")
        return 0
    except UnicodeDecodeError:
        return UTF8_FLAG


def local_header_size(name: bytes) -> int:
    return LOCAL_FIXED + len(name) + 20


def local_header(name: bytes, crc: int, size: int) -> bytes:
    extra = struct.pack("<HHQQ", 0x0001, 16, size, size)
    return struct.pack("<IHHHHHIIIHH", LOCAL_SIG, VERSION, _flags(name), 0, DOS_TIME, DOS_DATE,
                       crc, 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra)) + name + extra


def central_header(name: bytes, crc: int, size: int, offset: int) -> bytes:
    extra = struct.pack("<HHQQQ", 0x0001, 24, size, size, offset)
    return struct.pack("<IHHHHHHIIIHHHHHII", CENTRAL_SIG, VERSION, VERSION, _flags(name), 0, DOS_TIME, DOS_DATE,
                       crc, 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra), 0, 0, 0, EXTERNAL_ATTR,
                       0xFFFFFFFF) + name + extra


def end_records(count: int, cd_offset: int, cd_size: int) -> bytes:
    eocd64_offset = cd_offset + cd_size
    eocd64 = struct.pack("<IQHHIIQQQQ", EOCD64_SIG, EOCD64_FIXED - 12, VERSION, VERSION, 0, 0,
                         count, count, cd_size, cd_offset)
    locator = struct.pack("<IIQI", LOCATOR_SIG, 0, eocd64_offset, 1)
    eocd = struct.pack("<IHHHHIIH", EOCD_SIG, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                       min(cd_size, 0xFFFFFFFF), min(cd_offset, 0xFFFFFFFF), 0)
    return eocd64 + locator + eocd
