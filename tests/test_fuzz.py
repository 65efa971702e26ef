"""Property-based fuzzing of the parsers that read untrusted bytes: whatever the
input, they return or raise a ShardconvError, never another exception, and never
hang. Examples per target: SHARDCONV_FUZZ_EXAMPLES (default 200; bench runs more)."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import tf_index_writer as w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardconv.errors import ShardconvError
from shardconv.formats import npyformat, wire
from shardconv.sources.npz import NpzSource
from shardconv.sources.tf_bundle import TFBundleSource

EXAMPLES = int(os.environ.get("SHARDCONV_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
COUNTS_FILE = os.environ.get("SHARDCONV_FUZZ_COUNTS")

DATA = np.arange(24, dtype=np.float32).tobytes()
VALID_INDEX = w.index([(b"", w.header()),
                       (b"a", w.entry(1, [2, 3], size=24, crc=w.tensor_bytes_crc(DATA[:24]))),
                       (b"b", w.entry(1, [6], offset=24, size=24, crc=w.tensor_bytes_crc(DATA[24:48])))])
VALID_SNAPPY_INDEX = w.index([(b"", w.header()), (b"a", w.entry(1, [2, 3], size=24, crc=w.tensor_bytes_crc(DATA[:24])))],
                             snappy=True)


def _count(target: str) -> None:
    if COUNTS_FILE:
        with open(COUNTS_FILE, "a") as f:
            f.write(target + "\n")


def _read_all_tf(index: bytes, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "m.index").write_bytes(index)
        Path(d, "m.data-00000-of-00001").write_bytes(data)
        try:
            with TFBundleSource(Path(d, "m")) as s:
                for t in s.tensors():
                    if t.is_string:
                        s.read_strings(t.name)
                    elif t.nbytes <= 1 << 20:
                        s.read(t.name)
        except ShardconvError:
            pass


def _mutate(base: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(base)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b[:cut] if cut is not None else b)


@FUZZ
@given(st.binary(max_size=2048), st.binary(max_size=256))
def test_tf_index_random_bytes(index, data):
    _count("tf-index-random")
    _read_all_tf(index, data)


@FUZZ
@given(st.sampled_from([VALID_INDEX, VALID_SNAPPY_INDEX]),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       st.one_of(st.none(), st.integers(0, 400)))
def test_tf_index_mutations(base, edits, cut):
    _count("tf-index-mutation")
    _read_all_tf(_mutate(base, edits, cut), DATA)


@FUZZ
@given(st.integers(0, 40), st.lists(st.integers(-2**63, 2**64), max_size=4), st.integers(0, 2**64),
       st.integers(0, 2**64), st.integers(0, 1 << 20))
def test_tf_entries_with_arbitrary_fields(dtype, shape, offset, size, shard):
    _count("tf-entry-fields")
    try:
        entry = w.entry(dtype, shape, shard=shard, offset=offset, size=size, crc=0)
    except (ValueError, OverflowError):
        return
    _read_all_tf(w.index([(b"", w.header()), (b"x", entry)]), DATA)


@FUZZ
@given(st.binary(max_size=512))
def test_protobuf_wire_reader(data):
    _count("wire")
    try:
        for _num, _wt, val in wire.fields(data, "fuzz"):
            if isinstance(val, memoryview):
                list(wire.fields(val, "fuzz")) if len(val) < 64 else None
    except ShardconvError:
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_npy_header_reader(data):
    _count("npy-header")
    buf = io.BytesIO(data)
    try:
        npyformat.parse_header(buf.read, "fuzz")
    except ShardconvError:
        pass


def _valid_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(6, dtype=np.int32), b=np.ones((2, 2), np.float16))
    return buf.getvalue()


VALID_NPZ = _valid_npz()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       st.one_of(st.none(), st.integers(0, len(VALID_NPZ))))
def test_npz_mutations(edits, cut):
    _count("npz-mutation")
    _read_all(NpzSource, "x.npz", _mutate(VALID_NPZ, edits, cut))


def _valid_msgpack() -> bytes:
    import msgpack

    arr = np.arange(6, dtype=np.float32)
    payload = msgpack.packb(((2, 3), "float32", arr.tobytes()), use_bin_type=True)
    return msgpack.packb({"params": {"w": msgpack.ExtType(1, payload), "n": [1, 2.5, True]}, "step": 7},
                         use_bin_type=True)


VALID_MSGPACK = _valid_msgpack()


def _read_all(source_class: type, filename: str, data: bytes) -> None:
    """Open ``data`` as a file with ``source_class`` and read every tensor: a ShardconvError
    is the only acceptable failure."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d, filename)
        p.write_bytes(data)
        try:
            with source_class(p) as s:
                for t in s.tensors():
                    s.read(t.name)
        except ShardconvError:
            pass


def _read_all_msgpack(data: bytes) -> None:
    from shardconv.sources.flax_msgpack import FlaxMsgpackSource

    _read_all(FlaxMsgpackSource, "c.msgpack", data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       st.one_of(st.none(), st.integers(0, len(VALID_MSGPACK))))
def test_msgpack_walker_mutations(edits, cut):
    _count("msgpack-mutation")
    _read_all_msgpack(_mutate(VALID_MSGPACK, edits, cut))


@FUZZ
@given(st.binary(max_size=1024))
def test_msgpack_walker_random_bytes(data):
    _count("msgpack-random")
    _read_all_msgpack(data)
