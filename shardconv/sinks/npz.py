"""NPZ output: a zip64 of STORED ``.npy`` members whose every byte position is known
from the plan, written with ``pwrite`` in any chunk order.

Layout per member: local header (CRC filled in at finish) | npy header | data. A member of
``ALIGN_FROM`` bytes or more has its array data start on a page (``util.uncached.ALIGN``),
padded with an extra field in its local header (docs/npz-format.md rule 6): the engine then
writes it past the page cache, and a reader can map it.
Then the central directory and zip64 end records. A sidecar
``DEST.shardconv.json`` manifest records true dtypes (bfloat16 is ``|V2`` in the
header), per-tensor CRCs and where each tensor came from.

With ``max_file_size`` the output is a directory DEST of several such files, as
Hugging Face shards its checkpoints: ``STEM-00001-of-0000N.npz`` (each with its own
sidecar manifest, each loadable by ``np.load`` alone) and ``STEM.npz.index.json``
mapping every tensor to its file. Tensors go to files in plan order, a new file
starting when the next tensor would take the current one over the size; a tensor
larger than the size gets a file of its own. The assignment is a function of the
plan and the size, so a resumed run lays out the same files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.plan import Chunk, OutputTensor
from ..formats import npyformat, zipformat
from ..util import safefs
from ..util.checksums import combine_crc32, crc32
from ..util.fileio import check_free_space, fsync_file, preallocate, pwrite_all, truncate
from ..util.uncached import ALIGN
from . import filesink
from .filesink import MANIFEST_SUFFIX, manifest_path  # noqa: F401  (where they used to live)

INDEX_SUFFIX = ".npz.index.json"
#: A zip member name's length is a 16-bit field.
MAX_MEMBER_NAME = 0xFFFF
#: Members with this many data bytes or more start their data on a page: at most 4 KiB of
#: padding each, under 0.4 % of their size; smaller members are packed.
ALIGN_FROM = 1 << 20


@dataclass
class _Member:
    name: bytes
    local_offset: int
    npy_header: bytes
    data_offset: int
    nbytes: int
    file: int = 0
    pad: int = 0   # the local header's alignment extra field's size (0: none)

    @property
    def size(self) -> int:
        return len(self.npy_header) + self.nbytes


@dataclass
class _File:
    path: Path
    members: list[int]   # indices into the sink's members
    end: int = 0         # where the central directory starts
    fd: int = -1


def shard_stem(dest: Path) -> str:
    """``model`` for DEST ``model.npz`` or ``model``: the prefix of a split output's files."""
    return dest.name[:-4] if dest.name.lower().endswith(".npz") and len(dest.name) > 4 else dest.name


class NpzSink(filesink.OffsetSink):
    """NPZ output (see the module docstring): one zip64 of ``.npy`` members, or with
    ``max_file_size`` a directory of such files and an index."""

    name = "npz"
    Options = filesink.SplitOptions
    options_help = "NPZ output (DEST ending in .npz, or --to npz; see docs/npz-format.md)"
    opts: filesink.SplitOptions

    def __init__(self, options: filesink.SplitOptions | None = None) -> None:
        super().__init__(options)
        self.max_file_size = self.opts.max_file_size
        self._members: list[_Member] = []
        self._files: list[_File] = []

    @property
    def output_kind(self) -> str:  # type: ignore[override]
        return "directory" if self.max_file_size else "file"

    def check_outputs(self, outputs: list[OutputTensor]) -> list[str]:
        """Member names a zip cannot hold: not UTF-8 encodable, or longer than its 16-bit field.
        (Empty, absolute, ``..`` and NUL names are refused by the plan for every format.)

        Returns: the problems, one line each. Raises: nothing."""
        problems = super().check_outputs(outputs)
        for o in outputs:
            try:
                size = len((o.name + ".npy").encode("utf-8"))
            except UnicodeEncodeError:
                problems.append(f"{o.name!r}: not valid UTF-8 (a lone surrogate); zip member names are UTF-8")
                continue
            if size > MAX_MEMBER_NAME:
                problems.append(f"{o.name[:60]!r}...: its member name is {size} bytes, over the zip limit of "
                                f"{MAX_MEMBER_NAME}; shorten it with a rename rule")
        return problems

    def final_paths(self, dest: Path) -> list[Path]:
        return [dest] if self.max_file_size else [manifest_path(dest), dest]

    def _layout(self, out: Path, outputs: list[OutputTensor]) -> None:
        """Every member's place (a pure function of the outputs and ``max_file_size``)."""
        self.out = out
        names = [(o.name + ".npy").encode("utf-8") for o in outputs]
        heads = [npyformat.header(o.dtype, o.shape) for o in outputs]
        aligned = [o.nbytes >= ALIGN_FROM for o in outputs]
        # Files are cut by each member's largest size (its padding at most a page), so that the
        # cut does not depend on where a member falls.
        sizes = [zipformat.local_header_size(n) + len(h) + o.nbytes
                 + (zipformat.ALIGN_EXTRA_MIN + ALIGN - 1 if a else 0)
                 for n, h, o, a in zip(names, heads, outputs, aligned)]
        groups = filesink.group_by_size(sizes, self.max_file_size)
        self._members = [None] * len(outputs)  # type: ignore[list-item]
        for g, members in enumerate(groups):
            pos = 0
            for i in members:
                pad = zipformat.align_pad(pos, names[i], len(heads[i]), ALIGN) if aligned[i] else 0
                data_at = pos + zipformat.local_header_size(names[i], pad) + len(heads[i])
                self._members[i] = _Member(names[i], pos, heads[i], data_at, outputs[i].nbytes, g, pad)
                pos = data_at + outputs[i].nbytes
        if self.max_file_size:
            names_ = filesink.shard_names(shard_stem(out), ".npz", len(groups))
            self._files = [_File(out / name, g) for name, g in zip(names_, groups)]
        else:
            self._files = [_File(out, groups[0])]
        for f in self._files:
            last = self._members[f.members[-1]] if f.members else None
            f.end = last.data_offset + last.nbytes if last else 0

    def prepare(self, out: Path, outputs: list[OutputTensor]) -> None:
        """Create each file at its data size with every ``.npy`` header in place."""
        self._layout(out, outputs)
        if self.max_file_size:
            safefs.make_dir(out)
        check_free_space(out.parent, sum(f.end for f in self._files) + 1024 * len(outputs))
        for f in self._files:
            f.fd = safefs.open_file(f.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            truncate(f.fd, f.end, f.path)
            preallocate(f.fd, f.end)
            self._write_npy_headers(f)

    def attach(self, out: Path, outputs: list[OutputTensor]) -> None:
        """Open the files a prepare made; no byte in them changes (a finished file keeps its zip
        directory until ``finish`` writes the same one again). A file shorter than its data (or
        missing) is only extended: its chunks fail ``check`` and are written again."""
        self._layout(out, outputs)
        for f in self._files:
            f.fd = safefs.open_file(f.path, os.O_RDWR | os.O_CREAT)
            filesink.extend_to(f.fd, f.end, f.path)

    def _write_npy_headers(self, f: _File) -> None:
        for k in f.members:
            m = self._members[k]
            pwrite_all(f.fd, m.npy_header, m.data_offset - len(m.npy_header), f.path)

    def place(self, chunk: Chunk) -> tuple[_File, int]:
        m = self._members[chunk.index]
        return self._files[m.file], m.data_offset + chunk.offset

    def finish(self, receipts: list[tuple[Chunk, Any]], manifest: dict[str, Any]) -> list[tuple[Path, Path]]:
        assert self.ctx is not None
        data_crc = filesink.tensor_crcs(receipts, len(self._members))
        manifest = filesink.with_crcs(manifest, data_crc)
        fsync, dest = self.ctx.durable, self.ctx.dest.path
        for f in self._files:
            self._finish_file(f, data_crc, fsync)
        if not self.max_file_size:
            staged_manifest = self.out.with_name("manifest.json")
            safefs.write_json(staged_manifest, manifest, fsync)
            return [(staged_manifest, manifest_path(dest)), (self.out, dest)]
        files = [(f.path, f.members) for f in self._files]
        filesink.finish_split(self.out, files, manifest, shard_stem(self.out) + INDEX_SUFFIX,
                              {"format": "npz", "files": len(self._files)}, fsync)
        return [(self.out, dest)]

    def _finish_file(self, f: _File, data_crc: list[int], fsync: bool) -> None:
        """The ``.npy`` headers (again: the same bytes, so an output attached to after a crash in
        its prepare is whole), local headers with their CRCs, the central directory and the zip64
        end records."""
        self._write_npy_headers(f)
        central = bytearray()
        pos = f.end
        for k in f.members:
            m = self._members[k]
            crc = combine_crc32(crc32(m.npy_header), data_crc[k], m.nbytes)
            pwrite_all(f.fd, zipformat.local_header(m.name, crc, m.size, m.pad, ALIGN), m.local_offset, f.path)
            central += zipformat.central_header(m.name, crc, m.size, m.local_offset)
            if len(central) >= 1 << 20:
                pwrite_all(f.fd, bytes(central), pos, f.path)
                pos += len(central)
                central.clear()
        pwrite_all(f.fd, bytes(central), pos, f.path)
        pos += len(central)
        end = zipformat.end_records(len(f.members), f.end, pos - f.end)
        pwrite_all(f.fd, end, pos, f.path)
        truncate(f.fd, pos + len(end), f.path)
        if fsync:
            fsync_file(f.fd, f.path)
