"""In-memory pytrees: nested dicts/lists/tuples, NamedTuples, flax FrozenDict/struct
dataclasses/TrainState, with NumPy arrays, ``jax.Array``s (bfloat16, float8) or scalars.

Names are ``/``-joined key paths (big_vision's ``tree_flatten_with_names``): dict keys,
attribute names and sequence indices, in ``jax.tree_util`` order. A sharded
``jax.Array`` is read shard by shard through ``addressable_shards``: each requested
byte range is assembled from the shards whose ``index`` covers it (one shard per
distinct index, so replicas are read once). Shards on the CPU are read through a
zero-copy view; shards on an accelerator are sliced on the device, so only the
requested region ever reaches the host. Converting a tree therefore costs the memory
budget and nothing more.

JAX is imported only when the tree needs it: a tree of plain dicts, lists, tuples,
NamedTuples, NumPy arrays and scalars is walked without JAX (with the same names and
order ``jax.tree_util`` gives) as long as JAX is not already loaded.
"""
from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.plan import check_name
from ..core.types import Segment, TensorInfo
from ..errors import FormatError, MissingDependencyError, SourceError, UnsupportedError
from ..formats.regions import box_views, read_bytes_by_elements
from ..util.dtypes import NUMPY_DTYPES, dtype_name, itemsize
from .base import Source

NON_ARRAYS = ("error", "drop")
_PACKED = {"int4", "uint4", "int2", "uint2"}  # JAX packs these on devices


@dataclass
class _Leaf:
    dtype: str
    shape: tuple[int, ...]
    array: np.ndarray | None = None          # host array (NumPy, or a scalar made 0-d)
    shards: list[tuple[tuple[tuple[int, int], ...], Any]] = field(default_factory=list)  # (box, shard data)
    on_host: bool = True                      # shard data can be viewed in place (CPU)
    strings: list[bytes] | None = None


def _jax() -> Any:
    try:
        import jax
    except ImportError:
        raise MissingDependencyError("jax", "jax", "this tree (it holds objects only JAX can flatten)") from None
    return jax


def _key_name(k: Any) -> str:
    """A jax.tree_util key entry as big_vision names it: key, attribute name or index."""
    for attr in ("key", "name", "idx"):  # DictKey/FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


class _NeedsJax(Exception):
    pass


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _plain_flatten(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """Flatten plain containers exactly as jax.tree_util would, without JAX; raises
    _NeedsJax on anything else that is not a leaf JAX would also see as a leaf."""
    out: list[tuple[tuple[str, ...], Any]] = []

    def walk(x: Any, path: tuple[str, ...], depth: int) -> None:
        if depth > 1000:
            raise SourceError("pytree nests deeper than 1000 levels")
        t = type(x)
        if x is None:
            return
        if t is dict:
            try:
                keys = sorted(x)
            except TypeError:
                raise _NeedsJax() from None
            for k in keys:
                walk(x[k], path + (str(k),), depth + 1)
        elif t in (list, tuple):
            for i, v in enumerate(x):
                walk(v, path + (str(i),), depth + 1)
        elif _is_namedtuple(x) and type(x).__module__ != "jax":
            for name, v in zip(type(x)._fields, x):
                walk(v, path + (name,), depth + 1)
        elif isinstance(x, (np.ndarray, np.generic, bool, int, float, complex, str, bytes)):
            out.append((path, x))
        else:
            raise _NeedsJax()

    walk(tree, (), 0)
    return out


def flatten_with_names(tree: Any) -> list[tuple[str, Any]]:
    """(``/``-joined name, leaf) pairs in ``jax.tree_util`` order."""
    pairs: list[tuple[tuple[str, ...], Any]] | None = None
    if "jax" not in sys.modules:
        try:
            pairs = _plain_flatten(tree)
        except _NeedsJax:
            pairs = None
    if pairs is None:
        jax = _jax()
        try:
            flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        except (TypeError, ValueError) as e:
            raise SourceError(f"pytree cannot be flattened: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                              "(dict keys of mixed types?)") from None
        pairs = [(tuple(_key_name(k) for k in path), leaf) for path, leaf in flat]
    return [("/".join(p), v) for p, v in pairs]


class JaxTreeSource(Source):
    """A pytree held by the caller; ``non_arrays="drop"`` leaves out leaves that are not
    arrays, scalars or strings instead of refusing them."""

    format = "jax-tree"

    def __init__(self, tree: Any, *, non_arrays: str = "error", name: str = "pytree") -> None:
        if non_arrays not in NON_ARRAYS:
            raise SourceError(f"non_arrays must be one of {NON_ARRAYS}, got {non_arrays!r}")
        self._name = name
        self._tree_id = f"in-memory pytree {id(tree):x} in process {os.getpid()}"
        self._leaves: dict[str, _Leaf] = {}
        #: (name, why) of leaves left out with ``non_arrays="drop"``.
        self.skipped: list[tuple[str, str]] = []
        self._slice_on_device: Callable[[Any, tuple[slice, ...]], np.ndarray] = _device_slice
        pairs = flatten_with_names(tree)
        if any(n == "" for n, _ in pairs):
            raise SourceError(f"{name}: a bare array has no name; pass a dict such as {{'x': array}}")
        for leaf_name, value in pairs:
            why = check_name(leaf_name)
            if why:
                raise SourceError(f"{name}: leaf {leaf_name!r} cannot be a tensor name ({why})")
            if leaf_name in self._leaves:
                raise SourceError(f"{name}: two leaves are both named {leaf_name!r} (a key containing '/'?)")
            try:
                leaf = self._classify(leaf_name, value)
            except _Skip as s:
                if non_arrays == "error":
                    raise SourceError(f"{name}: leaf {leaf_name!r} is {s.what}, not an array; "
                                      "pass non_arrays='drop' to leave such leaves out") from None
                self.skipped.append((leaf_name, s.what))
                continue
            self._leaves[leaf_name] = leaf
        self._infos = [TensorInfo(n, l.dtype, l.shape,
                                  sum(map(len, l.strings)) if l.strings is not None
                                  else math.prod(l.shape) * itemsize(l.dtype),
                                  extra={"shards": len(l.shards)} if l.shards else {})
                       for n, l in self._leaves.items()]

    @property
    def location(self) -> str:
        return self._name

    # -- listing ------------------------------------------------------------------------

    def _classify(self, name: str, v: Any) -> _Leaf:
        where = f"{self._name}: leaf {name!r}"
        jax = sys.modules.get("jax")
        if jax is not None and isinstance(v, jax.core.Tracer):
            raise SourceError(f"{where}: is a JAX tracer; convert concrete arrays, outside jit/grad/vmap")
        if jax is not None and isinstance(v, jax.Array):
            return self._jax_leaf(where, v, jax)
        if isinstance(v, (str, bytes)):
            return _Leaf("string", (), strings=[v.encode("utf-8") if isinstance(v, str) else bytes(v)])
        if isinstance(v, bool):
            v = np.bool_(v)
        elif isinstance(v, int):
            if not -(1 << 63) <= v < 1 << 63:
                raise UnsupportedError(f"{where}: integer {v} does not fit int64")
            v = np.int64(v)
        elif isinstance(v, float):
            v = np.float64(v)
        elif isinstance(v, complex):
            v = np.complex128(v)
        if isinstance(v, np.generic):
            v = np.asarray(v)
        if isinstance(v, np.ndarray):
            return _Leaf(self._dtype(where, v.dtype), tuple(int(d) for d in v.shape), array=v)
        raise _Skip(f"a {type(v).__module__}.{type(v).__qualname__}")

    def _dtype(self, where: str, dt: Any) -> str:
        try:
            dt = np.dtype(dt)
        except TypeError:
            raise UnsupportedError(f"{where}: dtype {dt} has no NumPy equivalent (a jax.random key array? "
                                   "convert jax.random.key_data(key) instead)") from None
        if dt.hasobject:
            raise UnsupportedError(f"{where}: object arrays cannot be converted")
        if dt.byteorder == ">":
            dt = dt.newbyteorder("<")  # copied into little-endian output element by element
        try:
            return dtype_name(dt)
        except UnsupportedError as e:
            raise UnsupportedError(f"{where}: {e}") from None

    def _jax_leaf(self, where: str, a: Any, jax: Any) -> _Leaf:
        if a.is_deleted():
            raise SourceError(f"{where}: the jax.Array was deleted (donated?)")
        dtype = self._dtype(where, a.dtype)
        shape = tuple(int(d) for d in a.shape)
        boxes: dict[tuple[tuple[int, int], ...], Any] = {}
        # CPU buffers are viewed in place; packed sub-byte dtypes (int4, ...) have no such view.
        on_host = dtype not in _PACKED
        for s in a.addressable_shards:
            box = _box(s.index, shape, where)
            if box not in boxes:  # replicas hold the same values: read one
                boxes[box] = s.data
                on_host = on_host and s.device.platform == "cpu"
        covered = sum(math.prod(hi - lo for lo, hi in b) for b in boxes)
        if covered < math.prod(shape):
            raise UnsupportedError(f"{where}: this process holds only part of the array (multi-host sharding); "
                                   "run the conversion where every shard is addressable, or save with Orbax "
                                   "and convert the checkpoint")
        return _Leaf(dtype, shape, shards=list(boxes.items()), on_host=on_host)

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def input_files(self) -> list[str]:
        """None: the values are in memory."""
        return []

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        # Values in memory cannot be compared across runs: resume only within the same tree object.
        fp["pytree"] = self._tree_id
        return fp

    # -- reading ------------------------------------------------------------------------

    def read_strings(self, name: str) -> list[bytes]:
        leaf = self._leaves.get(name)
        if leaf is None or leaf.strings is None:
            return super().read_strings(name)
        return list(leaf.strings)

    def read_into(self, name: str, offset: int, out: memoryview) -> list[Segment]:
        leaf = self._entry(self._leaves, name, "leaf")
        if leaf.strings is not None:
            raise SourceError(f"{self._name}: leaf {name!r} is a string; it has no array bytes")
        isz = itemsize(leaf.dtype)
        nbytes = math.prod(leaf.shape) * isz
        out = self._region(name, offset, out, nbytes)
        a = leaf.array
        if a is not None and a.flags.c_contiguous and a.dtype.isnative:
            out[:] = a.reshape(-1).view(np.uint8).data[offset:offset + len(out)]
            return []
        read_bytes_by_elements(offset, out, isz, lambda lo, hi, buf: self._read_elements(leaf, lo, hi, buf))
        return []

    def _read_elements(self, leaf: _Leaf, lo: int, hi: int, out: memoryview) -> None:
        for box, dst in box_views(leaf.shape, NUMPY_DTYPES[leaf.dtype], lo, hi, out):
            if leaf.array is not None:
                np.copyto(dst, leaf.array[box], casting="equiv")
            else:
                self._copy_from_shards(leaf, box, dst)

    def _copy_from_shards(self, leaf: _Leaf, box: tuple[slice, ...], dst: np.ndarray) -> None:
        for sbox, data in leaf.shards:
            inter = [(max(b.start, s0), min(b.stop, s1)) for b, (s0, s1) in zip(box, sbox)]
            if any(a >= b for a, b in inter):
                continue
            src_idx = tuple(slice(a - s0, b - s0) for (a, b), (s0, _) in zip(inter, sbox))
            dst_idx = tuple(slice(a - b.start, c - b.start) for (a, c), b in zip(inter, box))
            if leaf.on_host:
                part = np.asarray(data)[src_idx]  # zero-copy view of the CPU buffer
            else:
                part = self._slice_on_device(data, src_idx)
            np.copyto(dst[dst_idx + (Ellipsis,)], part, casting="equiv")  # Ellipsis: a view even for 0-d


class _Skip(Exception):
    def __init__(self, what: str) -> None:
        self.what = what


def _box(index: tuple[Any, ...], shape: tuple[int, ...], where: str) -> tuple[tuple[int, int], ...]:
    """A shard's ``index`` (slices of the global array) as (start, stop) per dimension."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    box = []
    for s, dim in zip(index, shape):
        if not isinstance(s, slice):
            raise FormatError(f"{where}: shard index {index!r} is not a tuple of slices")
        start, stop, step = s.indices(dim)
        if step != 1:
            raise UnsupportedError(f"{where}: strided shard index {index!r}")
        box.append((start, max(start, stop)))
    return tuple(box)


@functools.lru_cache(maxsize=1)
def _dynamic_slice() -> Any:
    import jax

    # Start indices are traced, sizes static: one compilation per region shape, not per region.
    return jax.jit(jax.lax.dynamic_slice, static_argnums=(2,))


def _device_slice(data: Any, idx: tuple[slice, ...]) -> np.ndarray:
    """Slice a shard on its device, then copy just that region to the host."""
    sizes = tuple(s.stop - s.start for s in idx)
    if sizes == tuple(data.shape):
        return np.asarray(data)
    return np.asarray(_dynamic_slice()(data, tuple(s.start for s in idx), sizes))
