"""Zarr chunk files of a local store, encoded and written straight from the engine's buffers.

Used by the Zarr sink for local stores (TensorStore writes object stores). Each Zarr chunk of
an engine chunk is encoded as the array's metadata says (Blosc or zstd through numcodecs,
whose C code releases the GIL, or stored as is) on a few threads, and its bytes written to its
file with one ``pwrite``: no copy of a chunk but an edge chunk's padding, and no TensorStore on
the way, whose import brings ml_dtypes' (about 1.3 CPU s of a 2-core machine, every run), and
whose own copy of each chunk cost more. bench/README.md, "Zarr with --compression zstd".

A chunk file is written in place (not renamed into place as TensorStore does): a chunk whose
write a killed run left torn is not journaled, so a resume writes it again, and one that is
journaled is checked against its receipt. Nothing opens the store before ``finish`` writes the
metadata (see zarr.py).
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DestinationError
from ..util import safefs
from ..util.checksums import crc32
from ..util.fileio import pwrite_all, start_writeback

if TYPE_CHECKING:  # imported on first use: the CLI imports every sink
    from concurrent.futures import Future

    import numpy as np

#: Dtypes whose stored bytes are not the engine's (TensorStore keeps the low 4 or 2 bits of
#: each int4/int2 byte, ml_dtypes sign-extends them): their arrays go through TensorStore.
MASKED_DTYPES = ("int4", "int2")
Encoder = Callable[[memoryview], Any]


def encoder(metadata: dict[str, Any], itemsize: int) -> Encoder | None:
    """What turns one chunk's bytes into its stored bytes under ``metadata`` (the sink's own
    codecs: ``bytes`` alone, then Blosc or zstd), or None where it cannot (numcodecs missing,
    a big-endian host, codecs this module does not write): TensorStore writes that array."""
    if sys.byteorder != "little":
        return None
    if metadata.get("zarr_format") == 3:
        codecs = metadata["codecs"][1:]
        spec = ({"id": c["name"], **c.get("configuration", {})} for c in codecs)
        comp = next(spec, None)
        if len(codecs) > 1:
            return None
    else:
        comp = metadata.get("compressor")
        if metadata.get("filters"):
            return None
    if comp is None:
        return lambda view: view
    try:
        from numcodecs import blosc, zstd
    except ImportError:
        return None
    if comp["id"] == "blosc":
        cname, clevel, blocksize = comp["cname"].encode(), int(comp["clevel"]), int(comp.get("blocksize", 0))
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}.get(comp["shuffle"], comp["shuffle"])
        if not isinstance(shuffle, int):
            return None
        return lambda view: blosc.compress(view, cname, clevel, shuffle, blocksize, itemsize)
    if comp["id"] == "zstd" and not comp.get("checksum"):
        level = int(comp["level"])
        return lambda view: zstd.compress(view, level)
    return None


class PendingFiles:
    """An engine chunk's Zarr chunk files being encoded and written: ``result()`` waits for all
    of them (the first failure raised) and returns the chunk's receipt, the CRC32 of its bytes."""

    def __init__(self, futures: list[Future[None]], data: memoryview, crc: int | None) -> None:
        self._futures, self._data, self._crc = futures, data, crc

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def wait(self) -> None:
        """Wait for every file, without the receipt (errors ignored, cancelled ones skipped)."""
        for f in self._futures:
            if not f.cancelled():
                f.exception()

    def result(self) -> int:
        for f in self._futures:
            f.result()
        if self._crc is None:
            self._crc = crc32(self._data)
        return self._crc


class ChunkFiles:
    """Writes the chunk files of the arrays of one local store (``root``) on ``workers`` threads.

    Memory: each thread holds one encoded chunk at a time, and one edge chunk at a time is
    padded to the full chunk shape (a lock): ``workers + 1`` Zarr chunks beside the engine's
    buffers (``ZarrSink.scratch_slots``)."""

    def __init__(self, root: Path, zarr_format: int, durable: bool, workers: int, separator: str = "/") -> None:
        self.root, self.zarr_format, self.durable, self.separator = root, zarr_format, durable, separator
        from concurrent.futures import ThreadPoolExecutor  # (imports logging: not for every command)

        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardconv-zarr")
        self._dirs: set[Path] = set()
        self._pad_lock = threading.Lock()
        self._lock = threading.Lock()
        self._written: list[Path] = []   # files written since the last ``take_written`` (durable only)

    def chunk_path(self, key: str, index: tuple[int, ...]) -> Path:
        """The file of the chunk at grid ``index`` of the array at ``key``."""
        return chunk_file(self.root, self.zarr_format, key, index, self.separator)

    def write(self, key: str, shape: tuple[int, ...], chunks: list[int], itemsize: int, encode: Encoder,
              region: tuple[slice, ...], data: memoryview, crc: int | None, where: str) -> PendingFiles:
        """Start writing the Zarr chunks that ``data`` (the C-order bytes of ``region``, which
        covers whole chunks) holds. Returns: the pending receipt."""
        import numpy as np

        arr = np.frombuffer(data, np.uint8).reshape(tuple(s.stop - s.start for s in region) + (itemsize,))
        grid = [range(s.start // c, -(-s.stop // c)) for s, c in zip(region, chunks)]
        futures = []
        for index in itertools.product(*grid):
            local = tuple(slice(i * c - s.start, min((i + 1) * c, n) - s.start)
                          for i, c, s, n in zip(index, chunks, region, shape))
            cell = arr[local]
            full = all(sl.stop - sl.start == c for sl, c in zip(local, chunks))
            path = self.chunk_path(key, index)
            futures.append(self._pool.submit(self._write_one, path, cell, full, chunks, encode, where))
        return PendingFiles(futures, data, crc)

    def _write_one(self, path: Path, cell: np.ndarray, full: bool, chunks: list[int], encode: Encoder,
                   where: str) -> None:
        """Encode one Zarr chunk (an edge chunk padded with zeros, the fill value) and write its file."""
        try:
            if full and cell.flags.c_contiguous:
                self._put(path, encode(cell.data.cast("B")), where)
                return
            with self._pad_lock:
                import numpy as np

                padded = np.zeros(tuple(chunks) + (cell.shape[-1],), np.uint8)
                padded[tuple(slice(0, n) for n in cell.shape[:-1])] = cell
                self._put(path, encode(padded.data.cast("B")), where)
        except (RuntimeError, ValueError, MemoryError) as e:  # numcodecs' failures
            raise DestinationError(f"{where}: cannot encode {path}: {e}") from None

    def _put(self, path: Path, blob: Any, where: str) -> None:
        """Write ``blob`` as the file ``path`` (its directories made once), writeback started."""
        parent = path.parent
        if parent not in self._dirs:
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise DestinationError(f"{where}: cannot make {parent}: {e.strerror}") from None
            self._dirs.add(parent)
        fd = safefs.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            pwrite_all(fd, blob, 0, path)
            if self.durable:
                start_writeback(fd, 0, len(blob))
        finally:
            os.close(fd)
        if self.durable:
            with self._lock:
                self._written.append(path)

    def take_written(self) -> list[Path]:
        """The files written since the last call (durable stores only): what a sync must fsync."""
        with self._lock:
            files, self._written = self._written, []
        return files

    def close(self) -> None:
        """Stop the threads: files being written are finished, those not started are not (after a
        failure nothing waits for them; after a complete run there are none)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def chunk_file(root: Path, zarr_format: int, key: str, index: Iterable[int], separator: str = "/") -> Path:
    """The file of the chunk at grid ``index`` of the array at ``key`` under ``root``, by the
    metadata's key encoding: v3 ``c/0/1`` (``separator`` between), v2 ``0.1``; a scalar's ``c`` / ``0``."""
    if zarr_format == 3:
        return root / key / separator.join(["c", *map(str, index)])
    return root / key / (".".join(map(str, index)) or "0")


def default_workers() -> int:
    """Encoding threads: one per usable core, at most four (the engine keeps two engine chunks,
    of four 4 MiB Zarr chunks at the default budget, in flight). SHARDCONV_ENCODE_THREADS sets it."""
    given = int(os.environ.get("SHARDCONV_ENCODE_THREADS", "0") or 0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, given or min(4, cores))
