"""safetensors files (Hugging Face): one file, or several with a ``*.safetensors.index.json``.

A file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON mapping each
tensor name to its dtype, shape and ``data_offsets`` [begin, end) in the byte buffer
that follows, and an optional ``__metadata__`` string map. The header is checked as the
safetensors library checks it, before anything is allocated for the data: length cap,
UTF-8, JSON object without duplicate keys, known dtypes, shapes of non-negative ints,
dtype x shape = end - begin, offsets contiguous from 0 (no holes, no overlaps) and ending
exactly at the end of the file. Values are read with ``pread`` into the caller's buffer.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from ..core.types import RawRange, Segment, TensorInfo, Unit
from ..errors import FormatError, SourceError, UnsupportedError
from ..util.checksums import crc32
from ..util.dtypes import checked_nbytes
from ..util.fileio import open_read
from .base import Source, read_sidecar
from .npz import SplitNpzSource
from .probes import SAFETENSORS_INDEX_SUFFIX, SAFETENSORS_MAX_HEADER, the_safetensors_file

MAX_HEADER = SAFETENSORS_MAX_HEADER  # the safetensors library refuses longer headers
#: safetensors dtype code -> canonical dtype name, for the codes shardconv writes.
DTYPES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
    "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
#: Codes newer library versions write that shardconv reads but does not write (readers
#: before safetensors 0.7 refuse a file holding one).
READ_ONLY_DTYPES: dict[str, str] = {
    "C64": "complex64", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
#: Sub-byte and scale-only codes: valid safetensors, no array representation here.
UNSUPPORTED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0")
#: The library's Dtype enum order; its writer puts larger codes first (then sorts by name).
DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
               "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
               "F64", "I64", "U64")
INDEX_SUFFIX = SAFETENSORS_INDEX_SUFFIX


class SafetensorsSource(Source):
    format = "safetensors"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = the_safetensors_file(Path(path))
        self._fd = open_read(self.path, SourceError)
        try:
            self.size = os.fstat(self._fd).st_size
            self.metadata, self._tensors, self.data_start = parse_header(self._read_header(), self.size,
                                                                          str(self.path))
            self._sidecar = self._load_sidecar()
        except BaseException:
            os.close(self._fd)
            raise
        self._infos = [TensorInfo(n, t["dtype"], t["shape"], t["end"] - t["begin"], self._checksum(n))
                       for n, t in self._tensors.items()]

    @property
    def location(self) -> str:
        return str(self.path)

    def _read_header(self) -> bytes:
        """The 8-byte length and the header it declares, the length checked first."""
        if self.size < 8:
            raise FormatError(f"{self.path}: {self.size} bytes, too short for the 8-byte header length")
        n = struct.unpack("<Q", os.pread(self._fd, 8, 0))[0]
        if n > MAX_HEADER:
            raise FormatError(f"{self.path}: header length {n} is over the {MAX_HEADER}-byte limit")
        if 8 + n > self.size:
            raise FormatError(f"{self.path}: header length {n} runs past the end of the file ({self.size} bytes)")
        head = os.pread(self._fd, n, 8)
        if len(head) != n:
            raise FormatError(f"{self.path}: short read of the header (file truncated?)")
        return head

    def _load_sidecar(self) -> dict[str, dict[str, Any]]:
        """shardconv's manifest beside its own output: per-tensor CRC32s and the options used."""
        mpath, self.manifest_options, entries = read_sidecar(self.path)
        for name, t in self._tensors.items():
            e = entries.get(name)
            if e is not None and (e.get("dtype"), tuple(e.get("shape", ()))) != (t["dtype"], t["shape"]):
                raise FormatError(f"{mpath}: tensor {name!r} is {e.get('dtype')}{e.get('shape')} in the manifest "
                                  f"but {t['dtype']}{list(t['shape'])} in the file")
        self.stores_checksums = bool(entries)
        return entries

    def _checksum(self, name: str) -> str | None:
        crc = self._sidecar.get(name, {}).get("crc32")
        return f"crc32:{crc}" if isinstance(crc, int) else None

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def units(self) -> dict[str, Unit]:
        """The sidecar's CRC32s (shardconv output); the format itself stores none."""
        return {t.name: Unit(t.nbytes, "crc32", int(t.checksum[6:]), t.name, str(self.path))
                for t in self._infos if t.checksum}

    def recorded_options(self) -> dict[str, Any]:
        """The mapping options in the shardconv manifest (none for another writer's file)."""
        return dict(self.manifest_options)

    def input_files(self) -> list[str]:
        sidecar = self.path.with_name(self.path.name + ".shardconv.json")
        return [os.path.abspath(p) for p in (self.path, sidecar) if p.is_file()]

    def read_into(self, name: str, offset: int, out: memoryview) -> list[Segment]:
        t = self._entry(self._tensors, name, "tensor")
        out = self._region(name, offset, out, t["end"] - t["begin"])
        pos = self.data_start + t["begin"] + offset
        done = 0
        while done < len(out):
            n = os.preadv(self._fd, [out[done:]], pos + done)
            if n <= 0:
                raise FormatError(f"{self.path}: file ends inside tensor {name!r} (truncated?)")
            done += n
        return [Segment(name, offset, len(out), crc32(out))] if name in self._sidecar else []

    def raw_range(self, name: str, offset: int, length: int) -> RawRange | None:
        """Every tensor lies verbatim in the file (checksummed only by a shardconv sidecar)."""
        t = self._entry(self._tensors, name, "tensor")
        self._check_range(name, offset, length, t["end"] - t["begin"])
        unit = name if name in self._sidecar else None
        return RawRange(self._fd, self.data_start + t["begin"] + offset, str(self.path), name, unit, offset,
                        "crc32" if unit else None)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise FormatError(f"{name} is not JSON")


def _load_json(head: bytes, where: str) -> dict[str, Any]:
    """The header as a dict: UTF-8, starting with ``{``, JSON with unique keys."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: header is not UTF-8 (byte 0x{head[e.start]:02x} at {e.start})") from None
    if not text.startswith("{"):
        raise FormatError(f"{where}: header starts with {text[:10]!r}, not '{{'")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except FormatError as e:
        raise FormatError(f"{where}: header has a {e}") from None
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{where}: header is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: header is not a JSON object")
    return obj


def _entry(name: str, e: Any, where: str) -> dict[str, Any]:
    """One tensor entry checked: name, dtype, shape, offsets and their agreement."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{where}: tensor name {name!r} is not valid UTF-8") from None
    at = f"{where}: tensor {name!r}"
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise FormatError(f"{at}: entry {str(e)[:60]!r} lacks dtype, shape or data_offsets")
    code, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if code in UNSUPPORTED_DTYPES:
        raise UnsupportedError(f"{at}: dtype {code} (sub-byte or scale-only) is not supported")
    dtype = DTYPES.get(code) or READ_ONLY_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise FormatError(f"{at}: unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{at}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offs, list) or len(offs) != 2 or not all(type(x) is int and x >= 0 for x in offs)
            or offs[1] < offs[0]):
        raise FormatError(f"{at}: data_offsets {offs!r} is not [begin, end] with 0 <= begin <= end")
    nbytes = checked_nbytes(shape, dtype, at)
    if nbytes != offs[1] - offs[0]:
        raise FormatError(f"{at}: shape {shape} of {code} is {nbytes} bytes but data_offsets {offs} hold "
                          f"{offs[1] - offs[0]}")
    return {"dtype": dtype, "shape": tuple(shape), "begin": offs[0], "end": offs[1]}


def parse_header(head: bytes, file_size: int, where: str) -> tuple[dict[str, str], dict[str, dict[str, Any]], int]:
    """(``__metadata__``, tensors by name in file order, file offset of the byte buffer)
    from the header bytes of a file of ``file_size`` bytes; FormatError on any lie."""
    obj = _load_json(head, where)
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{where}: __metadata__ {str(meta)[:60]!r} is not a map of strings to strings")
    tensors = {name: _entry(name, e, where) for name, e in obj.items()}
    pos, prev = 0, None
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1]["begin"], kv[1]["end"])):
        if t["begin"] > pos:
            raise FormatError(f"{where}: bytes [{pos}, {t['begin']}) of the data belong to no tensor (a hole "
                              f"before {name!r})")
        if t["begin"] < pos:
            raise FormatError(f"{where}: tensors {prev!r} and {name!r} overlap (at data offset {t['begin']})")
        pos, prev = t["end"], name
    data_start = 8 + len(head)
    if data_start + pos != file_size:
        raise FormatError(f"{where}: the tensors end at data offset {pos} but the file holds "
                          f"{file_size - data_start} data bytes")
    return meta, dict(sorted(tensors.items(), key=lambda kv: kv[1]["begin"])), data_start


# -- several files with a Hugging Face index (transformers' sharded checkpoints) ------------

class SplitSafetensorsSource(SplitNpzSource):
    """Files named by a ``*.safetensors.index.json`` weight map, each read by SafetensorsSource."""

    format = "safetensors"
    index_suffix = INDEX_SUFFIX
    part_class = SafetensorsSource

    @property
    def stores_checksums(self) -> bool:  # type: ignore[override]
        """Only shardconv's own output has CRCs (in its sidecars)."""
        return all(p.stores_checksums for p in self._parts.values())
