"""NPZ output: a zip64 of STORED ``.npy`` members whose every byte position is known
from the plan, written with ``pwrite`` in any chunk order.

Layout per member: local header (CRC filled in at finish) | npy header | data.
Then the central directory and zip64 end records. A sidecar
``DEST.shardconv.json`` manifest records true dtypes (bfloat16 is ``|V2`` in the
header), per-tensor CRCs and where each tensor came from.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import npyformat, zipformat
from ..checksums import combine_crc32, crc32
from ..errors import DestinationError
from ..fileio import fsync_file, pwrite_all, start_writeback, truncate
from ..plan import Chunk, OutputTensor
from ..units import format_size
from .base import Sink

MANIFEST_SUFFIX = ".shardconv.json"


@dataclass
class _Member:
    name: bytes
    local_offset: int
    npy_header: bytes
    data_offset: int
    nbytes: int

    @property
    def size(self) -> int:
        return len(self.npy_header) + self.nbytes


def manifest_path(dest: Path) -> Path:
    return dest.with_name(dest.name + MANIFEST_SUFFIX)


class NpzSink(Sink):
    name = "npz"

    def __init__(self) -> None:
        self._fd = -1
        self._members: list[_Member] = []
        self._end = 0

    def final_paths(self, dest: Path) -> list[Path]:
        return [manifest_path(dest), dest]

    def open(self, out: Path, outputs: list[OutputTensor], resume: bool) -> None:
        self.out = out
        pos = 0
        self._members = []
        for o in outputs:
            name = (o.name + ".npy").encode("utf-8")
            head = npyformat.header(o.dtype, o.shape)
            lh = zipformat.local_header_size(name)
            self._members.append(_Member(name, pos, head, pos + lh + len(head), o.nbytes))
            pos += lh + len(head) + o.nbytes
        self._end = pos
        if not resume or not out.exists():
            free = shutil.disk_usage(out.parent).free
            need = pos + 1024 * len(outputs)
            if need > free:
                raise DestinationError(f"{out.parent}: needs {format_size(need)} for the output, "
                                       f"only {format_size(free)} free")
            fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        else:
            fd = os.open(out, os.O_RDWR)
        self._fd = fd
        truncate(fd, pos, out)
        for m in self._members:
            self._pwrite(m.npy_header, m.data_offset - len(m.npy_header))

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        pwrite_all(self._fd, data, offset, self.out)

    def write(self, chunk: Chunk, data: memoryview) -> int:
        m = self._members[chunk.index]
        self._pwrite(data, m.data_offset + chunk.offset)
        if self.durable:
            start_writeback(self._fd, m.data_offset + chunk.offset, len(data))
        return crc32(data)

    def check(self, chunk: Chunk, receipt: Any) -> bool:
        m = self._members[chunk.index]
        buf = bytearray(min(chunk.length, 1 << 20))
        view = memoryview(buf)
        crc = 0
        done = 0
        while done < chunk.length:
            n = os.preadv(self._fd, [view[: min(len(buf), chunk.length - done)]], m.data_offset + chunk.offset + done)
            if n <= 0:
                return False
            crc = crc32(view[:n], crc)
            done += n
        return crc == receipt

    def finish(self, receipts: list[tuple[Chunk, Any]], manifest: dict[str, Any], fsync: bool,
               dest: Path) -> list[tuple[Path, Path]]:
        data_crc = [0] * len(self._members)
        for chunk, crc in sorted(receipts, key=lambda r: (r[0].index, r[0].offset)):
            data_crc[chunk.index] = combine_crc32(data_crc[chunk.index], crc, chunk.length)
        central = bytearray()
        cd_offset = self._end
        pos = cd_offset
        for m, dcrc in zip(self._members, data_crc):
            crc = combine_crc32(crc32(m.npy_header), dcrc, m.nbytes)
            self._pwrite(zipformat.local_header(m.name, crc, m.size), m.local_offset)
            central += zipformat.central_header(m.name, crc, m.size, m.local_offset)
            if len(central) >= 1 << 20:
                self._pwrite(central, pos)
                pos += len(central)
                central.clear()
        self._pwrite(central, pos)
        pos += len(central)
        end = zipformat.end_records(len(self._members), cd_offset, pos - cd_offset)
        self._pwrite(end, pos)
        truncate(self._fd, pos + len(end), self.out)
        for entry, dcrc in zip(manifest["tensors"], data_crc):
            entry["crc32"] = dcrc
        if fsync:
            fsync_file(self._fd, self.out)
        staged_manifest = self.out.with_name("manifest.json")
        with open(staged_manifest, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.write("\n")
            if fsync:
                f.flush()
                fsync_file(f.fileno(), staged_manifest)
        return [(staged_manifest, manifest_path(dest)), (self.out, dest)]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
