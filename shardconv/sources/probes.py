"""Format probes: which source format, if any, a path (or an in-memory object) is.

Every probe looks at content (magic bytes, the zip directory, marker files, the first
msgpack byte), is cheap, never raises, and the probes claim disjoint inputs, so
``open_source`` runs them all and the order of ``sources.REGISTRY`` decides nothing
(tests/test_probes.py checks this on fixtures written by each format's own library).
The TF probe is ``tf_bundle.is_tf_bundle``; the others are here, in one module that
imports none of the readers (no TensorStore, no chunk decoders): probing a TF checkpoint
loads no npz, Zarr or msgpack code.
"""
from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path
from typing import Any

from ..errors import FormatError, ShardconvError
from ..formats import tsio, zipformat
from .steps import is_dir, steps

#: Members of the zip directory the npz probe looks at (enough to tell an npz from a
#: PyTorch ``.pt`` or a ``.keras`` archive, whose first members are not ``.npy``).
_PROBE_MEMBERS = 64
#: Members a zip directory may declare (the NPZ source's limit too).
MAX_MEMBERS = 10_000_000
NPZ_INDEX_SUFFIX = ".npz.index.json"
SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
#: The safetensors library refuses longer headers (MAX_HEADER_SIZE).
SAFETENSORS_MAX_HEADER = 100_000_000
_SAFE = (OSError, ValueError, TypeError)


# -- npz ----------------------------------------------------------------------------------

def is_npz(path: Any) -> bool:
    """A zip archive whose members are ``.npy`` arrays (``np.savez``), or a ``.npz`` file that
    is not a readable zip (opening it then says what is wrong). Any other zip (a PyTorch
    ``.pt``, a ``.keras`` file) is not."""
    try:
        p = Path(path)
        if not p.is_file():
            return False
        with open(p, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return p.suffix == ".npz"
            names = _first_member_names(f.fileno(), os.fstat(f.fileno()).st_size, str(p))
    except _SAFE:
        return False
    except ShardconvError:
        return p.suffix == ".npz"
    files = [n for n in names if not n.endswith("/")]
    return all(n.endswith(".npy") for n in files) and (bool(files) or p.suffix == ".npz")


def _first_member_names(fd: int, size: int, where: str) -> list[str]:
    """Names of the first ``_PROBE_MEMBERS`` members of the zip open as ``fd``."""
    def pread(n: int, off: int) -> bytes:
        data = os.pread(fd, n, off) if 0 <= off and off + n <= size else b""
        if len(data) != n:
            raise FormatError(f"{where}: truncated zip directory")
        return data

    count, cd_offset, cd_size = zipformat.end_of_directory(pread, size, where, MAX_MEMBERS)
    entries = zipformat.central_entries(pread, count, cd_offset, cd_size, where)
    return [e.name for e in itertools.islice(entries, _PROBE_MEMBERS)]


def index_file(path: Path, suffix: str) -> Path | None:
    """The index of a split output: ``path`` itself, or the one ``*suffix`` in directory ``path``."""
    if path.is_file() and path.name.endswith(suffix):
        return path
    if path.is_dir():
        found = sorted(path.glob("*" + suffix))
        if len(found) == 1:
            return found[0]
    return None


def is_split_npz(path: Any) -> bool:
    """A ``*.npz.index.json`` file, or a directory holding exactly one."""
    try:
        return index_file(Path(path), NPZ_INDEX_SUFFIX) is not None
    except _SAFE:
        return False


# -- safetensors --------------------------------------------------------------------------

def the_safetensors_file(path: Path) -> Path:
    """``path``, or the one ``*.safetensors`` file in directory ``path`` (as transformers
    saves an unsharded model beside its config)."""
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
    return path


def is_safetensors(path: Any) -> bool:
    """A ``.safetensors`` file (its header is checked on opening, so a bad one gets its own
    message), or any file starting with a plausible header length followed by ``{``."""
    try:
        p = the_safetensors_file(Path(path))
        if not p.is_file():
            return False
        if p.suffix == ".safetensors":
            return True
        with open(p, "rb") as f:
            head = f.read(9)
        size = p.stat().st_size
    except _SAFE:
        return False
    n = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
    return head[8:9] == b"{" and 0 < n <= SAFETENSORS_MAX_HEADER and n + 8 <= size


def is_split_safetensors(path: Any) -> bool:
    """A ``*.safetensors.index.json`` file, or a directory holding exactly one."""
    try:
        return index_file(Path(path), SAFETENSORS_INDEX_SUFFIX) is not None
    except _SAFE:
        return False


# -- Zarr and Orbax -----------------------------------------------------------------------

def is_shardconv_orbax(p: Path) -> bool:
    """A non-OCDBT Orbax checkpoint written by shardconv (its ``_CHECKPOINT_METADATA`` says
    so): read as a Zarr store, with shardconv's names and checksums."""
    try:
        meta = json.loads((p / "_CHECKPOINT_METADATA").read_text())
        return "shardconv" in (meta.get("custom_metadata") or {}) and (p / "_METADATA").is_file()
    except (*_SAFE, AttributeError):
        return False


def is_zarr(src: Any) -> bool:
    """A Zarr group/array (``zarr.json``, ``.zgroup``, ``.zarray``) or a non-OCDBT Orbax
    checkpoint written by shardconv; a URL is probed with one read per marker."""
    if not isinstance(src, (str, os.PathLike)):
        return False
    try:
        s = os.fspath(src)
        if tsio.is_remote(s):
            return _is_remote_zarr(s)
        p = tsio.local_path(s)
        if not p.is_dir():
            return False
        return any((p / k).is_file() for k in ("zarr.json", ".zgroup", ".zarray")) or is_shardconv_orbax(p)
    except _SAFE:
        return False


def _is_remote_zarr(url: str) -> bool:
    """One read per marker at ``url``: any of them makes it a store (any failure: it is not)."""
    try:
        ts = tsio.tensorstore()
        kv = ts.KvStore.open(tsio.kvstore_spec(url), context=tsio.context()).result()
        return any(kv.read(k).result().state == "value" for k in ("zarr.json", ".zgroup", ".zarray", "_METADATA"))
    except Exception:  # a probe never raises: a store that cannot be read is not recognised
        return False


def orbax_items(d: Path) -> list[Path]:
    """Item directories of an Orbax step (``CheckpointManager``: ``1234/default/_METADATA``).
    Without the step's ``_CHECKPOINT_METADATA``, children named like steps are steps, not items."""
    from .steps import STEP

    try:
        items = sorted(c for c in d.iterdir() if c.is_dir() and (c / "_METADATA").is_file())
    except OSError:
        return []
    if not (d / "_CHECKPOINT_METADATA").is_file():
        items = [c for c in items if not STEP.match(c.name)]
    return items


def is_orbax_checkpoint(d: Path) -> bool:
    """An Orbax item (``_METADATA``) or a step holding items."""
    return (d / "_METADATA").is_file() or bool(orbax_items(d))


def is_orbax(src: Any) -> bool:
    """An Orbax checkpoint (``_METADATA``), a step holding items, or a directory of steps;
    not one written by shardconv, which the Zarr source reads (``is_shardconv_orbax``)."""
    if not isinstance(src, (str, os.PathLike)) or "://" in os.fspath(src):
        return False
    try:
        p = Path(src)
        return is_dir(p) and not is_shardconv_orbax(p) and (
            is_orbax_checkpoint(p) or bool(steps(p, is_orbax_checkpoint)))
    except _SAFE:
        return False


# -- msgpack: flax and t5x ----------------------------------------------------------------

def is_msgpack_map(p: Path) -> bool:
    """A regular file whose first byte starts a msgpack map."""
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as f:
            b = f.read(1)
        return bool(b) and (0x80 <= b[0] <= 0x8F or b[0] in (0xDE, 0xDF))
    except _SAFE:
        return False


def is_flax_msgpack(path: Any) -> bool:
    """A regular file starting with a msgpack map (flax checkpoints are maps), other than a
    file named ``checkpoint``: that is t5x's (``is_t5x``), read with its step directory."""
    try:
        p = Path(path)
        return p.suffix not in (".npz", ".index", ".json") and p.name != "checkpoint" and is_msgpack_map(p)
    except _SAFE:
        return False


def is_t5x_checkpoint(d: Path) -> bool:
    """A directory with a msgpack ``checkpoint`` and no ``_METADATA`` (with it, an Orbax item)."""
    return is_msgpack_map(d / "checkpoint") and not (d / "_METADATA").exists()


def is_t5x(src: Any) -> bool:
    """A t5x checkpoint: a ``checkpoint`` msgpack file, its directory, or a directory of
    ``checkpoint_N`` steps."""
    if not isinstance(src, (str, os.PathLike)) or "://" in os.fspath(src):
        return False
    try:
        p = Path(src)
        if p.name == "checkpoint" and is_msgpack_map(p):
            return not (p.parent / "_METADATA").exists()
        return is_dir(p) and (is_t5x_checkpoint(p) or bool(steps(p, is_t5x_checkpoint)))
    except _SAFE:
        return False


# -- in-memory trees ----------------------------------------------------------------------

def is_pytree(src: Any) -> bool:
    """Anything that is not a path, URL or open source: an in-memory tree."""
    from .base import Source

    return not isinstance(src, (str, bytes, os.PathLike, Source))
