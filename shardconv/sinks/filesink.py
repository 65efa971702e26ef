"""What the single-file sinks (NPZ, safetensors) share: chunks as byte ranges of their files
(``OffsetSink``), splitting tensors over files of a bounded size, re-checking a journaled
chunk, per-tensor CRCs from chunk receipts, the sidecar manifest and the Hugging Face style
index of a split output.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.plan import Chunk
from ..errors import DestinationError, UsageError
from ..frontend import option_name
from ..util import safefs
from ..util.checksums import combine_crc32, crc32
from ..util.fileio import Writeback, fsync_file, range_crc, truncate
from ..util.uncached import ALIGN, UncachedWrites
from ..util.units import parse_size
from .base import Capabilities, Sink, SinkOptions, sink_option


@dataclass(frozen=True)
class SplitOptions(SinkOptions):
    """Options of the single-file sinks (NPZ, safetensors)."""

    max_file_size: int | None = sink_option(
        None, "split into files of at most SIZE (e.g. 5GB) in directory DEST, with an index JSON mapping each "
        "tensor to its file (as Hugging Face shards checkpoints)", metavar="SIZE", parse=parse_size)

    def validate(self) -> None:
        """Raises: UsageError for a size below 1 MiB."""
        if self.max_file_size is not None and (not isinstance(self.max_file_size, int)
                                               or self.max_file_size < MIN_FILE_SIZE):
            raise UsageError(f"{option_name('max_file_size')} {self.max_file_size!r} is below the 1 MiB minimum")


#: The smallest ``max_file_size``.
MIN_FILE_SIZE = 1 << 20
#: The sidecar beside an output file: true dtypes, per-tensor CRC32s, where tensors came from.
MANIFEST_SUFFIX = ".shardconv.json"


def manifest_path(dest: Path) -> Path:
    return dest.with_name(dest.name + MANIFEST_SUFFIX)


def group_by_size(sizes: Sequence[int], max_file_size: int | None, overhead: int = 0) -> list[list[int]]:
    """Indices of ``sizes`` in order, split into files: a new file starts when the next item
    would take the current one over ``max_file_size`` (each file costs ``overhead`` more);
    an item larger than the size gets a file of its own. One file without a size."""
    groups: list[list[int]] = [[]]
    pos = overhead
    for i, size in enumerate(sizes):
        if max_file_size and groups[-1] and pos + size > max_file_size:
            groups.append([])
            pos = overhead
        groups[-1].append(i)
        pos += size
    return groups


def shard_names(stem: str, suffix: str, n: int) -> list[str]:
    """``STEM-00001-of-0000N.SUFFIX``: Hugging Face's names for the files of a split output."""
    return [f"{stem}-{k + 1:05d}-of-{n:05d}{suffix}" for k in range(n)]


def tensor_crcs(receipts: list[tuple[Chunk, Any]], count: int,
                combine: Callable[[int, int, int], int] = combine_crc32) -> list[int]:
    """Each output tensor's CRC32 (or ``combine``'s checksum), combined from the CRCs its chunks
    were written with."""
    crcs = [0] * count
    for chunk, crc in sorted(receipts, key=lambda r: (r[0].index, r[0].offset)):
        crcs[chunk.index] = combine(crcs[chunk.index], crc, chunk.length)
    return crcs


def with_crcs(manifest: dict[str, Any], crcs: list[int]) -> dict[str, Any]:
    """A copy of ``manifest`` whose tensor entries carry their ``crc32`` (the given one is unchanged).

    Returns: a new dict. Raises: nothing."""
    return {**manifest, "tensors": [{**entry, "crc32": crc} for entry, crc in zip(manifest["tensors"], crcs)]}


def extend_to(fd: int, size: int, path: Path) -> None:
    """Make the file at ``fd`` at least ``size`` bytes long, never shorter (attaching to a
    partial output changes none of its bytes).

    Returns: None. Raises: DestinationError if the file cannot be examined or extended."""
    try:
        have = os.fstat(fd).st_size
    except OSError as e:
        raise DestinationError(f"{path}: cannot examine the partial output: {e.strerror}") from None
    if have < size:
        truncate(fd, size, path)


def finish_split(out: Path, files: list[tuple[Path, list[int]]], manifest: dict[str, Any], index_name: str,
                 metadata: dict[str, Any], fsync: bool) -> None:
    """Write each file's sidecar (the manifest with that file's tensors) and the index
    ``index_name`` in ``out``: ``metadata`` plus ``total_size`` and ``shardconv``, and the
    ``weight_map`` of every tensor name to its file."""
    weight_map = {}
    for path, members in files:
        part = {**manifest, "tensors": [manifest["tensors"][k] for k in members]}
        safefs.write_json(manifest_path(path), part, fsync)
        weight_map.update({manifest["tensors"][k]["name"]: path.name for k in members})
    total = sum(t["nbytes"] for t in manifest["tensors"])
    index = {"metadata": {**metadata, "total_size": total, "shardconv": __version__}, "weight_map": weight_map}
    safefs.write_json(out / index_name, index, fsync)
    if fsync:
        safefs.fsync_dir(out)


class OffsetSink(Sink):
    """A sink whose every chunk is a byte range at a fixed offset of one of its files
    (``_files``: objects with ``fd`` and ``path``; ``place`` says where): written with
    ``pwrite`` whole or in parts, its receipt the CRC32 of its bytes, synced by fsync."""

    capabilities = Capabilities(piecewise=True)
    receipt_checksum = "crc32"
    _files: Sequence[Any]

    def __init__(self, options: SinkOptions | None = None) -> None:
        super().__init__(options)
        self._writeback = Writeback()
        self._direct = UncachedWrites()

    def place(self, chunk: Chunk) -> tuple[Any, int]:
        """(the file, the offset in it) where ``chunk``'s bytes go."""
        raise NotImplementedError

    def write(self, chunk: Chunk, data: memoryview, crc: int | None = None) -> int:
        self.write_part(chunk, data)
        return crc32(data) if crc is None else crc

    def write_part(self, chunk: Chunk, data: memoryview) -> None:
        f, pos = self.place(chunk)
        durable = self.ctx is not None and self.ctx.durable
        self._direct.pwrite(f.fd, data, pos, f.path, self._writeback if durable else None,
                            direct=(pos - chunk.offset) % ALIGN == 0)

    def page_offset(self, chunk: Chunk) -> int | None:
        pos = self.place(chunk)[1]
        return pos % ALIGN if self._direct.enabled and (pos - chunk.offset) % ALIGN == 0 else None

    def check(self, chunk: Chunk, receipt: Any) -> bool:
        f, pos = self.place(chunk)
        return range_crc(f.fd, pos, chunk.length) == receipt

    def sync(self) -> bool:
        for f in self._files:
            if f.fd >= 0:
                fsync_file(f.fd, f.path)
        return True

    def close(self) -> None:
        self._direct.close()
        for f in self._files:
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1
