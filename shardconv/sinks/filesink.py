"""What the single-file sinks (NPZ, safetensors) share: splitting tensors over files of a
bounded size, re-checking a journaled chunk, per-tensor CRCs from chunk receipts, the
sidecar manifest and the Hugging Face style index of a split output.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.plan import Chunk
from ..errors import DestinationError
from ..util import safefs
from ..util.checksums import combine_crc32, crc32
from ..util.units import format_size

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


def check_free_space(where: Path, need: int) -> None:
    """DestinationError if the filesystem holding ``where`` has less than ``need`` bytes free."""
    free = shutil.disk_usage(where).free
    if need > free:
        raise DestinationError(f"{where}: needs {format_size(need)} for the output, only {format_size(free)} free")


def range_crc32(fd: int, offset: int, length: int, crc_fn: Callable[..., int] = crc32) -> int | None:
    """CRC32 (or ``crc_fn``'s checksum) of bytes [offset, offset+length) of ``fd``, read 1 MiB
    at a time; None if the file ends first (a journaled chunk that did not reach the disk)."""
    buf = bytearray(min(length, 1 << 20))
    view = memoryview(buf)
    crc = done = 0
    while done < length:
        n = os.preadv(fd, [view[: min(len(buf), length - done)]], offset + done)
        if n <= 0:
            return None
        crc = crc_fn(view[:n], crc)
        done += n
    return crc


def tensor_crcs(receipts: list[tuple[Chunk, Any]], count: int,
                combine: Callable[[int, int, int], int] = combine_crc32) -> list[int]:
    """Each output tensor's CRC32 (or ``combine``'s checksum), combined from the CRCs its chunks
    were written with."""
    crcs = [0] * count
    for chunk, crc in sorted(receipts, key=lambda r: (r[0].index, r[0].offset)):
        crcs[chunk.index] = combine(crcs[chunk.index], crc, chunk.length)
    return crcs


def write_json(path: Path, obj: dict[str, Any], fsync: bool) -> None:
    """``obj`` as indented JSON with sorted keys (deterministic bytes)."""
    safefs.write_file(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), fsync)


def finish_split(out: Path, files: list[tuple[Path, list[int]]], manifest: dict[str, Any], index_name: str,
                 metadata: dict[str, Any], fsync: bool) -> None:
    """Write each file's sidecar (the manifest with that file's tensors) and the index
    ``index_name`` in ``out``: ``metadata`` plus ``total_size`` and ``shardconv``, and the
    ``weight_map`` of every tensor name to its file."""
    weight_map = {}
    for path, members in files:
        part = {**manifest, "tensors": [manifest["tensors"][k] for k in members]}
        write_json(manifest_path(path), part, fsync)
        weight_map.update({manifest["tensors"][k]["name"]: path.name for k in members})
    total = sum(t["nbytes"] for t in manifest["tensors"])
    index = {"metadata": {**metadata, "total_size": total, "shardconv": __version__}, "weight_map": weight_map}
    write_json(out / index_name, index, fsync)
    if fsync:
        safefs.fsync_dir(out)
