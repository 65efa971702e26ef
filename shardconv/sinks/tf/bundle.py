"""One TensorFlow bundle (``PREFIX.index`` + ``PREFIX.data-00000-of-00001``) written by
shardconv itself, without TensorFlow: the machinery of every TF output.

The data file holds every key's bytes in key order without padding, as ``SaveV2`` lays them
out: an output's bytes at each of its keys (usually one), and the *carried* tensors (an
object graph, a builder's counters) as they were stored. Offsets are fixed before the first
chunk, so chunks are written with ``pwrite`` in any order; a chunk's receipt is its CRC32C.
``finish`` writes the index (``formats/bundleformat``), each entry's masked CRC32C combined
from its chunks' CRCs. For the same tensors both files are byte-identical to ``SaveV2``'s.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.plan import Chunk, OutputTensor
from ...formats import bundleformat
from ...util import safefs
from ...util.checksums import combine_crc32c, crc32c, mask
from ...util.fileio import (
    Writeback,
    check_free_space,
    fsync_file,
    preallocate,
    pwrite_all,
    range_crc,
    start_writeback,
    truncate,
)
from ...util.uncached import ALIGN, UncachedWrites
from .. import filesink

DATA_SUFFIX = ".data-00000-of-00001"


@dataclass
class Carried:
    """A tensor copied into the output as it was stored (its bytes and entry CRC)."""
    key: str
    dtype: str
    shape: tuple[int, ...]
    size: int
    crc: int       # the CRC32C its index entry stores, unmasked (for a string tensor not that of the bytes)
    data_crc: int  # CRC32C of the stored bytes (re-checked when a run attaches)
    data: bytes | None = None  # the bytes, until the data file holds them

    @classmethod
    def of(cls, key: str, dtype: str, shape: tuple[int, ...], data: bytes, crc: int) -> Carried:
        return cls(key, dtype, tuple(shape), len(data), crc, crc32c(data), data)

    def to_json(self) -> list[Any]:
        return [self.key, self.dtype, list(self.shape), self.size, self.crc, self.data_crc]

    @classmethod
    def from_json(cls, doc: list[Any]) -> Carried:
        key, dtype, shape, size, crc, data_crc = doc
        return cls(str(key), str(dtype), tuple(int(d) for d in shape), int(size), int(crc), int(data_crc))


class Bundle:
    """The data file and index of one bundle at ``prefix`` (see the module docstring)."""

    def __init__(self, prefix: Path, outputs: list[OutputTensor], keys: dict[str, list[str]],
                 carried: list[Carried]) -> None:
        self.prefix, self.outputs, self.carried = prefix, outputs, carried
        self.data_path = Path(f"{prefix}{DATA_SUFFIX}")
        self.index_path = Path(f"{prefix}.index")
        order = sorted([(k.encode("utf-8"), i) for i, o in enumerate(outputs) for k in keys[o.name]]
                       + [(c.key.encode("utf-8"), ~j) for j, c in enumerate(carried)])
        self._order: list[tuple[bytes, int, int]] = []  # key, output index (or ~carried index), offset
        self.offsets: list[list[int]] = [[] for _ in outputs]
        self.carried_at: list[int] = [0] * len(carried)
        pos = 0
        for key, i in order:
            self._order.append((key, i, pos))
            if i >= 0:
                self.offsets[i].append(pos)
                pos += outputs[i].nbytes
            else:
                self.carried_at[~i] = pos
                pos += carried[~i].size
        self.size = pos
        self._fd = -1
        self._writeback = Writeback()
        self._direct = UncachedWrites()

    # -- the data file

    def create(self, durable: bool) -> None:
        """A new data file of its final size, the carried tensors written (a leftover replaced)."""
        check_free_space(self.data_path.parent, self.size + 64 * len(self._order) + (1 << 20))
        for p in (self.data_path, self.index_path):
            safefs.remove(p)
        self._fd = safefs.open_file(self.data_path, os.O_RDWR | os.O_CREAT)
        truncate(self._fd, self.size, self.data_path)
        preallocate(self._fd, self.size)
        for c, pos in zip(self.carried, self.carried_at):
            assert c.data is not None
            pwrite_all(self._fd, c.data, pos, self.data_path)
            c.data = None
        if durable:
            start_writeback(self._fd, 0, self.size)

    def attach(self) -> bool:
        """Reopen the data file an earlier ``create`` made, changing nothing; False if it is not
        there at its size or a carried tensor's bytes do not match."""
        st = safefs.lstat(self.data_path)
        if st is None or st.st_size != self.size:
            return False
        self._fd = safefs.open_file(self.data_path, os.O_RDWR)
        return all(range_crc(self._fd, pos, c.size, crc32c) == c.data_crc
                   for c, pos in zip(self.carried, self.carried_at))

    def write(self, chunk: Chunk, data: memoryview, durable: bool) -> None:
        """``data`` (a chunk or a part of one) at each of its output's keys; a chunk's receipt
        is its CRC32C."""
        for base in self.offsets[chunk.index]:
            self._direct.pwrite(self._fd, data, base + chunk.offset, self.data_path,
                                self._writeback if durable else None, direct=base % ALIGN == 0)

    def page_offset(self, chunk: Chunk) -> int | None:
        """Where in a page the chunk's first byte goes (at its output's first key); None where
        that key's tensor does not start on a page."""
        offsets = self.offsets[chunk.index]
        if not self._direct.enabled or not offsets or offsets[0] % ALIGN:
            return None
        return (offsets[0] + chunk.offset) % ALIGN

    def sync(self) -> bool:
        """fsync the data file (every chunk written so far). Returns: True. Raises: DurabilityError."""
        if self._fd >= 0:
            fsync_file(self._fd, self.data_path)
        return True

    def check(self, chunk: Chunk, receipt: Any) -> bool:
        """True if the chunk's bytes at every key of its output have the CRC32C ``receipt``."""
        if type(receipt) is not int:
            return False  # a receipt of another writer (the groups of shardconv before 0.x)
        return all(range_crc(self._fd, base + chunk.offset, chunk.length, crc32c) == receipt
                   for base in self.offsets[chunk.index])

    # -- the index

    def finish(self, receipts: list[tuple[Chunk, Any]], fsync: bool) -> list[int]:
        """fsync the data (if asked), write the index; returns each output's CRC32C."""
        crcs = filesink.tensor_crcs(receipts, len(self.outputs), combine_crc32c)
        if fsync:
            fsync_file(self._fd, self.data_path)
        fd = safefs.open_file(self.index_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            table = bundleformat.TableWriter(lambda b: pwrite_all(fd, b, table.offset, self.index_path))
            for key, value in self._entries(crcs):
                table.add(key, value)
            table.finish()
            if fsync:
                fsync_file(fd, self.index_path)
        finally:
            os.close(fd)
        return crcs

    def _entries(self, crcs: list[int]) -> Iterator[tuple[bytes, bytes]]:
        """(key, serialized entry) in key order, the header first."""
        yield b"", bundleformat.header(1)
        for key, i, pos in self._order:
            if i >= 0:
                o = self.outputs[i]
                yield key, bundleformat.entry(o.dtype, o.shape, offset=pos, size=o.nbytes, crc=mask(crcs[i]))
            else:
                c = self.carried[~i]
                yield key, bundleformat.entry(c.dtype, c.shape, offset=pos, size=c.size, crc=mask(c.crc))

    def close(self) -> None:
        self._direct.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
