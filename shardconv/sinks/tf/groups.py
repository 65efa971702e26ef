"""Values written through TensorFlow's ``SaveV2`` in *groups*, merged at the end.

Each chunk (a hyper-rectangle of one tensor) is copied into an aligned group buffer; a full
buffer is written by one ``tf.raw_ops.SaveV2`` call (slice specs for partial tensors) into its
own prefix ``gNNNNNN``, with a sidecar listing its chunks and their CRC32C. ``merge`` joins the
groups (and the carried tensors) with ``tf.raw_ops.MergeV2Checkpoints``.

Resume: a group is all or nothing. On reopening every group is re-read and checked against
its sidecar (index entry CRCs and data bytes); a group that fails is deleted, so its chunks
fail ``check`` and are redone. The merged result is one more such group.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...core.budget import ALIGN, aligned_empty
from ...core.plan import Chunk, OutputTensor, chunk_region
from ...errors import DestinationError, ResumeError
from ...formats.bundle_entries import parse_entry, slice_key
from ...formats.sstable import SSTable
from ...formats.wire import as_int64, fields
from ...frontend import option
from ...util import safefs
from ...util.checksums import crc32c, mask
from ...util.dtypes import itemsize, numpy_dtype
from ...util.fileio import start_writeback
from .. import filesink
from . import ops

_GROUP_RE = re.compile(r"^g(\d{6})\.json$")

Ident = tuple[int, int, int]  # (output index, offset, length): a chunk


def ident(c: Chunk) -> Ident:
    return (c.index, c.offset, c.length)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (tmp + rename): a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    safefs.write_file(tmp, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode(), fsync=False)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def prefix_files(prefix: Path) -> list[Path]:
    """Every file of a bundle prefix (index, data shards, TF's temp files)."""
    if not prefix.parent.is_dir():
        return []
    return [p for p in prefix.parent.iterdir() if p.name.startswith(prefix.name + ".")]


def slice_spec(o: OutputTensor, c: Chunk) -> tuple[str, list[tuple[int, int]] | None]:
    """SaveV2 ``shape_and_slices`` for a chunk: "" for a whole tensor, else e.g. ``"4 3 0,2:-"``;
    with the (start, length | -1) extents TensorFlow keys the slice by."""
    if not o.shape or c.length == o.nbytes:
        return "", None
    region = chunk_region(o.shape, itemsize(o.dtype), c.offset, c.length)
    ext = [(s.start, -1) if (s.start, s.stop) == (0, d) else (s.start, s.stop - s.start)
           for s, d in zip(region, o.shape)]
    spec = ":".join("-" if n == -1 else f"{s},{n}" for s, n in ext)
    return " ".join(str(d) for d in o.shape) + " " + spec, ext


def region_shape(o: OutputTensor, c: Chunk) -> tuple[int, ...]:
    if not o.shape or c.length == o.nbytes:
        return tuple(o.shape)
    return tuple(s.stop - s.start for s in chunk_region(o.shape, itemsize(o.dtype), c.offset, c.length))


def bundle_entries(prefix: Path) -> tuple[int, dict[bytes, bytes]] | None:
    """(num_shards, key -> raw entry) of a bundle index, or None if it is missing or corrupt."""
    try:
        with SSTable(str(prefix) + ".index") as table:
            items = dict(table.items())
        header = items[b""]
        shards = [as_int64(v) for n, w, v in fields(header, "bundle header") if n == 1 and w == 0]  # type: ignore[arg-type]
    except Exception:
        return None
    return (shards[0] if shards else 1), items


def data_crc(path: Path, offset: int, size: int) -> int | None:
    """CRC32C of ``size`` bytes at ``offset`` of ``path``, or None if they cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return filesink.range_crc32(fd, offset, size, crc32c)
    finally:
        os.close(fd)


def members_of(doc: Any) -> dict[Ident, int] | None:
    try:
        return {(int(i), int(o), int(n)): int(c) for i, o, n, c in doc["members"]}
    except (TypeError, KeyError, ValueError):
        return None


@dataclass
class _Pending:
    ident: Ident
    keys: list[str]
    spec: str
    shape: tuple[int, ...]
    dtype: str
    pos: int
    crc: int


def tensor_over(tf: Any, buf: np.ndarray, p: _Pending) -> Any:
    """A TF tensor over the chunk's bytes in the group buffer, without copying (DLPack + bitcast)."""
    dt = numpy_dtype(p.dtype)
    n = math.prod(p.shape) * dt.itemsize
    if n == 0:
        return tf.zeros(p.shape, tf.dtypes.as_dtype(dt))
    raw = buf[p.pos:p.pos + n]
    if dt.kind in "biufc" and dt.type.__module__ == "numpy":
        t = tf.experimental.dlpack.from_dlpack(raw.view(dt).__dlpack__())
    else:
        tdt = tf.dtypes.as_dtype(dt)
        try:
            u = tf.experimental.dlpack.from_dlpack(raw.__dlpack__())
            t = tf.bitcast(tf.reshape(u, [-1, dt.itemsize]) if dt.itemsize > 1 else u, tdt)
        except tf.errors.InvalidArgumentError:
            # float8 / int4 / int2: Bitcast does not take them; TF copies the chunk once.
            return tf.constant(raw.view(dt).reshape(p.shape), dtype=tdt)
    return tf.reshape(t, p.shape)


class Groups:
    """The groups of one output: buffered chunks, written groups, the merged result."""

    def __init__(self, work: Path, outputs: list[OutputTensor], keys: dict[str, list[str]], label: Path) -> None:
        self.dir = work / "groups"
        self.work, self.outputs, self.keys, self.label = work, outputs, keys, label
        self.chunk_bytes, self.durable = 0, True
        self._buf: np.ndarray | None = None
        self._pending: list[_Pending] = []
        self._fill = self._gid = 0
        self._groups: dict[int, dict[Ident, int]] = {}
        self._merged: dict[Ident, int] | None = None
        self._known: dict[Ident, tuple[int | str, int]] = {}

    # -- resume

    def reload(self, final: Path, carry: bool) -> bool:
        """Keep what survives checking (groups, the merged result); False = start over."""
        if not self.dir.is_dir():
            return False
        merged = members_of(read_json(self.work / "merged.json"))
        if merged is not None and self.valid(final, merged):
            self._merged = merged
            self._known = {i: ("merged", crc) for i, crc in merged.items()}
        else:
            safefs.remove(self.work / "merged.json")
            if carry and bundle_entries(self.work / "carry") is None:
                return False  # the layout's own tensors are gone: rebuild everything
            for p in prefix_files(final):
                p.unlink()
        gids = [int(m.group(1)) for p in sorted(self.dir.iterdir()) if (m := _GROUP_RE.match(p.name))]
        for gid in gids:
            members = members_of(read_json(self.dir / f"g{gid:06d}.json"))
            if self._merged is None and members is not None and self.valid(self.dir / f"g{gid:06d}", members):
                self._groups[gid] = members
                for i, crc in members.items():
                    self._known.setdefault(i, (gid, crc))
        for p in list(self.dir.iterdir()):  # files of groups killed inside SaveV2, or rejected above
            m = re.match(r"^g(\d{6})\.", p.name)
            if not m or int(m.group(1)) not in self._groups:
                safefs.remove(p)
        self._gid = max(gids, default=-1) + 1
        return True

    def valid(self, prefix: Path, members: dict[Ident, int]) -> bool:
        """Every chunk of a group is in its index with the recorded CRC, and its bytes match."""
        got = bundle_entries(prefix)
        if got is None:
            return False
        shards, items = got
        for (i, off, n), crc in members.items():
            if not 0 <= i < len(self.outputs):
                return False
            o = self.outputs[i]
            _, ext = slice_spec(o, Chunk(i, off, n))
            for key in self.keys.get(o.name, []):
                raw = items.get(key.encode() if ext is None else slice_key(key, ext))
                try:
                    e = parse_entry(key, raw, str(prefix)) if raw is not None else None
                except Exception:
                    return False
                if e is None or e.size != n or e.crc != mask(crc) or e.shard >= shards:
                    return False
                if data_crc(Path(f"{prefix}.data-{e.shard:05d}-of-{shards:05d}"), e.offset, e.size) != crc:
                    return False
        return True

    # -- writing

    def write(self, chunk: Chunk, data: memoryview) -> Any:
        i = ident(chunk)
        crc = crc32c(data)
        known = self._known.get(i)
        if known is not None:
            if known[1] != crc:
                raise ResumeError(f"{self.label}: chunk {i} of {self.outputs[chunk.index].name!r} differs from the "
                                  f"copy in the partial output; rerun with {option('restart')}")
            return {"g": known[0], "c": crc}
        if self._merged is not None:
            raise ResumeError(f"{self.label}: the partial output was already merged but lacks chunk {i}; "
                              f"rerun with {option('restart')}")
        n = len(data)
        start = -(-self._fill // ALIGN) * ALIGN
        if self._pending and self._buf is not None and start + n > len(self._buf):
            self.flush()
            start = 0
        if self._buf is None or len(self._buf) < max(self.chunk_bytes, n):
            self._buf = aligned_empty(max(self.chunk_bytes, n))
        self._buf[start:start + n] = np.frombuffer(data, np.uint8)
        o = self.outputs[chunk.index]
        spec, _ = slice_spec(o, chunk)
        self._pending.append(_Pending(i, self.keys[o.name], spec, region_shape(o, chunk), o.dtype, start, crc))
        self._fill = start + n
        return {"g": self._gid, "c": crc}

    def flush(self) -> None:
        """One SaveV2 of the buffered chunks into group prefix gNNNNNN, then its sidecar."""
        if not self._pending:
            return
        tf = ops.import_tf()
        assert self._buf is not None
        prefix = self.dir / f"g{self._gid:06d}"
        names, specs, tensors = [], [], []
        for p in self._pending:
            t = tensor_over(tf, self._buf, p)
            for key in p.keys:
                names.append(key)
                specs.append(p.spec)
                tensors.append(t)
        try:
            tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=specs, tensors=tensors)
        except tf.errors.OpError as e:
            raise DestinationError(f"{prefix}: writing tensors failed: {e.message}") from None
        del tensors
        if self.durable:  # the final fsync then finds little left to write (as the NPZ sink does)
            fd = os.open(f"{prefix}.data-00000-of-00001", os.O_RDONLY)
            try:
                start_writeback(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        members = {p.ident: p.crc for p in self._pending}
        write_json(self.dir / f"g{self._gid:06d}.json", {"members": [[*i, c] for i, c in members.items()]})
        self._groups[self._gid] = members
        self._gid += 1
        self._pending, self._fill = [], 0

    def check(self, chunk: Chunk, receipt: Any) -> bool:
        if not isinstance(receipt, dict):
            return False
        if self._merged is not None:
            return self._merged.get(ident(chunk)) == receipt.get("c")
        g = self._groups.get(receipt.get("g"))  # type: ignore[arg-type]
        return g is not None and g.get(ident(chunk)) == receipt.get("c")

    # -- merge

    def merge(self, receipts: list[tuple[Chunk, Any]], final: Path, carry: bool) -> None:
        """Join the carried tensors and every group into ``final`` (once; a resumed merged run skips it)."""
        self.flush()
        self._buf = None
        if self._merged is not None:
            return
        owner: dict[Ident, int] = {}
        for gid in sorted(self._groups):
            for i in self._groups[gid]:
                if i in owner:
                    raise ResumeError(f"{self.label}: chunk {i} is in two groups; rerun with {option('restart')}")
                owner[i] = gid
        need = {ident(c) for c, _ in receipts}
        if set(owner) != need:
            raise ResumeError(f"{self.label}: the partial output lacks {len(need - set(owner))} chunks and has "
                              f"{len(set(owner) - need)} unplanned ones; rerun with {option('restart')}")
        inputs = []
        if carry:
            for p in prefix_files(self.work / "carry"):
                shutil.copyfile(p, self.work / ("carry_m" + p.name[len("carry"):]))
            inputs.append(str(self.work / "carry_m"))
        inputs += [str(self.dir / f"g{gid:06d}") for gid in sorted(self._groups)]
        _merge_prefixes(inputs, final)
        self._merged = {i: self._groups[g][i] for i, g in owner.items()}
        write_json(self.work / "merged.json", {"members": [[*i, c] for i, c in self._merged.items()]})
        for p in list(self.dir.iterdir()):
            safefs.remove(p)
        self._groups = {}

    def close(self) -> None:
        self._buf = None
        self._pending = []


def _merge_prefixes(inputs: list[str], final: Path) -> None:
    tf = ops.import_tf()
    final.parent.mkdir(parents=True, exist_ok=True)
    for p in prefix_files(final):
        p.unlink()
    try:
        if inputs:
            tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=inputs, destination_prefix=str(final),
                                          delete_old_dirs=False)
        else:  # nothing to write: an empty bundle
            tf.raw_ops.SaveV2(prefix=str(final), tensor_names=[], shape_and_slices=[], tensors=[])
    except tf.errors.OpError as e:
        raise DestinationError(f"{final}: merging the written groups failed: {e.message}") from None


def save_carried(carried: list[Any], prefix: Path) -> None:
    """The skeleton's carried tensors as their own bundle (merged with the groups at the end)."""
    if not carried:
        return
    from ...formats import bundleformat

    tf = ops.import_tf()
    tensors = []
    for c in carried:
        if c.dtype == "string":
            arr = np.array(bundleformat.string_elements(c.data, math.prod(c.shape)), dtype=object).reshape(c.shape)
            tensors.append(tf.constant(arr, dtype=tf.string))
        else:
            tensors.append(tf.constant(np.frombuffer(c.data, numpy_dtype(c.dtype)).reshape(c.shape)))
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=[c.key for c in carried],
                      shape_and_slices=[""] * len(carried), tensors=tensors)
