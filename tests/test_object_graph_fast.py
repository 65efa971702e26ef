"""The shortcuts that list a TF2 checkpoint of 100 000 variables fast (``tf_object_graph.roles``)
decide exactly what the code they skip decides, each checked against that code: the bulk decoder
(``_scan``: variable nodes found by their marker, runs of container nodes by one regex) against
``parse_strict``; ``roles`` against ``annotate(parse_strict(...))``; the graph of weights alone
(``_annotate_plain``) against ``_annotate``; tree paths against the breadth-first walk; bulk roles,
names and notes against the per-variable code. On graphs TensorFlow wrote (a tf.Module of 17 000
variables, shared and unnamed variables, a Keras 3 model, the shared fixtures, tests/data), on
crafted graphs, and on random and mutated ones (hypothesis)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import tf_index_writer as w
from conftest import TESTDATA, skip_unless_installed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import EXAMPLES, _mutate
from test_hostile import deadline
from test_index_decoding import _tf_written_graphs, g_attr, g_graph, g_node, g_ref, g_slot

from shardconv.errors import ShardconvError
from shardconv.sources import tf_object_graph as og

WHERE = "/x/m.data-00000-of-00001"
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
VV = b"VARIABLE_VALUE"

_WRITER = textwrap.dedent('''
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    out = sys.argv[1]
    v = lambda i, name=None: tf.Variable([float(i)], name=name) if name else tf.Variable([float(i)])

    root, layers = tf.Module(), []  # 1 700 modules of ten: node ids past 16 383 (3-byte varints)
    for i in range(17000):
        if i % 10 == 0:
            layers.append(tf.Module(name=f"layer_{i // 10:05d}"))
        setattr(layers[-1], f"w{i % 10}", v(i, f"model/layer_{i // 10:05d}/w{i % 10}"))
    root.layers = layers
    tf.train.Checkpoint(model=root).save(os.path.join(out, "modules", "ckpt"))  # with save_counter

    shared = tf.Module()
    shared.a, shared.b = tf.Module(), tf.Module()
    shared.a.w = shared.b.w = v(1, "blk/w")  # one variable, two paths
    shared.a.u = v(2, "blk/u")
    tf.train.Checkpoint(model=shared).write(os.path.join(out, "shared", "ckpt"))

    unnamed = tf.Module()
    unnamed.x, unnamed.y = v(3), v(4)  # full names without a scope: named by their path
    tf.train.Checkpoint(model=unnamed, extra=[v(5, "e/x")]).save(os.path.join(out, "unnamed", "ckpt"))

    import keras
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="dense"),
                          keras.layers.Dense(2, name="dense_1")], name="sequential")
    tf.train.Checkpoint(model=m).write(os.path.join(out, "keras3", "ckpt"))
''')


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, bytes]:
    """Object graphs TensorFlow wrote, by name."""
    skip_unless_installed("tensorflow", "keras")
    out = tmp_path_factory.mktemp("object_graphs")
    subprocess.run([sys.executable, "-c", _WRITER, str(out)], check=True, timeout=600)
    return {d.name: _tf_written_graphs([d])[0] for d in sorted(out.iterdir())}


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except ShardconvError as e:
        return type(e), str(e)


def _reference(blob: bytes):
    return _outcome(lambda: og.annotate(og.parse_strict(blob, WHERE)))


def check(blob: bytes) -> bool:
    """Every shortcut agrees with the code it skips on ``blob``; True where the graph decoded."""
    got, ref = _outcome(og.roles, blob, WHERE), _reference(blob)
    assert got == ref
    if got[0] == "ok":
        assert list(got[1]) == list(ref[1])  # the same order
    strict = _outcome(og.parse_strict, blob, WHERE)
    bulk = _bulk(blob)
    try:
        flat = og._scan(blob)
    except og._Bail:
        assert strict[0] != "ok"  # the bulk decoder gives up only on what is malformed
        return False
    try:
        piece = og._piecewise(blob)
    except og._Bail:
        piece = None
    assert bulk is None or piece is not None and (bulk.nodes(), bulk.top) == (piece.nodes(), piece.top)
    if strict[0] != "ok":
        return False
    assert flat.nodes() == strict[1] and piece is not None and piece.nodes() == strict[1]
    g = og._Graph(flat)
    lazy = og._scan(blob)  # container runs still undecoded: what _annotate_plain reads of them
    assert lazy.local_names() == {local for local, _ in flat.edges}
    some = range(len(flat.kids)) if len(flat.kids) < 300 else [0, 1, 2, 3, len(flat.kids) - 1]
    assert [lazy.children(nid) for nid in some] == [flat.kids[nid] for nid in some]
    assert [lazy.references(nid) for nid in some] == [[c for _, c in flat.edges].count(nid) for nid in some]
    plain = og._annotate_plain(og._scan(blob))
    assert plain is None or plain == og._annotate(g) and list(plain) == list(og._annotate(g))
    if og._is_tree(flat.kids, flat.edges):
        assert {k: list(v) for k, v in og._tree_paths(flat.kids).items()} == og._bfs_paths(flat.kids)
    ema_of, trainable = g.links()
    slots = og._slots(g, list(g.keys))
    roles = og._roles(g, ema_of, trainable, slots)
    assert roles == {nid: g.role(nid, ema_of, trainable, slots) for nid in g.keys}
    params = [nid for nid, r in roles.items() if r is og.Role.PARAM]
    assert og._param_names(g, params) == og._named(g, params)
    names = {nid: f"n{nid}" for nid in g.keys}
    assert og._unlinked_notes(g, roles, names) == og._notes(g, roles, names, {}, {})
    assert og._notes(g, roles, names, ema_of, slots) == _notes_one_by_one(g, roles, names, ema_of, slots)
    return True


def _notes_one_by_one(g, roles, names, ema_of, slots):
    """What ``og._notes`` makes column by column, one variable at a time."""
    out = {}
    for nid, (key, full) in g.keys.items():
        ema = names[ema_of[nid]] if nid in ema_of and ema_of[nid] in names else None
        weight = slots[nid][0] if nid in slots else None
        slot_of = names[weight] if weight is not None and weight in names and weight in g.keys else None
        out[key] = (og.SourceRole(roles[nid], names[nid], ema, slot_of), full)
    return out


def _bulk(blob: bytes) -> og._Flat | None:
    """``og._bulk``'s answer; None where it leaves the graph to ``_piecewise``."""
    try:
        return og._bulk(blob)
    except (og._Bail, IndexError):
        return None


@pytest.fixture
def bulk_calls(monkeypatch):
    """How often ``parse_strict`` / ``_piecewise`` were called and ``_containers`` / ``_annotate_plain``
    decided in bulk."""
    calls = {"strict": 0, "containers": 0, "plain": 0, "piecewise": 0}

    def wrap(name, key, counts):
        orig = getattr(og, name)

        def counted(*args):
            result = orig(*args)
            calls[key] += bool(counts(result))
            return result
        monkeypatch.setattr(og, name, counted)

    wrap("parse_strict", "strict", lambda r: True)
    wrap("_piecewise", "piecewise", lambda r: True)
    wrap("_containers", "containers", lambda r: r)
    wrap("_annotate_plain", "plain", lambda r: r is not None)
    return calls


def test_tf_written_graphs_take_the_fast_paths(written, bulk_calls):
    for name, blob in written.items():
        assert check(blob), name
        assert _bulk(blob) is not None, name  # every variable node cut out by _VAR_NODE
    bulk_calls.update(strict=0, containers=0, plain=0, piecewise=0)
    notes = og.roles(written["modules"], WHERE)
    assert bulk_calls == {"strict": 0, "containers": 1, "plain": 1, "piecewise": 0}  # 1 703 containers, in bulk
    flat = og._scan(written["modules"])
    assert len(flat.vids) == 17001 and len(flat.kids) == 18704 and not flat.attrs  # every variable by its marker
    assert notes["model/layers/1699/w9/.ATTRIBUTES/VARIABLE_VALUE"][0] == (og.Role.PARAM, "model/layer_01699/w9",
                                                                           None, None)
    assert notes["save_counter/.ATTRIBUTES/VARIABLE_VALUE"][0] == (og.Role.META, "save_counter", None, None)
    for name in ("keras3", "modules", "shared"):  # weights alone, scoped names (two paths or not): in bulk
        bulk_calls["plain"] = 0
        og.roles(written[name], WHERE)
        assert bulk_calls["plain"] == 1, name
    bulk_calls["plain"] = 0
    og.roles(written["unnamed"], WHERE)  # full names without a scope: named by path, per variable
    assert bulk_calls["plain"] == 0
    flat = og._scan(written["shared"])
    assert not og._is_tree(flat.kids, flat.edges)
    assert og._is_tree(og._scan(written["modules"]).kids, og._scan(written["modules"]).edges)


def test_fixture_and_vendored_graphs(tf2_keras_ckpt, savedmodel_ckpt, keras_ema_ckpt, tf2_v1_slots_ckpt, bulk_calls):
    graphs = _tf_written_graphs([TESTDATA, tf2_keras_ckpt, savedmodel_ckpt, keras_ema_ckpt, tf2_v1_slots_ckpt])
    assert len(graphs) >= 5
    for blob in graphs:
        assert check(blob)
    bulk_calls.update(strict=0, piecewise=0)
    for blob in graphs:
        og.roles(blob, WHERE)
    assert bulk_calls["strict"] == bulk_calls["piecewise"] == 0  # every variable node cut out by _bulk


def _module_graph(modules: int, per: int = 10, save_counter: bool = True) -> bytes:
    """The graph ``tf.train.Checkpoint(model=root).save`` writes for ``modules`` tf.Modules of
    ``per`` variables (as TensorFlow numbers them: breadth first)."""
    first = 3 + modules  # root 0, model 1, layers 2, modules 3.., then the variables
    nodes = [g_node([g_ref(1, b"model")] + ([g_ref(first + modules * per, b"save_counter")] if save_counter else [])),
             g_node([g_ref(2, b"layers")]),
             g_node([g_ref(3 + m, str(m).encode()) for m in range(modules)])]
    nodes += [g_node([g_ref(first + m * per + k, b"w%d" % k) for k in range(per)]) for m in range(modules)]
    nodes += [g_node(attributes=[g_attr(VV, b"model/layer_%05d/w%d" % (m, k),
                                        b"model/layers/%d/w%d/.ATTRIBUTES/VARIABLE_VALUE" % (m, k))])
              for m in range(modules) for k in range(per)]
    if save_counter:
        nodes.append(g_node(attributes=[g_attr(VV, b"save_counter", b"save_counter/.ATTRIBUTES/VARIABLE_VALUE")]))
    return g_graph(*nodes)


BIG = _module_graph(1700)  # 18 704 nodes: ids past 16 383
SMALL = _module_graph(30, per=3)  # containers past _containers' 256 bytes, variables after them



def _interleaved(layers: int, per: int, tail: bytes = b"\x2a\x02\x08\x01") -> bytes:
    """Keras's order: each layer's node, then its variables (runs of variables with nodes between);
    ``tail=b""``: as TensorFlow wrote nodes before has_checkpoint_values."""
    nodes = [g_node([g_ref(1 + layer * (per + 1), b"layer_with_a_long_name_%d" % layer) for layer in range(layers)],
                    tail=tail)]
    for layer in range(layers):
        first = 2 + layer * (per + 1)
        nodes.append(g_node([g_ref(first + k, b"w%d" % k) for k in range(per)], tail=tail))
        nodes += [g_node(attributes=[g_attr(VV, b"l%d/w%d" % (layer, k), b"l%d/w%d/.ATTRIBUTES/VARIABLE_VALUE" % (layer, k))],
                         tail=tail) for k in range(per)]
    return g_graph(*nodes)


def _variable_then(attribute: bytes, *, tail: bytes = b"\x2a\x02\x08\x01", after: bytes = b"") -> bytes:
    """A graph of the root, a variable node with ``attribute`` (raw) and ``after`` between it and the
    tail, and a plain variable: a shape _VAR_NODE matches in part."""
    return g_graph(g_node([g_ref(1, b"v"), g_ref(2, b"u")]), g_node(attributes=[attribute], tail=after + tail),
                   g_node(attributes=[g_attr(VV, b"u/w", b"u/w/.ATTRIBUTES/VARIABLE_VALUE")]))


def _stated(full: bytes, key: bytes, *, full_len: int = 0, key_len: int = 0, attribute_len: int = 0,
            node_len: int = 0) -> bytes:
    """A variable node of TensorFlow's shape whose four lengths are those of its bytes plus the given
    amounts, then a plain variable node: each length _bulk checks, stated wrong alone."""
    la = 20 + len(full) + len(key) + attribute_len
    head = bytes([0x0A, la + 6 + node_len, 0x12, la]) + b"\x0a\x0eVARIABLE_VALUE"
    node = head + bytes([0x12, len(full) + full_len]) + full + bytes([0x1A, len(key) + key_len]) + key
    return (g_graph(g_node([g_ref(1, b"v"), g_ref(2, b"u")])) + node + b"\x2a\x02\x08\x01"
            + g_graph(g_node(attributes=[g_attr(VV, b"u/w", b"u/w/.ATTRIBUTES/VARIABLE_VALUE")])))


#: One length of a variable node stated two bytes short of (or past) the bytes _VAR_NODE takes, the
#: others stated to agree with it (malformed: protobuf's fields overrun their message).
STATED_WRONG = {
    "full-name-length": _stated(b"v/w\x22\x00", b"k", full_len=-2, attribute_len=-2),
    "key-length": _stated(b"v/w", b"k\x22\x00", key_len=-2, attribute_len=-2),
    "attribute-length": _stated(b"v/w", b"k", attribute_len=2),
    "node-length": _stated(b"v/w", b"k", node_len=2),
}

#: Variable nodes _VAR_NODE matches where protobuf reads something else: _bulk must leave them to _piecewise.
_FULL, _KEY = w.field_bytes(1, VV) + w.field_bytes(2, b"v/w"), w.field_bytes(3, b"v/w/.ATTRIBUTES/VARIABLE_VALUE")
MATCHED_IN_PART = {
    "star-in-key": _variable_then(g_attr(VV, b"v/w", b"k*x")),
    "newline-in-key": _variable_then(g_attr(VV, b"v/w", b"k\nx")),
    "field-after-full": _variable_then(_FULL + b"\x22\x01x" + _KEY),  # an unknown field inside the attribute
    "field-after-key": _variable_then(_FULL + _KEY + b"\x22\x01x"),
    "name-again-after-key": _variable_then(_FULL + _KEY + b"\x0a\x00"),  # the attribute's name, now ""
    "child-after-attribute": _variable_then(_FULL + _KEY, after=b"\x0a\x00"),  # a reference to node 0, named ""
    "tail-as-the-last-field": _variable_then(_FULL + _KEY, tail=b"", after=b"\x2a\x02\x08\x01\x2a\x00"),
    "tail-inside-the-attribute": _variable_then(_FULL + _KEY + b"\x2a\x02\x08\x01", tail=b""),
    # a whole variable node inside a child's name: the fields before it end past it
    "variable-inside-a-name": g_graph(g_node([g_ref(1, b"n" + g_graph(g_node(attributes=[g_attr(VV, b"f/w", b"f")])))]),
                                      g_node(attributes=[g_attr(VV, b"v/w", b"v/w/.ATTRIBUTES/VARIABLE_VALUE")])),
    **STATED_WRONG,
}

CRAFTED = {
    **MATCHED_IN_PART,
    "interleaved": _interleaved(12, 4),
    "modules": BIG,
    "no-save-counter": _module_graph(40, save_counter=False),
    "name-with-newline": g_graph(g_node([g_ref(1, b"a\nb"), g_ref(2, b"c*")] + [g_ref(3, b"x" * 40)] * 0),
                                 g_node(attributes=[g_attr(VV, b"a/\x1a", b"k\x1a/.ATTRIBUTES/VARIABLE_VALUE")]),
                                 g_node(attributes=[g_attr(VV, b"c/" + b"\n\x0eVARIABLE_VALUE\x12",
                                                           b"c/.ATTRIBUTES/VARIABLE_VALUE")])),
    "marker-in-a-child-name": g_graph(g_node([g_ref(1, b"\n\x0eVARIABLE_VALUE\x12" * 20)]),
                                      g_node(attributes=[g_attr(VV, b"m/w", b"m/w/.ATTRIBUTES/VARIABLE_VALUE")])),
    "no-tails": g_graph(*[g_node([g_ref(i + 1, b"c%d" % i)], tail=b"") for i in range(60)],
                        g_node(attributes=[g_attr(VV, b"a/b", b"k")], tail=b"")),
    "variable-with-children": g_graph(g_node([g_ref(1, b"v")]), g_node([g_ref(2, b"inner")], [g_attr(VV, b"v/w", b"k")]),
                                      g_node()),
    "empty-key": g_graph(g_node([g_ref(1, b"v")]), g_node(attributes=[g_attr(VV, b"v/w", b"")])),
    "long-key": g_graph(g_node([g_ref(1, b"v")]), g_node(attributes=[g_attr(VV, b"v/w", b"k" * 200)])),
    "second-attribute": g_graph(g_node([g_ref(1, b"v")]),
                                g_node(attributes=[g_attr(VV, b"v/w", b"k1"), g_attr(VV, b"v/u", b"k2")])),
    "slots": g_graph(g_node([g_ref(1, b"m"), g_ref(2, b"o")]), g_node(attributes=[g_attr(VV, b"m/w", b"k")]),
                     g_node(slots=[g_slot(1, b"m", 3)]), g_node(attributes=[g_attr(VV, b"o/m", b"k2")])),
    "save-counter-twice": g_graph(g_node([g_ref(1, b"save_counter"), g_ref(1, b"s")]),
                                  g_node(attributes=[g_attr(VV, b"save_counter", b"save_counter/x")])),
    "save-counter-under-empty": g_graph(g_node([g_ref(1, b"")]), g_node([g_ref(2, b"save_counter")]),
                                        g_node(attributes=[g_attr(VV, b"save_counter", b"k")])),
    "colliding-names": g_graph(g_node([g_ref(1, b"a"), g_ref(2, b"b")]),
                               g_node(attributes=[g_attr(VV, b"d/w", b"k2")]), g_node(attributes=[g_attr(VV, b"d/w", b"k1")])),
    "keras3-scope": g_graph(g_node([g_ref(1, b"_functional"), g_ref(2, b"a"), g_ref(3, b"b")]), g_node(),
                            g_node(attributes=[g_attr(VV, b"seq/d/w", b"k1")]),
                            g_node(attributes=[g_attr(VV, b"seq/d/b", b"k2")])),
    "child-out-of-range": g_graph(*[g_node([g_ref(70, b"x")])] * 40),
    # a container whose length leaves out a child reference (0A 02 08 05) before its tail: protobuf
    # reads that reference, then the tail as a field outside any node
    "bytes-between-children": (b"\x0a\x12" + w.field_bytes(1, g_ref(1, b"a")) + w.field_bytes(1, g_ref(2, b"b"))
                               + b"\x0a\x02\x08\x05\x2a\x02\x08\x01" + g_graph(*[g_node([g_ref(3, b"c")])] * 60)),
    # 256 (80 02) is past the last node, 199 (C7 01) is not: bytes compared from the first would miss it
    "two-byte-id-out-of-range": g_graph(g_node([g_ref(199, b"a"), g_ref(256, b"b")]), *[g_node()] * 199),
    "two-byte-ids-in-range": g_graph(g_node([g_ref(199, b"a"), g_ref(256, b"b")]), *[g_node()] * 256),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_graphs(case):
    check(CRAFTED[case])


def test_bulk_shortcuts_are_taken_on_the_crafted_module_graph(bulk_calls):
    og.roles(BIG, WHERE)
    assert bulk_calls == {"strict": 0, "containers": 1, "plain": 1, "piecewise": 0}
    assert _reference(BIG)[1]["save_counter/.ATTRIBUTES/VARIABLE_VALUE"][0].role is og.Role.META


@pytest.mark.parametrize("case", sorted(MATCHED_IN_PART))
def test_bulk_leaves_what_it_matches_in_part_to_piecewise(case):
    assert _bulk(MATCHED_IN_PART[case]) is None
    assert check(MATCHED_IN_PART[case]) is (case not in STATED_WRONG)  # those four: malformed


@pytest.mark.parametrize("tail", [b"\x2a\x02\x08\x01", b""])
def test_bulk_decodes_runs_of_variables_between_other_nodes(bulk_calls, tail):
    blob = _interleaved(12, 4, tail)
    flat = _bulk(blob)
    assert flat is not None and len(flat.vids) == 48 and not flat.attrs and bulk_calls["containers"] >= bool(tail)
    assert flat.vids[:5] == [2, 3, 4, 5, 7] and flat.vkeys[4] == "l1/w0/.ATTRIBUTES/VARIABLE_VALUE"
    assert check(blob)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=3),
       st.one_of(st.none(), st.integers(0, 4000)))
def test_mutated_module_graphs(edits, cut):
    check(_mutate(SMALL, edits, cut))


LOCALS = [b"a", b"w", b"0", b"1", b"save_counter", b"", b"_trainable_variables", b"_iterations", b"metrics",
          b"_all_variables", b"_functional", b"_model_variables_moving_average", b"m", b"x/y", b"a\n*"]
FULLS = [b"", b"x", b"d/k", b"d/k", b"seq/d/k", b"seq/d/b", b"save_counter", b"a/b/c", b"\xff/x"]
KEYS = [b"", b"k1/.ATTRIBUTES/VARIABLE_VALUE", b"k2/.ATTRIBUTES/VARIABLE_VALUE", b"k1", b"save_counter/x", b"o/1"]


@st.composite
def graphs(draw) -> bytes:
    """A random object graph: a tree (each node a child of an earlier one) or any edges, with
    variables, optimizer and metric names, slot references, with and without TF's node tail."""
    n = draw(st.integers(1, 10))
    tree = draw(st.booleans())
    kids: list[list[bytes]] = [[] for _ in range(n)]
    for c in range(1, n):
        if tree:
            kids[draw(st.integers(0, c - 1))].append(g_ref(c, draw(st.sampled_from(LOCALS))))
    if not tree:
        for p, c, local in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1),
                                                   st.sampled_from(LOCALS)), max_size=2 * n)):
            kids[p].append(g_ref(c, local))
    nodes = []
    for i in range(n):
        attrs = [g_attr(draw(st.sampled_from([VV, VV, b"OBJECT_CONFIG_JSON"])), draw(st.sampled_from(FULLS)),
                        draw(st.sampled_from(KEYS))) for _ in range(draw(st.integers(0, 1)))]
        slots = [g_slot(draw(st.integers(0, n - 1)), b"m", draw(st.integers(0, n - 1)))
                 for _ in range(draw(st.integers(0, 1)) if draw(st.integers(0, 5)) == 0 else 0)]
        nodes.append(g_node(kids[i], attrs, slots, tail=draw(st.sampled_from([b"\x2a\x02\x08\x01", b""]))))
    return g_graph(*nodes)


@FUZZ
@given(graphs())
def test_random_graphs(blob):
    check(blob)


def _keras3_optimizer_graph() -> bytes:
    """A Keras 3 model's weight, its Adam-with-EMA optimizer's lists (trained weights, averages,
    one slot list) and iteration counter, as tf.train.Checkpoint(model=..., optimizer=...) lays them out."""
    def var(full: bytes, key: bytes) -> bytes:
        return g_node(attributes=[g_attr(VV, full, key + b"/.ATTRIBUTES/VARIABLE_VALUE")])
    return g_graph(g_node([g_ref(1, b"model"), g_ref(2, b"optimizer")]),
                   g_node([g_ref(3, b"w")]),
                   g_node([g_ref(4, b"_trainable_variables"), g_ref(5, b"_model_variables_moving_average"),
                           g_ref(6, b"_momentums"), g_ref(7, b"_iterations")]),
                   var(b"seq/dense/kernel", b"model/w"),
                   g_node([g_ref(3, b"0")]), g_node([g_ref(8, b"0")]), g_node([g_ref(9, b"0")]),
                   var(b"iteration", b"optimizer/_iterations"),
                   var(b"adam/seq_dense_kernel_average", b"optimizer/_model_variables_moving_average/0"),
                   var(b"adam/seq_dense_kernel_momentum", b"optimizer/_momentums/0"))


def test_an_optimizer_graph_gets_its_roles_and_links():
    blob = _keras3_optimizer_graph()
    assert check(blob)
    notes = {key.split("/.")[0]: note for key, (note, _) in og.roles(blob, WHERE).items()}
    assert notes == {  # Keras 3: the model's scope "seq" dropped; the unscoped "iteration" named by its key
        "model/w": (og.Role.PARAM, "dense/kernel", None, None),
        "optimizer/_iterations": (og.Role.OPTIMIZER, "optimizer/_iterations", None, None),
        "optimizer/_model_variables_moving_average/0": (og.Role.EMA, "adam/seq_dense_kernel_average", "dense/kernel",
                                                        None),
        "optimizer/_momentums/0": (og.Role.OPTIMIZER, "optimizer/dense/kernel/momentum", None, "dense/kernel")}


def test_markers_without_names_after_them_cost_linear_time():
    """30 000 variable markers (1 MB), none followed by a key field: each try of _VAR_NODE reads at
    most a name's 127 bytes past its marker (read to the end of the graph, about 200 s)."""
    blob = (b"\x0a\x01\x12\x01\x0a\x0eVARIABLE_VALUE\x12\x01" + b"x" * 10) * 30_000
    with deadline(20):
        assert _bulk(blob) is None
        assert _outcome(og.roles, blob, WHERE) == _reference(blob)
