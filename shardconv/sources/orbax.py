"""Orbax checkpoints, read by region through TensorStore (``formats.tensorstore_arrays``).

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
them. Without ``_METADATA`` such a directory is read by ``t5x.T5xSource``: the placeholders
then name the array directories beside the file.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.plan import check_name
from ..core.types import Segment, TensorInfo
from ..errors import FormatError, SourceError
from ..formats import ocdbt_index, tsio
from ..formats.chunkstream import stream_layout
from ..formats.tensorstore_arrays import (
    MAX_ARRAY_METADATA,
    TsArray,
    TsReader,
    cache_bytes,
    context,
    parse_json_object,
    read_json_file,
    reader_bytes,
    zarr_array_info,
)
from ..util.dtypes import itemsize
from .base import Source, walk_files
from .flax_msgpack import PLACEHOLDER_PREFIXES, FlaxMsgpackSource
from .probes import is_msgpack_map, is_orbax_checkpoint, orbax_items
from .steps import choose_step, is_dir

#: Orbax value types of empty containers and None: nothing to convert.
_EMPTY_TYPES = {"None", "Dict", "List", "Tuple", "NamedTuple"}


# -- locating checkpoints ---------------------------------------------------------------

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


@dataclass
class _ItemLayout:
    """How an Orbax item stores its arrays: per-array directories or one OCDBT database, Zarr v2 or v3."""

    base: dict[str, Any]     # kvstore spec of the item
    ocdbt: bool
    fmt3: bool
    fill_missing: bool       # a chunk not stored reads as the fill value (Orbax's default)
    index: ocdbt_index.OcdbtIndex | None = None   # OCDBT: where each chunk lies in the data files

    @classmethod
    def of(cls, d: Path, meta: dict[str, Any]) -> _ItemLayout:
        """From the item's ``_METADATA``. Raises FormatError when its OCDBT manifest is missing."""
        ocdbt = bool(meta.get("use_ocdbt"))
        base: dict[str, Any] = {"driver": "file", "path": str(d) + "/"}
        if ocdbt:
            if not (d / "manifest.ocdbt").is_file():
                raise FormatError(f"{d}: use_ocdbt is set but manifest.ocdbt is missing (incomplete checkpoint?)")
            base = {"driver": "ocdbt", "base": base, "cache_pool": "cache_pool#ocdbt"}
        return cls(base, ocdbt, bool(meta.get("use_zarr3")),
                   not meta.get("store_array_data_equal_to_fill_value", False),
                   ocdbt_index.OcdbtIndex(d) if ocdbt else None)

    @property
    def marker(self) -> str:
        return "zarr.json" if self.fmt3 else ".zarray"

    def array(self, d: Path, pname: str, raw: bytes, extra: dict[str, Any]) -> TsArray:
        """Array ``pname`` of item ``d`` from its metadata document ``raw``."""
        where = f"{d}: array {pname!r}"
        if len(raw) > MAX_ARRAY_METADATA:
            raise FormatError(f"{where}: {self.marker} of {len(raw)} bytes is too large")
        zmeta = parse_json_object(raw, f"{where} {self.marker}")
        dtype, shape, fmt, chunk = zarr_array_info(zmeta, where)
        if fmt != (3 if self.fmt3 else 2):
            raise FormatError(f"{where}: {self.marker} says zarr_format {fmt}, _METADATA says {3 if self.fmt3 else 2}")
        kvpath = f"{pname}/" if self.ocdbt else f"{self.base['path']}{pname}/"
        spec: dict[str, Any] = {"driver": "zarr3" if self.fmt3 else "zarr", "kvstore": {**self.base, "path": kvpath},
                "recheck_cached_data": False, "recheck_cached_metadata": False,
                "fill_missing_data_reads": self.fill_missing}
        return TsArray(where, spec, dtype, shape, chunk, extra=extra,
                       stream=stream_layout(zmeta, dtype, spec["kvstore"], self.fill_missing))


class OrbaxSource(Source):
    """An Orbax checkpoint (either layout), a step of one, or a directory of steps."""

    format = "orbax"

    def __init__(self, path: str | os.PathLike, step: int | None = None, item: str | None = None) -> None:
        root = Path(path)
        if not is_dir(root):
            raise SourceError(f"{root}: not a directory (an Orbax checkpoint is a directory)")
        self.dir = choose_step(root, step, is_orbax_checkpoint, "Orbax")
        items = [self.dir] if (self.dir / "_METADATA").is_file() else orbax_items(self.dir)
        if item is not None:
            items = [d for d in items if d.name == item]
            if not items:
                raise SourceError(f"{self.dir}: no item {item!r} (items: "
                                  f"{', '.join(d.name for d in orbax_items(self.dir)) or 'none'})")
        self._items = items
        self._arrays: dict[str, TsArray] = {}
        self._strings: dict[str, _StringLeaf] = {}
        self._string_cache: dict[Path, dict[str, Any]] = {}
        self._inline: dict[str, _InlineLeaf] = {}
        self._aggregates: list[_AggregateFile] = []
        self._order: list[str] = []
        self._names: set[str] = set()
        self._reader: TsReader | None = None
        self._index_bytes = 0   # OCDBT indexes (ocdbt_index), built on first read
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
        """List the leaves of item ``d`` (names prefixed with ``prefix``): metadata only, the
        arrays' ``.zarray``/``zarr.json`` read in parallel through the item's kvstore."""
        meta = read_json_file(d / "_METADATA")
        tree = meta.get("tree_metadata")
        if not isinstance(tree, dict):
            raise FormatError(f"{d}/_METADATA: no tree_metadata (not a PyTree checkpoint?)")
        layout = _ItemLayout.of(d, meta)
        ts = tsio.tensorstore("Orbax input")
        ctx = context(0)
        kv = tsio.wrap(SourceError, str(d), lambda: ts.KvStore.open(layout.base, context=ctx).result())
        agg = self._aggregate_file(d)
        pending = []
        for entry in tree.values():
            leaf = self._leaf(entry, d, prefix, agg, layout.ocdbt)
            if leaf is not None:
                name, pname, vtype = leaf
                pending.append((name, pname, vtype, kv.read(f"{pname}/{layout.marker}")))
        shardings = self._shardings(d)
        for name, pname, vtype, fut in pending:
            r = tsio.wrap(SourceError, f"{d}: leaf {name!r}", fut.result)
            if r.state != "value":
                raise FormatError(f"{d}: leaf {name!r} ({vtype}) has no array data: {pname}/{layout.marker} is "
                                  f"missing {'from the OCDBT database ' if layout.ocdbt else ''}"
                                  "(incomplete or damaged checkpoint)")
            extra = {"value_type": vtype, **({"sharding": shardings[pname]} if pname in shardings else {})}
            self._arrays[name] = layout.array(d, pname, bytes(r.value), extra)
            self._order.append(name)
        self._use_index(layout, [self._arrays[p[0]] for p in pending])

    def _use_index(self, layout: _ItemLayout, arrays: list[TsArray]) -> None:
        """Streamed arrays of an OCDBT item read their chunks from the data files by pread,
        through the item's index, when the index fits ``ocdbt_index.MAX_INDEX_BYTES``."""
        streamed = [a.stream for a in arrays if a.stream is not None]
        if layout.index is None or not streamed or not ocdbt_index.available():
            return
        n = layout.index.n_keys()
        if not ocdbt_index.usable(n):
            return  # a huge database: read through the kvstore, memory stays bounded
        self._index_bytes += ocdbt_index.index_bytes(n)
        for st in streamed:
            st.index = layout.index

    def _leaf(self, entry: Any, d: Path, prefix: str, agg: _AggregateFile | None,
              ocdbt: bool) -> tuple[str, str, Any] | None:
        """(name, param name, value type) of an array leaf of ``_METADATA`` still to be read;
        None for empty containers and for leaves recorded here (inline values, strings)."""
        keys = self._keys(entry, d)
        vm = entry.get("value_metadata") if isinstance(entry.get("value_metadata"), dict) else {}
        vtype = vm.get("value_type")
        if vtype in _EMPTY_TYPES:
            return None
        name = prefix + "/".join(keys)
        why = check_name(name)
        if why:
            raise FormatError(f"{d}/_METADATA: leaf name {name!r} is unsafe ({why}); refused")
        if name in self._names:
            raise FormatError(f"{d}/_METADATA: two leaves are named {name!r}")
        self._names.add(name)
        pname = ".".join(keys)
        if self._take_inline(agg, "/".join(keys), name, pname, vm, d):
            self._order.append(name)
            return None
        if vtype == "string":
            self._strings[name] = _StringLeaf(d, pname)
            self._order.append(name)
            return None
        if not ocdbt:
            real = os.path.realpath(d / pname)
            if os.path.commonpath([os.path.realpath(d), real]) != os.path.realpath(d) or real == os.path.realpath(d):
                raise FormatError(f"{d}/_METADATA: leaf {name!r} would be read from outside the checkpoint; refused")
        return name, pname, vtype

    def _aggregate_file(self, d: Path) -> _AggregateFile | None:
        """The item's legacy msgpack ``checkpoint`` file, if it has one (walked, not loaded)."""
        if not is_msgpack_map(d / "checkpoint"):
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
            raw = read_json_file(p)
            out = {}
            for k, v in raw.items():
                out[base64.b64decode(k).decode("utf-8")] = json.loads(v) if isinstance(v, str) else v
            return out
        except (SourceError, ValueError, UnicodeDecodeError, AttributeError):
            return {}  # informational: a damaged _sharding does not stop the conversion

    def _string(self, name: str) -> bytes:
        leaf = self._strings[name]
        if leaf.value is not None:
            return leaf.value
        table = self._string_cache.get(leaf.item)
        if table is None:
            table = read_json_file(leaf.item / "_strings.json")
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
        return reader_bytes(self._arrays.values()) + self._index_bytes

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
