"""Zarr chunks read as streams, so a region costs a few MiB however large its chunk.

TensorStore decodes a whole chunk to read any part of it, and Orbax writes one chunk
per shard (up to 2 GiB), so reading through TensorStore costs a decoded chunk on top
of the budget. For the codecs Orbax, t5x and zarr-python write (Zarr v2: zstd, gzip,
zlib, none, no filters, C order; Zarr v3: ``bytes`` (little-endian) then at most zstd or
gzip) this module instead keeps one forward decoder per chunk: compressed
bytes come from the TensorStore kvstore in 1 MiB byte ranges (file or OCDBT alike),
zstd streams through the system ``libzstd`` (``ZSTD_decompressStream``, window capped
at 16 MiB) and gzip/zlib through ``zlib`` with ``max_length``. A region becomes at most
a few pieces of each chunk's decoded bytes, each at most ``PIECE`` bytes, decoded in
order; reading backwards restarts that chunk's decoder. Different chunks of one read
are decoded on a small thread pool (the decoders release the GIL). Arrays with other
codecs (or without libzstd) are read by TensorStore.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import math
import os
import re
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError, UnsupportedError
from ..util.dtypes import NUMPY_DTYPES, itemsize
from . import tsio
from .regions import box_views

PIECE = 4 << 20          # largest decoded span held at once
FETCH = 1 << 20          # compressed bytes fetched per kvstore read
MAX_STREAMS = 32         # open chunk decoders (each: a zstd window <= 16 MiB, one fetch)


def _default_workers() -> int:
    """One decoding thread per usable core but one (left to the engine's writer), at least two
    where there are two cores (the writer waits on I/O part of the time: Orbax -> npz, 2 GiB,
    2 busy cores: 16-19 s instead of 18-24 s), at most 8 (more did not help on 16 cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores < 2 else min(8, max(2, cores - 1))


#: Chunks decoded at once when one read spans several (each holds at most a PIECE).
#: SHARDCONV_DECODE_THREADS overrides (1: no threads).
WORKERS = max(1, int(os.environ.get("SHARDCONV_DECODE_THREADS", "0") or 0) or _default_workers())
_ZSTD_WINDOW_LOG_MAX = 24
#: Decoder state per open stream, for estimates: zstd's window at the levels TensorStore
#: writes (3: 2 MiB at most; higher levels may use up to 16 MiB) or zlib's 32 KiB.
_STATE = {"zstd": 2 << 20, "gzip": 64 << 10, "zlib": 64 << 10, "raw": 0}
_SIZE = re.compile(r"value of size (\d+)")


# -- libzstd through ctypes ----------------------------------------------------------------

class _Buf(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


_zstd_lib: Any = None
_zstd_lock = threading.Lock()


def _zstd() -> Any:
    """The system libzstd, or None (then zstd chunks are read by TensorStore)."""
    global _zstd_lib
    with _zstd_lock:
        if _zstd_lib is None:
            lib: Any = False
            try:
                name = ctypes.util.find_library("zstd") or "libzstd.so.1"
                lib = ctypes.CDLL(name)
                lib.ZSTD_createDStream.restype = ctypes.c_void_p
                lib.ZSTD_freeDStream.argtypes = [ctypes.c_void_p]
                lib.ZSTD_initDStream.argtypes = [ctypes.c_void_p]
                lib.ZSTD_initDStream.restype = ctypes.c_size_t
                lib.ZSTD_DCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
                lib.ZSTD_DCtx_setParameter.restype = ctypes.c_size_t
                lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buf), ctypes.POINTER(_Buf)]
                lib.ZSTD_decompressStream.restype = ctypes.c_size_t
                lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
                lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
                lib.ZSTD_getErrorName.restype = ctypes.c_char_p
            except (OSError, AttributeError):
                lib = False
            _zstd_lib = lib
        return _zstd_lib or None


class _ZstdDecoder:
    def __init__(self) -> None:
        self.lib = _zstd()
        self.ds = self.lib.ZSTD_createDStream()
        if not self.ds:
            raise MemoryError("ZSTD_createDStream failed")
        self.lib.ZSTD_initDStream(self.ds)
        self.lib.ZSTD_DCtx_setParameter(self.ds, 100, _ZSTD_WINDOW_LOG_MAX)  # ZSTD_d_windowLogMax

    def reset(self) -> None:
        """Ready for a new frame (keeps its buffers and parameters: reused across chunks)."""
        self.lib.ZSTD_initDStream(self.ds)

    def decode(self, src: bytes | memoryview, at: int, dst: memoryview) -> tuple[int, int]:
        """Decode from ``src[at:]`` into ``dst``; returns (bytes consumed, bytes produced).
        ``src``: bytes, or a writable buffer (a stream's reused fetch buffer)."""
        if isinstance(src, bytes):
            base = ctypes.cast(ctypes.c_char_p(src), ctypes.c_void_p).value or 0  # the bytes' own buffer, no copy
        elif len(src) <= at:
            base = 0  # no input left (a flush)
        else:
            base = ctypes.addressof((ctypes.c_char * len(src)).from_buffer(src))
        d = (ctypes.c_char * len(dst)).from_buffer(dst)
        inb = _Buf(base + at, len(src) - at, 0)
        outb = _Buf(ctypes.addressof(d), len(dst), 0)
        r = self.lib.ZSTD_decompressStream(self.ds, ctypes.byref(outb), ctypes.byref(inb))
        if self.lib.ZSTD_isError(r):
            raise ValueError(self.lib.ZSTD_getErrorName(r).decode("ascii", "replace"))
        return inb.pos, outb.pos

    def __del__(self) -> None:
        if getattr(self, "ds", None):
            self.lib.ZSTD_freeDStream(self.ds)
            self.ds = None


class _ZlibDecoder:
    def __init__(self, wbits: int) -> None:
        self.d = zlib.decompressobj(wbits)

    def decode(self, src: bytes | memoryview, at: int, dst: memoryview) -> tuple[int, int]:
        out = self.d.decompress(memoryview(src)[at:], len(dst))
        dst[:len(out)] = out
        return len(src) - at - len(self.d.unconsumed_tail), len(out)


# -- which arrays stream --------------------------------------------------------------------

@dataclass
class StreamLayout:
    """A Zarr array whose chunks can be decoded as streams."""

    kvstore: dict[str, Any]          # kvstore spec whose keys are the chunk keys
    chunks: tuple[int, ...]
    codec: str                       # "raw", "zstd", "gzip" or "zlib"
    separator: str
    fill: bytes | None               # one element's fill value; None: a missing chunk is an error
    itemsize: int = 1
    prefix: str = ""                 # chunk keys' first component (Zarr v3's default encoding: "c")
    missing_hint: str = "the checkpoint is incomplete"   # said when a chunk is missing
    index: Any = None                # an ``ocdbt_index.OcdbtIndex``: chunks read from its data files by pread

    @property
    def chunk_nbytes(self) -> int:
        return math.prod(self.chunks) * self.itemsize

    def key(self, cidx: tuple[int, ...]) -> str:
        """The store key of chunk ``cidx``: ``0.1`` (v2), ``c/0/1`` (v3), ``0`` / ``c`` for a scalar."""
        if self.prefix:
            return self.separator.join([self.prefix, *map(str, cidx)])
        return self.separator.join(map(str, cidx)) or "0"


def stream_layout(meta: dict[str, Any], dtype: str, kvstore: dict[str, Any], fill_missing: bool) -> StreamLayout | None:
    """The layout if ``meta`` (``.zarray`` or ``zarr.json`` content) can be streamed here, else None."""
    fmt = meta.get("zarr_format", 2)
    found = _v2_codec(meta, dtype) if fmt == 2 else _v3_codec(meta, dtype) if fmt == 3 else None
    if found is None or (found[0] == "zstd" and _zstd() is None):
        return None
    codec, chunks, separator, prefix = found
    if not isinstance(chunks, list) or not all(isinstance(c, int) and c > 0 for c in chunks):
        return None
    if separator not in (".", "/") or len(chunks) != len(meta.get("shape") or ()):
        return None
    fill = None
    if fill_missing:
        fv = meta.get("fill_value")
        try:
            fill = np.full((), 0 if fv is None else fv, dtype=NUMPY_DTYPES[dtype]).tobytes()
        except (TypeError, ValueError, OverflowError):
            return None
    return StreamLayout(kvstore, tuple(chunks), codec, separator, fill, itemsize(dtype), prefix)


def _v2_codec(meta: dict[str, Any], dtype: str) -> tuple[str, Any, Any, str] | None:
    """(codec, chunk shape, separator, key prefix) of a streamable Zarr v2 array, else None."""
    if meta.get("order", "C") != "C" or meta.get("filters"):
        return None
    comp = meta.get("compressor")
    if comp is None:
        codec = "raw"
    elif isinstance(comp, dict) and comp.get("id") in ("zstd", "gzip", "zlib"):
        codec = comp["id"]
    else:
        return None
    dt = meta.get("dtype")
    if isinstance(dt, str) and dt[:1] == ">" and itemsize(dtype) > 1:
        return None  # stored big-endian: TensorStore swaps bytes
    return codec, meta.get("chunks", meta.get("shape")), meta.get("dimension_separator", "."), ""


def _v3_codec(meta: dict[str, Any], dtype: str) -> tuple[str, Any, Any, str] | None:
    """The same for Zarr v3: a regular grid, Zarr's own chunk keys, no storage transformers,
    codecs ``bytes`` (little-endian) then at most one of zstd or gzip."""
    grid, enc = meta.get("chunk_grid"), meta.get("chunk_key_encoding")
    codecs = meta.get("codecs")
    if not (isinstance(grid, dict) and grid.get("name") == "regular" and isinstance(enc, dict)
            and isinstance(codecs, list) and codecs and all(isinstance(c, dict) for c in codecs)):
        return None
    if meta.get("storage_transformers") or codecs[0].get("name") != "bytes" or len(codecs) > 2:
        return None
    if (codecs[0].get("configuration") or {}).get("endian", "little") != "little" and itemsize(dtype) > 1:
        return None
    codec = "raw" if len(codecs) == 1 else {"zstd": "zstd", "gzip": "gzip"}.get(codecs[1].get("name"))
    if codec is None or enc.get("name") not in ("default", "v2"):
        return None
    default = enc["name"] == "default"
    separator = (enc.get("configuration") or {}).get("separator", "/" if default else ".")
    return codec, (grid.get("configuration") or {}).get("chunk_shape"), separator, "c" if default else ""


def streams_needed(layout: StreamLayout, shape: tuple[int, ...]) -> int:
    """Chunks kept open at once: those across one row of chunks (C-order reads cross them all)
    plus one a read ended inside, or one per decoding thread, whichever is more."""
    row = math.prod(-(-s // c) for s, c in zip(shape[1:], layout.chunks[1:])) or 1
    return min(MAX_STREAMS, max(row + 1, WORKERS))


def stream_bytes(layout: StreamLayout, shape: tuple[int, ...]) -> int:
    """Memory the open decoders of this array hold (fetched bytes and decoder state)."""
    per = 0 if layout.codec == "raw" else 2 * FETCH + _STATE[layout.codec]  # pending + prefetched
    # decoders (zstd) and fetch buffers of finished chunks kept for reuse
    pooled = WORKERS * ((_STATE["zstd"] if layout.codec == "zstd" else 0) + (FETCH if layout.codec != "raw" else 0))
    return streams_needed(layout, shape) * per + pooled + WORKERS * (PIECE + (1 << 20))  # + each thread's piece, skip buffer


# -- reading --------------------------------------------------------------------------------

class _Stream:
    """Forward decoding of one chunk: ``pos`` decoded bytes are behind us."""

    def __init__(self, layout: StreamLayout, key: str, decoder: Any = None) -> None:
        self.key = key
        self.fd: int | None = None     # the local file, open while the stream is
        self.buf: bytearray | None = None  # fetch buffer of a local file, reused
        self.pos = 0          # decoded position
        self.cpos = 0         # next compressed byte to fetch
        self.pending: bytes | memoryview = b""  # fetched compressed bytes; pending[at:] not yet decoded
        self.at = 0
        self.eof = False
        self.missing = False
        self.size: int | None = None   # compressed size, once known
        self.ahead: tuple[int, Any] | None = None  # (offset, future) of the next fetch, in flight
        # a local file is read with pread (no TensorStore buffer and copy of each fetch)
        self.path = os.path.join(layout.kvstore["path"], key) if layout.kvstore.get("driver") == "file" else None
        self.base = 0                  # where the value starts in ``path``
        self.indexed = False           # ``path`` comes from an OCDBT index: it must exist
        self.inline: bytes | None = None   # the whole value, stored inline in the OCDBT B+tree
        if layout.index is not None:
            self._locate(layout.index, layout.kvstore.get("path", "") + key)
        self.decoder: Any = decoder
        if decoder is None and layout.codec == "zstd":
            self.decoder = _ZstdDecoder()
        elif decoder is None and layout.codec in ("gzip", "zlib"):
            self.decoder = _ZlibDecoder(31 if layout.codec == "gzip" else 15)

    def close_file(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close_file()

    def _locate(self, index: Any, key: str) -> None:
        loc = index.locate(key)
        if loc is None:
            self.missing = True
        elif isinstance(loc, bytes):
            self.inline, self.size = loc, len(loc)
        else:
            self.path, self.base, self.size = loc
            self.indexed = True


class StreamReader:
    """Reads C-order element ranges of streamable arrays, a piece of a chunk at a time."""

    def __init__(self, ts: Any, context: Any) -> None:
        self._ts = ts
        self._ctx = context
        self._kv: OrderedDict[int, Any] = OrderedDict()
        self._streams: OrderedDict[tuple[int, tuple[int, ...]], _Stream] = OrderedDict()
        self._lock = threading.Lock()       # the two maps above, shared by the decoding threads
        self._local = threading.local()     # per-thread scratch for skipped bytes
        self._pool: ThreadPoolExecutor | None = None
        self._free: list[_ZstdDecoder] = []  # zstd decoders of finished chunks, reused (at most WORKERS)
        self._free_bufs: list[bytearray] = []  # their fetch buffers, reused (not zeroed again)

    def _kvstore(self, layout: StreamLayout, where: str) -> Any:
        with self._lock:
            kv = self._kv.pop(id(layout), None)
            if kv is not None:
                self._kv[id(layout)] = kv
                return kv
        kv = tsio.wrap(FormatError, where, lambda: self._ts.KvStore.open(layout.kvstore, context=self._ctx).result())
        with self._lock:
            if len(self._kv) >= 8:
                self._kv.popitem(last=False)
            self._kv[id(layout)] = kv
        return kv

    def _skip_buffer(self) -> memoryview:
        buf = getattr(self._local, "skip", None)
        if buf is None:
            buf = self._local.skip = memoryview(bytearray(1 << 20))
        return buf

    def read(self, layout: StreamLayout, shape: tuple[int, ...], dtype: str, lo: int, hi: int, out: memoryview,
             where: str) -> None:
        """Fill ``out`` with elements [lo, hi) of the array (C order)."""
        npdt = NUMPY_DTYPES[dtype]
        c = layout.chunks
        cstrides = [math.prod(c[d + 1:]) for d in range(len(c))]
        # Different chunks are independent streams writing disjoint parts of ``out``: decode
        # them at once (libzstd and zlib run without the GIL). One chunk's pieces stay in order.
        by_chunk: dict[tuple[int, ...], list] = {}
        for box, dst in box_views(shape, npdt, lo, hi, out):
            ranges = [range(s.start // cd, (s.stop - 1) // cd + 1) for s, cd in zip(box, c)]
            for cidx in itertools.product(*ranges):
                origin = [i * cd for i, cd in zip(cidx, c)]
                glo = [max(s.start, o) for s, o in zip(box, origin)]
                ghi = [min(s.stop, o + cd) for s, o, cd in zip(box, origin, c)]
                local = [(a - o, b - o) for a, b, o in zip(glo, ghi, origin)]
                dsub = dst[tuple(slice(a - s.start, b - s.start) for a, b, s in zip(glo, ghi, box)) + (Ellipsis,)]
                by_chunk.setdefault(cidx, []).append((local, dsub))

        def run(cidx: tuple[int, ...]) -> None:
            for local, dsub in by_chunk[cidx]:
                self._copy_box(layout, cidx, local, cstrides, npdt, dsub, where)

        if len(by_chunk) < 2 or WORKERS < 2 or layout.codec == "raw":
            for cidx in by_chunk:
                run(cidx)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="shardconv-decode")
        futures = [self._pool.submit(run, cidx) for cidx in by_chunk]
        wait(futures)  # all of them, so none still writes into ``out`` once this returns or raises
        for f in futures:
            f.result()

    def _copy_box(self, layout: StreamLayout, cidx: tuple[int, ...], local: list[tuple[int, int]],
                  cstrides: list[int], npdt: np.dtype, dst: np.ndarray, where: str) -> None:
        """Copy the chunk's elements in ``local`` (per-dim [a, b)) into ``dst``, in spans of
        at most PIECE decoded bytes, in increasing order."""
        isz = npdt.itemsize
        nd = len(local)
        if nd == 0:
            buf = bytearray(isz)
            self._decoded(layout, cidx, 0, memoryview(buf), where)
            dst[...] = np.frombuffer(buf, dtype=npdt)[0]
            return

        def walk(prefix: list[int], j: int) -> None:
            a, b = local[j]
            slab = cstrides[j] * isz  # decoded bytes of one index along dim j
            if slab > PIECE and j + 1 < nd:
                for i in range(a, b):
                    walk(prefix + [i], j + 1)
                return
            step = max(1, PIECE // slab)
            for r0 in range(a, b, step):
                r1 = min(b, r0 + step)
                lo_idx = prefix + [r0] + [x for x, _ in local[j + 1:]]
                hi_idx = prefix + [r1 - 1] + [y - 1 for _, y in local[j + 1:]]
                start = sum(i * s for i, s in zip(lo_idx, cstrides)) * isz
                end = (sum(i * s for i, s in zip(hi_idx, cstrides)) + 1) * isz
                dsel = tuple(p - local[k][0] for k, p in enumerate(prefix)) + (slice(r0 - a, r1 - a),)
                target = dst[dsel + (Ellipsis,)]
                full = all(local[k] == (0, layout.chunks[k]) for k in range(j + 1, nd))
                if full and target.flags.c_contiguous:  # decode straight into the caller's buffer
                    self._decoded(layout, cidx, start, target.reshape(-1).view(np.uint8).data, where)
                    continue
                buf = bytearray(end - start)
                self._decoded(layout, cidx, start, memoryview(buf), where)
                shape = [r1 - r0] + [y - x for x, y in local[j + 1:]]
                view = np.ndarray(shape, dtype=npdt, buffer=buf,
                                  strides=[s * isz for s in cstrides[j:]])
                np.copyto(target, view)

        walk([], 0)

    def _stream(self, layout: StreamLayout, cidx: tuple[int, ...], start: int) -> _Stream:
        key = (id(layout), cidx)
        with self._lock:
            st = self._streams.pop(key, None)
            if st is None or st.pos > start:  # new, or a read behind the decoder: start over
                reuse = self._free.pop() if layout.codec == "zstd" and self._free else None
                st = _Stream(layout, layout.key(cidx), reuse)
                st.buf = self._free_bufs.pop() if self._free_bufs else None
                if len(self._streams) >= MAX_STREAMS:
                    self._streams.popitem(last=False)
            self._streams[key] = st
        return st

    def _decoded(self, layout: StreamLayout, cidx: tuple[int, ...], start: int, out: memoryview, where: str) -> None:
        """Decoded bytes [start, start+len(out)) of chunk ``cidx``."""
        st = self._stream(layout, cidx, start)
        kv = None if layout.index is not None else self._kvstore(layout, where)  # indexed: files only
        at = f"{where}: chunk {st.key!r}"
        if layout.codec == "raw":
            if st.path is not None:
                n = self._pread_into(st, start, out, at)
            else:
                data = self._fetch(kv, st, start, len(out), at)
                n = None if data is None else len(data)
                if data is not None and n == len(out):
                    out[:] = data
            st.close_file()
            if n is None:
                return self._fill(layout, out, at)
            if n != len(out):
                raise FormatError(f"{at}: holds fewer bytes than its shape needs (truncated?)")
            return
        skip = self._skip_buffer()
        while st.pos < start:  # skip forward
            n = min(len(skip), start - st.pos)
            if not self._pump(kv, st, skip[:n], at):
                return self._fill(layout, out, at)
        if not self._pump(kv, st, out, at):
            self._fill(layout, out, at)
        if st.pos >= layout.chunk_nbytes:  # fully decoded: free its file and buffer, keep its decoder
            self._finish(layout, cidx, st)

    def _finish(self, layout: StreamLayout, cidx: tuple[int, ...], st: _Stream) -> None:
        st.close_file()
        with self._lock:
            if self._streams.get((id(layout), cidx)) is st:
                del self._streams[(id(layout), cidx)]
            if isinstance(st.decoder, _ZstdDecoder) and len(self._free) < WORKERS:
                st.decoder.reset()
                self._free.append(st.decoder)
                st.decoder = None
            if st.buf is not None and len(self._free_bufs) < WORKERS:
                self._free_bufs.append(st.buf)
                st.buf = None

    def _pump(self, kv: Any, st: _Stream, out: memoryview, at: str) -> bool:
        """Decode exactly len(out) bytes from the stream; False if the chunk is missing."""
        done = 0
        while done < len(out):
            if st.at >= len(st.pending) and not st.eof:
                data: bytes | memoryview | None = self._take_ahead(st)
                if data is None:
                    data = self._fetch(kv, st, st.cpos, FETCH, at)
                if data is None:
                    return False
                st.cpos += len(data)
                st.pending, st.at = data, 0
                st.eof = len(data) < FETCH or (st.size is not None and st.cpos >= st.size)
                if not st.eof and st.path is None and kv is not None:  # the next compressed bytes are read while these are decoded
                    n = FETCH if st.size is None else min(FETCH, st.size - st.cpos)
                    st.ahead = (st.cpos, kv.read(st.key, byte_range=slice(st.cpos, st.cpos + n)))
            try:
                used, made = st.decoder.decode(st.pending, st.at, out[done:])
            except (ValueError, zlib.error) as e:
                if "too much memory" in str(e):  # a valid frame whose window exceeds the cap
                    raise UnsupportedError(f"{at}: its zstd frame needs a window over {1 << _ZSTD_WINDOW_LOG_MAX >> 20} "
                                           "MiB to decode (level 20+ or long-distance matching); not read, to keep "
                                           "memory bounded") from None
                raise FormatError(f"{at}: corrupt compressed data ({e})") from None
            st.at += used
            done += made
            st.pos += made
            if made == 0 and used == 0 and st.eof and st.at >= len(st.pending):
                raise FormatError(f"{at}: decodes to fewer bytes than its shape needs (truncated?)")
        return True

    @staticmethod
    def _take_ahead(st: _Stream) -> bytes | None:
        """The prefetched bytes at ``st.cpos``, or None (then they are fetched again, which
        also reports whatever went wrong, e.g. a range past the value's end)."""
        ahead, st.ahead = st.ahead, None
        if ahead is None or ahead[0] != st.cpos:
            return None
        try:
            r = ahead[1].result()
        except ValueError:
            return None
        return bytes(r.value) if r.state == "value" and len(r.value) else None

    @staticmethod
    def _open(st: _Stream, at: str) -> int | None:
        """The stream's descriptor of its local file (opened once), or None if it is missing."""
        if st.fd is not None or st.path is None:
            return st.fd
        try:
            st.fd = os.open(st.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            return st.fd
        except FileNotFoundError:
            if st.indexed:  # the database names this file: the checkpoint is damaged, not sparse
                raise FormatError(f"{at}: its OCDBT data file {st.path} is missing (incomplete checkpoint?)") from None
            st.missing = True
            return None
        except OSError as e:
            raise FormatError(f"{at}: {e.strerror}") from None

    def _pread_into(self, st: _Stream, start: int, out: memoryview, at: str) -> int | None:
        """Bytes [start, start+len(out)) of the stream's value straight into ``out`` (a local
        file, or the inline value); the count read (short at the value's end), or None if missing."""
        if st.inline is not None and not st.missing:
            data = st.inline[start:start + len(out)]
            out[:len(data)] = data
            return len(data)
        fd = None if st.missing else self._open(st, at)
        if fd is None:
            return None
        if st.size is not None:
            out = out[:max(0, st.size - start)]
        done = 0
        try:
            while done < len(out):
                n = os.preadv(fd, [out[done:]], st.base + start + done)
                if n <= 0:
                    break
                done += n
        except OSError as e:
            raise FormatError(f"{at}: {e.strerror}") from None
        return done

    def _fetch(self, kv: Any, st: _Stream, start: int, n: int, at: str) -> bytes | memoryview | None:
        """Compressed bytes [start, start+n) (fewer at the end); None if the chunk is missing.
        A local file is read into the stream's own buffer (valid until its next fetch)."""
        if st.missing:
            return None
        if st.inline is not None:
            return st.inline[start:start + n]
        if st.path is not None:
            if st.buf is None or len(st.buf) < n:
                st.buf = bytearray(n)
            got = self._pread_into(st, start, memoryview(st.buf)[:n], at)
            return None if got is None else memoryview(st.buf)[:got]
        if st.size is not None:
            n = max(0, min(n, st.size - start))
            if not n:
                return b""
        try:
            r = kv.read(st.key, byte_range=slice(start, start + n)).result()
        except ValueError as e:
            if "OUT_OF_RANGE" not in str(e):
                raise FormatError(f"{at}: {tsio.first_line(e)}") from None
            m = _SIZE.search(str(e))
            if m:  # the value ends within this range: now its size is known
                st.size = int(m.group(1))
                return self._fetch(kv, st, start, n, at)
            try:
                r = kv.read(st.key, byte_range=slice(start, None)).result()
            except ValueError as e2:
                if "OUT_OF_RANGE" in str(e2):
                    return b""
                raise FormatError(f"{at}: {tsio.first_line(e2)}") from None
        if r.state != "value":
            st.missing = True
            return None
        return bytes(r.value)

    @staticmethod
    def _fill(layout: StreamLayout, out: memoryview, at: str) -> None:
        if layout.fill is None:
            raise FormatError(f"{at} is missing; {layout.missing_hint}")
        pattern = layout.fill
        if pattern.count(0) == len(pattern):
            out[:] = bytes(len(out))
        else:
            out[:] = (pattern * (len(out) // len(pattern) + 1))[:len(out)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for st in self._streams.values():
            st.close_file()
        self._streams.clear()
        self._free.clear()
        self._free_bufs.clear()
        self._kv.clear()
