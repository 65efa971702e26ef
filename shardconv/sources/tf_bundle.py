"""TensorFlow checkpoints (TF1 name-based, TF2 object-based, SavedModel ``variables/``).

Reads the bundle format directly: the ``.index`` SSTable of BundleEntryProtos and
the raw ``.data-SSSSS-of-NNNNN`` shards. TensorFlow is never imported.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import operator
import os
import re
import threading
import types
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from ..core.types import RawRange, Role, Segment, SourceRole, TensorInfo, Unit
from ..errors import ChecksumError, FormatError, ShardconvError, SourceError, UnsupportedError
from ..formats.bundle_entries import OBJECT_GRAPH_KEY, Columns, Entry, EntryReader, parse_entry, slice_key
from ..formats.sstable import SSTable
from ..formats.wire import as_int64, fields, read_varint
from ..util.checksums import crc32c, mask, unmask
from ..util.dtypes import STRING, checked_nbytes, itemsize, numpy_dtype
from ..util.fileio import pread_exact
from .base import Source

if TYPE_CHECKING:
    import numpy as np  # imported where partitioned tensors are read: a listing needs none

class _Fields(NamedTuple):
    """Every tensor entry of an index, field by field (``Entry``'s fields as columns, in key order):
    a listing needs no Entry per tensor, and ``TFBundleSource._entries`` makes them on first use."""

    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    shards: list[int]
    offsets: list[int]
    sizes: list[int]
    crcs: list[int | None]
    slices: list[tuple[list[tuple[int, int]], ...]]


#: Each tensor's size and checksum (``_check_entries``).
_Rows = tuple[list[int], list["str | None"]]

#: String tensors larger than this are refused (they are read whole).
MAX_STRING_TENSOR_BYTES = 256 << 20


# --------------------------------------------------------------------------- paths

def _parse_state_file(path: Path) -> tuple[str | None, list[str]]:
    """The ``checkpoint`` text proto: latest path and all paths."""
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read checkpoint state file: {e}") from None
    latest = None
    allp = []
    for m in re.finditer(r'^\s*(model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*"((?:[^"\\]|\\.)*)"', text, re.M):
        value = m.group(2).encode("latin-1", "backslashreplace").decode("unicode_escape")
        if m.group(1) == "model_checkpoint_path":
            latest = value
        else:
            allp.append(value)
    return latest, allp


def _step_of(prefix: str) -> int | None:
    m = re.search(r"-(\d+)$", prefix)
    return int(m.group(1)) if m else None


_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")


def _owning_prefix(p: Path) -> Path | None:
    """The prefix a checkpoint file belongs to (``.index``, ``.data-…``, the TF1 graph
    ``.meta``), or None for another file. A ``.data``/``.meta`` file whose ``.index`` is not
    beside it is an error saying what to pass instead."""
    if p.name.endswith(".index"):
        return p.with_name(p.name[: -len(".index")])
    if _DATA_SUFFIX.search(p.name):
        prefix, what = p.with_name(_DATA_SUFFIX.sub("", p.name)), "a data shard"
    elif p.name.endswith(".meta"):
        prefix, what = p.with_name(p.name[: -len(".meta")]), "a TF1 graph (.meta, no values)"
    else:
        return None
    if Path(str(prefix) + ".index").is_file():
        return prefix
    raise SourceError(f"{p}: {what} of checkpoint {prefix.name}, whose index {prefix.name}.index is not "
                      f"beside it; pass the directory holding {prefix.name}.index and its .data files")


def _is_state_file(p: Path) -> bool:
    """True for TensorFlow's ``checkpoint`` text file (``model_checkpoint_path: "…"``); never
    raises (Orbax and t5x name msgpack files ``checkpoint`` too)."""
    try:
        return p.name == "checkpoint" and p.is_file() and p.stat().st_size < (1 << 20) and \
            _parse_state_file(p)[0] is not None
    except (OSError, SourceError):
        return False


def resolve_prefix(path: str | os.PathLike, step: int | None = None) -> Path:
    """Turn what a user points at into a bundle prefix (``.../model.ckpt-100``).

    Accepts a prefix, its ``.index``, ``.data-…`` or ``.meta`` file, the ``checkpoint``
    state file, a checkpoint directory (follows the state file, or ``step``, or takes the
    newest step of files copied without it), a SavedModel or its ``variables/``.
    """
    p = Path(path)
    if p.is_file():
        owner = _owning_prefix(p)
        if owner is not None:
            return owner
        if _is_state_file(p):
            return _resolve_dir(p.parent, step)
    if p.is_dir():
        return _resolve_dir(p, step)
    if Path(str(p) + ".index").is_file():
        return p
    if not p.exists() and not p.parent.is_dir():
        raise SourceError(f"{p}: no such file or directory")
    raise SourceError(f"{p}: not a TensorFlow checkpoint ({p}.index does not exist)")


def _resolve_dir(p: Path, step: int | None) -> Path:
    """The prefix a checkpoint directory stands for (see ``resolve_prefix``)."""
    for cand in (p / "variables" / "variables", p / "variables"):
        if Path(str(cand) + ".index").is_file():
            return cand
    candidates = sorted(q.name[: -len(".index")] for q in p.glob("*.index") if q.is_file())
    if step is not None:
        hits = [c for c in candidates if _step_of(c) == step]
        if not hits:
            steps = sorted({s for c in candidates if (s := _step_of(c)) is not None})
            raise SourceError(f"{p}: no checkpoint for step {step} (steps present: {steps or 'none'})")
        if len(hits) > 1:
            raise SourceError(f"{p}: several checkpoints for step {step}: {', '.join(hits)}; pass one of them")
        return p / hits[0]
    state = p / "checkpoint"
    if _is_state_file(state):
        return _from_state_file(p, state)
    return p / _newest(p, candidates)


def _from_state_file(p: Path, state: Path) -> Path:
    """The checkpoint the ``checkpoint`` state file names as the latest."""
    latest, _ = _parse_state_file(state)
    lp = Path(latest or "")
    lp = lp if lp.is_absolute() else p / lp
    if not Path(str(lp) + ".index").is_file():
        # Checkpoints moved with their directory: try the basename here.
        local = p / lp.name
        if Path(str(local) + ".index").is_file():
            return local
        raise SourceError(f"{state}: names checkpoint {latest!r} but {lp}.index does not exist; "
                          f"pass a prefix that exists, or --step N")
    return lp


def _newest(p: Path, candidates: list[str]) -> str:
    """Without a state file: the only checkpoint, or the highest step of one series
    (``model.ckpt-100``, ``model.ckpt-200``: files copied by hand); else an error listing them."""
    if not candidates:
        strays = _strays(p)
        if strays:
            raise SourceError(f"{p}: holds {', '.join(strays[:3])} but no .index file; copy the checkpoint's "
                              ".index beside them, or pass the directory it was saved in")
        raise SourceError(f"{p}: no TensorFlow checkpoint here (no .index file, no variables/)")
    steps = [_step_of(c) for c in candidates]
    series = {re.sub(r"-\d+$", "", c) for c in candidates}
    if len(candidates) == 1 or (len(series) == 1 and None not in steps and len(set(steps)) == len(steps)):
        return max(candidates, key=lambda c: _step_of(c) or 0)
    shown = ", ".join(candidates[:5]) + (", ..." if len(candidates) > 5 else "")
    step_hint = " or --step N" if any(s is not None for s in steps) else ""
    raise SourceError(f"{p}: holds {len(candidates)} checkpoints ({shown}) and no 'checkpoint' state file "
                      f"naming one; pass a prefix such as {p / candidates[-1]}{step_hint}")


def _strays(p: Path) -> list[str]:
    """``.data-…`` and ``.meta`` files in directory ``p``: checkpoint files without their index."""
    return sorted(q.name for q in p.iterdir()
                  if (q.name.endswith(".meta") or _DATA_SUFFIX.search(q.name)) and q.is_file())


def _state_file_used(path: Path, step: int | None, prefix: Path) -> Path | None:
    """The ``checkpoint`` state file ``resolve_prefix`` read to choose ``prefix``, if any."""
    if _is_state_file(path):
        path = path.parent
    state = path / "checkpoint"
    if step is not None or not path.is_dir() or not _is_state_file(state) or \
            prefix in (path / "variables" / "variables", path / "variables"):
        return None
    return state


def is_tf_bundle(path: object) -> bool:
    """True for anything ``resolve_prefix`` takes, and for a path that is recognisably meant
    as a TF checkpoint but is not usable as given (several checkpoints and no state file, a
    ``.meta`` without its index): opening it then says what to pass instead. A probe: never
    raises (False for what is not a path at all, bytes included, or a path the OS refuses)."""
    try:
        return _claims(path)  # type: ignore[arg-type]
    except (SourceError, OSError, ValueError, TypeError):
        return False


def _claims(path: str | os.PathLike) -> bool:
    try:
        resolve_prefix(path)
        return True
    except SourceError:
        pass
    p = Path(path)
    if p.is_dir():
        return _is_state_file(p / "checkpoint") or any(q.is_file() for q in p.glob("*.index")) or bool(_strays(p))
    return p.is_file() and (p.name.endswith(".meta") or bool(_DATA_SUFFIX.search(p.name)))


def _checked_nbytes(e: Entry, where: str) -> int:
    """shape x itemsize, checked for overflow; TF's own reader had CVEs here."""
    return checked_nbytes(e.shape, e.dtype, f"{where}: tensor {e.name!r}")


# ----------------------------------------------------------------- slices

@dataclass
class _Part:
    """A stored partition (or a sub-row of one) of a partitioned tensor."""

    extents: list[tuple[int, int]]   # (start, length) resolved, per remaining dim
    base: int                         # byte offset of this part's data within the unit
    entry: Entry                     # the slice's own entry (file, offset, crc)
    unit: str

    def sub(self, row: int, itemsize_: int) -> _Part:
        start, _ = self.extents[0]
        row_bytes = math.prod(l for _, l in self.extents[1:]) * itemsize_
        return _Part(self.extents[1:], self.base + (row - start) * row_bytes, self.entry, self.unit)


class TFBundleSource(Source):
    """A TensorFlow bundle checkpoint, read without TensorFlow."""

    format = "tf-checkpoint"
    stores_checksums = True

    def __init__(self, path: str | os.PathLike, step: int | None = None) -> None:
        self.prefix = resolve_prefix(path, step)
        self.index_path = Path(str(self.prefix) + ".index")
        self._state_file = _state_file_used(Path(path), step, self.prefix)
        self._fds: dict[int, int] = {}
        self._fd_lock = threading.Lock()
        with _gc_paused():
            self._load_index()

    # -- listing

    @property
    def location(self) -> str:
        return str(self.prefix)

    def data_path(self, shard: int) -> Path:
        return Path(self._data_file(shard))

    def _data_file(self, shard: int) -> str:
        """The path of data shard ``shard``, built once per shard."""
        path = self._data_files.get(shard)
        if path is None:
            path = self._data_files[shard] = f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}"
        return path

    def _load_index(self) -> None:
        where = str(self.index_path)
        self.num_shards = 1
        self._data_files: dict[int, str] = {}
        self._fields, raw_slices = self._read_entries(where)
        self._entries_built: dict[str, Entry] | None = None
        self._sizes: dict[int, int | None] = {}
        for s in range(self.num_shards):
            try:
                self._sizes[s] = os.stat(self._data_file(s)).st_size
            except FileNotFoundError:
                self._sizes[s] = None
        self._parts: dict[str, list[_Part]] = {}
        self._units_built: dict[str, Unit] | None = None
        self._by_name: dict[str, TensorInfo] | None = None
        self._infos = _infos(self._fields, *self._check_entries(raw_slices, where), self._graph_roles())

    @property
    def _entries(self) -> dict[str, Entry]:
        """Each tensor's Entry by name, made from ``_fields`` on first use (reading; a listing
        needs none)."""
        if self._entries_built is None:
            f = self._fields
            self._entries_built = dict(zip(f.names, map(tuple.__new__, repeat(Entry), zip(*f))))
        return self._entries_built

    def _entry_named(self, name: str) -> Entry | None:
        """The Entry of tensor ``name``, or None; without making every Entry (names are in key
        order: UTF-8 sorts as its code points do)."""
        if self._entries_built is not None:
            return self._entries_built.get(name)
        names = self._fields.names
        i = bisect_left(names, name)
        return Entry._make(column[i] for column in self._fields) if i < len(names) and names[i] == name else None

    def _check_entries(self, raw_slices: dict[bytes, bytes], where: str) -> _Rows:
        """Each tensor's size and checksum, every extent and partition checked: all at once where
        nothing is unusual (``_rows_at_once``), else one by one."""
        rows = self._rows_at_once(self._fields, where)
        if rows is not None:
            return rows
        sizes: list[int] = []
        checksums: list[str | None] = []
        nbytes_of: dict[tuple[tuple[int, ...], str], int] = {}  # checked shape x dtype sizes seen
        for e in self._entries.values():
            nbytes, checksum = self._row(e, raw_slices, where, nbytes_of)
            sizes.append(nbytes)
            checksums.append(checksum)
        return sizes, checksums

    def _row(self, e: Entry, raw_slices: dict[bytes, bytes], where: str,
             nbytes_of: dict[tuple[tuple[int, ...], str], int]) -> tuple[int, str | None]:
        """One entry's size and checksum, its extent or partitions checked (``nbytes_of``: the
        checked sizes of the shapes and dtypes seen so far)."""
        nbytes = nbytes_of.get((e.shape, e.dtype))
        if nbytes is None:
            nbytes = nbytes_of[(e.shape, e.dtype)] = _checked_nbytes(e, where)
        checksum = None
        if e.slices:
            self._parts[e.name] = self._resolve_slices(e, raw_slices, where)
        else:
            fsize = self._sizes.get(e.shard) if e.shard < self.num_shards else None
            if e.size != nbytes or fsize is None or e.offset + e.size > fsize or e.dtype == STRING:
                self._check_extent(e, nbytes, where)  # the rare cases, each its own message
            if e.crc is not None:
                checksum = f"crc32c:{e.crc}"
        return (e.size if e.dtype == STRING else nbytes), checksum

    def _rows_at_once(self, fields: _Fields, where: str) -> _Rows | None:
        """``_check_entries``'s rows where no entry needs a message: no tensor is partitioned, every
        shape's size fits int64, every size is its shape's (a string tensor's is what it stores),
        every extent lies in its shard; checked column by column (C-level ``map`` and list
        comparisons). None where some entry is unusual: ``_row`` then meets the first problem."""
        shapes, dtypes, sizes, shards = fields.shapes, fields.dtypes, fields.sizes, fields.shards
        pairs = list(zip(shapes, dtypes))
        try:
            nbytes_of = {p: checked_nbytes(p[0], p[1], where) for p in set(pairs)}
        except ShardconvError:
            return None
        nbytes = list(map(nbytes_of.__getitem__, pairs))
        fsizes: dict[int, Any] = {s: self._sizes.get(s) if s < self.num_shards else None for s in set(shards)}
        if STRING in dtypes:  # a string tensor's size is what it stores (its extent is checked below)
            for i in [i for i, d in enumerate(dtypes) if d == STRING]:
                nbytes[i] = sizes[i]
        if any(fields.slices) or None in fsizes.values() or nbytes != sizes or \
                not all(map(operator.le, map(operator.add, fields.offsets, sizes), map(fsizes.__getitem__, shards))):
            return None
        crcs = fields.crcs
        checksums: list[str | None] = [None if c is None else f"crc32c:{c}" for c in crcs] if None in crcs else \
            list(map("crc32c:{}".format, crcs))
        return nbytes, checksums

    def _read_entries(self, where: str) -> tuple[_Fields, dict[bytes, bytes]]:
        """The index's tensor entries field by field and its raw slice entries by key; reads the
        header. A block's entries are decoded together (``EntryReader.columns``); errors come in
        the order reading the entries one by one meets them."""
        fields = _Fields([], [], [], [], [], [], [], [])
        raw_slices: dict[bytes, bytes] = {}
        header_seen = False
        read_entry = EntryReader(where)
        with SSTable(self.index_path) as table:
            for keys, values in table.block_lists():
                start = 0  # the header (key "") and slice keys (a 0 byte first) sort before every name
                while start < len(keys) and (not keys[start] or keys[start][0] == 0):
                    if not keys[start]:
                        header_seen = True
                        self._parse_header(values[start], where)
                    else:
                        raw_slices[keys[start]] = values[start]
                    start += 1
                if start:
                    keys, values = keys[start:], values[start:]
                try:
                    names = list(map(bytes.decode, keys))
                except UnicodeDecodeError:
                    names = list(map(bytes.decode, keys[:_first_not_utf8(keys)]))
                    read_entry.columns(names, values[:len(names)])  # an error in an entry before comes first
                    raise FormatError(f"{where}: tensor name {keys[len(names)]!r} is not UTF-8") from None
                _extend(fields, names, read_entry.columns(names, values))
        if not header_seen:
            raise FormatError(f"{where}: no bundle header (key \"\"); not a TF2-format checkpoint index")
        return fields, raw_slices

    def _graph_roles(self) -> dict[str, tuple[SourceRole, str | None]]:
        """TF2 checkpoints: each variable's role and model name, with its ``full_name``, by
        checkpoint key, from the object graph (see tf_object_graph); the graph's own entry is
        ``meta``. Nothing for a TF1 checkpoint."""
        graph = self._entry_named(OBJECT_GRAPH_KEY)
        if graph is None or graph.dtype != STRING:
            return {}
        from . import tf_object_graph

        roles = cast(dict[str, tuple[SourceRole, str | None]],  # a fresh dict, which this may add to
                     tf_object_graph.roles(self._read_strings(graph)[0], str(self.data_path(graph.shard))))
        roles[OBJECT_GRAPH_KEY] = (SourceRole(Role.META), None)
        return roles

    def _parse_header(self, value: bytes, where: str) -> None:
        endianness = 0
        for num, wt, val in fields(value, f"{where}: bundle header"):
            if num == 1 and wt == 0:
                self.num_shards = as_int64(val)
            elif num == 2 and wt == 0:
                endianness = val
        if not 1 <= self.num_shards <= 1_000_000:
            raise FormatError(f"{where}: bundle header declares {self.num_shards} shards")
        if endianness != 0:
            raise UnsupportedError(f"{where}: big-endian checkpoint; shardconv reads little-endian bundles only")

    def _check_extent(self, e: Entry, nbytes: int, where: str) -> None:
        if e.shard >= self.num_shards:
            raise FormatError(f"{where}: tensor {e.name!r} is in shard {e.shard} but the bundle has {self.num_shards}")
        if e.dtype != STRING and e.size != nbytes:
            raise FormatError(f"{where}: tensor {e.name!r} stores {e.size} bytes but shape {list(e.shape)} "
                              f"x {e.dtype} needs {nbytes}")
        if e.dtype == STRING and e.size < 0:
            raise FormatError(f"{where}: string tensor {e.name!r} has negative size")
        fsize = self._sizes.get(e.shard)
        if fsize is not None and e.offset + e.size > fsize:
            raise FormatError(f"{self.data_path(e.shard)}: tensor {e.name!r} needs bytes "
                              f"[{e.offset}, {e.offset + e.size}) but the file has {fsize} (truncated?)")

    def _resolve_slices(self, e: Entry, raw: dict[bytes, bytes], where: str) -> list[_Part]:
        parts = []
        covered = 0
        for i, ext in enumerate(e.slices):
            if len(ext) != len(e.shape):
                raise FormatError(f"{where}: tensor {e.name!r} slice {i} has {len(ext)} dims, shape has {len(e.shape)}")
            resolved = []
            for (start, length), dim in zip(ext, e.shape):
                if length == -1:
                    start, length = 0, dim
                if start < 0 or length < 0 or start + length > dim:
                    raise FormatError(f"{where}: tensor {e.name!r} slice {i} extent {ext} outside shape {list(e.shape)}")
                resolved.append((start, length))
            key = slice_key(e.name, ext)
            if key not in raw:
                raise FormatError(f"{where}: tensor {e.name!r} slice {i} ({ext}) has no stored entry")
            se = parse_entry(e.name, raw[key], where)
            if se.dtype != e.dtype or tuple(l for _, l in resolved) != se.shape:
                raise FormatError(f"{where}: tensor {e.name!r} slice {i} is {se.dtype}{list(se.shape)}, "
                                  f"expected {e.dtype}{[l for _, l in resolved]}")
            nbytes = _checked_nbytes(se, where)
            self._check_extent(se, nbytes, where)
            unit = f"{e.name}@{';'.join(f'{s},{l}' for s, l in resolved)}"
            parts.append(_Part(resolved, 0, se, unit))
            covered += math.prod(l for _, l in resolved)
        if covered != math.prod(e.shape) or not _disjoint(parts):
            raise FormatError(f"{where}: partitions of tensor {e.name!r} do not tile its shape {list(e.shape)}")
        return parts

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        if self._by_name is None:
            self._by_name = {t.name: t for t in self._infos}
        t = self._by_name.get(name)
        if t is not None:
            return t
        raise SourceError(f"{self.location}: no tensor named {name!r}")

    def units(self) -> dict[str, Unit]:
        if self._units_built is None:  # built on first use: listing needs none
            self._units_built = self._build_units()
        return dict(self._units_built)

    def _build_units(self) -> dict[str, Unit]:
        """One unit per stored checksum: a whole tensor's, or each partition's (``tensor@start,len;...``)."""
        units: dict[str, Unit] = {}
        for name, e in self._entries.items():
            parts = self._parts.get(name)
            if parts is not None:
                for p in parts:
                    if p.entry.crc is not None:
                        units[p.unit] = Unit(p.entry.size, "crc32c", unmask(p.entry.crc), name,
                                             self._data_file(p.entry.shard))
            elif e.crc is not None:
                units[name] = Unit(e.size, "crc32c", unmask(e.crc), name, self._data_file(e.shard))
        return units

    def input_files(self) -> list[str]:
        """The .index, every .data shard that exists and the ``checkpoint`` state file if it chose the prefix."""
        files = [self.index_path] + [self.data_path(s) for s in range(self.num_shards) if self._sizes.get(s) is not None]
        if self._state_file is not None:
            files.append(self._state_file)
        return [os.path.abspath(f) for f in files]

    # -- reading

    def _fd(self, shard: int, tensor: str) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            return fd
        with self._fd_lock:
            if shard in self._fds:
                return self._fds[shard]
            path = self.data_path(shard)
            if self._sizes.get(shard) is None:
                raise SourceError(f"{path}: data shard {shard} of {self.num_shards} is missing "
                                  f"(needed for tensor {tensor!r})")
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise SourceError(f"{path}: cannot open data shard for tensor {tensor!r}: {e.strerror}") from None
            self._fds[shard] = fd
            return fd

    def _pread_into(self, e: Entry, pos: int, out: memoryview) -> None:
        pread_exact(self._fd(e.shard, e.name), out, e.offset + pos, self.data_path(e.shard), e.name)

    def read_into(self, name: str, offset: int, out: memoryview) -> list[Segment]:
        out = out.cast("B") if out.format != "B" else out
        e = self._entry(self._entries, name, "tensor")
        if e.dtype == STRING:
            raise SourceError(f"{self.location}: {name!r} is a string tensor; use read_strings")
        if name in self._parts:
            return self._read_parts(e, offset, out)
        if offset < 0 or offset + len(out) > e.size:
            raise SourceError(f"{self.location}: read of [{offset}, {offset + len(out)}) outside tensor {name!r} ({e.size} bytes)")
        self._pread_into(e, offset, out)
        return [Segment(name, offset, len(out), crc32c(out))]

    def raw_range(self, name: str, offset: int, length: int) -> RawRange | None:
        """A plain tensor's bytes are stored verbatim in its data file (checksum unit: the tensor)."""
        e = self._entry(self._entries, name, "tensor")
        if e.dtype == STRING or name in self._parts:
            return None
        if offset < 0 or length < 0 or offset + length > e.size:
            raise SourceError(f"{self.location}: read of [{offset}, {offset + length}) outside tensor {name!r} ({e.size} bytes)")
        return RawRange(self._fd(e.shard, e.name), e.offset + offset, str(self.data_path(e.shard)), name, name,
                        offset, "crc32c")

    # Partitioned tensors: a byte range of the full tensor is split into whole
    # rows (each part contributes a rectangular block) and partial rows
    # (recursing into the row's sub-tensor).
    def _read_parts(self, e: Entry, offset: int, out: memoryview) -> list[Segment]:
        isz = itemsize(e.dtype)
        if offset % isz or len(out) % isz:
            raise SourceError(f"{self.location}: unaligned read of partitioned tensor {e.name!r}")
        import numpy as np

        flat = np.frombuffer(out, dtype=numpy_dtype(e.dtype)) if len(out) else np.empty(0, numpy_dtype(e.dtype))
        segments: list[Segment] = []
        self._read_block(e, e.shape, self._parts[e.name], offset // isz, flat, segments)
        return segments

    def _read_block(self, e: Entry, shape: tuple[int, ...], parts: list[_Part], e0: int,
                    out: np.ndarray, segs: list[Segment]) -> None:
        import numpy

        n = out.size
        if n == 0:
            return
        row = math.prod(shape[1:])
        r0, c0 = divmod(e0, row)
        if c0 or n < row:
            take = min(n, row - c0)
            sub = [p.sub(r0, out.itemsize) for p in parts if p.extents[0][0] <= r0 < p.extents[0][0] + p.extents[0][1]]
            self._read_block(e, shape[1:], sub, c0, out[:take], segs)
            self._read_block(e, shape, parts, e0 + take, out[take:], segs)
            return
        nrows = n // row
        block = out[: nrows * row].reshape((nrows,) + shape[1:])
        for p in parts:
            s, l = p.extents[0]
            lo, hi = max(r0, s), min(r0 + nrows, s + l)
            if lo >= hi:
                continue
            prow = math.prod(x for _, x in p.extents[1:])
            tmp = numpy.empty((hi - lo,) + tuple(x for _, x in p.extents[1:]), dtype=out.dtype)
            pos = p.base + (lo - s) * prow * out.itemsize
            mv = memoryview(tmp.reshape(-1).view(numpy.uint8).data)
            self._pread_into(p.entry, pos, mv)
            segs.append(Segment(p.unit, pos, len(mv), crc32c(mv)))
            index = (slice(lo - r0, hi - r0),) + tuple(slice(st, st + ln) for st, ln in p.extents[1:])
            block[index] = tmp
        if nrows * row < n:
            self._read_block(e, shape, parts, e0 + nrows * row, out[nrows * row:], segs)

    def read_strings(self, name: str) -> list[bytes]:
        return self._read_strings(self._entry(self._entries, name, "tensor"))

    def _read_strings(self, e: Entry) -> list[bytes]:
        """``read_strings`` of the tensor whose entry is ``e``."""
        name = e.name
        if e.dtype != STRING:
            raise SourceError(f"{self.location}: {name!r} is not a string tensor")
        if e.size > MAX_STRING_TENSOR_BYTES:
            raise UnsupportedError(f"{self.location}: string tensor {name!r} is {e.size} bytes, over the "
                                   f"{MAX_STRING_TENSOR_BYTES}-byte limit for string tensors")
        buf = bytearray(e.size)
        self._pread_into(e, 0, memoryview(buf))
        where = f"{self.data_path(e.shard)}: string tensor {name!r}"
        count = math.prod(e.shape)
        if count > e.size:
            raise FormatError(f"{where}: {count} elements cannot fit in {e.size} bytes")
        pos = 0
        lengths = []
        crc = 0
        for _ in range(count):
            ln, pos = read_varint(buf, pos, None, "string length")
            lengths.append(ln)
            # The entry CRC covers each length as uint32 (uint64 if larger), not as a varint.
            crc = crc32c(ln.to_bytes(4 if ln <= 0xFFFFFFFF else 8, "little"), crc)
        if count:
            if pos + 4 > len(buf):
                raise FormatError(f"{where}: truncated before the length checksum")
            crc = crc32c(buf[pos:pos + 4], crc)
            pos += 4
        out = []
        for ln in lengths:
            if pos + ln > len(buf):
                raise FormatError(f"{where}: element lengths exceed the stored {e.size} bytes")
            out.append(bytes(buf[pos:pos + ln]))
            crc = crc32c(out[-1], crc)
            pos += ln
        if pos != len(buf):
            raise FormatError(f"{where}: {len(buf) - pos} trailing bytes after the last element")
        if e.crc is not None and mask(crc) != e.crc:
            raise ChecksumError(f"{where}: checksum mismatch (data corrupt)")
        return out

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


#: ``TensorInfo``'s fields, in order, as ``_infos`` sets them.
_INFO_FIELDS = ("name", "dtype", "shape", "nbytes", "checksum", "extra", "role")


def _slotted_info_class(cls: type) -> bool:
    """True where ``cls`` is a dataclass of exactly ``_INFO_FIELDS``, each held in a slot of its
    own, deriving from nothing but ``object``, whose ``__init__`` does nothing else (no
    ``__post_init__``): what setting each slot of an ``object.__new__`` instance makes too."""
    return (dataclasses.is_dataclass(cls) and tuple(f.name for f in dataclasses.fields(cls)) == _INFO_FIELDS
            and cls.__bases__ == (object,) and getattr(cls, "__slots__", None) == _INFO_FIELDS
            and all(type(cls.__dict__.get(f)) is types.MemberDescriptorType for f in _INFO_FIELDS)
            and not hasattr(cls, "__post_init__"))


_FAST_INFOS = _slotted_info_class(TensorInfo)


def _extend(fields: _Fields, names: list[str], columns: Columns) -> None:
    """``fields`` with a block's entries: ``names``, and ``EntryReader.columns``' columns with the
    fields of the entries it decoded one by one put in their places."""
    n = len(fields.names)
    lists: list[list[Any]] = list(fields)
    mores: list[list[Any]] = [names, *columns[:-1], [()] * len(names)]
    for column, more in zip(lists, mores):
        column += more
    for i, e in columns[-1].items():
        for column, value in zip(lists, e):
            column[n + i] = value


def _infos(fields: _Fields, sizes: list[int], checksums: list[str | None],
           roles: dict[str, tuple[SourceRole, str | None]]) -> list[TensorInfo]:
    """A TensorInfo per tensor (its entry's fields, size, checksum), with its recorded role and
    model name. Where ``TensorInfo`` is the slotted frozen dataclass ``_slotted_info_class``
    checks, they are made all at once, field by field: an instance each from ``object.__new__``,
    then each slot set by a C-level ``map`` of its descriptor (what ``__init__`` does one instance
    at a time through ``object.__setattr__``: 2x as long, a fifth of listing 100 000 tensors)."""
    names, shards, sliced = fields.names, fields.shards, list(map(bool, fields.slices))
    if roles:
        recorded = list(map(roles.get, names))
        extras = [{"shard": s, "sliced": f} if r is None or r[1] is None else
                  {"shard": s, "sliced": f, "full_name": r[1]} for s, f, r in zip(shards, sliced, recorded)]
        kinds: list[SourceRole | None] = [None if r is None else r[0] for r in recorded]
    else:
        extras = [{"shard": s, "sliced": f} for s, f in zip(shards, sliced)]
        kinds = [None] * len(names)
    if not _FAST_INFOS:
        return list(map(TensorInfo, names, fields.dtypes, fields.shapes, sizes, checksums, extras, kinds))
    infos = list(map(object.__new__, repeat(TensorInfo, len(names))))
    columns: list[list[Any]] = [names, fields.dtypes, fields.shapes, sizes, checksums, extras, kinds]
    for name, column in zip(_INFO_FIELDS, columns):
        any(map(TensorInfo.__dict__[name].__set__, infos, column))  # each __set__ returns None: any() runs all
    return infos


@contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while an index is loaded: that makes ~10 objects a
    tensor, none in a cycle, and every collection meanwhile walks all of them (a quarter of
    the CPU of listing 100 000 tensors). It is on again afterwards if it was on before."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _first_not_utf8(keys: list[bytes]) -> int:
    """The index of the first of ``keys`` that is not UTF-8 (there is one)."""
    for i, key in enumerate(keys):
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:
            return i
    raise AssertionError("every key is UTF-8")


def _disjoint(parts: list[_Part]) -> bool:
    if len(parts) > 256:
        return True  # element-count check already done; pairwise test too costly
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            if all(sa < sb + lb and sb < sa + la for (sa, la), (sb, lb) in zip(a.extents, b.extents)):
                return False
    return True
