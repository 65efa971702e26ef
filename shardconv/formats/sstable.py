"""Reader for the LevelDB-style SSTable that holds a TensorFlow bundle's ``.index``.

Layout (table/format.cc in TensorFlow): blocks of prefix-compressed entries, each
followed by a 5-byte trailer (compression type, masked CRC32C of block + type);
a 48-byte footer holds the metaindex and index block handles and the magic.
Every length is checked against the file size before anything is read.
"""
from __future__ import annotations

import operator
import os
from collections.abc import Iterator

from ..errors import ChecksumError, FormatError, UnsupportedError
from ..util.checksums import crc32c, mask
from ..util.fileio import open_read
from .wire import read_varint

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
TRAILER_SIZE = 5
#: Largest block (compressed or not) accepted; TensorFlow writes 4 KiB-ish blocks.
MAX_BLOCK_BYTES = 64 << 20


class SSTable:
    """Reads an index file with ``pread``; iterates (key, value) in key order."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._fd = open_read(self.path, FormatError, "index file")
        try:
            self.size = os.fstat(self._fd).st_size
            self._read_footer()
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SSTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _err(self, msg: str) -> FormatError:
        return FormatError(f"{self.path}: corrupt checkpoint index: {msg}")

    def _pread(self, n: int, off: int) -> bytes:
        data = os.pread(self._fd, n, off)
        if len(data) != n:
            raise self._err(f"short read of {n} bytes at offset {off}")
        return data

    def _read_footer(self) -> None:
        if self.size < FOOTER_SIZE:
            raise self._err(f"file is {self.size} bytes, smaller than the {FOOTER_SIZE}-byte footer (truncated?)")
        footer = self._pread(FOOTER_SIZE, self.size - FOOTER_SIZE)
        magic = int.from_bytes(footer[40:48], "little")
        if magic != MAGIC:
            raise self._err(f"bad magic 0x{magic:016x} (expected 0x{MAGIC:016x}); not a TensorFlow checkpoint index or truncated")
        try:
            pos = 0
            handles = []
            for _ in range(2):
                off, pos = read_varint(footer, pos, 40, "footer block offset")
                size, pos = read_varint(footer, pos, 40, "footer block size")
                handles.append((off, size))
        except FormatError as e:
            raise self._err(str(e)) from None
        self.metaindex_handle, self.index_handle = handles

    def _block(self, handle: tuple[int, int], what: str) -> bytes:
        off, size = handle
        if size > MAX_BLOCK_BYTES:
            raise self._err(f"{what} block of {size} bytes exceeds the {MAX_BLOCK_BYTES}-byte limit")
        if off + size + TRAILER_SIZE > self.size - FOOTER_SIZE:
            raise self._err(f"{what} block [{off}, {off + size}) runs past the end of the file ({self.size} bytes)")
        raw = self._pread(size + TRAILER_SIZE, off)
        data, ctype = raw[:size], raw[size]
        stored = int.from_bytes(raw[size + 1:], "little")
        actual = mask(crc32c(raw[:size + 1]))
        if stored != actual:
            raise ChecksumError(f"{self.path}: checksum mismatch in {what} block at offset {off} "
                                f"(stored 0x{stored:08x}, computed 0x{actual:08x})")
        if ctype == 0:
            return data
        if ctype == 1:
            return self._snappy(data, what, off)
        raise UnsupportedError(f"{self.path}: {what} block at offset {off} uses compression type {ctype} (only none and snappy are known)")

    def _snappy(self, data: bytes, what: str, off: int) -> bytes:
        try:
            declared, _ = read_varint(data, 0, None, "snappy length")
        except FormatError as e:
            raise self._err(f"{what} block at offset {off}: {e}") from None
        if declared > MAX_BLOCK_BYTES:
            raise self._err(f"{what} block at offset {off} declares {declared} bytes uncompressed, over the {MAX_BLOCK_BYTES}-byte limit")
        import cramjam

        try:
            out = bytes(cramjam.snappy.decompress_raw(data))
        except Exception as e:  # cramjam raises its own DecompressionError
            raise self._err(f"{what} block at offset {off}: snappy data is corrupt ({e})") from None
        if len(out) != declared:
            raise self._err(f"{what} block at offset {off}: snappy output is {len(out)} bytes, header said {declared}")
        return out

    def _entries(self, block: bytes, what: str) -> Iterator[tuple[bytes, bytes]]:
        keys, values, error = self.block_items(block, what)
        yield from zip(keys, values)
        if error is not None:
            raise error

    def block_items(self, block: bytes, what: str) -> tuple[list[bytes], list[bytes], FormatError | None]:
        """The keys and the values of a block's entries, in order, in one loop (a block of an index
        of 100 000 tensors holds ~50 of them: a generator per entry cost a third of reading them),
        and the error that ended the block early (the entries before it are returned), if any."""
        n = len(block)
        if n < 4:
            raise self._err(f"{what} block of {n} bytes has no restart count")
        num_restarts = int.from_bytes(block[n - 4:], "little")
        limit = n - 4 - 4 * num_restarts
        if num_restarts == 0 or limit < 0:
            raise self._err(f"{what} block: bad restart count {num_restarts}")
        keys: list[bytes] = []
        values: list[bytes] = []
        pos = 0
        key = b""
        try:
            while pos < limit:
                if pos + 3 <= limit and block[pos] | block[pos + 1] | block[pos + 2] < 0x80:
                    shared, non_shared, vlen = block[pos], block[pos + 1], block[pos + 2]  # three 1-byte varints
                    pos += 3
                else:
                    shared, non_shared, vlen, pos = self._entry_lengths(block, pos, limit, what)
                if shared > len(key) or non_shared + vlen > limit - pos:
                    raise self._err(f"{what} block: entry at {pos} overruns the block")
                key = key[:shared] + block[pos:pos + non_shared]
                pos += non_shared
                keys.append(key)
                values.append(block[pos:pos + vlen])
                pos += vlen
        except FormatError as e:
            return keys, values, e
        return keys, values, None

    def _entry_lengths(self, block: bytes, pos: int, limit: int, what: str) -> tuple[int, int, int, int]:
        """An entry's shared, non-shared and value lengths (any varint form) and the position after them."""
        try:
            shared, pos = read_varint(block, pos, limit, "entry shared length")
            non_shared, pos = read_varint(block, pos, limit, "entry key length")
            vlen, pos = read_varint(block, pos, limit, "entry value length")
        except FormatError as e:
            raise self._err(f"{what} block: {e}") from None
        return shared, non_shared, vlen, pos

    def data_blocks(self) -> Iterator[bytes]:
        """Each data block's bytes (checked and decompressed), in order."""
        index = self._block(self.index_handle, "index")
        for _, handle_bytes in self._entries(index, "index"):
            try:
                off, pos = read_varint(handle_bytes, 0, None, "block handle offset")
                size, pos = read_varint(handle_bytes, pos, None, "block handle size")
            except FormatError as e:
                raise self._err(str(e)) from None
            yield self._block((off, size), "data")

    def order_error(self, key: bytes, prev: bytes) -> FormatError:
        """The error for ``key`` after ``prev`` where keys must increase strictly."""
        kind = "duplicate" if key == prev else "out-of-order"
        return self._err(f"{kind} key {key!r} after {prev!r}")

    def block_lists(self) -> Iterator[tuple[list[bytes], list[bytes]]]:
        """Each data block's keys and values (``block_items``), keys checked to increase strictly
        across the whole table (by C-level comparisons of each block's keys). An error is raised
        after the entries before it are yielded, as ``items`` would meet it."""
        prev: bytes | None = None
        for block in self.data_blocks():
            keys, values, error = self.block_items(block, "data")
            if keys and not (prev is None or prev < keys[0]) or not all(map(operator.lt, keys, keys[1:])):
                for i, key in enumerate(keys):
                    if prev is not None and key <= prev:
                        keys, values, error = keys[:i], values[:i], self.order_error(key, prev)
                        break
                    prev = key
            if keys:
                prev = keys[-1]
            yield keys, values
            if error is not None:
                raise error

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """All (key, value) pairs in order; checks keys are strictly increasing."""
        for keys, values in self.block_lists():
            yield from zip(keys, values)
