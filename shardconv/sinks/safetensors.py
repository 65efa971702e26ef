"""safetensors output: an 8-byte header length, a JSON header, then every tensor's raw
bytes at an offset fixed by the plan, written with ``pwrite`` in any chunk order.

Tensors are laid out as the safetensors library's own writer lays them out: larger
dtypes first (its ``Dtype`` order), then by name, so every tensor starts at a multiple
of its item size; the header is padded with spaces to a multiple of 8. The header is
written last (at ``finish``): until then the file's first 8 bytes are zero, which no
reader takes for a safetensors file. ``__metadata__`` records ``format: pt`` (the key
transformers requires to load a file by tensor name), the shardconv version, the source
format and the plan digest; its room is reserved at ``open`` so data offsets never move.
A sidecar ``DEST.shardconv.json`` holds per-tensor CRC32s (safetensors stores none).

With ``max_file_size`` DEST is a directory of ``model-00001-of-0000N.safetensors`` files
and ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), the
names transformers loads. Tensors go to files in plan order (see ``filesink``).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.plan import Chunk, OutputTensor
from ..sources.safetensors import DTYPE_ORDER, DTYPES, INDEX_SUFFIX, MAX_HEADER
from ..util import safefs
from ..util.fileio import check_free_space, fsync_file, preallocate, pwrite_all, truncate
from . import filesink
from .base import Capabilities

#: Canonical dtype name -> safetensors code, for the dtypes written.
CODES: dict[str, str] = {name: code for code, name in DTYPES.items()}
#: The stem transformers looks for: ``model.safetensors.index.json`` and its shards.
SHARD_STEM = "model"
#: Room reserved for the source format's name in ``__metadata__`` (longer names are cut).
SOURCE_ROOM = 32


@dataclass
class _File:
    path: Path
    members: list[int]            # output indices, in file order
    header_len: int = 0           # N: the padded header's length
    fd: int = -1
    offsets: dict[int, int] = field(default_factory=dict)  # output index -> data offset

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _entry(o: OutputTensor, begin: int) -> dict[str, Any]:
    return {"dtype": CODES[o.dtype], "shape": list(o.shape), "data_offsets": [begin, begin + o.nbytes]}


def header(entries: list[tuple[str, dict[str, Any]]], metadata: dict[str, str], length: int = 0) -> bytes:
    """The header JSON (compact, as the library writes it; ``__metadata__`` first, its keys
    sorted), padded with spaces to ``length``, or else to a multiple of 8."""
    obj: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    obj.update(entries)
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    size = length or -(-len(text) // 8) * 8
    if len(text) > size:
        raise AssertionError(f"header of {len(text)} bytes outgrew its {size} reserved")
    return text + b" " * (size - len(text))


def _metadata(source: str = "x" * SOURCE_ROOM, plan: str = "0" * 64) -> dict[str, str]:
    """What ``__metadata__`` holds; the defaults take the most room the real values can."""
    return {"format": "pt", "shardconv": __version__, "source_format": source[:SOURCE_ROOM], "plan": plan}


class SafetensorsSink(filesink.OffsetSink):
    """safetensors output (see the module docstring): one file, or with ``max_file_size`` a
    directory of files and the index transformers loads."""

    name = "safetensors"
    Options = filesink.SplitOptions
    options_help = "safetensors output (DEST ending in .safetensors, or --to safetensors)"
    capabilities = Capabilities(dtypes=frozenset(CODES), piecewise=True)
    opts: filesink.SplitOptions

    def __init__(self, options: filesink.SplitOptions | None = None) -> None:
        super().__init__(options)
        self.max_file_size = self.opts.max_file_size
        self._files: list[_File] = []
        self._where: list[tuple[_File, int]] = []
        self._outputs: list[OutputTensor] = []

    @property
    def output_kind(self) -> str:  # type: ignore[override]
        return "directory" if self.max_file_size else "file"

    def final_paths(self, dest: Path) -> list[Path]:
        return [dest] if self.max_file_size else [filesink.manifest_path(dest), dest]

    def leave_out(self, output: OutputTensor) -> str | None:
        if output.dtype in CODES:
            return None
        return (f"{output.dtype} has no safetensors dtype (it holds bool, integers, float16/32/64, bfloat16, "
                "float8_e4m3fn and float8_e5m2)")

    def check_outputs(self, outputs: list[OutputTensor]) -> list[str]:
        """Names the header cannot hold (not UTF-8, the reserved ``__metadata__``), and a
        header over the 100 MB readers accept."""
        problems, size = [], 0
        for o in outputs:
            why = self.leave_out(o)
            if why:
                problems.append(f"{o.name!r}: {why}; leave it out or cast it with a rule")
            try:
                size += len(o.name.encode("utf-8")) + 80 + 4 * len(o.shape)
            except UnicodeEncodeError:
                problems.append(f"{o.name!r}: not valid UTF-8 (a lone surrogate); safetensors names are UTF-8")
            if o.name == "__metadata__":
                problems.append(f"{o.name!r}: the name safetensors reserves for its metadata; rename it")
        if size > MAX_HEADER and not self.max_file_size:
            problems.append(f"the header would be about {size} bytes, over the {MAX_HEADER} readers accept; "
                            "split the output with --max-file-size")
        return problems

    def prepare(self, out: Path, outputs: list[OutputTensor]) -> None:
        """Create each file at its full size; its first 8 bytes stay zero until ``finish``."""
        self._layout(out, outputs)
        if self.max_file_size:
            safefs.make_dir(out)
        check_free_space(out.parent, sum(f.data_start + self._data_len(f, outputs) for f in self._files))
        for f in self._files:
            f.fd = safefs.open_file(f.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            size = f.data_start + self._data_len(f, outputs)
            truncate(f.fd, size, f.path)
            preallocate(f.fd, size)

    def attach(self, out: Path, outputs: list[OutputTensor]) -> None:
        """Open the files a prepare made, changing no byte (a file found short or missing is
        only extended: its chunks then fail ``check``)."""
        self._layout(out, outputs)
        for f in self._files:
            f.fd = safefs.open_file(f.path, os.O_RDWR | os.O_CREAT)
            filesink.extend_to(f.fd, f.data_start + self._data_len(f, outputs), f.path)

    def _layout(self, out: Path, outputs: list[OutputTensor]) -> None:
        """Files, each tensor's file and data offset, and each header's reserved length (a pure
        function of the outputs and ``max_file_size``)."""
        self.out, self._outputs = out, outputs
        # A file's size counts its tensors' bytes and header entries (offsets at their widest),
        # the 8-byte length, the metadata and up to 7 bytes of padding: never over the size.
        room, total = len(header([], _metadata())), sum(o.nbytes for o in outputs)
        sizes = [o.nbytes + len(json.dumps({o.name: _entry(o, total)}, ensure_ascii=False, separators=(",", ":")))
                 for o in outputs]
        groups = filesink.group_by_size(sizes, self.max_file_size, overhead=8 + room + 7)
        if self.max_file_size:
            names = filesink.shard_names(SHARD_STEM, ".safetensors", len(groups))
            self._files = [_File(out / n, g) for n, g in zip(names, groups)]
        else:
            self._files = [_File(out, groups[0])]
        self._where = [None] * len(outputs)  # type: ignore[list-item]
        rank = {code: k for k, code in enumerate(DTYPE_ORDER)}
        for f in self._files:
            f.members.sort(key=lambda i: (-rank[CODES[outputs[i].dtype]], outputs[i].name))
            pos = 0
            for i in f.members:
                f.offsets[i] = pos
                self._where[i] = (f, pos)
                pos += outputs[i].nbytes
            f.header_len = len(header(self._entries(f, outputs), _metadata()))

    @staticmethod
    def _entries(f: _File, outputs: list[OutputTensor]) -> list[tuple[str, dict[str, Any]]]:
        return [(outputs[i].name, _entry(outputs[i], f.offsets[i])) for i in f.members]

    @staticmethod
    def _data_len(f: _File, outputs: list[OutputTensor]) -> int:
        return sum(outputs[i].nbytes for i in f.members)

    def place(self, chunk: Chunk) -> tuple[_File, int]:
        f, begin = self._where[chunk.index]
        return f, f.data_start + begin + chunk.offset

    def finish(self, receipts: list[tuple[Chunk, Any]], manifest: dict[str, Any]) -> list[tuple[Path, Path]]:
        assert self.ctx is not None
        fsync, dest = self.ctx.durable, self.ctx.dest.path
        manifest = filesink.with_crcs(manifest, filesink.tensor_crcs(receipts, len(self._outputs)))
        meta = _metadata(manifest["source"]["format"], manifest["plan"])
        for f in self._files:
            head = header(self._entries(f, self._outputs), meta, f.header_len)
            pwrite_all(f.fd, struct.pack("<Q", len(head)) + head, 0, f.path)
            if fsync:
                fsync_file(f.fd, f.path)
        if not self.max_file_size:
            staged = self.out.with_name("manifest.json")
            safefs.write_json(staged, manifest, fsync)
            return [(staged, filesink.manifest_path(dest)), (self.out, dest)]
        files = [(f.path, f.members) for f in self._files]
        filesink.finish_split(self.out, files, manifest, SHARD_STEM + INDEX_SUFFIX, {"format": "safetensors"}, fsync)
        return [(self.out, dest)]
