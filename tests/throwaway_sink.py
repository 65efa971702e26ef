"""A format that exists only for the tests: the first of the three places a new sink needs
(this module, whose last line registers it; then one ``SinkTests`` subclass in
test_sink_contract.py). Nothing else in shardconv knows it.

``--to rawdir`` (or DEST ending in ``.rawdir``): a directory holding every output tensor's
C-order bytes in ``NAME.bin`` (a ``/`` in a name is a subdirectory), each file starting with
the ``--magic`` text when given, and ``manifest.json`` (shardconv's manifest with a CRC32 per
tensor). The commands find it through ``SHARDCONV_PLUGINS=throwaway_sink``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shardconv.sinks import register
from shardconv.sinks.base import Capabilities, Chunk, OutputTensor, Sink, SinkOptions, sink_option
from shardconv.sinks.filesink import tensor_crcs, with_crcs
from shardconv.util import safefs
from shardconv.util.checksums import crc32
from shardconv.util.dtypes import numpy_dtype
from shardconv.util.fileio import fsync_tree, pwrite_all, range_crc, truncate

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RawOptions(SinkOptions):
    magic: str | None = sink_option(None, "write TEXT at the start of every tensor file", metavar="TEXT")


class RawDirSink(Sink):
    name = "rawdir"
    Options = RawOptions
    options_help = "raw directory output (a test format: DEST ending in .rawdir)"
    capabilities = Capabilities(nested_names=True)
    opts: RawOptions

    def __init__(self, options: RawOptions | None = None) -> None:
        super().__init__(options)
        self._head = (self.opts.magic or "").encode()
        self._fds: list[int] = []
        self._paths: list[Path] = []

    def _layout(self, out: Path, outputs: list[OutputTensor]) -> None:
        self.out, self.outputs = out, outputs
        self._paths = [out / (o.name + ".bin") for o in outputs]

    def prepare(self, out: Path, outputs: list[OutputTensor]) -> None:
        self._layout(out, outputs)
        safefs.remove(out)
        self._open(create=True)

    def attach(self, out: Path, outputs: list[OutputTensor]) -> None:
        self._layout(out, outputs)
        self._open(create=False)

    def _open(self, create: bool) -> None:
        for path, o in zip(self._paths, self.outputs):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = safefs.open_file(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if create else 0))
            self._fds.append(fd)
            if create or os.fstat(fd).st_size < len(self._head) + o.nbytes:
                truncate(fd, len(self._head) + o.nbytes, path)
            if create:
                pwrite_all(fd, self._head, 0, path)

    def write(self, chunk: Chunk, data: memoryview, crc: int | None = None) -> int:
        pwrite_all(self._fds[chunk.index], data, len(self._head) + chunk.offset, self._paths[chunk.index])
        return crc32(data)

    def check(self, chunk: Chunk, receipt: Any) -> bool:
        fd = self._fds[chunk.index]
        return range_crc(fd, len(self._head) + chunk.offset, chunk.length) == receipt

    def finish(self, receipts: list[tuple[Chunk, Any]], manifest: dict[str, Any]) -> list[tuple[Path, Path]]:
        assert self.ctx is not None
        manifest = with_crcs(manifest, tensor_crcs(receipts, len(self.outputs)))
        safefs.write_json(self.out / MANIFEST, {**manifest, "magic": self.opts.magic}, self.ctx.durable)
        if self.ctx.durable:
            fsync_tree(self.out)
        return [(self.out, self.ctx.dest.path)]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def read_rawdir(dest: Path) -> dict[str, np.ndarray]:
    """Every tensor of a rawdir output, true dtypes restored."""
    manifest = json.loads((dest / MANIFEST).read_text())
    skip = len((manifest["magic"] or "").encode())
    out = {}
    for t in manifest["tensors"]:
        data = (dest / (t["name"] + ".bin")).read_bytes()[skip:]
        out[t["name"]] = np.frombuffer(data, numpy_dtype(t["dtype"])).reshape(t["shape"])
    return out


register("rawdir", RawDirSink, suffixes=(".rawdir",))
