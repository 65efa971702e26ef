"""``.npz`` files (big_vision checkpoints, ``np.savez``, shardconv's own output).

Reads the zip directory (zip64 aware), each member's ``.npy`` header, and data
by offset. STORED members are read by ``pread``; DEFLATED ones are inflated in
a forward stream (random access restarts the stream). Object (pickled) members
are refused: we never unpickle. bfloat16 stored as ``|V2`` is recognised from
the shardconv manifest beside the file, else by big_vision's convention.
"""
from __future__ import annotations

import json
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..core.plan import check_name
from ..core.types import RawRange, Segment, TensorInfo, Unit
from ..errors import FormatError, SourceError, UnsupportedError
from ..formats import npyformat, zipformat
from ..util.checksums import combine_crc32, crc32
from ..util.dtypes import dtype_name, itemsize
from ..util.fileio import open_read
from .base import Source, read_sidecar
from .probes import MAX_MEMBERS, NPZ_INDEX_SUFFIX, index_file


@dataclass
class _Member:
    name: str            # without .npy
    data_start: int      # file offset of the member's stored bytes
    stored: int          # compressed size
    size: int            # uncompressed size (npy header + data)
    method: int
    crc: int
    header_len: int = 0
    dtype: str = ""
    shape: tuple[int, ...] = ()
    header_crc: int = 0  # CRC32 of the npy header (the zip CRC covers header + data)


class NpzSource(Source):
    format = "npz"
    stores_checksums = True

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd = open_read(self.path, SourceError)
        self._inflate: dict[str, _Inflater] = {}
        self._lock = threading.Lock()
        try:
            self.size = os.fstat(self._fd).st_size
            self._manifest = self._load_manifest()
            self._members = self._read_directory()
            self._infos = [self._describe(m) for m in self._members.values()]
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def location(self) -> str:
        return str(self.path)

    def _err(self, msg: str) -> FormatError:
        return FormatError(f"{self.path}: {msg}")

    def _pread(self, n: int, off: int) -> bytes:
        if off < 0 or n < 0 or off + n > self.size:
            raise self._err(f"read of {n} bytes at offset {off} runs past the end of the file ({self.size} bytes)")
        data = os.pread(self._fd, n, off)
        if len(data) != n:
            raise self._err(f"short read at offset {off} (file truncated?)")
        return data

    def _load_manifest(self) -> dict[str, dict[str, Any]]:
        _, self.manifest_options, entries = read_sidecar(self.path)
        return entries

    def _read_directory(self) -> dict[str, _Member]:
        """The archive's ``.npy`` members by tensor name, their headers parsed
        (``formats.zipformat`` checks the zip structure; this, that every member is an array)."""
        where = str(self.path)
        count, cd_offset, cd_size = zipformat.end_of_directory(self._pread, self.size, where, MAX_MEMBERS)
        members: dict[str, _Member] = {}
        checked = []
        for e in zipformat.central_entries(self._pread, count, cd_offset, cd_size, where):
            if e.name.endswith("/"):
                continue
            z = zipformat.check_member(self._pread, e, cd_offset, self.size, where)
            tname = self._tensor_name(e.name, members)
            checked.append(z)
            members[tname] = _Member(tname, z.data_start, z.stored, z.size, z.method, z.crc)
        zipformat.check_no_overlap(checked, where)
        for m in members.values():
            self._parse_npy(m)
        return members

    def _tensor_name(self, member: str, members: dict[str, _Member]) -> str:
        """The tensor a member holds: its name without ``.npy`` (safe, not seen before)."""
        if not member.endswith(".npy"):
            raise UnsupportedError(f"{self.path}: member {member!r} is not an .npy array")
        tname = member[:-4]
        why = check_name(tname)
        if why:
            raise self._err(f"member name {member!r} is unsafe ({why})")
        if tname in members:
            raise self._err(f"duplicate member {member!r}")
        return tname

    def _parse_npy(self, m: _Member) -> None:
        where = f"{self.path}: member {m.name + '.npy'!r}"
        buf = self._member_prefix(m, min(m.size, npyformat.MAX_HEADER_LEN + 16))
        pos = 0

        def read(n: int) -> bytes:
            nonlocal pos
            out = buf[pos:pos + n]
            pos += n
            return out

        dt, descr, shape, fortran, hlen = npyformat.parse_header(read, where)
        if fortran and len(shape) > 1:
            raise UnsupportedError(f"{where}: Fortran-order arrays are not supported")
        man = self._manifest.get(m.name)
        if dt is None:
            size = int(descr[2:]) if descr[:2] in ("|V", "<V", ">V", "=V") and descr[2:].isdigit() else 0
            if man and itemsize(man["dtype"]) == size:
                name = man["dtype"]
            elif size == 2:
                name = "bfloat16"  # big_vision / np.save convention
            else:
                raise UnsupportedError(f"{where}: raw dtype {descr!r} with no manifest naming its real dtype")
        else:
            try:
                name = dtype_name(dt)
            except UnsupportedError as e:
                raise UnsupportedError(f"{where}: {e}") from None
            if man and man.get("dtype") != name:
                raise FormatError(f"{where}: dtype {name} disagrees with the manifest ({man.get('dtype')})")
        numel = npyformat.numel(shape)
        if hlen + numel * itemsize(name) != m.size:
            raise FormatError(f"{where}: header says shape {list(shape)} of {name} "
                              f"({numel * itemsize(name)} bytes) but the member holds {m.size - hlen}")
        m.header_len, m.dtype, m.shape = hlen, name, tuple(shape)
        m.header_crc = crc32(buf[:hlen])

    def _member_prefix(self, m: _Member, n: int) -> bytes:
        if m.method == 0:
            return self._pread(min(n, m.stored), m.data_start)
        d = zlib.decompressobj(-15)
        out = d.decompress(self._pread(min(m.stored, 1 << 16), m.data_start), n)
        return out[:n]

    def _describe(self, m: _Member) -> TensorInfo:
        data_bytes = m.size - m.header_len
        # The zip CRC covers header + data; split off the header's part (CRC is linear).
        data_crc = m.crc ^ combine_crc32(m.header_crc, 0, data_bytes)
        man = self._manifest.get(m.name)
        if man and "crc32" in man and man["crc32"] != data_crc:
            raise FormatError(f"{self.path}: member {m.name + '.npy'!r} has CRC32 0x{data_crc:08x} in the archive but "
                              f"0x{man['crc32']:08x} in the manifest")
        self._units = getattr(self, "_units", {})
        self._units[m.name] = Unit(data_bytes, "crc32", data_crc, m.name, str(self.path))
        return TensorInfo(m.name, m.dtype, m.shape, data_bytes, f"crc32:{data_crc}")

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def units(self) -> dict[str, Unit]:
        return dict(getattr(self, "_units", {}))

    def recorded_options(self) -> dict[str, Any]:
        """The mapping options in the shardconv manifest (none for another writer's file)."""
        return dict(self.manifest_options)

    def input_files(self) -> list[str]:
        """The archive, and the shardconv manifest beside it if there is one (its options are read)."""
        manifest = self.path.with_name(self.path.name + ".shardconv.json")
        return [os.path.abspath(p) for p in (self.path, manifest) if p.is_file()]

    def read_into(self, name: str, offset: int, out: memoryview) -> list[Segment]:
        m = self._entry(self._members, name, "member")
        data_bytes = m.size - m.header_len
        out = self._region(name, offset, out, data_bytes)
        if m.method == 0:
            done = 0
            while done < len(out):
                n = os.preadv(self._fd, [out[done:]], m.data_start + m.header_len + offset + done)
                if n <= 0:
                    raise self._err(f"file ends inside member {name!r} (truncated?)")
                done += n
        else:
            self._inflate_into(m, m.header_len + offset, out)
        return [Segment(name, offset, len(out), crc32(out))]

    def raw_range(self, name: str, offset: int, length: int) -> RawRange | None:
        """A STORED member's data lies verbatim in the archive (checksum unit: the member's data)."""
        m = self._entry(self._members, name, "member")
        self._check_range(name, offset, length, m.size - m.header_len)
        if m.method != 0:
            return None
        return RawRange(self._fd, m.data_start + m.header_len + offset, str(self.path), name, name, offset, "crc32")

    def _inflate_into(self, m: _Member, pos: int, out: memoryview) -> None:
        """Inflate forward to ``pos``; sequential reads continue where the last stopped."""
        with self._lock:
            st = self._inflate.get(m.name)
            if st is None or st.upos > pos:
                st = _Inflater(zlib.decompressobj(-15), 0, m.data_start, b"")
            need, written = len(out), 0
            while written < need:
                if not st.pending:
                    st.pending = self._inflate_more(st, m)
                    continue
                target = pos + written
                if st.upos + len(st.pending) <= target:
                    st.upos += len(st.pending)
                    st.pending = b""
                    continue
                lo = target - st.upos
                piece = st.pending[lo:lo + need - written]
                out[written:written + len(piece)] = piece
                written += len(piece)
                st.pending = st.pending[lo + len(piece):]
                st.upos += lo + len(piece)
            self._inflate[m.name] = st

    def _inflate_more(self, st: _Inflater, m: _Member) -> bytes:
        """The next inflated bytes: at most 1 MiB, possibly none while zlib takes input in.

        Once every compressed byte is read, zlib may still hold output (very compressible
        data: the last input is taken in before all its output fits ``max_length``); it is
        drained a MiB at a time before the data counts as ending early."""
        end = m.data_start + m.stored
        raw = st.d.unconsumed_tail
        if not raw and st.cpos < end and not st.d.eof:
            raw = self._pread(min(1 << 20, end - st.cpos), st.cpos)
            st.cpos += len(raw)
        try:
            out = st.d.decompress(raw, 1 << 20)
        except zlib.error as e:
            raise self._err(f"member {m.name!r}: corrupt deflate data ({e})") from None
        if not out and not raw:
            raise self._err(f"member {m.name!r}: compressed data ends before the declared size")
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class _Inflater:
    d: Any          # zlib decompressobj
    upos: int       # uncompressed position of pending[0]
    cpos: int       # next compressed byte to read (file offset)
    pending: bytes  # inflated bytes not yet handed out


# -- several npz files with an index (shardconv --max-file-size, Hugging Face style) ----------

INDEX_SUFFIX = NPZ_INDEX_SUFFIX
_MAX_INDEX = 256 << 20


class SplitNpzSource(Source):
    """An npz output split into several files: the index names each tensor's file;
    every file is read by NpzSource (its own manifest and CRCs included)."""

    format = "npz"
    stores_checksums = True
    #: The index's name ends so; each file it names is read by ``part_class`` (other formats
    #: split the same way subclass this).
    index_suffix = INDEX_SUFFIX
    part_class: ClassVar[type[Any]] = NpzSource  # its constructor takes the part's path

    @classmethod
    def index_file(cls, path: Path) -> Path | None:
        return index_file(path, cls.index_suffix)

    def __init__(self, path: str | os.PathLike) -> None:
        index = self.index_file(Path(path))
        if index is None:
            raise SourceError(f"{path}: no *{self.index_suffix} here (not a split {self.format} output)")
        self.index = index
        self.dir = index.parent
        weight_map = self._read_index()
        self._parts: dict[str, Source] = {}
        self._where: dict[str, Source] = {}
        try:
            for fname in sorted(set(weight_map.values())):
                self._parts[fname] = self.part_class(self.dir / fname)
            for fname, part in self._parts.items():
                names = {t.name for t in part.tensors()}
                claimed = {n for n, f in weight_map.items() if f == fname}
                if names != claimed:
                    extra, missing = sorted(names - claimed), sorted(claimed - names)
                    why = [f"lacks {missing[:3]}, which the index maps to it"] if missing else []
                    why += [f"holds {extra[:3]}, which the index maps elsewhere or not at all"] if extra else []
                    raise FormatError(f"{self.dir / fname}: {'; '.join(why)}")
                self._where.update({n: part for n in names})
        except BaseException:
            self.close()
            raise
        self._infos = [t for part in self._parts.values() for t in part.tensors()]
        first = next(iter(self._parts.values()), None)
        self.manifest_options = first.recorded_options() if first is not None else {}

    def _read_index(self) -> dict[str, str]:
        try:
            size = self.index.stat().st_size
            if size > _MAX_INDEX:
                raise FormatError(f"{self.index}: {size} bytes is more than an index can be")
            data = json.loads(self.index.read_bytes())
        except (ValueError, UnicodeDecodeError):
            raise FormatError(f"{self.index}: not valid JSON") from None
        except OSError as e:
            raise SourceError(f"{self.index}: cannot read: {e.strerror}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FormatError(f"{self.index}: no weight_map of tensor names to file names")
        for name, fname in weight_map.items():
            if "/" in fname or "\\" in fname or fname in ("", ".", "..") or "\x00" in fname:
                raise FormatError(f"{self.index}: tensor {name!r} maps to {fname!r}, not a file in this directory; refused")
            if not (self.dir / fname).is_file():
                raise FormatError(f"{self.index}: tensor {name!r} is in {fname}, which is missing (incomplete copy?)")
        return weight_map

    @property
    def location(self) -> str:
        return str(self.dir)

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def units(self) -> dict[str, Unit]:
        return {k: u for part in self._parts.values() for k, u in part.units().items()}

    def read_into(self, name: str, offset: int, out: memoryview) -> list[Segment]:
        part = self._entry(self._where, name, "tensor")
        return part.read_into(name, offset, out)

    def raw_range(self, name: str, offset: int, length: int) -> RawRange | None:
        return self._entry(self._where, name, "tensor").raw_range(name, offset, length)

    def recorded_options(self) -> dict[str, Any]:
        """The mapping options in the shardconv manifest (none for another writer's file)."""
        return dict(self.manifest_options)

    def input_files(self) -> list[str]:
        """The index and every part (with their manifests)."""
        return [os.path.abspath(self.index)] + [f for part in self._parts.values() for f in part.input_files()]

    def close(self) -> None:
        for part in self._parts.values():
            part.close()
