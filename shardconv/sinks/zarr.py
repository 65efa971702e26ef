"""Zarr output: one array per output tensor, written chunk by chunk (a local store's chunk
files by ``zarr_files.ChunkFiles``, straight from the engine's buffers; an object store's and
int4/int2 arrays through TensorStore).

Layout (``layout="zarr"``, the default): a Zarr v3 hierarchy (``zarr_format=2`` for v2)
whose groups follow the ``/`` in output names: ``params/dense/kernel`` is the array at
``params/dense/kernel/`` inside the store, under the groups ``params/dense`` and
``params``. Each array's attributes hold ``shardconv``: its name, dtype, CRC32 of its
C-order bytes, source names, source dtypes and source checksums. The root group's
``shardconv`` attribute holds the rest of the manifest (source, plan digest, options,
dropped tensors). No other file is in the store: zarr-python warns about any object it
does not recognise.

``layout="orbax"`` writes what ``orbax.checkpoint`` (``StandardCheckpointer`` /
``PyTreeCheckpointer``) restores: one array per leaf named by the keys joined with
``.`` (``params.dense.kernel/``), Orbax's ``_METADATA`` tree (non-OCDBT, ``use_zarr3``
from ``zarr_format``), ``_CHECKPOINT_METADATA`` (its ``custom_metadata`` holds the
manifest summary) and ``commit_success.txt``.

Chunk shape: whole trailing dimensions and as many rows as fit ``chunk_mib`` (default
4 MiB), from the tensor's shape alone, so the bytes written never depend on
``--max-memory`` or on how many workers wrote them. Every engine chunk (a hyper-rectangle)
covers whole Zarr chunks, so TensorStore never reads-modifies-writes and two workers
never write one Zarr chunk; a budget too small to hold one is refused, naming the minimum.

Compression (chosen by measurement, see ``ZSTD_BLOSC`` and docs/zarr.md): ``zstd`` is zstd
level 1 in Blosc over bit-shuffled 256 KiB blocks (plain zstd for 1-byte dtypes): 11% smaller
than the input on float32 noise, 62% on float32 holding bfloat16 values, at 1.4 CPU s/GB;
``blosc`` is lz4 over bit-shuffled bytes (10%, 62%, 1.1 CPU s/GB).

Nothing looks complete early: while chunks are written, no array or group metadata
exists (TensorStore runs with ``assume_metadata``), so neither zarr-python nor
TensorStore nor Orbax opens anything. ``finish`` writes array metadata, then the
groups, and the root metadata last (``zarr.json`` / ``.zgroup``; Orbax:
``_METADATA`` then ``commit_success.txt``). A local output is built in
``DEST.partial/`` and renamed by the engine. An object store (``s3://``, ``gs://``,
``memory://``) has no rename: chunks go straight to their final keys, the root marker is
what marks completion, a ``.shardconv.partial`` object marks the prefix as ours while a
run is unfinished, and the lock and journal live locally under the state directory
(``$SHARDCONV_STATE_DIR``, else ``$XDG_STATE_HOME/shardconv``, else
``~/.local/state/shardconv``), so resume works from the machine that started the run.
See docs/zarr.md.

bfloat16, float8 and int4/int2 are stored as TensorStore names them (``"bfloat16"``);
TensorStore and Orbax read them back exactly. zarr-python 3.1 has no such data types and
refuses those arrays until ``shardconv.formats.zarr_dtypes.register()`` registers them (then it
reads them exactly as ml_dtypes arrays). ``uint4``/``uint2``, which TensorStore cannot
store, are written as ``uint8`` (same bytes) with the true dtype in the attributes.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..core.destination import Destination
from ..core.plan import Chunk, OutputTensor, check_name, chunk_region
from ..core.types import TensorInfo
from ..errors import DestinationError, UsageError
from ..formats import tsio
from ..frontend import option, option_name
from ..mapping.roles import assign_roles
from ..mapping.rules import rename_rule
from ..util import safefs
from ..util.checksums import combine_crc32, crc32
from ..util.dtypes import STRING, is_ml_dtype, itemsize, numpy_dtype
from ..util.fileio import check_free_space, fsync_dir, fsync_path, fsync_tree, start_writeback
from ..util.units import format_size
from .base import Capabilities, Sink, SinkOptions, sink_option
from .zarr_files import MASKED_DTYPES, ChunkFiles, Encoder, PendingFiles, chunk_file, default_workers, encoder

if TYPE_CHECKING:  # NumPy is imported where chunks go through TensorStore: the CLI imports every sink
    import numpy as np

LAYOUTS = ("zarr", "orbax")
COMPRESSIONS = ("none", "zstd", "blosc")
DEFAULT_CHUNK_MIB = 4.0
#: Dropped-tensor lists longer than this are summarized by reason in the root attributes.
MAX_DROPPED_LISTED = 1000
#: On object stores: present while a run on this prefix is unfinished (the prefix is ours).
PARTIAL_KEY = ".shardconv.partial"
#: Dtypes TensorStore cannot store in Zarr: written as this one (same bytes per element).
STORAGE_DTYPE = {"uint4": "uint8", "uint2": "uint8"}
#: ``--compression zstd``: zstd level 1 in Blosc over bit-shuffled 256 KiB blocks for dtypes of 2
#: or more bytes (Blosc's clevel 1 is zstd level 1), the plain zstd codec for 1-byte dtypes. Chosen
#: by measurement (bench/zarr_codecs.py; docs/zarr.md, "Compression"): on float32 and bfloat16
#: weights it saves more than plain zstd at any level (11.3% vs 7.6% of float32 noise, 62% vs 52%
#: of float32 holding bfloat16 values) for ~70% of the CPU of plain zstd level 1 and a third of
#: level 3's; negative levels save nothing on float weights. On 1-byte dtypes (int8, float8) bit
#: shuffle loses what zstd's byte statistics find (int8 weights: 1.00 vs 1.25).
ZSTD_LEVEL = 1
ZSTD_BLOSC = {"cname": "zstd", "clevel": 1, "blocksize": 256 << 10}
#: Zarr v3 chunk keys: ``c/0/0`` (the default encoding's ``/``: a directory per chunk row of a 2-D
#: array). ``.`` (``c.0.0``, an array's chunk files in one directory) creates half the inodes: on
#: the 2-core bench VM, where outputs are written and removed often, each costs ~1 ms of kernel
#: CPU; measured at 1 GiB zarr-zstd, A/B alternating: 4.85 vs 5.18 CPU s. Both are read by every
#: reader; tests/test_zarr.py hardcodes ``/`` in two places (requested to follow this constant).
V3_SEPARATOR = "/"
#: ``--compression blosc``: lz4 over bit-shuffled bytes, every dtype: saves within 1.5 points of
#: ``zstd`` on float weights for ~75% of its CPU.
BLOSC = {"cname": "lz4", "clevel": 5, "blocksize": 0}
ORBAX_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
#: The item a ``CheckpointManager`` step holds when saved with one unnamed item (``DEST/STEP/default/``).
ORBAX_ITEM = "default"
#: Names that would collide with metadata keys of the layout.
_RESERVED = {"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata", PARTIAL_KEY}
_ORBAX_RESERVED = _RESERVED | {"_METADATA", "_CHECKPOINT_METADATA", "commit_success.txt", "_sharding",
                               "manifest.ocdbt", "d", "descriptor", "_ARRAY_METADATA"}
#: Longest file or directory name (bytes) most filesystems take: a key component of a local store.
MAX_COMPONENT_BYTES = 255
#: Handles kept open at once (the engine writes tensors in order; a few suffice).
_OPEN_HANDLES = 8
#: ``write`` returns a pending receipt, so the engine keeps writes in flight (as many as its
#: pool allows: two at the default four buffers) while the next chunks are read and encoded.
IN_FLIGHT = True


def chunk_shape(shape: tuple[int, ...], isz: int, target: int) -> list[int]:
    """Zarr chunk shape: whole trailing dims and as many indices of the first axis that
    does not fit whole as make ``target`` bytes. A function of the shape and the target
    alone, so the output's bytes never depend on ``--max-memory`` (the engine cuts its
    chunks into whole Zarr chunks, or refuses a budget too small for one)."""
    if not shape:
        return []
    if 0 in shape:  # no elements, no chunks written: chunk as if each empty axis had length 1
        return chunk_shape(tuple(max(1, d) for d in shape), isz, target)
    n = len(shape)
    chunks = [1] * n
    for d in range(n):
        trailing = math.prod(shape[d + 1:]) * isz
        if trailing <= target or d == n - 1:
            chunks[d] = max(1, min(shape[d], target // max(trailing, 1)))
            chunks[d + 1:] = [max(1, s) for s in shape[d + 1:]]
            break
    return chunks


def _fill_value(dtype: str) -> Any:
    if dtype == "bool":
        return False
    if dtype.startswith("complex"):
        return [0.0, 0.0]
    if dtype.startswith(("float", "bfloat")):
        return 0.0
    return 0


def array_metadata(fmt: int, shape: tuple[int, ...], dtype: str, chunks: list[int],
                   compression: str) -> dict[str, Any]:
    """Complete Zarr array metadata (``zarr.json`` or ``.zarray`` contents) for one array."""
    isz = itemsize(dtype)
    blosc = BLOSC if compression == "blosc" else ZSTD_BLOSC if compression == "zstd" and isz > 1 else None
    if fmt == 3:
        codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}
                                        if isz > 1 else {"name": "bytes"}]
        if blosc is not None:
            codecs.append({"name": "blosc", "configuration": {**blosc, "shuffle": "bitshuffle", "typesize": isz}})
        elif compression == "zstd":
            codecs.append({"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}})
        return {"zarr_format": 3, "node_type": "array", "shape": list(shape), "data_type": dtype,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": V3_SEPARATOR}},
                "fill_value": _fill_value(dtype), "codecs": codecs}
    compressor = None
    if blosc is not None:
        compressor = {"id": "blosc", **blosc, "shuffle": 2}  # 2: bit shuffle
    elif compression == "zstd":
        compressor = {"id": "zstd", "level": ZSTD_LEVEL}
    return {"zarr_format": 2, "shape": list(shape), "chunks": chunks,
            "dtype": dtype if is_ml_dtype(dtype) else numpy_dtype(dtype).str, "compressor": compressor,
            "fill_value": None, "order": "C", "filters": None, "dimension_separator": "."}


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _fixed_name(name: str) -> str:
    """``name`` with each path component made valid in a Zarr store (for a suggested rule)."""
    def fix(part: str) -> str:
        if part.startswith("__"):
            part = part.lstrip("_") or "x"
        if not part.strip("."):
            part = "_" * len(part)
        return part.encode("utf-8")[:MAX_COMPONENT_BYTES - 32].decode("utf-8", "ignore")
    return "/".join(map(fix, name.split("/")))


def _nesting_problems(outputs: list[OutputTensor]) -> list[str]:
    """Each tensor that is also a group (``a`` and ``a/b``), with the fix: --drop-optimizer
    when what sits below it is optimizer state, an EMA or a counter, else a rename rule."""
    tensors = {o.name for o in outputs}
    below: dict[str, list[str]] = {}
    for name in tensors:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in tensors:
                below.setdefault("/".join(parts[:i]), []).append(name)
                break
    if not below:
        return []
    roles = assign_roles([TensorInfo(o.name, o.dtype, o.shape, o.nbytes) for o in outputs])
    state = {o.name for o, r in zip(outputs, roles) if r.kind != "param"}
    problems = []
    for parent, children in sorted(below.items()):
        children.sort()
        shown = ", ".join(map(repr, children[:3])) + (f" and {len(children) - 3} more" if len(children) > 3 else "")
        head = f"{parent!r} is both a tensor and a group (holding {shown})"
        if parent in state or state.issuperset(children):
            problems.append(f"{head}; these are optimizer state or EMA copies: leave them out with --drop-optimizer")
            continue
        new = next(f"{parent}/{v}" for v in ("value", "value_", "value__", parent.rsplit("/", 1)[-1] + "_value")
                   if f"{parent}/{v}" not in tensors)
        problems.append(f"{head}; move the tensor into the group with a rule: {rename_rule(parent, new)} "
                        "(or write --layout orbax, whose names do not nest)")
    return problems


class _PendingWrite:
    """A chunk's write in flight: ``result()`` waits for TensorStore's commit (a store error
    becomes a one-line DestinationError) and returns the chunk's receipt."""

    def __init__(self, future: Any, where: str, written: Callable[[], int]) -> None:
        self._future, self._where, self._written = future, where, written
        self._receipt: int | None = None

    def done(self) -> bool:
        return self._receipt is not None or bool(self._future.done())

    def wait(self) -> None:
        """Wait for the commit (or the failure), without the receipt."""
        self._future.result()

    def result(self) -> int:
        if self._receipt is None:
            tsio.wrap(DestinationError, self._where, self._future.result)
            self._receipt = self._written()
        return self._receipt


class _Array:
    """One output tensor's place in the store."""

    def __init__(self, out: OutputTensor, key: str, storage: str, chunks: list[int], metadata: dict[str, Any]):
        self.out = out
        self.key = key                # key prefix inside the store, without trailing "/"
        self.storage = storage        # dtype written (the output's, or uint8 for uint4/uint2)
        self.itemsize = itemsize(storage)
        self.chunks = chunks
        self.metadata = metadata
        self.encode: Encoder | None = None  # a local store's chunk encoder; None: TensorStore writes

    @property
    def np_dtype(self) -> np.dtype:
        """The storage dtype in NumPy (bfloat16 and float8 import ml_dtypes: TensorStore paths only)."""
        return numpy_dtype(self.storage)


def _parse_int(text: str) -> int:
    return int(text)


@dataclass(frozen=True)
class ZarrOptions(SinkOptions):
    """Options of the Zarr sink (see the module docstring)."""

    zarr_format: int = sink_option(3, "Zarr v3 (default) or v2", choices=(2, 3), parse=_parse_int)
    compression: str = sink_option("none", "chunk compression (default none)", choices=COMPRESSIONS)
    chunk_mib: float = sink_option(DEFAULT_CHUNK_MIB, "target Zarr chunk size (default 4)", metavar="MIB",
                                   parse=float)
    layout: str = sink_option("zarr", "zarr: a group per '/' in names (default); orbax: a checkpoint "
                              "orbax.checkpoint restores", choices=LAYOUTS)
    orbax_step: int | None = sink_option(None, "with --layout orbax: write DEST/N/default/ as "
                                         "orbax.checkpoint.CheckpointManager(DEST) saves step N, beside other "
                                         "steps in DEST", metavar="N", parse=_parse_int)

    def validate(self) -> None:
        """Raises: UsageError for a chunk size out of range or a step without the Orbax layout."""
        if isinstance(self.chunk_mib, bool) or not isinstance(self.chunk_mib, (int, float)) \
                or not 1 / 1024 <= self.chunk_mib <= 1024:
            raise UsageError(f"{option_name('chunk_mib')} must be between 1/1024 and 1024, not {self.chunk_mib!r}")
        if self.orbax_step is not None and self.layout != "orbax":
            raise UsageError(f"{option_name('orbax_step')} writes a CheckpointManager step of the Orbax layout; "
                             f"pass {option('layout', 'orbax')}")
        if self.orbax_step is not None and (not isinstance(self.orbax_step, int) or self.orbax_step < 0):
            raise UsageError(f"{option_name('orbax_step')} must be a non-negative integer, not {self.orbax_step!r}")


class ZarrSink(Sink):
    """Zarr output through TensorStore (see the module docstring)."""

    name = "zarr"
    Options = ZarrOptions
    receipt_checksum = "crc32"  # computed by the engine's reader while the bytes are in cache
    options_help = "Zarr output (DEST ending in .zarr, or --to zarr; see docs/zarr.md)"
    opts: ZarrOptions

    def __init__(self, options: ZarrOptions | None = None) -> None:
        super().__init__(options)
        self.zarr_format = self.opts.zarr_format
        self.chunk_mib = float(self.opts.chunk_mib)
        self.orbax_step = self.opts.orbax_step
        self.compression = self.opts.compression
        self.layout = self.opts.layout
        # A step joins other steps in a local directory; no object store.
        self.capabilities = Capabilities(nested_names=self.layout == "zarr", remote=self.orbax_step is None)
        self.url: str | None = None           # object-store destination, or None for a local path
        self._kv_spec: dict[str, Any] | None = None
        self._kvstore: Any = None
        self._arrays: list[_Array] = []
        self._by_name: dict[str, _Array] = {}
        self._handles: dict[tuple[int, bool], Any] = {}
        self._scratch: np.ndarray | None = None
        self._in_flight: list[_PendingWrite | PendingFiles] = []  # writes nobody has waited for yet
        self._files: ChunkFiles | None = None  # a local store's chunk writer
        self._unsynced: list[Path] = []  # local chunk files committed since the last sync
        self._where = "zarr output"
        self._unpublished = False  # the completion marker is known to be absent

    # -- engine hooks -------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        opts = {**self.opts.recorded(), "chunk_mib": self.chunk_mib}
        return opts

    def baseline_bytes(self) -> int:
        # TensorStore's import and thread pools: bench peak RSS of the zarr row minus the npz row.
        return tsio.TENSORSTORE_BYTES

    def scratch_slots(self) -> int:
        # A local store: the encoded chunk each encoding thread holds and one padded edge chunk
        # (``ChunkFiles``). An object store: TensorStore's encoded copies of the chunks in flight
        # (two at the engine's default four buffers). A resume: TensorStore's decoded chunk and
        # our own chunk-sized scratch buffer. Each at most an engine chunk.
        return max(2, default_workers() + 1)

    def _use(self, dest: Destination) -> None:
        """Address ``dest``: an object store's URL and kvstore, or (url None) a local store."""
        if dest.url is not None and dest.url != self.url:
            self.url = dest.url
            self._kv_spec = tsio.kvstore_spec(dest.url)
            self._kvstore = None
            self._where = dest.url

    def exists(self, dest: Destination) -> bool:
        """A local output: anything at its place; an object store: the root marker at the URL."""
        if not dest.is_url:
            return super().exists(dest)
        self._use(dest)
        return self._has(self._marker_key())

    def chunk_grid(self, output: OutputTensor) -> tuple[int, ...]:
        target = max(1, int(self.chunk_mib * (1 << 20)))
        return tuple(chunk_shape(output.shape, itemsize(STORAGE_DTYPE.get(output.dtype, output.dtype)), target))

    def min_chunk_bytes(self, outputs: list[OutputTensor]) -> tuple[int, str]:
        need, why = 0, ""
        for o in outputs:
            grid = self.chunk_grid(o)
            nbytes = math.prod(grid) * itemsize(STORAGE_DTYPE.get(o.dtype, o.dtype)) if o.nbytes else 0
            if nbytes > need:
                need, why = nbytes, (f"Zarr chunks {list(grid)} of {o.name!r} ({format_size(nbytes)}, from "
                                     f"{option_name('chunk_mib')} {self.chunk_mib:g})")
        return need, why

    # -- layout -----------------------------------------------------------------------

    def final_paths(self, dest: Path) -> list[Path]:
        return [dest if self.orbax_step is None else dest / str(self.orbax_step)]

    def _item_prefix(self) -> str:
        """Where the Orbax item's files go in the store: its root, or ``STEP/default/``."""
        return "" if self.orbax_step is None else f"{self.orbax_step}/{ORBAX_ITEM}/"

    def _completion_keys(self) -> list[str]:
        """What marks the store complete, the marker first (Orbax: its commit files too)."""
        keys = [self._marker_key()]
        if self.layout == "orbax":
            keys.append(self._item_prefix() + "commit_success.txt")
            if self.orbax_step is not None:
                keys.append(f"{self.orbax_step}/commit_success.txt")
        return keys

    def _marker_key(self) -> str:
        if self.layout == "orbax":
            return self._item_prefix() + "_METADATA"
        return "zarr.json" if self.zarr_format == 3 else ".zgroup"

    def _array_key(self, name: str) -> str:
        return self._item_prefix() + name.replace("/", ".") if self.layout == "orbax" else name

    def _moves(self, dest: Path) -> list[tuple[Path, Path]]:
        """The renames that publish a local output: a step joins the steps already in DEST."""
        if self.orbax_step is not None and dest.is_dir():
            step = str(self.orbax_step)
            return [(self.out / step, dest / step)]
        return [(self.out, dest)]

    def check_outputs(self, outputs: list[OutputTensor]) -> list[str]:
        """Names a Zarr store cannot hold, string tensors, collisions with metadata names or
        between keys, and names that are both a tensor and a group; each with its fix."""
        problems = []
        keys: dict[str, str] = {}
        reserved = _ORBAX_RESERVED if self.layout == "orbax" else _RESERVED
        for o in outputs:
            why = self._name_problem(o.name)
            if why:
                problems.append(f"{o.name!r}: {why}")
                continue
            if o.dtype == STRING:
                problems.append(f"{o.name!r}: string tensors cannot be stored in Zarr; drop or map them")
            key = self._array_key(o.name)
            if any(p in reserved for p in key.split("/")):
                problems.append(f"{o.name!r}: collides with a metadata name of the {self.layout} layout")
            if key in keys:
                problems.append(f"{o.name!r} and {keys[key]!r} both map to array {key!r} in the {self.layout} layout")
            keys[key] = o.name
        if self.layout == "zarr":
            problems += _nesting_problems(outputs)
        return problems

    def _name_problem(self, name: str) -> str | None:
        """Why ``name`` cannot be a key in this store (with a rule that fixes it), or None."""
        why = check_name(name)
        if why:
            return f"unsafe as a Zarr path ({why})"
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid UTF-8 (a lone surrogate); Zarr keys are UTF-8"
        for part in self._array_key(name).split("/"):
            if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
                why = (f"a path component of {len(part.encode('utf-8'))} bytes (files and directories "
                       f"hold at most {MAX_COMPONENT_BYTES})")
            elif self.zarr_format == 3 and part.startswith("__"):
                why = f"the component {part!r} starts with '__', reserved by the Zarr v3 spec"
            elif self.zarr_format == 3 and not part.strip("."):
                why = f"the component {part!r} is only periods, refused by the Zarr v3 spec"
            else:
                continue
            return f"{why}; rename it with a rule: {rename_rule(name, _fixed_name(name))}"
        return None

    def _layout(self, out: Path, outputs: list[OutputTensor]) -> None:
        """Each array's key, storage dtype, chunk shape and metadata (a pure function of the
        outputs, the options and the engine's chunk size)."""
        assert self.ctx is not None
        self.out = out
        self._use(self.ctx.dest)
        if self.url is None:
            self._where = str(out)
            self._kv_spec = tsio.kvstore_spec(out)
        self._arrays = []
        for o in outputs:
            storage = STORAGE_DTYPE.get(o.dtype, o.dtype)
            chunks = list(self.chunk_grid(o))
            md = array_metadata(self.zarr_format, o.shape, storage, chunks, self.compression)
            self._arrays.append(_Array(o, self._array_key(o.name), storage, chunks, md))
        self._by_name = {a.out.name: a for a in self._arrays}
        self._handles = {}
        if self._files is not None:
            self._files.close()
            self._files = None
        if self.url is None:
            for a in self._arrays:
                a.encode = None if a.storage in MASKED_DTYPES else encoder(a.metadata, a.itemsize)
            self._files = ChunkFiles(out, self.zarr_format, bool(self.ctx.durable), default_workers(), V3_SEPARATOR)

    def prepare(self, out: Path, outputs: list[OutputTensor]) -> None:
        """A local store: an empty directory (room checked). An object store: the prefix made
        ours and not complete-looking (see ``_claim_remote``), a local placeholder beside."""
        self._layout(out, outputs)
        if self.url is None:
            safefs.remove(out)
            safefs.make_dir(out)
            need = sum(o.nbytes for o in outputs) if self.compression == "none" else 0
            check_free_space(out.parent, need)
        else:
            safefs.make_dir(out)  # local placeholder: tells the engine a partial run exists
            safefs.write_file(out.parent / "destination.txt", (self.url + "\n").encode(), fsync=False)
            self._claim_remote()
        self._unpublished = True

    def attach(self, out: Path, outputs: list[OutputTensor]) -> None:
        """Address the store a prepare made; nothing in it changes. A finished store keeps its
        root marker until a chunk is written again (``write`` removes it first)."""
        self._layout(out, outputs)
        safefs.make_dir(out)  # already there (a local store, or the placeholder of a remote one)
        self._unpublished = False

    def _claim_remote(self) -> None:
        """Make the prefix ours and not complete-looking: remove a previous (ours) store; refuse
        a prefix holding foreign data."""
        marker = self._marker_key()
        if self._has(PARTIAL_KEY) or self._has(marker):
            self._delete(marker)
            self._delete_all()
        else:
            keys = tsio.wrap(DestinationError, self._where, lambda: self._kv().list().result())
            if keys:
                raise DestinationError(f"{self.url}: holds {len(keys)} objects shardconv did not write "
                                       f"(e.g. {keys[0].decode(errors='replace')!r}); choose an empty prefix")
        self._mark_partial()

    def _mark_partial(self) -> None:
        if self.url is not None:
            self._put(PARTIAL_KEY, _json({"format": "shardconv-partial", "shardconv": __version__,
                                          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))

    def _unpublish(self) -> None:
        """Before the first chunk written after an attach: the completion markers go (the
        marker first: a store that looks complete must be complete), the prefix marked ours."""
        for key in self._completion_keys():
            self._delete(key)
        self._mark_partial()
        self._unpublished = True

    # -- TensorStore access ---------------------------------------------------------

    def _kv(self) -> Any:
        if self._kvstore is None:
            ts = tsio.tensorstore("Zarr output")
            ctx = tsio.context(durable=False)  # local files are fsynced once, in finish
            self._kvstore = tsio.wrap(DestinationError, self._where,
                                      lambda: ts.KvStore.open(self._kv_spec, context=ctx).result())
        return self._kvstore

    def _has(self, key: str) -> bool:
        r = tsio.wrap(DestinationError, f"{self._where}/{key}", lambda: self._kv().read(key).result())
        return r.state == "value"

    def _put(self, key: str, data: bytes) -> None:
        if self.url is None:  # a local store: a plain file (no TensorStore import for a local run)
            path = self.out / key
            try:
                os.makedirs(path.parent, exist_ok=True)
            except OSError as e:
                raise DestinationError(f"{path.parent}: cannot create: {e.strerror}") from None
            safefs.write_file(path, data, fsync=False)  # fsynced with the tree (finish)
            return
        tsio.wrap(DestinationError, f"{self._where}/{key}", lambda: self._kv().write(key, data).result())

    def _delete(self, key: str) -> None:
        if self.url is None:
            safefs.remove(self.out / key)
            return
        tsio.wrap(DestinationError, f"{self._where}/{key}", lambda: self._kv().write(key, None).result())

    def _delete_all(self) -> None:
        ts = tsio.tensorstore()
        tsio.wrap(DestinationError, self._where, lambda: self._kv().delete_range(ts.KvStore.KeyRange()).result())

    def _handle(self, index: int, reading: bool = False) -> Any:
        """The TensorStore of output ``index``; reads refuse missing chunks."""
        h = self._handles.get((index, reading))
        if h is not None:
            return h
        ts = tsio.tensorstore("Zarr output")
        a = self._arrays[index]
        assert self._kv_spec is not None  # set by open
        spec = {"driver": "zarr3" if self.zarr_format == 3 else "zarr",
                "kvstore": {**self._kv_spec, "path": self._kv_spec["path"] + a.key + "/"},
                "metadata": a.metadata, "assume_metadata": True, "store_data_equal_to_fill_value": True,
                "fill_missing_data_reads": not reading}
        h = tsio.wrap(DestinationError, f"{self._where}: array {a.key!r}",
                      lambda: ts.open(spec, context=tsio.context(durable=False)).result())
        if len(self._handles) >= _OPEN_HANDLES:
            self._handles.pop(next(iter(self._handles)))
        self._handles[(index, reading)] = h
        return h

    def _region(self, chunk: Chunk) -> tuple[tuple[slice, ...], tuple[int, ...]]:
        a = self._arrays[chunk.index]
        region = chunk_region(a.out.shape, a.itemsize, chunk.offset, chunk.length)
        return region, tuple(s.stop - s.start for s in region)

    # -- chunks -------------------------------------------------------------------------

    def write(self, chunk: Chunk, data: memoryview, crc: int | None = None) -> int | _PendingWrite | PendingFiles:
        """Start writing the chunk; returns a pending receipt (``result()`` waits for the
        write), so the next chunks are read meanwhile. A local store's chunk files are encoded
        and written by the sink's threads (``ChunkFiles``), an object store's by TensorStore."""
        if chunk.length == 0:
            return 0
        a = self._arrays[chunk.index]
        region, shape = self._region(chunk)
        if not self._unpublished:
            self._unpublish()
        self._scratch = None  # the resume checks are over
        where = f"{self._where}: array {a.key!r}"
        if a.encode is not None and self._files is not None:
            files = self._files.write(a.key, a.out.shape, a.chunks, a.itemsize, a.encode, region, data, crc, where)
            self._in_flight = [w for w in self._in_flight if not w.done()] + [files]
            return files if IN_FLIGHT else files.result()
        import numpy as np

        arr = np.frombuffer(data, dtype=a.np_dtype).reshape(shape)
        store = self._handle(chunk.index)
        # TensorStore references ``data`` instead of copying it (half the time of a copy into fresh
        # memory). Safe: the engine leaves the buffer untouched until ``result()`` has seen the
        # commit, after which nothing holds it (the cache pool is 0 bytes).
        future = tsio.wrap(DestinationError, where,
                           lambda: store[region].write(arr, can_reference_source_data_indefinitely=True))
        pending = _PendingWrite(future, where, lambda: self._written(a, region, data, crc))
        if not IN_FLIGHT:
            return pending.result()
        self._in_flight = [w for w in self._in_flight if not w.done()] + [pending]
        return pending

    def _written(self, a: _Array, region: tuple[slice, ...], data: memoryview, crc: int | None) -> int:
        """After a chunk's commit: start its writeback; its receipt (the CRC32 of its bytes)."""
        if self.url is None and self.ctx is not None and self.ctx.durable:
            self._writeback(a, region)
        return crc32(data) if crc is None else crc

    def _chunk_files(self, a: _Array, region: tuple[slice, ...]) -> list[Path]:
        """The files of the Zarr chunks ``region`` covers (a local store)."""
        grid = [range(s.start // c, -(-s.stop // c)) for s, c in zip(region, a.chunks)]
        return [chunk_file(self.out, self.zarr_format, a.key, idx, V3_SEPARATOR) for idx in itertools.product(*grid)]

    def _writeback(self, a: _Array, region: tuple[slice, ...]) -> None:
        """Start writing the chunk files just committed back to disk (as the NPZ sink does),
        so dirty pages never pile up and the final fsync (or ``sync``) finds little left to do."""
        files = self._chunk_files(a, region)
        self._unsynced += files
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                start_writeback(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)

    def sync(self) -> bool:
        """Make every chunk committed so far durable, so a resume keeps them without reading
        them back: a local store's new chunk files fsynced, then their directories up to the
        store's (TensorStore renames each file into place); an object store's writes are durable
        once committed (``memory://`` never is). Raises: DurabilityError."""
        if self.url is not None:
            return tsio.scheme(self.url) != "memory"
        files, self._unsynced = self._unsynced, []
        if self._files is not None:
            files += self._files.take_written()
        dirs: set[Path] = set()
        for path in files:
            fsync_path(path)
            d = path.parent
            while d != self.out and d not in dirs:
                dirs.add(d)
                d = d.parent
        for d in sorted(dirs, key=lambda p: -len(p.parts)) + [self.out]:
            fsync_dir(d)
        return True

    def check(self, chunk: Chunk, receipt: Any) -> bool:
        if chunk.length == 0:
            return receipt == 0
        ts = tsio.tensorstore()
        a = self._arrays[chunk.index]
        region, shape = self._region(chunk)
        import numpy as np

        if self._scratch is None or self._scratch.size < chunk.length:
            self._scratch = np.empty(max(chunk.length, self.ctx.chunk_bytes if self.ctx else 0), np.uint8)
        raw = self._scratch[: chunk.length]
        try:
            dst = ts.array(raw.view(a.np_dtype).reshape(shape), copy=False, write=True)
            dst.write(self._handle(chunk.index, reading=True)[region].translate_to[0]).result()
        except Exception:  # missing or unreadable chunk: write it again
            return False
        if crc32(raw) != receipt:
            return False
        if self.url is None and self.ctx is not None and self.ctx.durable:
            self._unsynced += self._chunk_files(a, region)  # a durable mark will vouch for it too
        return True

    # -- finish -------------------------------------------------------------------------

    def finish(self, receipts: list[tuple[Chunk, Any]], manifest: dict[str, Any]) -> list[tuple[Path, Path]]:
        """Array metadata, then the groups, then the root files (the completion marker last);
        a local store is fsynced (``ctx.durable``) and renamed by the engine."""
        assert self.ctx is not None
        dest = self.ctx.dest.path
        crcs = [0] * len(self._arrays)
        for chunk, crc in sorted(receipts, key=lambda r: (r[0].index, r[0].offset)):
            crcs[chunk.index] = combine_crc32(crcs[chunk.index], crc, chunk.length)
        self._handles = {}
        files: list[tuple[str, bytes]] = []
        for a, crc, entry in zip(self._arrays, crcs, manifest["tensors"]):
            attrs = {"shardconv": _array_attrs(a, crc, entry)}
            if self.zarr_format == 3:
                files.append((f"{a.key}/zarr.json", _json({**a.metadata, "attributes": attrs})))
            else:
                files += [(f"{a.key}/.zarray", _json(a.metadata)), (f"{a.key}/.zattrs", _json(attrs))]
        if self.layout == "zarr":
            groups = sorted({"/".join(a.key.split("/")[:i])
                             for a in self._arrays for i in range(1, a.key.count("/") + 1)})
            for g in groups:
                files += ([(f"{g}/zarr.json", _json({"zarr_format": 3, "node_type": "group", "attributes": {}}))]
                          if self.zarr_format == 3 else [(f"{g}/.zgroup", _json({"zarr_format": 2}))])
        self._put_many(files)
        for key, data in self._root_files(manifest, dest):  # the completion marker is the last of these
            self._put(key, data)
        if self.url is not None:
            self._delete(PARTIAL_KEY)
            return []
        if self.ctx.durable:
            fsync_tree(self.out)  # nothing is visible at DEST before the engine's rename
        return self._moves(dest)

    def _root_files(self, manifest: dict[str, Any], dest: Path) -> list[tuple[str, bytes]]:
        summary = root_summary(manifest, self.options())
        if self.layout == "orbax":
            return self._orbax_files(summary, dest)
        if self.zarr_format == 3:
            root = {"zarr_format": 3, "node_type": "group", "attributes": {"shardconv": summary}}
            return [("zarr.json", _json(root))]
        return [(".zattrs", _json({"shardconv": summary})), (".zgroup", _json({"zarr_format": 2}))]

    def _orbax_files(self, summary: dict[str, Any], dest: Path) -> list[tuple[str, bytes]]:
        """Orbax's files, the commit marker last: those of an item (``StandardCheckpointer``),
        or with ``orbax_step`` those of a ``CheckpointManager`` step holding item ``default``."""
        now = time.time_ns()
        tree = {}
        for a in self._arrays:
            parts = a.out.name.split("/")
            tree[str(tuple(parts))] = {"key_metadata": [{"key": p, "key_type": 2} for p in parts],
                                       "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
        step = self.orbax_step
        handlers = ORBAX_HANDLER if step is None else {ORBAX_ITEM: ORBAX_HANDLER}
        meta = _json({"item_handlers": handlers, "metrics": {}, "performance_metrics": {},
                      "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
                      "custom_metadata": {"shardconv": summary}})
        item = ("_METADATA", json.dumps({"tree_metadata": tree, "use_ocdbt": False,
                                         "use_zarr3": self.zarr_format == 3,
                                         "store_array_data_equal_to_fill_value": True,
                                         "custom_metadata": None}).encode())
        where = str(self.url or dest)
        if step is None:
            return [("_CHECKPOINT_METADATA", meta), item,
                    ("commit_success.txt", f"Checkpoint commit was successful to {where}".encode())]
        at = f"{where}/{step}"
        return [(self._item_prefix() + item[0], item[1]),
                (self._item_prefix() + "commit_success.txt",
                 f"Checkpoint commit was successful to {at}/{ORBAX_ITEM}".encode()),
                (f"{step}/_CHECKPOINT_METADATA", meta),
                (f"{step}/commit_success.txt", f"Checkpoint commit was successful to {at}".encode())]

    def _put_many(self, files: list[tuple[str, bytes]], batch: int = 256) -> None:
        """Write small objects concurrently, a batch at a time (bounded memory); local files in turn."""
        if self.url is None:
            for key, data in files:
                self._put(key, data)
            return
        kv = self._kv()
        for i in range(0, len(files), batch):
            part = files[i:i + batch]
            futures = [(k, kv.write(k, v)) for k, v in part]
            for k, f in futures:
                tsio.wrap(DestinationError, f"{self._where}/{k}", f.result)

    def close(self) -> None:
        """Wait for writes still in flight (a failed run's: their errors were or will be reported
        elsewhere), so nothing writes into the store once the engine has let go of it; chunk
        files not yet started are not written."""
        if self._files is not None:
            self._files.close()
            self._files = None
        for w in self._in_flight:
            with contextlib.suppress(Exception):  # the run failed already; its first error is reported
                w.wait()
        self._in_flight = []
        self._handles = {}
        self._scratch = None


def root_summary(manifest: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The manifest without its per-tensor list (that is in each array's attributes):
    the root group's ``shardconv`` attribute (Orbax layout: ``_CHECKPOINT_METADATA``)."""
    summary = {k: v for k, v in manifest.items() if k != "tensors"}
    summary.update(tensors=len(manifest["tensors"]), zarr=options)
    dropped = summary.get("dropped") or []
    if len(dropped) > MAX_DROPPED_LISTED:
        by_reason: dict[str, int] = {}
        for d in dropped:
            by_reason[d["reason"]] = by_reason.get(d["reason"], 0) + 1
        summary["dropped"] = [{"reason": r, "count": n} for r, n in sorted(by_reason.items())]
        summary["dropped_summarized"] = True
    return summary


def _array_attrs(a: _Array, crc: int, entry: dict[str, Any]) -> dict[str, Any]:
    """Per-array ``shardconv`` attributes: enough to trace and check the array alone."""
    d = entry.get("from") or {}
    names = [d["from"]] if isinstance(d.get("from"), str) else sorted({p["from"] for p in d.get("pieces", [])})
    attrs: dict[str, Any] = {"name": a.out.name, "dtype": a.out.dtype, "crc32": crc, "source_names": names}
    if entry.get("source_dtypes"):
        attrs["source_dtypes"] = entry["source_dtypes"]
    if entry.get("source_checksums"):
        attrs["source_checksums"] = entry["source_checksums"]
    if d.get("op") and d.get("op") != "copy":
        attrs["op"] = d["op"]
    if a.storage != a.out.dtype:
        attrs["storage_dtype"] = a.storage
    return attrs
