"""TensorFlow outputs written chunk by chunk: a SavedModel (``--to savedmodel``) or a
plain TF checkpoint (``--to tf-checkpoint``), never holding the model's values.

How (see docs/savedmodel.md): the layout comes first. For a SavedModel that is a
skeleton ``tf.Module`` of ``UninitializedVariable``s (nested modules follow the
``/`` in output names) or the object a user's model builder returns, saved with
``tf.saved_model.save``; its checkpoint index gives every variable's key and the
object graph. Then each chunk (a hyper-rectangle of one tensor) is copied into an
aligned group buffer; a full buffer is written by one ``tf.raw_ops.SaveV2`` call
(slice specs for partial tensors) into its own temporary prefix, a *group*, with
a sidecar listing its chunks and their CRC32C. ``finish`` joins the groups with
``tf.raw_ops.MergeV2Checkpoints``.

Resume: a group is all or nothing. On reopening, every group is re-read and
checked against its sidecar (index entry CRCs and data bytes); a group that fails
is deleted, so its chunks fail ``check`` and are redone. A chunk already present in
a valid group is never rewritten, even if its journal line was lost. The merged
result is one more such group, so a run killed after the merge resumes too.

TensorFlow is imported only by this module, and only when a layout or a group
is written.
"""
from __future__ import annotations

import collections
import functools
import gc
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.plan import Chunk, OutputTensor, chunk_region
from ..errors import DestinationError, DurabilityError, MissingDependencyError, PlanError, ResumeError, UsageError
from ..formats.bundle_entries import parse_entry, slice_key
from ..formats.sstable import SSTable
from ..formats.wire import as_int64, fields
from ..frontend import option, option_name
from ..mapping.rules import rename_rule
from ..util import safefs
from ..util.checksums import crc32c, mask
from ..util.dtypes import itemsize, numpy_dtype
from ..util.fileio import fsync_file, start_writeback
from .base import Sink

LAYOUT_VERSION = 1
#: RSS that ``import tensorflow`` adds (measured: 638 MiB with numpy, TF 2.21, Linux x86-64).
TF_IMPORT_BYTES = 610 << 20
#: Chunks start at this alignment in the group buffer (TensorFlow CPU kernels need 64).
ALIGN = 64
from ..formats.bundle_entries import OBJECT_GRAPH_KEY

#: Dtypes TF 2.21 saves (SaveV2) but cannot restore into a variable (no AssignVariableOp kernel).
NO_VARIABLE_DTYPES = frozenset({"float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2fnuz"})
MANIFEST_NAME = "shardconv.json"
#: TensorFlow's rule for a root name scope, which a SavedModel variable's name must pass
#: (``_VALID_OP_NAME_REGEX``, tensorflow/python/framework/ops.py; a backslash is refused by
#: shardconv's own name check before this one).
VALID_VARIABLE_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*")
_GROUP_RE = re.compile(r"^g(\d{6})\.json$")

Ident = tuple[int, int, int]  # (output index, offset, length): a chunk


def _tf():
    """Import TensorFlow (quietly), or say which extra installs it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF errors reach us as exceptions
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # quiet; shardconv computes nothing with TF
    try:
        import tensorflow as tf
    except ImportError:
        raise MissingDependencyError("tensorflow", "tf",
                                     "TensorFlow output (--to savedmodel / tf-checkpoint)") from None
    return tf


def _ident(c: Chunk) -> Ident:
    return (c.index, c.offset, c.length)


def _write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (tmp + rename): a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    safefs.write_file(tmp, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode(), fsync=False)
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _rm(path: Path) -> None:
    safefs.remove(path)  # a directory with its contents, a link as a link


def _prefix_files(prefix: Path) -> list[Path]:
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


# --------------------------------------------------------------------------- validation (no TF)

def _bundle_entries(prefix: Path) -> tuple[int, dict[bytes, bytes]] | None:
    """(num_shards, key -> raw entry) of a bundle index, or None if it is missing or corrupt."""
    try:
        with SSTable(str(prefix) + ".index") as table:
            items = dict(table.items())
    except Exception:
        return None
    header = items.get(b"")
    if header is None:
        return None
    shards = 1
    try:
        for num, wt, val in fields(header, "bundle header"):
            if num == 1 and wt == 0:
                shards = as_int64(val)
    except Exception:
        return None
    return shards, items


def _data_crc(path: Path, offset: int, size: int) -> int | None:
    """CRC32C of ``size`` bytes at ``offset`` of ``path``, or None if they cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        buf = bytearray(min(max(size, 1), 1 << 20))
        view = memoryview(buf)
        crc = 0
        done = 0
        while done < size:
            n = os.preadv(fd, [view[: min(len(buf), size - done)]], offset + done)
            if n <= 0:
                return None
            crc = crc32c(view[:n], crc)
            done += n
        return crc
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the sink

@dataclass
class _Pending:
    ident: Ident
    keys: list[str]
    spec: str
    shape: tuple[int, ...]
    dtype: str
    pos: int
    crc: int


class TFCheckpointSink(Sink):
    """A plain TF checkpoint: ``DEST/ckpt.index``, ``DEST/ckpt.data-*`` and a ``checkpoint``
    state file, so ``tf.train.load_checkpoint(DEST)`` and shardconv both read it. Keys are
    the output names (TF1 name-based style), or with a model builder the keys of
    ``tf.train.Checkpoint(model=<built model>)``."""

    name = "tf-checkpoint"
    prefix_name = "ckpt"

    def __init__(self, model_builder: str | None = None, model_config: str | os.PathLike | None = None,
                 serving_version: int | None = None) -> None:
        if serving_version is not None and not isinstance(self, SavedModelSink):
            raise UsageError("--serving-version applies to --to savedmodel only")
        if serving_version is not None and (not isinstance(serving_version, int) or serving_version < 0):
            raise UsageError(f"--serving-version must be a non-negative integer, got {serving_version!r}")
        if model_config is not None and model_builder is None:
            raise UsageError("--model-config is the argument of --model-builder; pass --model-builder module:function")
        self.model_builder = model_builder
        self.model_config = Path(model_config).absolute() if model_config is not None else None
        self.serving_version = serving_version
        if self.model_config is not None and not self.model_config.is_file():
            raise UsageError(f"{self.model_config}: --model-config file does not exist")
        self._buf: np.ndarray | None = None
        self._pending: list[_Pending] = []
        self._fill = 0
        self._gid = 0
        self._groups: dict[int, dict[Ident, int]] = {}
        self._merged: dict[Ident, int] | None = None
        self._known: dict[Ident, tuple[int | str, int]] = {}

    # -- options and paths

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.serving_version is not None:
            opts["serving_version"] = self.serving_version
        if self.model_builder is not None:
            opts["model_builder"] = self.model_builder
        if self.model_config is not None:
            opts["model_config_sha256"] = hashlib.sha256(self.model_config.read_bytes()).hexdigest()
        return opts

    def baseline_bytes(self) -> int:
        return TF_IMPORT_BYTES

    def scratch_slots(self) -> int:
        return 1  # the group buffer

    def _model_dir(self, root: Path) -> Path:
        """Where the checkpoint (or SavedModel) itself lives inside the output directory."""
        return root

    def _final_prefix(self) -> Path:
        return self._model_dir(self.out) / self.prefix_name

    # -- open

    def open(self, out: Path, outputs: list[OutputTensor], resume: bool) -> None:
        self.out = out
        self.outputs = outputs
        self.work = out.parent / (out.name + ".tfwork")
        self.groups_dir = self.work / "groups"
        want = {o.name: [o.dtype, list(o.shape)] for o in outputs}
        layout = _read_json(self.work / "layout.json") if resume else None
        if (isinstance(layout, dict) and layout.get("version") == LAYOUT_VERSION and layout.get("outputs") == want
                and layout.get("options") == self.options() and self._reload(layout)):
            return
        for p in (self.out, self.work):
            _rm(p)
        self.groups_dir.mkdir(parents=True)
        self.out.mkdir(parents=True)
        self.keys, self.carry = self._build_layout()
        _write_json(self.work / "layout.json", {"version": LAYOUT_VERSION, "outputs": want, "options": self.options(),
                                                "keys": self.keys, "carry": self.carry})
        self._groups, self._merged, self._known, self._gid = {}, None, {}, 0

    def _reload(self, layout: dict[str, Any]) -> bool:
        """Resume: keep what survives checking (groups, the merged result); False = start over."""
        self.keys = {k: list(v) for k, v in layout["keys"].items()}
        self.carry = list(layout["carry"])
        if not self.out.is_dir() or not self.groups_dir.is_dir():
            return False
        self._groups, self._merged, self._known = {}, None, {}
        merged = _read_json(self.work / "merged.json")
        if merged is not None:
            members = self._members_of(merged)
            if members is not None and self._valid(self._final_prefix(), members):
                self._merged = members
                self._known = {i: ("merged", crc) for i, crc in members.items()}
            else:
                (self.work / "merged.json").unlink()
        if self._merged is None:
            if self.carry and _bundle_entries(self.work / "carry") is None:
                return False  # the layout's own tensors are gone: rebuild everything
            for p in _prefix_files(self._final_prefix()):
                p.unlink()
        gids = []
        for p in sorted(self.groups_dir.iterdir()):
            m = _GROUP_RE.match(p.name)
            if not m:
                continue
            gid = int(m.group(1))
            gids.append(gid)
            members = self._members_of(_read_json(p))
            prefix = self.groups_dir / f"g{gid:06d}"
            if self._merged is None and members is not None and self._valid(prefix, members):
                self._groups[gid] = members
                for i, crc in members.items():
                    self._known.setdefault(i, (gid, crc))
            else:
                p.unlink()
        # Files of groups without a valid sidecar: killed inside SaveV2, or rejected above.
        for p in list(self.groups_dir.iterdir()):
            m = re.match(r"^g(\d{6})\.", p.name)
            if m and int(m.group(1)) not in self._groups:
                _rm(p)
            elif not m:
                _rm(p)
        self._gid = max(gids, default=-1) + 1
        return True

    def _members_of(self, doc: Any) -> dict[Ident, int] | None:
        try:
            return {(int(i), int(o), int(n)): int(c) for i, o, n, c in doc["members"]}
        except (TypeError, KeyError, ValueError):
            return None

    def _valid(self, prefix: Path, members: dict[Ident, int]) -> bool:
        """Every chunk of a group is in its index with the recorded CRC, and its bytes match."""
        got = _bundle_entries(prefix)
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
                if raw is None:
                    return False
                try:
                    e = parse_entry(key, raw, str(prefix))
                except Exception:
                    return False
                if e.size != n or e.crc != mask(crc) or e.shard >= shards:
                    return False
                if _data_crc(Path(f"{prefix}.data-{e.shard:05d}-of-{shards:05d}"), e.offset, e.size) != crc:
                    return False
        return True

    # -- layout (TensorFlow)

    def _build_layout(self) -> tuple[dict[str, list[str]], list[str]]:
        """Output name -> checkpoint keys, and the keys copied from the skeleton's checkpoint."""
        if self.model_builder is None:
            return {o.name: [o.name] for o in self.outputs}, []
        tf = _tf()
        obj, _ = _call_builder(self.model_builder, self.model_config)
        skeleton = self.work / "skeleton"
        ckpt = tf.train.Checkpoint(model=obj)
        ckpt.save_counter  # noqa: B018 (created here so the output restores like a ckpt.save() one)
        try:
            ckpt.write(str(skeleton))
        except Exception as e:
            raise UsageError(f"--model-builder {self.model_builder}: cannot checkpoint the model it "
                             f"returned: {e}") from None
        keys, carry = _layout_from_skeleton(tf, skeleton, ckpt, obj, self.outputs, self.model_builder,
                                            strip="model/", save_type="checkpoint")
        _copy_carry(tf, skeleton, self.work / "carry", carry)
        for p in _prefix_files(skeleton):
            p.unlink()
        del obj, ckpt
        gc.collect()  # the builder's model held its initial values: release them before streaming
        return keys, carry

    # -- writing

    def write(self, chunk: Chunk, data: memoryview) -> Any:
        ident = _ident(chunk)
        crc = crc32c(data)
        known = self._known.get(ident)
        if known is not None:
            if known[1] != crc:
                raise ResumeError(f"{self.out}: chunk {ident} of {self.outputs[chunk.index].name!r} differs from the "
                                  f"copy in the partial output; rerun with {option('restart')}")
            return {"g": known[0], "c": crc}
        if self._merged is not None:
            raise ResumeError(f"{self.out}: the partial output was already merged but lacks chunk {ident}; "
                              f"rerun with {option('restart')}")
        n = len(data)
        start = -(-self._fill // ALIGN) * ALIGN
        cap = max(self.chunk_bytes, n)
        if self._pending and start + n > len(self._buf):
            self._flush()
            start = 0
        if self._buf is None or len(self._buf) < cap:
            self._buf = _aligned(cap)
        self._buf[start:start + n] = np.frombuffer(data, np.uint8)
        o = self.outputs[chunk.index]
        spec, _ = slice_spec(o, chunk)
        self._pending.append(_Pending(ident, self.keys[o.name], spec, region_shape(o, chunk), o.dtype, start, crc))
        self._fill = start + n
        return {"g": self._gid, "c": crc}

    def _flush(self) -> None:
        """One SaveV2 of the buffered chunks into group prefix gNNNNNN, then its sidecar."""
        if not self._pending:
            return
        tf = _tf()
        prefix = self.groups_dir / f"g{self._gid:06d}"
        names, specs, tensors = [], [], []
        for p in self._pending:
            t = _tensor(tf, self._buf, p)
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
            data = Path(f"{prefix}.data-00000-of-00001")
            fd = os.open(data, os.O_RDONLY)
            try:
                start_writeback(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        members = {p.ident: p.crc for p in self._pending}
        _write_json(self.groups_dir / f"g{self._gid:06d}.json", {"members": [[*i, c] for i, c in members.items()]})
        self._groups[self._gid] = members
        self._gid += 1
        self._pending = []
        self._fill = 0

    def check(self, chunk: Chunk, receipt: Any) -> bool:
        if not isinstance(receipt, dict):
            return False
        ident = _ident(chunk)
        if self._merged is not None:
            return self._merged.get(ident) == receipt.get("c")
        g = self._groups.get(receipt.get("g"))
        return g is not None and g.get(ident) == receipt.get("c")

    # -- finish

    def finish(self, receipts: list[tuple[Chunk, Any]], manifest: dict[str, Any], fsync: bool,
               dest: Path) -> list[tuple[Path, Path]]:
        self._flush()
        self._buf = None
        final = self._final_prefix()
        if self._merged is None:
            owner: dict[Ident, int] = {}
            for gid in sorted(self._groups):
                for i in self._groups[gid]:
                    if i in owner:
                        raise ResumeError(f"{self.out}: chunk {i} is in two groups; rerun with {option('restart')}")
                    owner[i] = gid
            need = {_ident(c) for c, _ in receipts}
            if set(owner) != need:
                raise ResumeError(f"{self.out}: the partial output lacks {len(need - set(owner))} chunks and has "
                                  f"{len(set(owner) - need)} unplanned ones; rerun with {option('restart')}")
            tf = _tf()
            inputs = []
            if self.carry:
                for p in _prefix_files(self.work / "carry"):
                    shutil.copyfile(p, self.work / ("carry_m" + p.name[len("carry"):]))
                inputs.append(str(self.work / "carry_m"))
            inputs += [str(self.groups_dir / f"g{gid:06d}") for gid in sorted(self._groups)]
            final.parent.mkdir(parents=True, exist_ok=True)
            for p in _prefix_files(final):
                p.unlink()
            try:
                if inputs:
                    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=inputs, destination_prefix=str(final),
                                                  delete_old_dirs=False)
                else:  # nothing to write: an empty bundle
                    tf.raw_ops.SaveV2(prefix=str(final), tensor_names=[], shape_and_slices=[], tensors=[])
            except tf.errors.OpError as e:
                raise DestinationError(f"{final}: merging the written groups failed: {e.message}") from None
            self._merged = {i: self._groups[g][i] for i, g in owner.items()}
            _write_json(self.work / "merged.json", {"members": [[*i, c] for i, c in self._merged.items()]})
            for p in list(self.groups_dir.iterdir()):
                _rm(p)
            self._groups = {}
        self._finish_layout()
        manifest = dict(manifest)
        manifest["tf_keys"] = {name: keys for name, keys in self.keys.items()}
        mpath = self._manifest_path()
        mpath.parent.mkdir(parents=True, exist_ok=True)
        safefs.write_file(mpath, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), fsync=False)
        if fsync:
            _fsync_tree(self.out)
        return self._moves(dest)

    def _finish_layout(self) -> None:
        """The ``checkpoint`` state file, so the directory works as a checkpoint directory."""
        safefs.write_file(self.out / "checkpoint", (f'model_checkpoint_path: "{self.prefix_name}"\n'
                                                    f'all_model_checkpoint_paths: "{self.prefix_name}"\n').encode(),
                          fsync=False)

    def _manifest_path(self) -> Path:
        return self.out / MANIFEST_NAME

    def _moves(self, dest: Path) -> list[tuple[Path, Path]]:
        return [(self.out, dest)]

    def close(self) -> None:
        self._buf = None
        self._pending = []


class SavedModelSink(TFCheckpointSink):
    """A SavedModel directory (``saved_model.pb`` + ``variables/``), or ``DEST/N/`` with
    ``--serving-version N`` (the TF Serving layout; added beside other versions in DEST)."""

    name = "savedmodel"
    prefix_name = "variables"

    def _model_dir(self, root: Path) -> Path:
        return root / str(self.serving_version) if self.serving_version is not None else root

    def _final_prefix(self) -> Path:
        return self._model_dir(self.out) / "variables" / "variables"

    def final_paths(self, dest: Path) -> list[Path]:
        return [self._model_dir(dest)]

    def _manifest_path(self) -> Path:
        # assets.extra/: files a SavedModel carries that its loader ignores (TF Serving convention).
        return self._model_dir(self.out) / "assets.extra" / MANIFEST_NAME

    def _finish_layout(self) -> None:
        pass

    def check_outputs(self, outputs: list[OutputTensor]) -> list[str]:
        """Without a model builder every output becomes a variable of that name in nested
        modules: TensorFlow's variable-name rule, no tensor that is also a module, no
        dtype a variable cannot hold. Checked without importing TensorFlow."""
        if self.model_builder is not None:
            return []  # the builder's variables decide (checked against the tensors after building)
        problems = [p for o in outputs if (p := _variable_name_problem(o.name))]
        problems += _skeleton_problems([o.name for o in outputs])
        bad = [o for o in outputs if o.dtype in NO_VARIABLE_DTYPES]
        if bad:
            problems.append(f"{len(bad)} tensor(s) of dtypes TensorFlow cannot load into a variable "
                            f"({', '.join(sorted({o.dtype for o in bad}))}): {', '.join(repr(o.name) for o in bad[:5])}"
                            f"{', ...' if len(bad) > 5 else ''}; cast them with a rule or use "
                            f"{option('to', 'tf-checkpoint')}")
        return problems

    def _moves(self, dest: Path) -> list[tuple[Path, Path]]:
        if self.serving_version is not None and dest.is_dir():
            return [(self._model_dir(self.out), self._model_dir(dest))]  # a new version beside the others
        return [(self.out, dest)]

    def _build_layout(self) -> tuple[dict[str, list[str]], list[str]]:
        tf = _tf()
        model_dir = self._model_dir(self.out)
        if self.model_builder is None:
            obj, signatures = _skeleton(tf, self.outputs), None
        else:
            obj, signatures = _call_builder(self.model_builder, self.model_config)
        try:
            tf.saved_model.save(obj, str(model_dir), signatures=signatures)
        except Exception as e:
            if self.model_builder is None:
                raise
            raise UsageError(f"--model-builder {self.model_builder}: tf.saved_model.save failed on the model it "
                             f"returned: {type(e).__name__}: {e}") from None
        skeleton = model_dir / "variables" / "variables"
        keys, carry = _layout_from_skeleton(tf, skeleton, obj, obj, self.outputs, self.model_builder, strip="",
                                            save_type="savedmodel")
        _copy_carry(tf, skeleton, self.work / "carry", carry)
        for p in _prefix_files(skeleton):  # the skeleton's stale index and data (initial values, if any)
            p.unlink()
        del obj, signatures
        gc.collect()  # a builder's model held its initial values: release them before streaming
        return keys, carry


# --------------------------------------------------------------------------- helpers (TensorFlow)

def _aligned(n: int) -> np.ndarray:
    raw = np.empty(n + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + n]


def _tensor(tf, buf: np.ndarray, p: _Pending):
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


def _variable_name_problem(name: str) -> str | None:
    """Why TensorFlow refuses ``name`` as a variable name (its root name-scope rule,
    ``_VALID_OP_NAME_REGEX`` in tensorflow/python/framework/ops.py), with a rule that fixes it."""
    if VALID_VARIABLE_NAME.fullmatch(name):
        return None
    fixed = re.sub(r"[^A-Za-z0-9_./>-]", "_", name).lstrip("_>-")
    if not VALID_VARIABLE_NAME.fullmatch(fixed):
        fixed = "v_" + fixed.lstrip("/")
    return (f"{name!r} is not a valid TensorFlow variable name ([A-Za-z0-9.][A-Za-z0-9_./>-]*); "
            f"rename it with a rule: {rename_rule(name, fixed)}")


def _skeleton_problems(names: list[str]) -> list[str]:
    """Names that cannot be nested modules: a tensor that is also a module, a reserved name."""
    problems = []
    tensors = set(names)
    for name in names:
        parts = name.split("/")
        for k in range(1, len(parts)):
            parent = "/".join(parts[:k])
            if parent in tensors:
                problems.append(f"{parent!r} is a tensor and also holds {name!r}; a SavedModel attribute cannot be "
                                f"both (rename one with {option_name('rules')})")
                tensors.discard(parent)
        if parts[0] == "signatures":
            problems.append(f"{name!r}: the top-level name 'signatures' is reserved in a SavedModel "
                            f"(rename with {option_name('rules')})")
    return problems


def _skeleton(tf, outputs: list[OutputTensor]):
    """Nested trackable nodes whose leaves are UninitializedVariables: no value is allocated."""
    from tensorflow.python.ops.resource_variable_ops import UninitializedVariable

    class Node(tf.__internal__.tracking.AutoTrackable):
        def __init__(self) -> None:
            object.__setattr__(self, "_shardconv_children", {})

        def _trackable_children(self, save_type="checkpoint", **kwargs):
            return dict(self._shardconv_children)

    root = Node()
    for o in outputs:
        *path, leaf = o.name.split("/")
        node = root
        for part in path:
            node = node._shardconv_children.setdefault(part, Node())
        node._shardconv_children[leaf] = UninitializedVariable(
            shape=o.shape, dtype=tf.dtypes.as_dtype(numpy_dtype(o.dtype)), name=o.name)
    return root


def _load_builder(spec: str) -> Callable[..., Any]:
    """``module:function`` from the current directory or PYTHONPATH."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise UsageError(f"--model-builder must be module:function, got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise UsageError(f"--model-builder {spec}: no module {module!r} in the current directory or on "
                             "PYTHONPATH") from None
        raise UsageError(f"--model-builder {spec}: importing {module!r} failed: {e}") from None
    except Exception as e:
        raise UsageError(f"--model-builder {spec}: importing {module!r} failed: {type(e).__name__}: {e}") from None
    try:
        fn = functools.reduce(getattr, attr.split("."), mod)
    except AttributeError:
        raise UsageError(f"--model-builder {spec}: module {module!r} has no {attr!r}") from None
    if not callable(fn):
        raise UsageError(f"--model-builder {spec}: {attr!r} is not callable")
    return fn


def _call_builder(spec: str, config: Path | None) -> tuple[Any, Any]:
    """Build the model: (trackable object, signatures or None for TF's default)."""
    fn = _load_builder(spec)
    try:
        result = fn(str(config) if config is not None else None)
    except Exception as e:
        raise UsageError(f"--model-builder {spec} raised {type(e).__name__}: {e}") from None
    obj, signatures = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    tf = _tf()
    if not isinstance(obj, tf.__internal__.tracking.Trackable):
        raise UsageError(f"--model-builder {spec} returned {type(obj).__name__}; expected a Keras model or tf.Module")
    return obj, signatures


def _object_graph(tf, prefix: Path):
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(str(prefix))
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(OBJECT_GRAPH_KEY))
    return reader, graph


def _keras_names_as_listed(keras_names: dict[int, str], outs: set[str]) -> dict[int, str]:
    """Keras 3 variable paths in the form ``shardconv ls`` gives a TF checkpoint's weights (a
    Sequential's own name scope dropped, see tf_object_graph.strip_model_scope) when the outputs
    are named that way; as they are otherwise (outputs from another source keep Keras's paths)."""
    from ..sources.tf_object_graph import strip_model_scope

    unique = sorted(set(keras_names.values()))
    listed = dict(zip(unique, strip_model_scope(unique)))
    if len(outs.intersection(listed.values())) <= len(outs.intersection(unique)):
        return keras_names
    return {k: listed[v] for k, v in keras_names.items()}


def _layout_from_skeleton(tf, prefix: Path, root: Any, model: Any, outputs: list[OutputTensor],
                          builder: str | None, strip: str, save_type: str) -> tuple[dict[str, list[str]], list[str]]:
    """Match the saved object graph's variables to the outputs by name.

    A variable's name is its Keras ``path`` where it has one, else its shortest path of
    attribute names from the saved root (``strip`` removed). With a builder every model
    variable must get a tensor and every tensor a variable; all problems are reported.
    """
    reader, graph = _object_graph(tf, prefix)
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    paths: dict[int, tuple[str, ...]] = {0: ()}
    queue = collections.deque([0])
    while queue:
        n = queue.popleft()
        for child in graph.nodes[n].children:
            if child.node_id not in paths:
                paths[child.node_id] = paths[n] + (child.local_name,)
                queue.append(child.node_id)
    keras_names: dict[int, str] = {}
    keras = sys.modules.get("keras")
    if builder is not None and keras is not None and hasattr(keras, "Variable"):
        def visit(obj):
            if isinstance(obj, keras.Variable):
                keras_names[id(obj)] = obj.path
                inner = getattr(obj, "_value", None)
                if inner is not None:
                    keras_names[id(inner)] = obj.path
        for v in getattr(model, "variables", []) or []:
            visit(v)
        keras_names = _keras_names_as_listed(keras_names, {o.name for o in outputs})
    children_cache: dict[int, dict[str, Any]] = {}

    def python_object(node: int):
        obj, path = root, ()
        for part in paths[node]:
            if isinstance(obj, (list, tuple)):  # Keras 3 keeps layers in plain lists (Sequential._layers)
                obj = obj[int(part)]
                continue
            kids = children_cache.get(id(obj))
            if kids is None:
                kids = children_cache[id(obj)] = dict(obj._trackable_children(save_type=save_type))
            obj = kids[part]
            path += (part,)
        return obj

    var_keys: dict[str, list[str]] = collections.defaultdict(list)
    var_meta: dict[str, tuple[str | None, tuple[int, ...] | None]] = {}
    for node, proto in enumerate(graph.nodes):
        for attr in proto.attributes:
            if attr.name != "VARIABLE_VALUE" or node not in paths:
                continue
            name = "/".join(paths[node])
            if strip:
                if not name.startswith(strip):
                    continue  # the checkpoint's own state (save_counter): carried as it is
                name = name[len(strip):]
            if builder is not None:
                try:
                    name = keras_names.get(id(python_object(node)), name)
                except (KeyError, AttributeError, TypeError):
                    pass
            var_keys[name].append(attr.checkpoint_key)
            key = attr.checkpoint_key
            if key in dtypes:
                var_meta[name] = (np.dtype(dtypes[key].as_numpy_dtype).name, tuple(shapes[key]))
            else:
                var_meta.setdefault(name, (None, None))
    outs = {o.name: o for o in outputs}
    if builder is not None:
        problems = []
        missing = sorted(set(var_keys) - set(outs))
        unused = sorted(set(outs) - set(var_keys))
        if missing:
            problems.append(f"{len(missing)} model variable(s) get no converted tensor: {', '.join(missing[:12])}"
                            + (", ..." if len(missing) > 12 else ""))
        if unused:
            problems.append(f"{len(unused)} converted tensor(s) match no model variable: {', '.join(unused[:12])}"
                            + (", ..." if len(unused) > 12 else "")
                            + f" (rename them with {option_name('rules')}, or leave them out with "
                              f"{option('drop_optimizer')} / drop rules)")
        for name in sorted(set(var_keys) & set(outs)):
            dt, shape = var_meta.get(name, (None, None))
            o = outs[name]
            if shape is not None and (dt, tuple(shape)) != (o.dtype, tuple(o.shape)):
                problems.append(f"{name!r}: the model variable is {dt}{list(shape)}, the tensor is "
                                f"{o.dtype}{list(o.shape)}")
        if problems:
            raise PlanError(problems, where=f"--model-builder {builder}")
    else:
        missing = sorted(set(outs) - set(var_keys))
        if missing:  # a bug in the skeleton, not the user's doing
            raise DestinationError(f"SavedModel skeleton lacks variables for {missing[:5]}")
    keys = {name: sorted(var_keys[name]) for name in outs}
    used = {k for ks in keys.values() for k in ks}
    carry = sorted(k for k in dtypes if k not in used)
    return keys, carry


def _copy_carry(tf, skeleton: Path, carry_prefix: Path, carry: list[str]) -> None:
    """Copy the skeleton checkpoint's other tensors (the object graph; tables, counters of a
    builder's model) into their own prefix, merged with the values at the end."""
    if not carry:
        return
    reader = tf.train.load_checkpoint(str(skeleton))
    dtypes = reader.get_variable_to_dtype_map()
    tensors = tf.raw_ops.RestoreV2(prefix=str(skeleton), tensor_names=carry, shape_and_slices=[""] * len(carry),
                                   dtypes=[dtypes[k] for k in carry])
    tf.raw_ops.SaveV2(prefix=str(carry_prefix), tensor_names=carry, shape_and_slices=[""] * len(carry),
                      tensors=tensors)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            fd = os.open(p, os.O_RDONLY)
            try:
                fsync_file(fd, p)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as e:
            raise DurabilityError(f"{dirpath}: fsync failed ({e.strerror}); rerun to write it again") from None
        finally:
            os.close(fd)
