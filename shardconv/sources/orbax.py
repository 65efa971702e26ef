"""Orbax checkpoints and t5x TensorStore checkpoints, read by region through TensorStore.

**Orbax** (``orbax.checkpoint``, PyTree/Standard handlers): a checkpoint directory holds
``_METADATA`` (the tree: each leaf's keys and value type), one Zarr array per leaf, and
``_sharding``. Arrays are either one directory per leaf (``params.dense.kernel/``, the
TensorStore-per-array layout) or, with ``use_ocdbt``, keys of one OCDBT database
(``manifest.ocdbt``, ``d/``, ``ocdbt.process_N/``). Listing reads ``_METADATA`` and each
array's ``.zarray``/``zarr.json`` only; values are read with ``ts.open`` on the
kvstore spec Orbax itself uses (OCDBT included), never through Orbax's restore. A
directory of steps (``ckpt_dir/1234/...``, also ``ckpt_dir/1234/<item>/...`` as
``CheckpointManager`` writes them) opens the latest step, or ``step=N``; several items
in one step are listed under their item names, or one is chosen with ``item=``.
The legacy aggregate layout (Orbax before about 0.5) also has a msgpack ``checkpoint``
file in the item: a leaf whose value is stored there (``skip_deserialize``) is read from it
by offset (``flax_msgpack``), a ``PLACEHOLDER://`` leaf from its array, as Orbax restores
them. Without ``_METADATA`` such a directory is read by ``T5xSource``: the placeholders
then name the array directories beside the file.

**t5x** TensorStore checkpoints: a msgpack ``checkpoint`` file whose leaves are inline
values or TensorStore specs (``{"driver": "zarr", "kvstore": {"driver": "gfile",
"path": "target.encoder.x/"}, "metadata": {...}}``). The msgpack file is walked by
``flax_msgpack``; each spec's path is rewritten to a local ``file`` kvstore under the
checkpoint directory (a path leading outside it is refused), and when the array has no
``.zarray`` the spec's own metadata is used (``assume_metadata``). A model directory of
``checkpoint_N/`` steps opens the latest, or ``step=N``.

Memory: Orbax writes one chunk per shard (up to 2 GiB), and TensorStore decodes a
whole chunk to read any part of it. Zarr v2 and v3 chunks compressed with zstd, gzip or
zlib (or not at all), which is what Orbax and t5x write, are therefore read as streams
(``chunkstream``): a few MiB at a time whatever the chunk size. Other arrays (sharding
codecs, blosc, filters) are read by TensorStore with a chunk cache of their largest chunk, so a
chunk read piecewise is decoded once; for those, peak memory is the budget plus about
two such chunks. Neither format records checksums.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.plan import check_name
from ..core.types import Segment, TensorInfo
from ..errors import FormatError, SourceError, UnsupportedError
from ..formats import tsio
from ..formats.chunkstream import StreamLayout, StreamReader, stream_bytes, stream_layout
from ..formats.regions import box_views, read_bytes_by_elements
from ..frontend import option, option_name
from ..util.dtypes import NUMPY_DTYPES, checked_nbytes, itemsize
from .base import Source, walk_files
from .flax_msgpack import PLACEHOLDER_PREFIXES, FlaxMsgpackSource
from .zarr import parse_json_object, zarr_dtype

_MAX_JSON = 256 << 20          # _METADATA of a very large tree is a few MB
_MAX_ARRAY_METADATA = 1 << 20  # one .zarray / zarr.json
_OPEN_HANDLES = 8
_MIN_CACHE = 8 << 20           # room for small chunks
_OCDBT_CACHE = 4 << 20         # OCDBT manifest and b-tree nodes (as Orbax, a pool of their own)
_STEP = re.compile(r"^(?:.*?[_-])?(\d+)$")  # "1234", "checkpoint_1234", "ckpt-1234"
#: Orbax value types of empty containers and None: nothing to convert.
_EMPTY_TYPES = {"None", "Dict", "List", "Tuple", "NamedTuple"}
_V2_METADATA_KEYS = {"chunks", "compressor", "dtype", "fill_value", "filters", "order", "shape",
                     "dimension_separator", "zarr_format"}


# -- locating checkpoints ---------------------------------------------------------------

def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:
        return False


def _orbax_items(d: Path) -> list[Path]:
    """Item directories of an Orbax step (``CheckpointManager``: ``1234/default/_METADATA``).
    Without the step's ``_CHECKPOINT_METADATA``, children named like steps are steps, not items."""
    try:
        items = sorted(c for c in d.iterdir() if c.is_dir() and (c / "_METADATA").is_file())
    except OSError:
        return []
    if not (d / "_CHECKPOINT_METADATA").is_file():
        items = [c for c in items if not _STEP.match(c.name)]
    return items


def _is_orbax_checkpoint(d: Path) -> bool:
    return (d / "_METADATA").is_file() or bool(_orbax_items(d))


def _is_t5x_checkpoint(d: Path) -> bool:
    return _is_msgpack_map(d / "checkpoint")


def _is_msgpack_map(p: Path) -> bool:
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as f:
            b = f.read(1)
        return bool(b) and (0x80 <= b[0] <= 0x8F or b[0] in (0xDE, 0xDF))
    except OSError:
        return False


def _steps(root: Path, is_checkpoint: Any) -> dict[int, Path]:
    """Finished step directories under ``root`` by step number (temporary ones skipped)."""
    out: dict[int, Path] = {}
    try:
        children = sorted(root.iterdir())
    except OSError:
        return out
    for c in children:
        m = _STEP.match(c.name)
        if m and "tmp" not in c.name and _is_dir(c) and is_checkpoint(c):
            out.setdefault(int(m.group(1)), c)
    return out


def _choose_step(root: Path, step: int | None, is_checkpoint: Any, kind: str) -> Path:
    if is_checkpoint(root):
        m = _STEP.match(root.name)
        if step is not None and not (m and int(m.group(1)) == step):
            raise SourceError(f"{root}: is a single {kind} checkpoint, not a directory of steps; "
                              f"{option('step', step)} does not apply (point at its parent directory)")
        return root
    steps = _steps(root, is_checkpoint)
    if not steps:
        raise SourceError(f"{root}: not a {kind} checkpoint and holds no step directories of one")
    if step is None:
        return steps[max(steps)]
    if step not in steps:
        shown = ", ".join(map(str, sorted(steps)[-10:]))
        raise SourceError(f"{root}: no step {step} (steps here: {shown})")
    return steps[step]


def is_orbax(src: Any) -> bool:
    """An Orbax checkpoint (``_METADATA``), a step holding items, or a directory of steps."""
    if not isinstance(src, (str, os.PathLike)) or "://" in os.fspath(src):
        return False
    try:
        p = Path(src)
        return _is_dir(p) and (_is_orbax_checkpoint(p) or bool(_steps(p, _is_orbax_checkpoint)))
    except (OSError, ValueError):
        return False


def is_t5x(src: Any) -> bool:
    """A t5x checkpoint: a ``checkpoint`` msgpack file, its directory, or a directory of
    ``checkpoint_N`` steps."""
    if not isinstance(src, (str, os.PathLike)) or "://" in os.fspath(src):
        return False
    try:
        p = Path(src)
        if p.name == "checkpoint" and _is_msgpack_map(p):
            return True
        return _is_dir(p) and (_is_t5x_checkpoint(p) or bool(_steps(p, _is_t5x_checkpoint)))
    except (OSError, ValueError):
        return False


# -- Zarr metadata ----------------------------------------------------------------------

def _read_json_file(p: Path, limit: int = _MAX_JSON) -> dict[str, Any]:
    try:
        size = p.stat().st_size
        if size > limit:
            raise FormatError(f"{p}: {size} bytes of metadata is more than the {limit} allowed")
        return parse_json_object(p.read_bytes(), str(p))
    except FileNotFoundError:
        raise SourceError(f"{p}: not found") from None
    except OSError as e:
        raise SourceError(f"{p}: cannot read: {e.strerror}") from None


def _shape(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v):
        raise FormatError(f"{where}: bad shape {v!r}")
    return tuple(v)


def zarr_array_info(meta: dict[str, Any], where: str) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, zarr_format, bytes of one decoded chunk) from ``.zarray`` or ``zarr.json``."""
    if meta.get("zarr_format") == 3:
        if meta.get("node_type", "array") != "array":
            raise FormatError(f"{where}: not an array")
        dtype = zarr_dtype(meta.get("data_type"), where)
        shape = _shape(meta.get("shape"), where)
        grid = ((meta.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape", list(shape))
        for codec in meta.get("codecs") or []:  # a sharded array is read inner chunk by inner chunk
            if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
                grid = (codec.get("configuration") or {}).get("chunk_shape", grid)
        fmt = 3
    else:
        dtype = zarr_dtype(meta.get("dtype"), where)
        shape = _shape(meta.get("shape"), where)
        grid = meta.get("chunks", list(shape))
        fmt = 2
    chunk = _shape(grid, where)
    checked_nbytes(shape, dtype, where)
    if len(chunk) != len(shape) or (math.prod(shape) and not all(chunk)):
        raise FormatError(f"{where}: bad chunk shape {list(chunk)} for shape {list(shape)}")
    return dtype, shape, fmt, checked_nbytes(chunk, dtype, where)


# -- reading through TensorStore ---------------------------------------------------------

@dataclass
class TsArray:
    """One array behind a TensorStore spec, as listed (opened only when read)."""

    where: str                   # "<checkpoint>: array <name>" for messages
    spec: dict[str, Any]
    dtype: str
    shape: tuple[int, ...]
    chunk_bytes: int
    assume_metadata: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    stream: StreamLayout | None = None   # set when chunks can be decoded as streams (chunkstream)


def context(chunk_cache: int) -> Any:
    """A TensorStore context: a chunk cache of ``chunk_cache`` bytes and OCDBT's node cache."""
    ts = tsio.tensorstore("Orbax / t5x input")
    return ts.Context({"cache_pool": {"total_bytes_limit": chunk_cache},
                       "cache_pool#ocdbt": {"total_bytes_limit": _OCDBT_CACHE}}, parent=tsio.context())


def cache_bytes(arrays: Any) -> int:
    """Chunk cache for the arrays TensorStore decodes whole: their largest chunk."""
    return max([a.chunk_bytes for a in arrays if a.stream is None] + [0])


def array_dirs(arrays: Any) -> list[Path]:
    """Local directories holding these arrays' chunks (per-array layouts)."""
    return sorted({Path(a.spec["kvstore"]["path"]) for a in arrays if a.spec["kvstore"].get("driver") == "file"})


def reader_bytes(arrays: Any) -> int:
    """What reading these arrays holds beside the budget: TensorStore itself, its chunk
    cache (chunks it decodes whole) and the largest set of open chunk streams."""
    arrays = list(arrays)
    if not arrays:
        return 0
    streams = max([stream_bytes(a.stream, a.shape) for a in arrays if a.stream is not None] + [0])
    return tsio.TENSORSTORE_BYTES + cache_bytes(arrays) + _MIN_CACHE + _OCDBT_CACHE + streams


class TsReader:
    """Opens TensorStore arrays lazily (a few at a time) and reads C-order byte ranges.

    Arrays with a ``stream`` layout are read chunk stream by chunk stream (chunkstream);
    the others through ``ts.open``. One context per source; its chunk cache holds
    ``chunk_cache`` bytes (the largest chunk TensorStore must decode whole), so sequential
    reads decode each such chunk once.
    """

    def __init__(self, chunk_cache: int) -> None:
        ts = tsio.tensorstore("Orbax / t5x input")
        self._ts = ts
        self._lock = threading.Lock()
        # The pool must exceed the chunk it holds (a pool exactly one chunk large retains nothing).
        self._ctx = context(int(chunk_cache) + _MIN_CACHE)
        self._handles: dict[int, Any] = {}
        self._streams = StreamReader(ts, self._ctx)

    def _handle(self, a: TsArray) -> Any:
        h = self._handles.pop(id(a), None)
        if h is None:
            ts = self._ts
            h = tsio.wrap(FormatError, a.where, lambda: ts.open(
                a.spec, context=self._ctx, read=True, open=True, assume_metadata=a.assume_metadata).result())
            if tuple(h.shape) != a.shape or np.dtype(h.dtype.numpy_dtype) != NUMPY_DTYPES[a.dtype]:
                raise FormatError(f"{a.where}: TensorStore reads {h.dtype.name}{list(h.shape)}, "
                                  f"metadata says {a.dtype}{list(a.shape)}")
            if len(self._handles) >= _OPEN_HANDLES:
                self._handles.pop(next(iter(self._handles)))
        self._handles[id(a)] = h  # most recently used last
        return h

    def read(self, a: TsArray, offset: int, out: memoryview) -> None:
        """Fill ``out`` with bytes [offset, offset+len(out)) of ``a`` in C order."""
        with self._lock:
            read_bytes_by_elements(offset, out, itemsize(a.dtype), lambda lo, hi, buf: self._read_elements(a, lo, hi, buf))

    def _read_elements(self, a: TsArray, lo: int, hi: int, out: memoryview) -> None:
        if a.stream is not None:
            self._streams.read(a.stream, a.shape, a.dtype, lo, hi, out, a.where)
            return
        store = self._handle(a)
        for box, dst in box_views(a.shape, NUMPY_DTYPES[a.dtype], lo, hi, out):
            src = store[box].translate_to[0] if box else store
            try:
                self._ts.array(dst, copy=False, write=True).write(src).result()
            except (ValueError, RuntimeError, OSError) as e:
                line = tsio.first_line(e)
                if "NOT_FOUND" in line or "missing" in line:
                    raise FormatError(f"{a.where}: a chunk is missing ({line}); the checkpoint is incomplete") from None
                raise FormatError(f"{a.where}: {line}") from None

    def close(self) -> None:
        self._handles.clear()
        self._streams.close()


# -- Orbax ------------------------------------------------------------------------------

@dataclass
class _StringLeaf:
    item: Path
    key: str
    value: bytes | None = None  # stored inline in a legacy aggregate file


@dataclass
class _InlineLeaf:
    file: _AggregateFile
    key: str   # its name in the aggregate file
    info: TensorInfo


class _AggregateFile(FlaxMsgpackSource):
    """The msgpack ``checkpoint`` file of a legacy Orbax item, walked lazily: leaves stored
    inline are read from it by offset; placeholders and strings are only recorded (the
    item's ``_METADATA`` says where placeholder arrays are, OCDBT included)."""

    format = "orbax-aggregate"

    def __init__(self, path: Path) -> None:
        self.placeholders: dict[str, str] = {}
        self.strings: dict[str, str] = {}
        super().__init__(path)

    def _text(self, name: str, value: str) -> None:
        if value.startswith(PLACEHOLDER_PREFIXES):
            self.placeholders[name] = value.split("://", 1)[1]
        else:
            self.strings[name] = value


class OrbaxSource(Source):
    """An Orbax checkpoint (either layout), a step of one, or a directory of steps."""

    format = "orbax"

    def __init__(self, path: str | os.PathLike, step: int | None = None, item: str | None = None) -> None:
        root = Path(path)
        if not _is_dir(root):
            raise SourceError(f"{root}: not a directory (an Orbax checkpoint is a directory)")
        self.dir = _choose_step(root, step, _is_orbax_checkpoint, "Orbax")
        items = [self.dir] if (self.dir / "_METADATA").is_file() else _orbax_items(self.dir)
        if item is not None:
            items = [d for d in items if d.name == item]
            if not items:
                raise SourceError(f"{self.dir}: no item {item!r} (items: "
                                  f"{', '.join(d.name for d in _orbax_items(self.dir)) or 'none'})")
        self._items = items
        self._arrays: dict[str, TsArray] = {}
        self._strings: dict[str, _StringLeaf] = {}
        self._string_cache: dict[Path, dict[str, Any]] = {}
        self._inline: dict[str, _InlineLeaf] = {}
        self._aggregates: list[_AggregateFile] = []
        self._order: list[str] = []
        self._reader: TsReader | None = None
        try:
            for d in items:
                self._list_item(d, f"{d.name}/" if len(items) > 1 else "")
            self._infos = [self._make_info(name) for name in self._order]
        except BaseException:
            self.close()
            raise

    def _make_info(self, name: str) -> TensorInfo:
        if name in self._inline:
            return self._inline[name].info
        if name in self._arrays:
            a = self._arrays[name]
            return TensorInfo(name, a.dtype, a.shape, math.prod(a.shape) * itemsize(a.dtype), extra=a.extra)
        return TensorInfo(name, "string", (), len(self._string(name)))

    @property
    def location(self) -> str:
        return str(self.dir)

    def _list_item(self, d: Path, prefix: str) -> None:
        meta = _read_json_file(d / "_METADATA")
        tree = meta.get("tree_metadata")
        if not isinstance(tree, dict):
            raise FormatError(f"{d}/_METADATA: no tree_metadata (not a PyTree checkpoint?)")
        ocdbt = bool(meta.get("use_ocdbt"))
        fmt3 = bool(meta.get("use_zarr3"))
        fill_missing = not meta.get("store_array_data_equal_to_fill_value", False)
        if ocdbt:
            if not (d / "manifest.ocdbt").is_file():
                raise FormatError(f"{d}: use_ocdbt is set but manifest.ocdbt is missing (incomplete checkpoint?)")
            base = {"driver": "ocdbt", "base": {"driver": "file", "path": str(d) + "/"},
                    "cache_pool": "cache_pool#ocdbt"}
        else:
            base = {"driver": "file", "path": str(d) + "/"}
        shardings = self._shardings(d)
        ts = tsio.tensorstore("Orbax input")
        ctx = context(0)
        kv = tsio.wrap(SourceError, str(d), lambda: ts.KvStore.open(base, context=ctx).result())
        marker = "zarr.json" if fmt3 else ".zarray"
        agg = self._aggregate_file(d)
        pending = []
        for entry in tree.values():
            keys = self._keys(entry, d)
            vm = entry.get("value_metadata") if isinstance(entry.get("value_metadata"), dict) else {}
            vtype = vm.get("value_type")
            if vtype in _EMPTY_TYPES:
                continue
            name = prefix + "/".join(keys)
            why = check_name(name)
            if why:
                raise FormatError(f"{d}/_METADATA: leaf name {name!r} is unsafe ({why}); refused")
            if name in self._arrays or name in self._strings:
                raise FormatError(f"{d}/_METADATA: two leaves are named {name!r}")
            pname = ".".join(keys)
            if self._take_inline(agg, "/".join(keys), name, pname, vm, d):
                self._order.append(name)
                continue
            if vtype == "string":
                self._strings[name] = _StringLeaf(d, pname)
                self._order.append(name)
                continue
            if not ocdbt:
                real = os.path.realpath(d / pname)
                if os.path.commonpath([os.path.realpath(d), real]) != os.path.realpath(d) or real == os.path.realpath(d):
                    raise FormatError(f"{d}/_METADATA: leaf {name!r} would be read from outside the checkpoint; refused")
            pending.append((name, pname, vtype, kv.read(f"{pname}/{marker}")))
        for name, pname, vtype, fut in pending:
            r = tsio.wrap(SourceError, f"{d}: leaf {name!r}", fut.result)
            if r.state != "value":
                raise FormatError(f"{d}: leaf {name!r} ({vtype}) has no array data: {pname}/{marker} is missing "
                                  f"{'from the OCDBT database ' if ocdbt else ''}(incomplete or damaged checkpoint)")
            raw = bytes(r.value)
            where = f"{d}: array {pname!r}"
            if len(raw) > _MAX_ARRAY_METADATA:
                raise FormatError(f"{where}: {marker} of {len(raw)} bytes is too large")
            zmeta = parse_json_object(raw, f"{where} {marker}")
            dtype, shape, fmt, chunk = zarr_array_info(zmeta, where)
            if fmt != (3 if fmt3 else 2):
                raise FormatError(f"{where}: {marker} says zarr_format {fmt}, _METADATA says {3 if fmt3 else 2}")
            kvpath = f"{pname}/" if ocdbt else f"{base['path']}{pname}/"
            spec = {"driver": "zarr3" if fmt3 else "zarr", "kvstore": {**base, "path": kvpath},
                    "recheck_cached_data": False, "recheck_cached_metadata": False,
                    "fill_missing_data_reads": fill_missing}
            extra = {"value_type": vtype}
            if pname in shardings:
                extra["sharding"] = shardings[pname]
            self._arrays[name] = TsArray(f"{d}: array {pname!r}", spec, dtype, shape, chunk, extra=extra,
                                         stream=stream_layout(zmeta, dtype, spec["kvstore"], fill_missing))
            self._order.append(name)

    def _aggregate_file(self, d: Path) -> _AggregateFile | None:
        """The item's legacy msgpack ``checkpoint`` file, if it has one (walked, not loaded)."""
        if not _is_msgpack_map(d / "checkpoint"):
            return None
        agg = _AggregateFile(d / "checkpoint")
        self._aggregates.append(agg)
        return agg

    def _take_inline(self, agg: _AggregateFile | None, key: str, name: str, pname: str,
                     vm: dict[str, Any], d: Path) -> bool:
        """Record leaf ``name`` when its value is stored in the aggregate file (as Orbax
        restores it: any value there but a placeholder); False when it is an array."""
        if agg is not None and key in agg._leaves:
            leaf = agg._leaves[key]
            info = TensorInfo(name, leaf.dtype, leaf.shape, math.prod(leaf.shape) * itemsize(leaf.dtype),
                              extra={"value_type": vm.get("value_type")})
            self._inline[name] = _InlineLeaf(agg, key, info)
            return True
        if agg is not None and key in agg.strings:
            self._strings[name] = _StringLeaf(d, pname, agg.strings[key].encode("utf-8"))
            return True
        if agg is not None and key in agg.placeholders and agg.placeholders[key] != pname:
            raise FormatError(f"{agg.path}: leaf {name!r} is a placeholder for {agg.placeholders[key]!r}, "
                              f"but _METADATA stores it as {pname!r}")
        if vm.get("skip_deserialize"):
            where = f"{agg.path} has no value for it" if agg is not None else f"{d}/checkpoint is missing"
            raise FormatError(f"{d}: leaf {name!r} is stored in the msgpack checkpoint file "
                              f"(skip_deserialize), but {where}")
        return False

    @staticmethod
    def _keys(entry: Any, d: Path) -> list[str]:
        km = entry.get("key_metadata") if isinstance(entry, dict) else None
        if not isinstance(km, list) or not km or not all(isinstance(k, dict) and "key" in k for k in km):
            raise FormatError(f"{d}/_METADATA: a tree_metadata entry has no key_metadata")
        return [str(k["key"]) for k in km]

    @staticmethod
    def _shardings(d: Path) -> dict[str, Any]:
        """``_sharding``: base64 param name -> JSON sharding; shown as extra information only."""
        p = d / "_sharding"
        if not p.is_file():
            return {}
        try:
            raw = _read_json_file(p)
            out = {}
            for k, v in raw.items():
                out[base64.b64decode(k).decode("utf-8")] = json.loads(v) if isinstance(v, str) else v
            return out
        except (SourceError, ValueError, UnicodeDecodeError, AttributeError):
            return {}  # informational: a damaged _sharding does not stop the conversion

    def _string(self, name: str) -> str:
        leaf = self._strings[name]
        if leaf.value is not None:
            return leaf.value
        table = self._string_cache.get(leaf.item)
        if table is None:
            table = _read_json_file(leaf.item / "_strings.json")
            self._string_cache[leaf.item] = table
        v = table.get(leaf.key)
        if not isinstance(v, str):
            raise FormatError(f"{leaf.item}/_strings.json: no string for leaf {name!r}")
        return v.encode("utf-8")

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def read_strings(self, name: str) -> list[bytes]:
        if name not in self._strings:
            return super().read_strings(name)
        return [self._string(name)]

    def read_into(self, name: str, offset: int, out: memoryview) -> list[Segment]:
        if name in self._inline:
            leaf = self._inline[name]
            return leaf.file.read_into(leaf.key, offset, self._region(name, offset, out, leaf.info.nbytes))
        a = self._entry(self._arrays, name)
        nbytes = math.prod(a.shape) * itemsize(a.dtype)
        out = self._region(name, offset, out, nbytes)
        if self._reader is None:
            self._reader = TsReader(cache_bytes(self._arrays.values()))
        self._reader.read(a, offset, out)
        return []

    def baseline_bytes(self) -> int:
        return reader_bytes(self._arrays.values())

    def input_files(self) -> list[str]:
        """Every file of the items read: metadata, array chunks or OCDBT manifests and data files."""
        return walk_files(*self._items)

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "step_dir": self.dir.name}

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        for agg in self._aggregates:
            agg.close()



# -- t5x --------------------------------------------------------------------------------

def is_tensorstore_spec(node: Any) -> bool:
    """A msgpack map that is a TensorStore spec (t5x writes one per large array)."""
    return (isinstance(node, dict) and isinstance(node.get("driver"), str) and "kvstore" in node
            and node["driver"] in ("zarr", "zarr3", "n5", "neuroglancer_precomputed", "array", "json"))


def t5x_array(spec: dict[str, Any], base_dir: Path, name: str, where: str) -> TsArray:
    """The array a t5x TensorStore spec names, with its kvstore rewritten to a local
    ``file`` path under ``base_dir`` (paths leading outside it are refused)."""
    at = f"{where}: leaf {name!r}"
    driver = spec["driver"]
    if driver not in ("zarr", "zarr3"):
        raise UnsupportedError(f"{at}: TensorStore driver {driver!r} is not supported (zarr and zarr3 are)")
    kv = spec["kvstore"]
    if isinstance(kv, str):
        scheme, sep, rest = kv.partition("://")
        kv = {"driver": scheme, "path": rest} if sep else {"driver": "file", "path": kv}
    if not isinstance(kv, dict):
        raise FormatError(f"{at}: kvstore {kv!r} is not a spec")
    kdriver = kv.get("driver")
    if kdriver not in ("gfile", "file"):
        raise UnsupportedError(f"{at}: kvstore driver {kdriver!r}: only local paths (gfile/file) relative to the "
                               "checkpoint are read; copy the arrays beside the checkpoint file")
    rel = kv.get("path", "")
    if isinstance(spec.get("path"), str):  # old TensorStore specs: path beside the kvstore
        rel = f"{rel.rstrip('/')}/{spec['path']}" if rel else spec["path"]
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise FormatError(f"{at}: TensorStore path {rel!r} is not a path")
    base_real = os.path.realpath(base_dir)
    full = os.path.realpath(os.path.join(base_dir, rel))
    if os.path.commonpath([base_real, full]) != base_real or full == base_real:
        raise FormatError(f"{at}: TensorStore path {rel!r} leads outside the checkpoint directory {base_dir}; refused")
    if not os.path.isdir(full):
        raise FormatError(f"{at}: its array directory {rel!r} is missing (incomplete checkpoint?)")
    md = spec.get("metadata") if isinstance(spec.get("metadata"), dict) else {}
    marker = Path(full) / ("zarr.json" if driver == "zarr3" else ".zarray")
    arr_where = f"{where}: array {rel.rstrip('/')!r}"
    if marker.is_file():
        stored = _read_json_file(marker, _MAX_ARRAY_METADATA)
        dtype, shape, _, chunk = zarr_array_info(stored, arr_where)
        stream_meta = stored
        if "shape" in md and tuple(md["shape"]) != shape:
            raise FormatError(f"{arr_where}: spec says shape {md['shape']}, {marker.name} says {list(shape)}")
        assume = False
        open_spec: dict[str, Any] = {"driver": driver}
    else:
        if driver != "zarr":
            raise FormatError(f"{arr_where}: no zarr.json (incomplete checkpoint?)")
        md = {k: v for k, v in md.items() if k in _V2_METADATA_KEYS}
        dt = spec.get("dtype") or md.get("dtype")
        if "shape" not in md or dt is None:
            raise FormatError(f"{arr_where}: no .zarray, and the spec does not carry shape and dtype")
        dtype, shape, _, chunk = zarr_array_info({**md, "dtype": dt, "zarr_format": 2}, arr_where)
        md.setdefault("chunks", list(shape))
        assume = True
        open_spec = {"driver": "zarr", "dtype": dtype, "metadata": md}
        stream_meta = md
    kvstore = {"driver": "file", "path": full + "/"}
    open_spec.update({"kvstore": kvstore, "recheck_cached_data": False, "recheck_cached_metadata": False})
    # t5x restores through TensorStore's defaults: a chunk not stored holds the fill value
    stream = stream_layout(stream_meta, dtype, kvstore, True) if driver == "zarr" else None
    return TsArray(arr_where, open_spec, dtype, shape, chunk, assume_metadata=assume, stream=stream)


def placeholder_array(param: str, base_dir: Path, name: str, where: str) -> TsArray:
    """The array a legacy Orbax ``PLACEHOLDER://param`` leaf names: the Zarr array
    ``param/`` beside the msgpack file (``.zarray``, or ``zarr.json`` for zarr3)."""
    driver = "zarr3" if (base_dir / param / "zarr.json").is_file() else "zarr"
    return t5x_array({"driver": driver, "kvstore": {"driver": "file", "path": f"{param}/"}}, base_dir, name, where)


class T5xSource(FlaxMsgpackSource):
    """A t5x checkpoint directory (``checkpoint`` + array directories) or a directory of
    ``checkpoint_N`` steps; the msgpack file itself is read by FlaxMsgpackSource."""

    format = "t5x"

    def __init__(self, path: str | os.PathLike, step: int | None = None) -> None:
        p = Path(path)
        if p.name == "checkpoint" and p.is_file():
            if step is not None:
                raise SourceError(f"{p}: {option_name('step')} applies to a directory of checkpoint_N steps, "
                                  "not to one file")
            f = p
        else:
            f = _choose_step(p, step, _is_t5x_checkpoint, "t5x") / "checkpoint"
        super().__init__(f)
