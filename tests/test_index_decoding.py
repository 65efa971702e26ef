"""The fast BundleEntryProto reader (``tf_bundle.EntryReader``) against the strict
field-by-field one (``parse_entry``), and the fast object-graph decoder
(``tf_object_graph.parse``) against the strict one (``parse_strict``): the same result or the
same error (class and message) on everything TensorFlow wrote (fixtures and tests/data), on
crafted hostile input, and on random and mutated bytes; and the fast path is the one taken
for what TensorFlow writes."""
from __future__ import annotations

from pathlib import Path

import pytest
import tf_index_writer as w
from conftest import TESTDATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import EXAMPLES, _mutate
from test_hostile import CRAFTED

from shardconv.errors import ShardconvError
from shardconv.formats import bundle_entries as tf_bundle
from shardconv.formats.bundle_entries import OBJECT_GRAPH_KEY
from shardconv.formats.sstable import SSTable
from shardconv.sources import tf_object_graph as og
from shardconv.sources.tf_bundle import TFBundleSource
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



# --------------------------------------------------------------------------- the object graph
#
# ``tf_object_graph.parse`` (a decoder in plain loops that gives up on anything malformed)
# against ``parse_strict`` (field by field with ``wire.fields``): the same nodes or the same
# error, and no fallback on a graph TensorFlow wrote.

GRAPH_WHERE = "/x/m.data-00000-of-00001"
GRAPH_STRICT = og.parse_strict  # the function itself, whatever ``graph_fallbacks`` puts in its place


def _graph_outcome(decode, blob: bytes):
    try:
        return "nodes", decode(blob, GRAPH_WHERE)
    except ShardconvError as e:
        return type(e), str(e)


def assert_same_graph(blob: bytes) -> None:
    assert _graph_outcome(og.parse, blob) == _graph_outcome(GRAPH_STRICT, blob)


@pytest.fixture
def graph_fallbacks(monkeypatch):
    """Graphs ``parse`` handed to ``parse_strict``."""
    seen: list[bytes] = []

    def counting(blob, where):
        seen.append(blob)
        return GRAPH_STRICT(blob, where)

    monkeypatch.setattr(og, "parse_strict", counting)
    return seen


def _tf_written_graphs(dirs: list[Path]) -> list[bytes]:
    graphs = []
    for index in _tf_written_indexes(dirs):
        with TFBundleSource(str(index)[: -len(".index")]) as src:
            if any(t.name == OBJECT_GRAPH_KEY for t in src.tensors()):
                graphs.append(src.read_strings(OBJECT_GRAPH_KEY)[0])
    return graphs


def _check_graphs(graphs: list[bytes], fallbacks: list[bytes]) -> None:
    assert graphs
    for blob in graphs:
        fallbacks.clear()
        nodes = og.parse(blob, GRAPH_WHERE)
        assert fallbacks == []  # TensorFlow's own form never leaves the fast decoder
        assert nodes == GRAPH_STRICT(blob, GRAPH_WHERE)
        assert len(nodes) > 1
    assert any(n.attributes for blob in graphs for n in og.parse(blob, GRAPH_WHERE))


def test_tf_written_object_graphs_in_tests_data(graph_fallbacks):
    _check_graphs(_tf_written_graphs([TESTDATA]), graph_fallbacks)


def test_tf_written_object_graphs_in_fixtures(graph_fallbacks, tf2_keras_ckpt, savedmodel_ckpt, keras_ema_ckpt,
                                              tf2_v1_slots_ckpt):
    graphs = _tf_written_graphs([tf2_keras_ckpt, savedmodel_ckpt, keras_ema_ckpt, tf2_v1_slots_ckpt])
    assert any(n.slots for blob in graphs for n in GRAPH_STRICT(blob, GRAPH_WHERE))  # v1 slot references
    _check_graphs(graphs, graph_fallbacks)


def g_ref(node_id: int, local: bytes) -> bytes:
    return w.field_varint(1, node_id) + w.field_bytes(2, local)


def g_attr(name: bytes, full: bytes, key: bytes) -> bytes:
    return w.field_bytes(1, name) + w.field_bytes(2, full) + w.field_bytes(3, key)


def g_slot(orig: int, name: bytes, slot: int) -> bytes:
    return w.field_varint(1, orig) + w.field_bytes(2, name) + w.field_varint(3, slot)


def g_node(children=(), attributes=(), slots=(), tail: bytes = b"\x2a\x02\x08\x01") -> bytes:
    """A TrackableObject as TensorFlow writes it (``tail``: has_checkpoint_values = true)."""
    return (b"".join(w.field_bytes(1, c) for c in children) + b"".join(w.field_bytes(2, a) for a in attributes)
            + b"".join(w.field_bytes(3, s) for s in slots) + tail)


def g_graph(*nodes: bytes) -> bytes:
    return b"".join(w.field_bytes(1, n) for n in nodes)


LONG = b"layer/" * 40  # 240 bytes: two-byte lengths
TYPICAL = g_graph(g_node([g_ref(1, b"model"), g_ref(2, b"save_counter")]),
                  g_node([g_ref(2, b"w")], slots=[g_slot(2, b"m", 3)]),
                  g_node(attributes=[g_attr(b"VARIABLE_VALUE", b"model/w", b"model/w/.ATTRIBUTES/VARIABLE_VALUE")]),
                  g_node(attributes=[g_attr(b"VARIABLE_VALUE", LONG, LONG + b"/.ATTRIBUTES/VARIABLE_VALUE")]))

GRAPH_EDGES = {
    "empty": b"",
    "typical": TYPICAL,
    "empty-node": g_graph(b""),
    "no-tail": g_graph(g_node([g_ref(0, b"self")], tail=b"")),
    "child-fields-reversed": g_graph(g_node([w.field_bytes(2, b"a") + w.field_varint(1, 0)])),
    "child-id-twice": g_graph(g_node([g_ref(5, b"a") + w.field_varint(1, 0)])),
    "child-id-as-bytes": g_graph(g_node([w.field_bytes(1, b"\x00") + w.field_bytes(2, b"a")])),
    "child-name-as-varint": g_graph(g_node([w.field_varint(1, 0) + w.field_varint(2, 7)])),
    "child-id-2-bytes": g_graph(*[g_node([g_ref(200, b"a")])] + [b""] * 200),
    "child-id-huge": g_graph(g_node([g_ref(2**64 - 1, b"a")])),
    "child-id-overflow": g_graph(g_node([b"\x08" + b"\xff" * 9 + b"\x7f" + w.field_bytes(2, b"a")])),
    "child-id-11-bytes": g_graph(g_node([b"\x08" + b"\x80" * 10 + b"\x00"])),
    "child-out-of-range": g_graph(g_node([g_ref(1, b"a")])),
    "child-long-name": g_graph(g_node([g_ref(0, LONG)])),
    "child-empty": g_graph(g_node([b""])),
    "child-unknown-fields": g_graph(g_node([w.field_varint(9, 3) + g_ref(0, b"a") + b"\x19" + bytes(8)
                                            + w.field_fixed32(4, 1) + w.field_bytes(20, b"x")])),
    "attribute-reversed": g_graph(g_node(attributes=[w.field_bytes(3, b"k") + w.field_bytes(2, b"f")
                                                     + w.field_bytes(1, b"VARIABLE_VALUE")])),
    "attribute-varints": g_graph(g_node(attributes=[w.field_varint(1, 1) + w.field_varint(2, 300)
                                                    + w.field_bytes(3, b"k")])),
    "attribute-field-4": g_graph(g_node(attributes=[g_attr(b"n", b"f", b"k") + w.field_bytes(4, b"x")])),
    "attribute-field-0": g_graph(g_node(attributes=[b"\x02\x01x"])),
    "attribute-long": g_graph(g_node(attributes=[g_attr(LONG, LONG, LONG)])),
    "attribute-bad-utf8": g_graph(g_node(attributes=[g_attr(b"\xff\xfe", b"a\x80b", b"\xc3")])),
    "attribute-overrun": g_graph(g_node(attributes=[b"\x0a\x05ab"])),
    "slot-fields-reversed": g_graph(g_node(slots=[w.field_varint(3, 0) + w.field_bytes(2, b"m") + w.field_varint(1, 0)])),
    "slot-out-of-range": g_graph(g_node(slots=[g_slot(0, b"m", 9)])),
    "slot-as-varint": g_graph(g_node(), w.field_varint(3, 1)),
    "node-field-16": g_graph(g_node([g_ref(0, b"a")], tail=w.field_bytes(16, b"x") + w.field_varint(17, 1))),
    "node-fixed64": g_graph(g_node(tail=b"\x21" + bytes(8))),
    "node-fixed64-short": g_graph(g_node(tail=b"\x21" + bytes(7))),
    "node-fixed32-short": g_graph(g_node(tail=b"\x25" + bytes(3))),
    "node-wire-type-3": g_graph(g_node(tail=b"\x2b")),
    "node-wire-type-6": g_graph(g_node(tail=b"\x2e\x00")),
    "node-field-0": g_graph(g_node(tail=b"\x02\x00")),
    "node-key-last-byte": g_graph(g_node(tail=b"\x2a")),
    "node-length-past-end": g_graph(g_node(tail=b"\x2a\x7f")),
    "top-unknown": w.field_varint(2, 5) + b"\x19" + bytes(8) + w.field_bytes(3, b"abc") + TYPICAL,
    "top-node-as-varint": w.field_varint(1, 5) + TYPICAL,
    "top-key-last-byte": TYPICAL + b"\x0a",
    "top-length-past-end": TYPICAL + b"\x0a\x05ab",
    "top-varint-truncated": TYPICAL + b"\x10\x80",
    "top-wire-type-7": b"\x0f",
    "top-overlong-key": b"\x8a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00",
}


@pytest.mark.parametrize("case", sorted(GRAPH_EDGES))
def test_edge_graphs(case):
    assert_same_graph(GRAPH_EDGES[case])


def test_edge_graphs_cover_the_fast_path_and_the_fallback(graph_fallbacks):
    """The edge cases are decoded fast where they are well-formed (whatever their field order,
    lengths or unknown fields) and handed over exactly where they are not."""
    decoded = []
    for case in sorted(GRAPH_EDGES):
        graph_fallbacks.clear()
        ok = _graph_outcome(og.parse, GRAPH_EDGES[case])[0] == "nodes"
        decoded.append((case, ok, bool(graph_fallbacks)))
    malformed = {c for c, ok, _ in decoded if not ok}
    assert {"child-id-overflow", "node-wire-type-3", "top-overlong-key", "attribute-overrun"} <= malformed
    assert "typical" not in malformed and "child-unknown-fields" not in malformed
    # a bad reference is decoded fast and refused by the shared check; a decoding error falls back
    assert [c for c, ok, fell in decoded if fell] == sorted(malformed - {"child-out-of-range", "slot-out-of-range",
                                                                         "child-id-huge"})


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 700), st.integers(0, 255)), max_size=4), st.one_of(st.none(), st.integers(0, 700)))
def test_mutated_graphs(edits, cut):
    assert_same_graph(_mutate(_small_graph(), edits, cut))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(TYPICAL)), st.binary(max_size=12)), max_size=3))
def test_graphs_with_inserted_bytes(inserts):
    blob = TYPICAL
    for pos, extra in inserts:
        blob = blob[:pos] + extra + blob[pos:]
    assert_same_graph(blob)


@FUZZ
@given(st.binary(max_size=64))
def test_random_graphs(blob):
    assert_same_graph(blob)


_SMALL_GRAPH: list[bytes] = []


def _small_graph() -> bytes:
    """The object graph of a TF2 SavedModel in tests/data (613 bytes), read once."""
    if not _SMALL_GRAPH:
        _SMALL_GRAPH.append(_tf_written_graphs([TESTDATA / "tf-serving" / "saved_model_half_plus_two_tf2_cpu"])[0])
    return _SMALL_GRAPH[0]
