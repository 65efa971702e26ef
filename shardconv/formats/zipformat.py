"""Zip archives: zip64 records for STORED members (written by the NPZ sink) and the reading
of any zip's directory (the NPZ source and the npz probe).

Writing: every member uses zip64 extra fields from the start, so a member over 4 GiB
needs no special case, and timestamps are fixed (1980-01-01) so bytes are
deterministic. A byte of a member's data can be put on a page (so that what follows it can be
written past the page cache and mapped by readers) with a padding extra field in its local
header, as Android's ``zipalign`` pads; readers skip extra fields they do not know.
Reading: the end records (zip64 aware), the central directory, and each
member's local header, every offset and size checked against the file; only stored and
deflated members are accepted. Which members an archive may hold is the caller's policy.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import FormatError, UnsupportedError

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


#: The padding extra field (shardconv's; docs/npz-format.md rule 6): its ID ("SC"), its
#: length, the alignment (2 bytes), then zero bytes. Not zipalign's 0xD935, which says the
#: member's first byte is aligned: here a byte inside it (the array after the .npy header) is.
ALIGN_EXTRA_ID = 0x5343
ALIGN_EXTRA_MIN = 6


def local_header_size(name: bytes, pad: int = 0) -> int:
    """A local header's size: ``pad`` is the alignment extra field's size (0: none)."""
    return LOCAL_FIXED + len(name) + 20 + pad


def align_pad(header_at: int, name: bytes, prefix: int, alignment: int) -> int:
    """The alignment extra field's size (``ALIGN_EXTRA_MIN`` .. + ``alignment`` - 1) that puts
    the byte ``prefix`` bytes into the data of a member whose local header is at ``header_at``
    on a multiple of ``alignment``."""
    at = header_at + local_header_size(name) + ALIGN_EXTRA_MIN + prefix
    return ALIGN_EXTRA_MIN + -at % alignment


def local_header(name: bytes, crc: int, size: int, pad: int = 0, alignment: int = 0) -> bytes:
    """A STORED member's local header; ``pad`` > 0 adds an alignment extra field of that size
    (from ``align_pad``) naming ``alignment``."""
    extra = struct.pack("<HHQQ", 0x0001, 16, size, size)
    if pad:
        assert pad >= ALIGN_EXTRA_MIN
        extra += struct.pack("<HHH", ALIGN_EXTRA_ID, pad - 4, alignment) + bytes(pad - ALIGN_EXTRA_MIN)
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


# -- reading ------------------------------------------------------------------------------

#: ``pread(n, offset)``: exactly ``n`` bytes of the archive at ``offset``, or FormatError.
Pread = Callable[[int, int], bytes]


@dataclass
class CentralEntry:
    """One central directory record, zip64 sizes and offset resolved."""

    name: str
    flags: int
    method: int
    crc: int
    stored: int          # compressed size
    size: int            # uncompressed size
    header_offset: int   # file offset of the member's local header


@dataclass
class ZipMember:
    """A member whose local header has been checked: its stored bytes are
    ``[data_start, data_start + stored)`` of the archive."""

    name: str
    method: int
    crc: int
    stored: int
    size: int
    data_start: int
    header_offset: int


def end_of_directory(pread: Pread, size: int, where: str, max_members: int) -> tuple[int, int, int]:
    """(member count, central directory offset, its size) from the end records (zip64 aware).

    Raises:
        FormatError: no end record, a bad zip64 record, or a directory that cannot fit.
        UnsupportedError: a multi-disk archive.
    """
    tail_len = min(size, EOCD_FIXED + 0xFFFF)
    tail = pread(tail_len, size - tail_len)
    pos = tail.rfind(struct.pack("<I", EOCD_SIG))
    if pos < 0 or pos + EOCD_FIXED > len(tail):
        raise FormatError(f"{where}: not a zip file, or truncated (no end of central directory record)")
    (_, disk, cd_disk, _n_disk, count, cd_size, cd_offset, _clen) = struct.unpack(
        "<IHHHHIIH", tail[pos:pos + EOCD_FIXED])
    if disk or cd_disk:
        raise UnsupportedError(f"{where}: multi-disk zip archives are not supported")
    loc_at = size - tail_len + pos - LOCATOR_FIXED
    if loc_at >= 0:
        loc = pread(LOCATOR_FIXED, loc_at)
        if struct.unpack("<I", loc[:4])[0] == LOCATOR_SIG:
            _, _, e64_at, _ = struct.unpack("<IIQI", loc)
            sig, _, _, _, _, _, _, count, cd_size, cd_offset = struct.unpack("<IQHHIIQQQQ", pread(EOCD64_FIXED, e64_at))
            if sig != EOCD64_SIG:
                raise FormatError(f"{where}: bad zip64 end of central directory record")
    if count > max_members or cd_offset + cd_size > size or cd_size < count * CENTRAL_FIXED:
        raise FormatError(f"{where}: central directory ({count} entries, {cd_size} bytes at {cd_offset}) "
                          "does not fit the file")
    return count, cd_offset, cd_size


def _zip64_extra(extra: bytes, usize: int, csize: int, off: int, where: str) -> tuple[int, int, int]:
    """Sizes and offset with the zip64 extra field's values where the record holds 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, ln = struct.unpack("<HH", extra[pos:pos + 4])
        body = extra[pos + 4:pos + 4 + ln]
        if tag == 1:
            vals = []
            for v in (usize, csize, off):
                if v == 0xFFFFFFFF:
                    if len(body) < 8:
                        raise FormatError(f"{where}: zip64 extra field too short")
                    v, body = struct.unpack("<Q", body[:8])[0], body[8:]
                vals.append(v)
            usize, csize, off = vals
        pos += 4 + ln
    return usize, csize, off


def central_entries(pread: Pread, count: int, cd_offset: int, cd_size: int, where: str) -> Iterator[CentralEntry]:
    """The central directory's records, in order (names decoded as the flags say).

    Raises:
        FormatError: a bad signature, or a record overrunning the directory.
    """
    pos, end = cd_offset, cd_offset + cd_size
    for _ in range(count):
        (sig, _vm, _vn, flags, method, _t, _d, crc, csize, usize, nlen, xlen, clen, _ds, _ia, _ea,
         off) = struct.unpack("<IHHHHHHIIIHHHHHII", pread(CENTRAL_FIXED, pos))
        if sig != CENTRAL_SIG:
            raise FormatError(f"{where}: bad central directory entry at offset {pos}")
        if pos + CENTRAL_FIXED + nlen + xlen + clen > end:
            raise FormatError(f"{where}: central directory entry at offset {pos} overruns the directory")
        var = pread(nlen + xlen, pos + CENTRAL_FIXED)
        raw_name, extra = var[:nlen], var[nlen:]
        usize, csize, off = _zip64_extra(extra, usize, csize, off, f"{where}: member {raw_name!r}")
        pos += CENTRAL_FIXED + nlen + xlen + clen
        name = raw_name.decode("utf-8" if flags & UTF8_FLAG else "cp437")
        yield CentralEntry(name, flags, method, crc, csize, usize, off)


def check_member(pread: Pread, e: CentralEntry, cd_offset: int, size: int, where: str) -> ZipMember:
    """Check a member's encryption, method, local header and sizes; where its data starts.

    Raises:
        UnsupportedError: an encrypted member, or a method other than stored or deflated.
        FormatError: a bad local header, data past the archive, or impossible sizes.
    """
    at = f"{where}: member {e.name!r}"
    if e.flags & 1:
        raise UnsupportedError(f"{at} is encrypted")
    if e.method not in (0, 8):
        raise UnsupportedError(f"{at} uses compression method {e.method} (only stored and deflated are supported)")
    (lsig, _v, _f, _m, _t, _d, _c, _cs, _us, lnlen, lxlen) = struct.unpack(
        "<IHHHHHIIIHH", pread(LOCAL_FIXED, e.header_offset))
    if lsig != LOCAL_SIG:
        raise FormatError(f"{at}: bad local header at offset {e.header_offset}")
    start = e.header_offset + LOCAL_FIXED + lnlen + lxlen
    if start + e.stored > cd_offset or start + e.stored > size:
        raise FormatError(f"{at}: data [{start}, {start + e.stored}) runs past the archive")
    if e.method == 0 and e.size != e.stored:
        raise FormatError(f"{at}: stored but sizes differ ({e.stored} vs {e.size})")
    if e.method == 8 and e.size > max(e.stored, 1) * 1100:
        # deflate cannot expand more than 1032:1; a larger claim is a zip bomb or corruption
        raise FormatError(f"{at}: declares {e.size} bytes from {e.stored} compressed, "
                          "more than deflate can expand (zip bomb?)")
    return ZipMember(e.name, e.method, e.crc, e.stored, e.size, start, e.header_offset)


def check_no_overlap(members: list[ZipMember], where: str) -> None:
    """Refuse members whose local headers and data overlap (a crafted archive)."""
    ranges = sorted((m.header_offset, m.data_start + m.stored, m.name) for m in members)
    for (_, a1, an), (b0, _, bn) in zip(ranges, ranges[1:]):
        if b0 < a1:
            raise FormatError(f"{where}: members {an!r} and {bn!r} overlap")
