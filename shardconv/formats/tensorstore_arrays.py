"""TensorStore-backed Zarr arrays as Orbax and t5x store them: metadata, specs, and reading.

The array layer shared by the Orbax source (one Zarr array per leaf, per-array directories
or OCDBT) and the flax msgpack / t5x source (TensorStore specs and legacy ``PLACEHOLDER://``
leaves naming Zarr arrays beside the msgpack file): Zarr metadata parsing
(``zarr_array_info``), t5x spec resolution (``t5x_array``, paths confined to the checkpoint
directory), and ``TsReader``, which reads C-order byte ranges of the arrays, streaming
zstd/gzip/zlib chunks (``chunkstream``) and handing other codecs to TensorStore with a chunk
cache of their largest chunk. Holds no format policy of its own: which leaves exist is the
sources' business. Importing this module does not import TensorStore.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, SourceError, UnsupportedError
from ..util.dtypes import NUMPY_DTYPES, checked_nbytes, dtype_name, is_ml_dtype, itemsize
from . import tsio
from .chunkstream import StreamLayout, StreamReader, stream_bytes, stream_layout
from .regions import box_views, read_bytes_by_elements

MAX_JSON = 256 << 20          # _METADATA of a very large tree is a few MB
MAX_ARRAY_METADATA = 1 << 20  # one .zarray / zarr.json
_OPEN_HANDLES = 8
_MIN_CACHE = 8 << 20           # room for small chunks
_OCDBT_CACHE = 4 << 20         # OCDBT manifest and b-tree nodes (as Orbax, a pool of their own)
_V2_METADATA_KEYS = {"chunks", "compressor", "dtype", "fill_value", "filters", "order", "shape",
                     "dimension_separator", "zarr_format"}


# -- Zarr metadata ----------------------------------------------------------------------

def zarr_dtype(dt: Any, where: str) -> str:
    """A Zarr v2 ``dtype`` (or a TensorStore data type name) as a canonical dtype name."""
    if isinstance(dt, str) and dt in NUMPY_DTYPES and (is_ml_dtype(dt) or dt[:1] not in "<>|="):
        return dt
    try:
        npdt = np.dtype(dt)
        if npdt.byteorder == ">":  # TensorStore reads it in native (little-endian) order
            npdt = npdt.newbyteorder("<")
        return dtype_name(npdt)
    except (TypeError, ValueError, UnsupportedError):
        raise UnsupportedError(f"{where}: dtype {dt!r} is not supported") from None


def parse_json_object(data: bytes, where: str) -> dict[str, Any]:
    """Zarr/Orbax metadata: a JSON object, or one line saying what is wrong."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{where}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: not a JSON object")
    return obj


def read_json_file(p: Path, limit: int = MAX_JSON) -> dict[str, Any]:
    """A JSON object from a metadata file of at most ``limit`` bytes (SourceError if unreadable)."""
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
    if len(chunk) != len(shape) or (all(shape) and not all(chunk)):
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


def is_tensorstore_spec(node: Any) -> bool:
    """A msgpack map that is a TensorStore spec (t5x writes one per large array)."""
    return (isinstance(node, dict) and isinstance(node.get("driver"), str) and "kvstore" in node
            and node["driver"] in ("zarr", "zarr3", "n5", "neuroglancer_precomputed", "array", "json"))


def _spec_dir(spec: dict[str, Any], base_dir: Path, at: str) -> tuple[str, str]:
    """(path relative to ``base_dir``, real absolute path) of the array a t5x spec names;
    only local kvstores (gfile/file) inside ``base_dir`` are accepted."""
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
    return rel, full


_ArrayInfo = tuple[str, tuple[int, ...], int, int]  # zarr_array_info: dtype, shape, zarr_format, chunk bytes


def _spec_metadata(spec: dict[str, Any], full: str, where: str) -> tuple[_ArrayInfo, dict[str, Any], dict[str, Any], bool]:
    """(array info, Zarr metadata for streaming, open spec without kvstore, assume_metadata)
    of a t5x array: its own ``.zarray``/``zarr.json`` when present, else the spec's metadata."""
    driver = spec["driver"]
    md: dict[str, Any] = spec["metadata"] if isinstance(spec.get("metadata"), dict) else {}
    marker = Path(full) / ("zarr.json" if driver == "zarr3" else ".zarray")
    if marker.is_file():
        stored = read_json_file(marker, MAX_ARRAY_METADATA)
        info = zarr_array_info(stored, where)
        if "shape" in md and tuple(md["shape"]) != info[1]:
            raise FormatError(f"{where}: spec says shape {md['shape']}, {marker.name} says {list(info[1])}")
        return info, stored, {"driver": driver}, False
    if driver != "zarr":
        raise FormatError(f"{where}: no zarr.json (incomplete checkpoint?)")
    md = {k: v for k, v in md.items() if k in _V2_METADATA_KEYS}
    dt = spec.get("dtype") or md.get("dtype")
    if "shape" not in md or dt is None:
        raise FormatError(f"{where}: no .zarray, and the spec does not carry shape and dtype")
    info = zarr_array_info({**md, "dtype": dt, "zarr_format": 2}, where)
    md.setdefault("chunks", list(info[1]))
    return info, md, {"driver": "zarr", "dtype": info[0], "metadata": md}, True


def t5x_array(spec: dict[str, Any], base_dir: Path, name: str, where: str) -> TsArray:
    """The array a t5x TensorStore spec names, with its kvstore rewritten to a local
    ``file`` path under ``base_dir`` (paths leading outside it are refused)."""
    at = f"{where}: leaf {name!r}"
    driver = spec["driver"]
    if driver not in ("zarr", "zarr3"):
        raise UnsupportedError(f"{at}: TensorStore driver {driver!r} is not supported (zarr and zarr3 are)")
    rel, full = _spec_dir(spec, base_dir, at)
    arr_where = f"{where}: array {rel.rstrip('/')!r}"
    (dtype, shape, _, chunk), stream_meta, open_spec, assume = _spec_metadata(spec, full, arr_where)
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
