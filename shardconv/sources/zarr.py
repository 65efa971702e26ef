"""Zarr stores (v2 and v3) and non-OCDBT Orbax checkpoints, read by region.

Chunks whose codecs decode as a stream (``bytes`` alone or with zstd or gzip in v3;
none, zstd, gzip or zlib without filters in v2) are read once, in order, a few MiB at a
time however large the chunk (``chunkstream``). Others (blosc, sharding, transposes) are
read by TensorStore, which decodes a whole chunk for any part of it: a chunk cache of
the largest such chunk decodes each once, and that chunk (decoded plus encoded) is held
within ``--max-memory``, so a budget too small for it is refused before any byte is
written, naming the minimum.

Listing reads metadata only (``zarr.json`` / ``.zarray`` + ``.zattrs``; Orbax's
``_METADATA``), never chunk data. A store written by shardconv carries each tensor's
true name, dtype and CRC32 in the arrays' ``shardconv`` attributes, so ``verify``
checks every tensor's checksum; other stores are listed by path.

Refused: metadata whose names or paths lead outside the store (unsafe names, keys with
``/`` or ``..``, symlinks out of a local store's directory), chunk key encodings other
than Zarr's own, storage transformers, and dtypes NumPy cannot hold in an array
(strings, objects). A missing chunk is an error naming the array, never silently the
fill value (a writer that skipped all-fill chunks, such as zarr-python by default, needs
``allow_missing_chunks=True``). Any TensorStore kvstore URL works as for the sink.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..core.plan import check_name
from ..core.types import Segment, TensorInfo, Unit
from ..errors import FormatError, SourceError, UnsupportedError
from ..formats import tsio
from ..formats.chunkstream import StreamLayout, StreamReader, stream_bytes, stream_layout
from ..formats.regions import box_views, read_bytes_by_elements
from ..formats.tensorstore_arrays import parse_json_object, zarr_dtype
from ..util.checksums import crc32
from ..util.dtypes import NUMPY_DTYPES, checked_nbytes, itemsize
from ..util.units import format_size
from .base import Source, walk_files

_V3_CHUNK_KEYS = {"default", "v2"}
_SEPARATORS = {"/", "."}
_MAX_METADATA = 16 << 20  # bytes; larger metadata documents are refused
_OPEN_HANDLES = 8
_MIN_CACHE = 8 << 20  # TensorStore's chunk cache beyond the largest chunk it decodes whole
_MISSING = ("the store is incomplete, or its writer skipped chunks equal to the fill value "
            "(then pass allow_missing_chunks=True)")


def _read_kv(kv: Any, key: str) -> bytes | None:
    r = kv.read(key).result()
    return bytes(r.value) if r.state == "value" else None


class _Array:
    def __init__(self, name: str, key: str, fmt: int, dtype: str, storage: str, shape: tuple[int, ...],
                 crc: int | None) -> None:
        self.name = name
        self.key = key            # key prefix of the array in the store (no trailing "/")
        self.fmt = fmt            # 2 or 3
        self.dtype = dtype        # true dtype
        self.storage = storage    # dtype TensorStore reads (uint8 for uint4/uint2 written by shardconv)
        self.shape = shape
        self.crc = crc
        self.stream: StreamLayout | None = None  # set when its chunks decode as streams
        self.whole_chunk = 0      # otherwise: decoded bytes of the chunk TensorStore decodes whole


def whole_chunk_bytes(meta: dict[str, Any], fmt: int, isz: int) -> int:
    """Decoded bytes of the unit TensorStore decodes at once: a chunk (a sharded v3 array's
    inner chunk); the whole array where the metadata does not say."""
    if fmt == 2:
        chunks = meta.get("chunks")
    else:
        chunks = ((meta.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape")
        for codec in meta.get("codecs") or []:
            if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
                chunks = (codec.get("configuration") or {}).get("chunk_shape")
    if not isinstance(chunks, list) or not all(isinstance(c, int) and c > 0 for c in chunks):
        chunks = meta.get("shape") or []
    return math.prod(chunks) * isz


class ZarrSource(Source):
    format = "zarr"

    def __init__(self, src: str | os.PathLike, allow_missing_chunks: bool = False) -> None:
        self._src = os.fspath(src)
        self.allow_missing_chunks = allow_missing_chunks
        self._remote = tsio.is_remote(self._src)
        self._root = None if self._remote else tsio.local_path(self._src)
        self._loc = tsio.normalize_url(self._src) if self._remote else str(self._root)
        if self._root is not None and not self._root.is_dir():
            raise SourceError(f"{self._loc}: not a directory (a Zarr store is a directory)")
        self._kv_spec = tsio.kvstore_spec(self._src)
        ts = tsio.tensorstore("Zarr input")
        self._kv = tsio.wrap(SourceError, self._loc,
                             lambda: ts.KvStore.open(self._kv_spec, context=tsio.context()).result())
        self._handles: dict[str, Any] = {}
        self._ctx: Any = None
        self._streams: StreamReader | None = None
        self.manifest_options: dict[str, Any] = {}
        self._arrays: dict[str, _Array] = {}
        for a in self._list():
            if a.name in self._arrays:
                raise FormatError(f"{self._loc}: arrays {self._arrays[a.name].key!r} and {a.key!r} both claim "
                                  f"the name {a.name!r}")
            self._arrays[a.name] = a
        self._infos = [TensorInfo(a.name, a.dtype, a.shape, math.prod(a.shape) * itemsize(a.dtype),
                                  f"crc32:{a.crc}" if a.crc is not None else None)
                       for a in self._arrays.values()]

    @property
    def location(self) -> str:
        return self._loc

    # -- listing ----------------------------------------------------------------------

    def _get(self, key: str) -> bytes | None:
        data = tsio.wrap(SourceError, f"{self._loc}/{key}", lambda: _read_kv(self._kv, key))
        if data is not None and len(data) > _MAX_METADATA:
            raise FormatError(f"{self._loc}/{key}: metadata of {len(data)} bytes is too large")
        return data

    def _json(self, key: str, data: bytes | None = None) -> Any:
        data = self._get(key) if data is None else data
        if data is None:
            return None
        return parse_json_object(data, f"{self._loc}/{key}")

    def _list(self) -> list[_Array]:
        root3 = self._json("zarr.json")
        if root3 is not None:
            if root3.get("node_type") == "array":
                return [self._array(self._single_name(), "", 3, root3)]
            self._root_attrs(root3.get("attributes"))
            return self._walk(3)
        if self._get(".zarray") is not None:
            return [self._array(self._single_name(), "", 2, self._json(".zarray"))]
        if self._get(".zgroup") is not None:
            self._root_attrs(self._json(".zattrs"))
            return self._walk(2)
        orbax = self._json("_METADATA")
        if orbax is not None:
            return self._orbax(orbax)
        raise SourceError(f"{self._loc}: no zarr.json, .zgroup or _METADATA: not a Zarr store")

    def _single_name(self) -> str:
        base = self._loc.rstrip("/").rsplit("/", 1)[-1]
        return base[:-5] if base.endswith(".zarr") and len(base) > 5 else base

    def _root_attrs(self, attrs: Any) -> None:
        info = (attrs or {}).get("shardconv") if isinstance(attrs, dict) else None
        if isinstance(info, dict) and isinstance(info.get("options"), dict):
            self.manifest_options = dict(info["options"])

    def _walk(self, fmt: int) -> list[_Array]:
        """Every array of the hierarchy, from metadata only."""
        marker = "zarr.json" if fmt == 3 else ".zarray"
        found = self._remote_metadata(marker) if self._remote else self._local_metadata(fmt)
        arrays = []
        for key, meta in found:
            if fmt == 3 and meta.get("node_type") != "array":
                continue
            path = key[: -len(marker) - 1]
            arrays.append(self._array(path, path, fmt, meta))
        return arrays

    def _remote_metadata(self, marker: str) -> list[tuple[str, dict[str, Any]]]:
        keys = tsio.wrap(SourceError, self._loc, lambda: self._kv.list().result())
        names = sorted(k.decode("utf-8", "replace") for k in keys if k.endswith(b"/" + marker.encode()))
        out = []
        for i in range(0, len(names), 256):  # concurrent reads, a batch at a time
            batch = [(k, self._kv.read(k)) for k in names[i:i + 256]]
            for k, f in batch:
                r = tsio.wrap(SourceError, f"{self._loc}/{k}", f.result)
                if r.state == "value":
                    out.append((k, self._json(k, bytes(r.value))))
        return out

    def _local_metadata(self, fmt: int) -> list[tuple[str, dict[str, Any]]]:
        """Walk groups only (never into an array's chunks); refuse links out of the store."""
        assert self._root is not None  # a local store
        top = str(self._root)
        root = os.path.realpath(top)
        out = []
        for d, dirs, names in os.walk(top):
            rel = os.path.relpath(d, top).replace(os.sep, "/")
            for n in dirs + names:
                p = os.path.join(d, n)
                if os.path.islink(p) and os.path.commonpath([root, os.path.realpath(p)]) != root:
                    raise FormatError(f"{self._loc}: {os.path.relpath(p, top)!r} is a link pointing "
                                      "outside the store; refused")
            dirs.sort()
            if rel == ".":
                continue
            if fmt == 3:
                meta = self._json(f"{rel}/zarr.json") if "zarr.json" in names else None
                if meta is None:
                    dirs.clear()  # not part of the hierarchy
                elif meta.get("node_type") == "array":
                    out.append((f"{rel}/zarr.json", meta))
                    dirs.clear()
            elif ".zarray" in names:
                out.append((f"{rel}/.zarray", self._json(f"{rel}/.zarray")))
                dirs.clear()
            elif ".zgroup" not in names:
                dirs.clear()
        return out

    def _orbax(self, meta: dict[str, Any]) -> list[_Array]:
        """A non-OCDBT Orbax checkpoint: one array per leaf at the keys joined by ``.``."""
        if meta.get("use_ocdbt"):
            raise UnsupportedError(f"{self._loc}: an OCDBT Orbax checkpoint; the zarr source reads only "
                                   "non-OCDBT ones (one Zarr array per leaf)")
        fmt = 3 if meta.get("use_zarr3") else 2
        tree = meta.get("tree_metadata")
        if not isinstance(tree, dict):
            raise FormatError(f"{self._loc}/_METADATA: no tree_metadata")
        cm = self._json("_CHECKPOINT_METADATA") or {}
        self._root_attrs(cm.get("custom_metadata"))
        arrays = []
        for entry in tree.values():
            keys = [str(k.get("key")) for k in (entry or {}).get("key_metadata") or [] if isinstance(k, dict)]
            key = ".".join(keys)
            if not keys or "/" in key or key in (".", "..") or key.startswith("."):
                raise FormatError(f"{self._loc}/_METADATA: leaf {keys!r} would point outside the checkpoint; refused")
            marker = "zarr.json" if fmt == 3 else ".zarray"
            m = self._json(f"{key}/{marker}")
            if m is None:
                raise FormatError(f"{self._loc}: leaf {key!r} has no {marker} (incomplete checkpoint?)")
            arrays.append(self._array("/".join(keys), key, fmt, m))
        return arrays

    def _array(self, name: str, key: str, fmt: int, meta: dict[str, Any]) -> _Array:
        where = f"{self._loc}: array {key or name!r}"
        attrs = meta.get("attributes") if fmt == 3 else self._json(f"{key}/.zattrs" if key else ".zattrs")
        info = (attrs or {}).get("shardconv") if isinstance(attrs, dict) else None
        info = info if isinstance(info, dict) else {}
        if isinstance(info.get("name"), str):
            name = info["name"]
        why = check_name(name)
        if why:
            raise FormatError(f"{where}: unsafe tensor name {name!r} ({why}); refused")
        shape = meta.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise FormatError(f"{where}: bad shape {shape!r}")
        if fmt == 3:
            storage = self._v3_dtype(meta, where)
        else:
            storage = self._v2_dtype(meta, where)
        dtype = storage
        if isinstance(info.get("dtype"), str) and info["dtype"] != storage:
            if info.get("storage_dtype") != storage or info["dtype"] not in NUMPY_DTYPES \
                    or itemsize(info["dtype"]) != itemsize(storage):
                raise FormatError(f"{where}: attributes say dtype {info['dtype']} but the array holds {storage}")
            dtype = info["dtype"]
        crc = info.get("crc32") if isinstance(info.get("crc32"), int) else None
        checked_nbytes(shape, dtype, where)
        a = _Array(name, key, fmt, dtype, storage, tuple(shape), crc)
        a.stream = stream_layout(meta, storage, self._array_kv(a), self.allow_missing_chunks)
        if a.stream is not None:
            a.stream.missing_hint = _MISSING
        elif a.shape and all(a.shape):
            a.whole_chunk = whole_chunk_bytes(meta, fmt, itemsize(storage))
        return a

    def _array_kv(self, a: _Array) -> dict[str, Any]:
        """The kvstore spec whose keys are the array's own (``zarr.json``, chunk keys)."""
        return {**self._kv_spec, "path": self._kv_spec["path"] + (a.key + "/" if a.key else "")}

    def _v3_dtype(self, meta: dict[str, Any], where: str) -> str:
        enc = meta.get("chunk_key_encoding") or {}
        sep = (enc.get("configuration") or {}).get("separator", "/" if enc.get("name") == "default" else ".")
        if enc.get("name") not in _V3_CHUNK_KEYS or sep not in _SEPARATORS:
            raise FormatError(f"{where}: chunk_key_encoding {enc!r} is not Zarr's own; refused")
        if meta.get("storage_transformers"):
            raise UnsupportedError(f"{where}: storage transformers are not supported")
        dt = meta.get("data_type")
        if not isinstance(dt, str) or dt not in NUMPY_DTYPES:
            raise UnsupportedError(f"{where}: data type {dt!r} is not supported")
        return dt

    def _v2_dtype(self, meta: dict[str, Any], where: str) -> str:
        if meta.get("dimension_separator", ".") not in _SEPARATORS:
            raise FormatError(f"{where}: dimension_separator {meta.get('dimension_separator')!r}; refused")
        return zarr_dtype(meta.get("dtype"), where)

    # -- reading ----------------------------------------------------------------------

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def units(self) -> dict[str, Unit]:
        return {a.name: Unit(math.prod(a.shape) * itemsize(a.dtype), "crc32", a.crc, a.name, self._loc)
                for a in self._arrays.values() if a.crc is not None}

    def _whole_chunk(self) -> tuple[int, str]:
        """The largest chunk TensorStore decodes whole, and the array holding it."""
        a = max(self._arrays.values(), key=lambda a: a.whole_chunk, default=None)
        return (a.whole_chunk, a.key or a.name) if a is not None and a.whole_chunk else (0, "")

    def baseline_bytes(self) -> int:
        """TensorStore, its chunk cache's slack and the largest set of open chunk streams (the
        chunk decoded whole is held within the budget: ``budget_reserve``)."""
        streams = [stream_bytes(a.stream, a.shape) for a in self._arrays.values() if a.stream is not None]
        return tsio.TENSORSTORE_BYTES + _MIN_CACHE + max(streams + [0])

    def budget_reserve(self) -> tuple[int, str]:
        n, key = self._whole_chunk()
        if not n:
            return 0, ""
        return 2 * n, (f"{self._loc}: array {key!r} has chunks of {format_size(n)} that TensorStore decodes only "
                       "whole (blosc, sharding or filters do not stream), held decoded and encoded")

    def _context(self) -> Any:
        """One TensorStore context for this source: a chunk cache of its largest chunk decoded
        whole (so a chunk read piece by piece is decoded once)."""
        if self._ctx is None:
            ts = tsio.tensorstore()
            self._ctx = ts.Context({"cache_pool": {"total_bytes_limit": self._whole_chunk()[0] + _MIN_CACHE}},
                                   parent=tsio.context())
        return self._ctx

    def _handle(self, a: _Array) -> Any:
        h = self._handles.get(a.name)
        if h is None:
            ts = tsio.tensorstore()
            spec = {"driver": "zarr3" if a.fmt == 3 else "zarr", "kvstore": self._array_kv(a),
                    "open": True, "fill_missing_data_reads": self.allow_missing_chunks}
            h = tsio.wrap(FormatError, f"{self._loc}: array {a.key or a.name!r}",
                          lambda: ts.open(spec, context=self._context(), read=True).result())
            if tuple(h.shape) != a.shape or np.dtype(h.dtype.numpy_dtype) != NUMPY_DTYPES[a.storage]:
                raise FormatError(f"{self._loc}: array {a.key!r}: TensorStore reads {h.dtype.name}{list(h.shape)}, "
                                  f"metadata says {a.storage}{list(a.shape)}")
            if len(self._handles) >= _OPEN_HANDLES:
                self._handles.pop(next(iter(self._handles)))
            self._handles[a.name] = h
        return h

    def read_into(self, name: str, offset: int, out: memoryview) -> list[Segment]:
        a = self._entry(self._arrays, name)
        isz = itemsize(a.storage)
        nbytes = math.prod(a.shape) * isz
        out = self._region(name, offset, out, nbytes)
        read_bytes_by_elements(offset, out, isz, lambda lo, hi, buf: self._read_elements(a, lo, hi, buf))
        if a.crc is None:
            return []
        return [Segment(name, offset, len(out), crc32(out))]

    def _read_elements(self, a: _Array, lo: int, hi: int, out: memoryview) -> None:
        ts = tsio.tensorstore()
        msg = f"{self._loc}: array {a.key or a.name!r}"
        if a.stream is not None:
            if self._streams is None:
                self._streams = StreamReader(ts, self._context())
            self._streams.read(a.stream, a.shape, a.storage, lo, hi, out, msg)
            return
        store = self._handle(a)
        for box, dst in box_views(a.shape, NUMPY_DTYPES[a.storage], lo, hi, out):
            src = store[box].translate_to[0] if box else store
            try:
                ts.array(dst, copy=False, write=True).write(src).result()
            except ValueError as e:
                line = tsio.first_line(e)
                if "NOT_FOUND" in line or "missing" in line:
                    raise FormatError(f"{msg}: a chunk is missing ({line}); the store is incomplete, or its writer "
                                      "skipped chunks equal to the fill value (then pass allow_missing_chunks=True)"
                                      ) from None
                raise FormatError(f"{msg}: {line}") from None

    @property
    def stores_checksums(self) -> bool:  # type: ignore[override]
        """Only shardconv's own stores record a CRC per array (in their manifest)."""
        return bool(self._arrays) and all(a.crc is not None for a in self._arrays.values())

    def recorded_options(self) -> dict[str, Any]:
        """The mapping options in the shardconv manifest (none for another writer's file)."""
        return dict(self.manifest_options)

    def input_files(self) -> list[str]:
        """Every metadata and chunk file of a local store; none for a URL (its fingerprint is
        the metadata's tensor table)."""
        return [] if self._root is None else walk_files(self._root)

    def close(self) -> None:
        self._handles = {}
        if self._streams is not None:
            self._streams.close()
            self._streams = None
