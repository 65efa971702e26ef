"""The bulk index readers that make listing 100 000 tensors fast against the entry-at-a-time
ones they replace: ``EntryReader.many`` against ``EntryReader.__call__`` (itself checked
against the strict ``parse_entry`` in test_index_decoding), and ``SSTable.block_lists``
against the table's entries one at a time. Same entries, or the same first error (class and
message), on what TensorFlow wrote, on crafted hostile entries and on random and mutated ones;
and the bulk path is the one taken for what TensorFlow writes."""
from __future__ import annotations

import cramjam
import pytest
import tf_index_writer as w
from conftest import TESTDATA
from hypothesis import given
from hypothesis import strategies as st
from test_index_decoding import EDGE_ENTRIES, FUZZ, SIZED, WHERE, _index_entries, _tf_written_indexes

from shardconv.errors import ShardconvError
from shardconv.formats import bundle_entries as be
from shardconv.formats.sstable import SSTable
from shardconv.formats.wire import read_varint
from shardconv.util.dtypes import TF_DTYPES


def _one_by_one(names: list[str], values: list[bytes]):
    reader = be.EntryReader(WHERE)
    out = []
    try:
        for n, v in zip(names, values):
            out.append(reader(n, v))
    except ShardconvError as e:
        return type(e), str(e)
    return "entries", out


def _bulk(names: list[str], values: list[bytes], reader: be.EntryReader | None = None):
    try:
        return "entries", (reader or be.EntryReader(WHERE)).many(names, values)
    except ShardconvError as e:
        return type(e), str(e)


def assert_same(values: list[bytes]) -> None:
    names = [f"t{i}" for i in range(len(values))]
    assert _bulk(names, values) == _one_by_one(names, values)


@pytest.fixture
def calls(monkeypatch):
    """Entries ``many`` handed to ``EntryReader.__call__``."""
    seen: list[str] = []
    call = be.EntryReader.__call__

    def counting(self, name, value):
        seen.append(name)
        return call(self, name, value)

    monkeypatch.setattr(be.EntryReader, "__call__", counting)
    return seen


def test_tf_written_indexes_take_the_bulk_path(calls, tf1_dtypes_ckpt, exotic_dtypes_ckpt, tf2_keras_ckpt,
                                               savedmodel_ckpt):
    checked = 0
    for index in _tf_written_indexes([TESTDATA, tf1_dtypes_ckpt, exotic_dtypes_ckpt, tf2_keras_ckpt, savedmodel_ckpt]):
        entries = [(n, v) for n, v in _index_entries(index) if n[0] != "\x00"]
        names, values = [n for n, _ in entries], [v for _, v in entries]
        calls.clear()
        bulk = _bulk(names, values)
        called = list(calls)
        assert bulk[0] == "entries"
        expected = _one_by_one(names, values)
        assert bulk == expected, index
        assert called == [e.name for e in expected[1] if e.slices], index  # only partitioned tensors' full entries
        checked += len(names)
    assert checked > 150


def test_edge_entries_each_between_canonical_ones():
    good = w.entry(1, [3, 4], offset=100, size=48, crc=7)
    for value in EDGE_ENTRIES:
        assert_same([good, value, good])
        assert_same([value])


def test_shapes_and_heads_are_remembered_per_distinct_bytes():
    reader = be.EntryReader(WHERE)
    values = [w.entry(1, [3, 4], offset=i, size=48) for i in range(1, 200)]
    entries = reader.many([str(i) for i in range(len(values))], values)
    assert [e.offset for e in entries] == list(range(1, 200)) and len(reader._heads) == 1
    # a dim holding a name: the pattern's split of the shape is not its fields, the head check sees that
    odd = b"\x08\x01\x12\x06\x12\x04\x08\x04\x12\x00\x28\x10"
    assert _bulk(["x"], [odd], reader) == _one_by_one(["x"], [odd])


#: Numbers at and around each varint length's ends, with every bit of each length set somewhere.
EDGES = sorted({0, 1, 2**63 - 1} | {v for k in range(1, 10) for v in (2**(7 * k) - 1, 2**(7 * k), 2**(7 * k) + 1,
                                                                      (2**(7 * k) - 1) // 3, 2 * (2**(7 * k) - 1) // 3)})


def test_numbers_of_every_varint_length():
    values = [w.entry(1, [d], shard=s, offset=o, size=z, crc=c) for d, s, o, z, c in
              zip(EDGES, EDGES[3:] + EDGES[:3], EDGES[7:] + EDGES[:7], EDGES[11:] + EDGES[:11], range(len(EDGES)))]
    for value in values:
        assert_same([value])
    safe = [w.entry(1, [3], offset=o, size=12, crc=1) for o in EDGES if o < 2**63]
    assert _bulk(["x"] * len(safe), safe)[0] == "entries"
    assert_same(safe)


@FUZZ
@given(st.sampled_from(sorted(TF_DTYPES)), st.lists(SIZED, max_size=4), SIZED, SIZED, SIZED,
       st.one_of(st.none(), st.integers(0, 2**32 - 1)), st.lists(st.binary(max_size=24), max_size=3))
def test_canonical_entries_with_others(dtype, shape, shard, offset, size, crc, others):
    """Entries as TensorFlow writes them, with values of every varint length, among random ones."""
    value = w.entry(dtype, shape, shard=shard, offset=offset, size=size, crc=crc)
    assert_same([value])
    assert_same([value, *others, value])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3), st.one_of(st.none(), st.integers(0, 40)),
       SIZED, SIZED)
def test_mutated_entries(edits, cut, offset, size):
    value = bytearray(w.entry(1, [3, 4], offset=offset, size=size, crc=5))
    for pos, byte in edits:
        value[pos % len(value)] = byte
    assert_same([w.entry(1, [2], size=8), bytes(value[:cut] if cut is not None else value)])


# --------------------------------------------------------------------------- SSTable blocks

def _entries_one_by_one(table: SSTable, block: bytes, what: str):
    """A block's entries as the per-entry reader yielded them (its code before ``block_items``)."""
    n = len(block)
    if n < 4:
        raise table._err(f"{what} block of {n} bytes has no restart count")
    num_restarts = int.from_bytes(block[n - 4:], "little")
    limit = n - 4 - 4 * num_restarts
    if num_restarts == 0 or limit < 0:
        raise table._err(f"{what} block: bad restart count {num_restarts}")
    pos, key = 0, b""
    while pos < limit:
        shared, non_shared, vlen, pos = table._entry_lengths(block, pos, limit, what)
        if shared > len(key) or non_shared + vlen > limit - pos:
            raise table._err(f"{what} block: entry at {pos} overruns the block")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + vlen]
        pos += vlen


def _items_one_by_one(table: SSTable):
    """The table's entries as the per-entry reader met them: block by block, each entry parsed
    and its key checked against the one before in its turn."""
    out, prev = [], None
    try:
        index = table._block(table.index_handle, "index")
        for _, handle in _entries_one_by_one(table, index, "index"):
            off, pos = read_varint(handle, 0)
            size, _ = read_varint(handle, pos)
            for key, value in _entries_one_by_one(table, table._block((off, size), "data"), "data"):
                if prev is not None and key <= prev:
                    raise table.order_error(key, prev)
                prev = key
                out.append((key, value))
    except ShardconvError as e:
        return out, (type(e), str(e))
    return out, None


def _items_bulk(table: SSTable):
    out = []
    try:
        for keys, values in table.block_lists():
            out.extend(zip(keys, values))
    except ShardconvError as e:
        return out, (type(e), str(e))
    return out, None


ITEM = w.entry(1, [3, 4], size=48)


@pytest.mark.parametrize("items", [
    [(b"", w.header()), (b"a", ITEM), (b"b", ITEM)],
    [(b"", w.header()), (b"b", ITEM), (b"a", ITEM), (b"c", ITEM)],
    [(b"", w.header()), (b"a", ITEM), (b"a", ITEM)],
    [(b"a", ITEM), (b"", w.header())],
    [(b"", w.header()), (b"x" * 300, ITEM), (b"y", b"\x00" * 200)],  # lengths of two-byte varints
], ids=["sorted", "out-of-order", "duplicate", "header-last", "long"])
def test_block_lists_as_entries_one_by_one(tmp_path, items):
    path = tmp_path / "m.index"
    path.write_bytes(w.index(items))
    with SSTable(path) as table:
        assert _items_bulk(table) == _items_one_by_one(table)


@FUZZ
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=3), st.binary(max_size=4)), max_size=6),
       st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3))
def test_block_lists_random(tmp_path_factory, items, edits):
    """Random keys (any order) and a data block with random bytes changed (overruns, long lengths)."""
    raw = bytearray(w.block(items))
    for pos, byte in edits:
        raw[pos % len(raw)] = byte
    path = tmp_path_factory.mktemp("t") / "m.index"
    path.write_bytes(w.index([], raw_data_block=bytes(cramjam.snappy.compress_raw(bytes(raw)))))
    with SSTable(path) as table:
        assert _items_bulk(table) == _items_one_by_one(table)


# --------------------------------------------------------------------------- TensorInfos


def test_infos_made_without_the_constructor_are_the_constructors(monkeypatch):
    import dataclasses

    from shardconv.core.types import Role, SourceRole
    from shardconv.sources import tf_bundle

    entries = [be.Entry("a", "float32", (3, 4), 0, 0, 48, 7, ()), be.Entry("b", "string", (), 1, 48, 5, None, ([(0, -1)],))]
    rows = (tf_bundle._Fields(*map(list, zip(*entries))), [48, 5], ["crc32c:7", None])
    roles = {"b": (SourceRole(Role.META), "full/b")}
    assert tf_bundle._FAST_INFOS
    fast = tf_bundle._infos(*rows, roles)
    monkeypatch.setattr(tf_bundle, "_FAST_INFOS", False)
    slow = tf_bundle._infos(*rows, roles)
    assert fast == slow and list(map(repr, fast)) == list(map(repr, slow))
    assert [(t.extra, t.role) for t in fast] == [(t.extra, t.role) for t in slow]
    assert fast[1].extra == {"shard": 1, "sliced": True, "full_name": "full/b"} and fast[1].role.role == Role.META
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast[0].name = "c"  # type: ignore[misc]

    assert tf_bundle._slotted_info_class(tf_bundle.TensorInfo)

    @dataclasses.dataclass(frozen=True)
    class Plain:
        name: str
        dtype: str
        shape: tuple
        nbytes: int
        checksum: str | None
        extra: dict
        role: object

    @dataclasses.dataclass(frozen=True, slots=True)
    class Posted:
        name: str
        dtype: str
        shape: tuple
        nbytes: int
        checksum: str | None
        extra: dict
        role: object

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True)
    class Other:
        name: str

    @dataclasses.dataclass(frozen=True, slots=True)
    class Slotted(Plain):  # its fields in a base's __dict__, not in slots of its own
        pass

    assert not any(map(tf_bundle._slotted_info_class, (Plain, Slotted, Posted, Other, tuple)))


# --------------------------------------------------------------------------- checks at once

def _open_outcome(path):
    from shardconv.sources.tf_bundle import TFBundleSource

    try:
        with TFBundleSource(path) as src:
            return "infos", [(t.name, t.dtype, t.shape, t.nbytes, t.checksum, t.extra) for t in src.tensors()]
    except ShardconvError as e:
        return type(e), str(e)


def _strings_value(items: list[bytes]) -> bytes:
    """A string tensor's stored bytes: the lengths, their masked CRC, then the elements."""
    from shardconv.util.checksums import crc32c, mask

    lengths = b"".join(w.varint(len(i)) for i in items)
    crc = 0
    for i in items:
        crc = crc32c(len(i).to_bytes(4, "little"), crc)
    return lengths + mask(crc).to_bytes(4, "little") + b"".join(items)


def _checks_agree(tmp_path, items, data: bytes, monkeypatch, expect_bulk: bool | None = None) -> None:
    from shardconv.sources import tf_bundle

    (tmp_path / "m.data-00000-of-00001").write_bytes(data)
    (tmp_path / "m.index").write_bytes(w.index(items))
    at_once = []
    real = tf_bundle.TFBundleSource._rows_at_once

    def spy(self, *a):
        at_once.append(real(self, *a))
        return at_once[-1]

    with monkeypatch.context() as m:
        m.setattr(tf_bundle.TFBundleSource, "_rows_at_once", spy)
        bulk = _open_outcome(tmp_path / "m")
    with monkeypatch.context() as m:
        m.setattr(tf_bundle.TFBundleSource, "_rows_at_once", lambda self, *a: None)
        assert bulk == _open_outcome(tmp_path / "m"), items
    if expect_bulk is not None:
        assert (at_once[0] is not None) == expect_bulk


HEADER = (b"", w.header())
STR = _strings_value([b"ab", b"c"])


@pytest.mark.parametrize("case", [
    ("plain", [(b"a", w.entry(1, [3], size=12, crc=5)), (b"b", w.entry(1, [2], offset=12, size=8))], True),
    ("string", [(b"a", w.entry(1, [3], size=12)), (b"s", w.entry(7, [2], offset=12, size=len(STR), crc=9))], True),
    ("string past the end", [(b"a", w.entry(1, [3], size=12)), (b"s", w.entry(7, [2], offset=30, size=len(STR)))], False),
    ("size not shape's", [(b"a", w.entry(1, [3], size=12)), (b"b", w.entry(1, [2], offset=12, size=9))], False),
    ("past the end", [(b"a", w.entry(1, [3], size=12)), (b"b", w.entry(1, [2], offset=40, size=8))], False),
    ("shard outside", [(b"a", w.entry(1, [3], size=12)), (b"b", w.entry(1, [2], shard=3, size=8))], False),
    ("overflow", [(b"a", w.entry(1, [2**40, 2**40], size=12)), (b"b", w.entry(1, [2], offset=40, size=8))], False),
    ("two errors", [(b"a", w.entry(1, [3], size=13)), (b"b", w.entry(1, [2], offset=400, size=8))], False),
    ("empty", [], True),
], ids=lambda c: c[0])
def test_checks_at_once_agree_with_one_by_one(tmp_path, monkeypatch, case):
    _, entries, bulk = case
    data = bytes(12 + 8) if not any(k == b"s" for k, _ in entries) else bytes(12) + STR
    _checks_agree(tmp_path, [HEADER, *entries], data, monkeypatch, bulk)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([1, 3, 7, 9]), st.lists(st.integers(0, 3), max_size=2),
                          st.integers(0, 40), st.integers(0, 24), st.sampled_from([None, 5])), max_size=4))
def test_checks_at_once_random(tmp_path_factory, monkeypatch, entries):
    items = [HEADER] + [(f"t{i}".encode(), w.entry(d, shape, offset=o, size=z, crc=c))
                        for i, (d, shape, o, z, c) in enumerate(entries)]
    _checks_agree(tmp_path_factory.mktemp("c"), items, bytes(48), monkeypatch)


# --------------------------------------------------------------------------- entries kept as fields

def test_entries_made_from_fields_are_the_readers(tf1_dtypes_ckpt, exotic_dtypes_ckpt, tf2_keras_ckpt,
                                                  savedmodel_ckpt):
    """A source keeps its entries field by field (no Entry per tensor while listing): the Entries
    it makes from them on first use, and the one ``_entry_named`` makes from them, are what the
    entry reader makes of each stored value, partitioned tensors' included; absent names are None."""
    from shardconv.sources.tf_bundle import TFBundleSource

    checked = listed_without = 0
    for index in _tf_written_indexes([TESTDATA, tf1_dtypes_ckpt, exotic_dtypes_ckpt, tf2_keras_ckpt, savedmodel_ckpt]):
        reader = be.EntryReader(WHERE)
        expected = {n: reader(n, v) for n, v in _index_entries(index) if n[0] != "\x00"}
        with TFBundleSource(str(index)[:-len(".index")]) as src:
            sliced = any(e.slices for e in expected.values())
            listed_without += src._entries_built is None  # made only where entries are checked one by one
            assert src._entries_built is not None or not sliced
            named = {n: src._entry_named(n) for n in expected}
            for absent in ("", "\x00", " ", "~~~", *(n + "\x00" for n in expected), *(n[:-1] for n in expected)):
                if absent not in expected:
                    assert src._entry_named(absent) is None, absent
            assert src._entries == expected and named == expected
            assert {n: src._entry_named(n) for n in expected} == expected  # from the dict, once made
        checked += len(expected)
    assert checked > 150 and listed_without
