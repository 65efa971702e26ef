"""The fast BundleEntryProto reader (``tf_bundle.EntryReader``) against the strict
field-by-field one (``parse_entry``): the same entry or the same error (class and
message) on every entry TensorFlow wrote (fixtures and tests/data), on the crafted
hostile entries, and on random and mutated bytes; and the fast path is the one taken
for what TensorFlow writes."""
from __future__ import annotations

from pathlib import Path

import pytest
import tf_index_writer as w
from conftest import TESTDATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import EXAMPLES
from test_hostile import CRAFTED

from shardconv.errors import ShardconvError
from shardconv.formats import bundle_entries as tf_bundle
from shardconv.formats.sstable import SSTable
from shardconv.util.dtypes import TF_DTYPES

WHERE = "/x/m.index"
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _outcome(decode, name: str, value: bytes):
    try:
        return "entry", decode(name, value)
    except ShardconvError as e:
        return type(e), str(e)


STRICT = tf_bundle.parse_entry  # the function itself, whatever ``fallbacks`` puts in its place


def _strict(name: str, value: bytes):
    return _outcome(lambda n, v: STRICT(n, v, WHERE), name, value)


def assert_same(value: bytes, reader: tf_bundle.EntryReader | None = None, name: str = "x") -> None:
    """A fresh reader, and ``reader`` (whose shape cache may already hold this shape), agree with
    ``_parse_entry``."""
    expected = _strict(name, value)
    assert _outcome(tf_bundle.EntryReader(WHERE), name, value) == expected
    if reader is not None:
        assert _outcome(reader, name, value) == expected


def _index_entries(index: Path) -> list[tuple[str, bytes]]:
    with SSTable(index) as table:
        return [(k.decode("utf-8", "backslashreplace"), v) for k, v in table.items() if k]


def _tf_written_indexes(dirs: list[Path]) -> list[Path]:
    found = sorted(p for d in dirs for p in d.rglob("*.index"))
    assert found
    return found


@pytest.fixture
def fallbacks(monkeypatch):
    """Entries the reader handed to ``_parse_entry``."""
    seen: list[str] = []

    def counting(name, value, where):
        seen.append(name)
        return STRICT(name, value, where)

    monkeypatch.setattr(tf_bundle, "parse_entry", counting)
    return seen


def _check_indexes(indexes: list[Path], fallbacks: list[str]) -> int:
    checked = 0
    for index in indexes:
        reader = tf_bundle.EntryReader(WHERE)
        for name, value in _index_entries(index):
            fallbacks.clear()
            expected = _strict(name, value)
            assert _outcome(reader, name, value) == expected, (index, name)
            # TensorFlow's own form takes the fast path; only a partitioned tensor's full entry
            # (its slices, field 7) goes to the strict reader.
            sliced = expected[0] == "entry" and expected[1].slices
            assert fallbacks == ([name] if sliced else []), (index, name, value.hex())
            checked += 1
    return checked


def test_tf_written_entries_in_tests_data(fallbacks):
    assert _check_indexes(_tf_written_indexes([TESTDATA]), fallbacks) > 100


def test_tf_written_entries_in_fixtures(fallbacks, tf1_dtypes_ckpt, exotic_dtypes_ckpt, tf2_keras_ckpt, savedmodel_ckpt):
    dirs = [tf1_dtypes_ckpt, exotic_dtypes_ckpt, tf2_keras_ckpt, savedmodel_ckpt]
    assert _check_indexes(_tf_written_indexes(dirs), fallbacks) > 50


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_hostile_entries(case):
    items, _, _ = CRAFTED[case]
    reader = tf_bundle.EntryReader(WHERE)
    for key, value in items:
        if key:
            assert_same(value, reader)


EDGE_ENTRIES = [
    b"", b"\x08", b"\x08\x01", b"\x08\x01\x12", b"\x08\x01\x12\x00",          # truncated, minimal
    b"\x08\x01\x12\x05\x12\x02\x08\x04",                                         # shape longer than the entry
    b"\x08\x01\x12\x02\x18\x01",                                                 # shape of unknown rank
    b"\x08\x01\x12\x0b\x12\x09\x08" + b"\xff" * 8 + b"\x7f",                     # dimension -1 (9-byte varint)
    b"\x08\x01\x12\x0c\x12\x0a\x08" + b"\xff" * 9 + b"\x01",                     # dimension -1 (10-byte varint)
    b"\x08\x01\x12\x00\x20" + b"\xff" * 9 + b"\x01",                             # negative offset
    b"\x08\x01\x12\x00\x20" + b"\xff" * 8 + b"\x7f",                             # offset 2**63 - 1
    b"\x08\x01\x12\x00\x28\x30\x28\x10",                                         # size twice: the last wins
    b"\x08\x01\x12\x00\x28\x10\x20\x04",                                         # fields out of order
    b"\x08\x01\x12\x00\x35\x01\x02\x03",                                         # truncated crc
    b"\x08\x01\x12\x00\x35\x01\x02\x03\x04\x08\x02",                             # dtype again after the crc
    b"\x08\x01\x12\x00\x12\x02\x12\x00",                                         # shape twice
    b"\x08\x14\x12\x00", b"\x08\x63\x12\x00", b"\x08\x00\x12\x00",               # resource, unknown, zero dtype
    b"\x08\x81\x01\x12\x00",                                                     # dtype 129 (two-byte varint)
    b"\x08\x01\x12\x04\x12\x02\x10\x04",                                         # dim holding field 2 as a varint
    b"\x08\x01\x12\x06\x12\x04\x08\x04\x12\x00",                                 # dim with an empty name
    b"\x08\x01\x12\x00\x3a\x04\x0a\x02\x08\x01",                                 # a slice
    b"\x08\x01\x12\x00\x40\x01",                                                 # unknown field 8
    b"\x08\x01\x12\x00\x28\x80\x00",                                             # overlong size 0
]


@pytest.mark.parametrize("value", EDGE_ENTRIES, ids=lambda v: v.hex() or "empty")
def test_edge_entries(value):
    assert_same(value, tf_bundle.EntryReader(WHERE))


@FUZZ
@given(st.binary(max_size=64))
def test_random_entries(value):
    assert_same(value)


#: Integers whose varints are 1 to 10 bytes long, each length as likely.
SIZED = st.integers(1, 10).flatmap(lambda n: st.integers((1 << 7 * (n - 1)) - (n == 1), min((1 << 7 * n) - 1, 2**64 - 1)))


@FUZZ
@given(st.integers(0, 200), st.lists(st.one_of(SIZED, st.integers(-2**63, -1)), max_size=4), SIZED, SIZED, SIZED,
       st.one_of(st.none(), st.integers(0, 2**32 - 1)),
       st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3), st.one_of(st.none(), st.integers(0, 80)))
def test_mutated_entries(dtype, shape, shard, offset, size, crc, edits, cut):
    value = bytearray(w.entry(dtype, shape, shard=shard, offset=offset, size=size, crc=crc))
    for pos, byte in edits:
        value[pos % len(value)] = byte
    assert_same(bytes(value[:cut] if cut is not None else value))


@FUZZ
@given(st.sampled_from(sorted(TF_DTYPES)), st.lists(SIZED, max_size=4), SIZED, SIZED, SIZED,
       st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_canonical_entries(fallbacks, dtype, shape, shard, offset, size, crc):
    """Entries as TensorFlow writes them, with values of every varint length: the fast path,
    and the strict reader's result (which may be an error: a 10-byte varint is negative)."""
    value = w.entry(dtype, shape, shard=shard, offset=offset, size=size, crc=crc)
    fallbacks.clear()
    assert_same(value)
    assert fallbacks == ([] if max(shape + [shard, offset, size]) < 1 << 63 else ["x"])


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), SIZED), max_size=7))
def test_field_sequences(fields):
    """Entry fields in any order and number, each with a value of any varint length."""
    value = w.field_varint(1, 1) + w.field_bytes(2, b"")
    for num, v in fields:
        value += (w.field_fixed32(num, v & 0xFFFFFFFF) if num == 6 else
                  w.field_bytes(num, w.field_bytes(2, w.field_varint(1, v))) if num in (2, 7) else
                  w.field_varint(num, v))
    assert_same(value)


@FUZZ
@given(st.binary(max_size=24))
def test_canonical_head_random_tail(tail):
    assert_same(w.entry(1, [3, 4])[:12] + tail)  # dtype and shape, then anything

