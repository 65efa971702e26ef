"""The source interface: list tensors without reading values; read any byte region.

A source also names its *checksum units* (a tensor, or a slice of a partitioned
tensor) with their expected CRCs. Each read reports the segments of units it
touched with the CRC of exactly those bytes, so the engine can verify a unit
once every byte of it has been read, even across a resumed run.
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, TypeVar

from ..core.types import RawRange, Segment, TensorInfo, Unit
from ..errors import FormatError, SourceError

E = TypeVar("E")


def walk_files(*dirs: str | os.PathLike[str]) -> list[str]:
    """Every file under ``dirs`` (links to directories are not followed), as absolute
    paths, found with one ``os.scandir`` per directory (no stat per file)."""
    out: list[str] = []
    stack = [os.path.abspath(d) for d in dirs]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif e.is_file():
                out.append(e.path)
    return sorted(out)


def file_stats(paths: list[str], root: str) -> dict[str, dict[str, int] | None]:
    """Size, mtime, ctime and inode of each file (None if it is gone), by its path relative
    to ``root`` with ``/`` separators: what a resume and the final check compare."""
    prefix = os.path.join(root, "")
    out: dict[str, dict[str, int] | None] = {}
    for p in paths:
        rel = p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root)
        rel = rel.replace(os.sep, "/")
        try:
            st = os.stat(p)
        except FileNotFoundError:
            out[rel] = None
            continue
        out[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}
    return dict(sorted(out.items()))


class Source(ABC):
    """A checkpoint opened for reading. Subclasses: one module per format."""

    #: Short format name shown by ``ls`` and recorded in manifests.
    format: str = "?"
    #: Whether the format stores checksums of the values that reads verify. Without them a
    #: change to the input during a run is seen only in file metadata (``fingerprint``).
    stores_checksums: bool = False

    @property
    @abstractmethod
    def location(self) -> str:
        """Path or description used in messages."""

    @abstractmethod
    def tensors(self) -> list[TensorInfo]:
        """Every tensor, without reading values."""

    @abstractmethod
    def read_into(self, name: str, offset: int, out: memoryview) -> list[Segment]:
        """Fill ``out`` with bytes [offset, offset+len(out)) of tensor ``name`` (C order).

        Returns the checksum segments the read covered (empty if the format has none).
        """

    def raw_range(self, name: str, offset: int, length: int) -> RawRange | None:
        """Where bytes [offset, offset+length) of tensor ``name`` lie verbatim in one file, so
        the engine can copy them in cache-sized pieces (read, checksum, write while in cache);
        None if they are not stored so (compressed, partitioned, in memory, another layout).
        The bytes and their checksum segment are exactly what ``read_into`` would give.

        Returns: the RawRange or None. Raises: SourceError for a range outside the tensor."""
        return None

    def baseline_bytes(self) -> int:
        """Memory the reader holds beside the budget's buffers (libraries it loads, decoder
        state, caches), for estimates; bounded whatever the tensor sizes."""
        return 0

    def budget_reserve(self) -> tuple[int, str]:
        """(bytes, why): memory the reader must hold at once that grows with the data, such
        as a chunk its library decodes only whole. The engine takes it out of
        ``--max-memory`` before sizing buffers, and refuses a budget that cannot hold it."""
        return 0, ""

    def _entry(self, table: Mapping[str, E], name: str, kind: str = "array") -> E:
        """``table[name]``, or a SourceError naming this input and the unknown name."""
        entry = table.get(name)
        if entry is None:
            raise SourceError(f"{self.location}: no {kind} named {name!r}")
        return entry

    def _region(self, name: str, offset: int, out: memoryview, nbytes: int) -> memoryview:
        """``out`` as bytes, after checking [offset, offset+len(out)) lies within the tensor."""
        out = out.cast("B") if out.format != "B" else out
        self._check_range(name, offset, len(out), nbytes)
        return out

    def _check_range(self, name: str, offset: int, length: int, nbytes: int) -> None:
        """Raise a SourceError unless [offset, offset+length) lies within the tensor's ``nbytes``."""
        if offset < 0 or length < 0 or offset + length > nbytes:
            raise SourceError(f"{self.location}: read [{offset}, {offset + length}) outside {name!r} "
                              f"({nbytes} bytes)")

    def units(self) -> dict[str, Unit]:
        """Checksum units by key; empty if the format records no checksums."""
        return {}

    def read_strings(self, name: str) -> list[bytes]:
        """Elements of a string tensor, flattened.

        Returns: the elements. Raises: SourceError where ``name`` is no string tensor of this source."""
        raise SourceError(f"{self.location}: no string tensor named {name!r}")

    def recorded_options(self) -> dict[str, Any]:
        """The mapping options a shardconv output records (its manifest's ``options``), to
        rebuild its plan (``verify``); {} for any other input.

        Returns: a new dict. Raises: nothing."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input for resume and change detection: the tensor table and
        every input file's size, mtime, ctime and inode (a rewrite cannot restore ctime)."""
        fp: dict[str, Any] = {
            "format": self.format,
            "tensors": {t.name: [t.dtype, list(t.shape), t.nbytes, t.checksum] for t in self.tensors()},
        }
        files = self.input_files()
        if files:
            fp["files"] = file_stats(files, self._input_root())
        return fp

    def _input_root(self) -> str:
        """The directory ``fingerprint()`` keys input files by: the location, or its parent."""
        loc = os.path.abspath(self.location)
        return loc if os.path.isdir(loc) else os.path.dirname(loc)

    def input_files(self) -> list[str]:
        """Every file this source reads, as absolute paths (empty for in-memory sources).

        Fingerprinted for resume and change detection, and guarded: no output may be
        written over or inside any of them."""
        loc = self.location
        return [os.path.abspath(loc)] if isinstance(loc, str) and os.path.isfile(loc) else []

    def info(self, name: str) -> TensorInfo:
        """What this source knows about tensor ``name`` (found by name in a table built once).

        Returns: its TensorInfo. Raises: SourceError naming this input and ``name`` when there is none."""
        index: dict[str, TensorInfo] | None = self.__dict__.get("_info_index")
        if index is None:
            index = {t.name: t for t in self.tensors()}
            self.__dict__["_info_index"] = index
        t = index.get(name)
        if t is None:
            raise SourceError(f"{self.location}: no tensor named {name!r}")
        return t

    def read(self, name: str) -> Any:
        """Whole tensor as a NumPy array (a list of bytes for a string tensor). For tests and
        small tensors only: it reads the whole tensor into memory."""
        import numpy as np

        from ..util.dtypes import numpy_dtype

        t = self.info(name)
        if t.is_string:
            return self.read_strings(name)
        arr = np.empty(t.shape, dtype=numpy_dtype(t.dtype))
        if t.nbytes:
            self.read_into(name, 0, arr.reshape(-1).view(np.uint8).data)
        return arr

    def close(self) -> None:
        """Release the files and handles the source holds (the default holds none). Raises: nothing."""
        return None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_sidecar(path: os.PathLike[str]) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """shardconv's manifest beside one of its single-file outputs (``PATH.shardconv.json``):
    (its path, the mapping options recorded, entries by tensor name); empty when there is none."""
    mpath = os.fspath(path) + ".shardconv.json"
    if not os.path.isfile(mpath):
        return mpath, {}, {}
    try:
        with open(mpath, "rb") as f:
            data = json.loads(f.read())
        return mpath, dict(data.get("options") or {}), {t["name"]: t for t in data.get("tensors", [])}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FormatError(f"{mpath}: manifest is not valid shardconv JSON") from None
