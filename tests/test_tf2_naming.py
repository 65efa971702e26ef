"""One naming story for TF2 (docs/mapping.md, "TF2 names"): a weight has the same name whether it
was written by ``tf.train.Checkpoint``, ``model.save_weights``, a SavedModel (``model.save``,
``model.export``, ``tf.saved_model.save``), from a Keras 2 (tf_keras) or a Keras 3 model of the same
architecture; a slot is ``optimizer/<weight>/<slot>`` and links to its weight; two weights whose names
collide get Keras's layer suffix ``_1`` in the order of their checkpoint keys. Every value is
checked against ``tf.train.load_checkpoint``. The checkpoints are written by the real libraries in
two child processes (this process never imports TensorFlow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_unless_installed
from procs import run_cli
from test_npz import load_npz

import shardconv
from shardconv.sources import open_source

_WRITER = textwrap.dedent('''
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    out, which = sys.argv[1], sys.argv[2]
    if which == "keras2":
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np, tensorflow as tf
    if which == "keras2":
        import tf_keras as keras
    else:
        import keras
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 3), dtype=np.float32), rng.random((8, 2), dtype=np.float32)

    def sequential():
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="dense"),
                                 keras.layers.Dense(2, name="dense_1")], name="sequential")

    def colliding():  # two sub-models, each with a layer named "proj": both weights are "proj/kernel"
        def sub(n_in, n_out, name):
            i = keras.Input((n_in,))
            return keras.Model(i, keras.layers.Dense(n_out, name="proj")(i), name=name)
        inp = keras.Input((3,))
        return keras.Model(inp, sub(4, 2, "dec")(sub(3, 4, "enc")(inp)), name="outer")

    def reference(prefix, dest):
        r = tf.train.load_checkpoint(prefix)
        np.savez(dest, **{k: r.get_tensor(k) for k, d in r.get_variable_to_dtype_map().items()
                          if d != tf.string})

    for arch, make in [("sequential", sequential), ("colliding", colliding)]:
        m = make()
        m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        m.fit(x, y, epochs=1, batch_size=8, verbose=0)
        d = os.path.join(out, which, arch)
        saved = {"checkpoint": tf.train.Checkpoint(model=m, optimizer=m.optimizer).save(os.path.join(d, "ckpt", "c"))}
        if which == "keras2":
            m.save_weights(os.path.join(d, "save_weights", "w"))
            m.save(os.path.join(d, "model_save"), save_format="tf")
            saved.update(save_weights=os.path.join(d, "save_weights", "w"), model_save=os.path.join(d, "model_save"))
        else:  # a Keras 3 .weights.h5 is not a TF checkpoint
            m.export(os.path.join(d, "export"), verbose=False)
            saved["export"] = os.path.join(d, "export")
        tf.saved_model.save(m, os.path.join(d, "tf_saved_model"))
        saved["tf_saved_model"] = os.path.join(d, "tf_saved_model")
        for how, path in saved.items():
            prefix = os.path.join(path, "variables", "variables") if os.path.isdir(path) else path
            reference(prefix, os.path.join(out, f"{which}-{arch}-{how}.npz"))
            print(f"{which} {arch} {how} {path}")
''')

#: The weights of each architecture, as every writer's checkpoint lists them.
PARAMS = {"sequential": {"dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias"},
          "colliding": {"proj/kernel", "proj/bias", "proj_1/kernel", "proj_1/bias"}}
#: What each optimizer calls Adam's two slots.
SLOTS = {"keras2": ("m", "v"), "keras3": ("momentum", "velocity")}
#: The shape of each weight (``proj_1`` is the second sub-model's, by checkpoint-key order).
SHAPES = {"dense/kernel": [3, 4], "dense/bias": [4], "dense_1/kernel": [4, 2], "dense_1/bias": [2],
          "proj/kernel": [3, 4], "proj/bias": [4], "proj_1/kernel": [4, 2], "proj_1/bias": [2]}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[tuple[str, str, str], tuple[Path, Path]]:
    """(keras version, architecture, how saved) -> (checkpoint path, TF's values by key in an .npz);
    one child process per Keras version."""
    skip_unless_installed("tensorflow", "tf_keras")  # the children import them; this process does not
    out = tmp_path_factory.mktemp("tf2_naming")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(out), which], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for which in ("keras2", "keras3")]
    found = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
        for line in stdout.splitlines():
            which, arch, how, path = line.split(" ", 3)
            found[which, arch, how] = Path(path), out / f"{which}-{arch}-{how}.npz"
    assert len(found) == 2 * (4 + 3)
    return found


def _ls(path: Path) -> dict[str, dict]:
    proc = run_cli("ls", path, "--json")
    assert proc.returncode == 0, proc.stderr
    return {r["name"]: r for r in json.loads(proc.stdout)}


def _cases():
    hows = {"keras2": ["checkpoint", "save_weights", "model_save", "tf_saved_model"],
            "keras3": ["checkpoint", "export", "tf_saved_model"]}
    return [(w, a, h) for w in hows for a in PARAMS for h in hows[w]]


@pytest.mark.parametrize("which,arch,how", _cases(), ids=["-".join(c) for c in _cases()])
def test_weights_have_one_name_and_slots_are_named_after_them(written, which, arch, how):
    path, ref = written[which, arch, how]
    rows = _ls(path)
    params = {n: r for n, r in rows.items() if r["role"] == "param"}
    assert set(params) == PARAMS[arch]
    assert {n: r["shape"] for n, r in params.items()} == {n: SHAPES[n] for n in params}
    slots = {n: r for n, r in rows.items() if r["role"] == "optimizer" and r["shape"]}
    if how != "export":  # an export archive holds no optimizer
        want = {f"optimizer/{w}/{s}": w for w in PARAMS[arch] for s in SLOTS[which]}
        assert {n: r["slot_of"] for n, r in slots.items()} == want
        assert all(r["shape"] == SHAPES[r["slot_of"]] for r in slots.values())
    assert not [(a, b) for a in rows for b in rows if b.startswith(a + "/")]  # no tensor is also a group
    ref = np.load(ref)
    src = open_source(path)
    try:
        for name, r in {**params, **slots}.items():
            got, want_value = np.asarray(src.read(r["key"])), ref[r["key"]]
            assert got.dtype == want_value.dtype and got.tobytes() == want_value.tobytes(), name
    finally:
        src.close()


def test_the_same_names_from_every_writer(written):
    for arch in PARAMS:
        names = {(w, h): sorted(n for n, r in _ls(written[w, a, h][0]).items() if r["role"] == "param")
                 for w, a, h in _cases() if a == arch}
        assert all(v == sorted(PARAMS[arch]) for v in names.values()), names


def test_keys_listing_and_rules_see_the_same_tensors(written, tmp_path):
    """``--names keys`` still lists the raw keys; rules match the names ``ls`` shows."""
    path, ref = written["keras2", "colliding", "checkpoint"]
    rows = _ls(path)
    keys = run_cli("ls", path, "--names", "keys", "--json")
    assert keys.returncode == 0, keys.stderr
    assert sorted(r["name"] for r in json.loads(keys.stdout)) == sorted(r["key"] for r in rows.values())
    rules = [{"match": r"proj_1/(.*)", "rename": r"decoder/\1"}, {"match": r"proj/(.*)", "rename": r"encoder/\1"}]
    shardconv.convert(path, tmp_path / "o.npz", rules=rules, drop_optimizer=True)
    got = load_npz(tmp_path / "o.npz")
    ref = np.load(ref)
    want = {n.replace("proj_1/", "decoder/").replace("proj/", "encoder/"): ref[rows[n]["key"]]
            for n in PARAMS["colliding"]}
    assert sorted(got) == sorted(want)
    assert all(got[n].tobytes() == want[n].tobytes() for n in want)


def test_collision_suffixes_skip_names_already_taken_and_a_model_scope_goes_only_when_shared():
    from shardconv.sources.tf_object_graph import dedupe, strip_model_scope

    assert dedupe(["proj/kernel", "proj_1/kernel", "proj/kernel", "w", "w"]) == [
        "proj/kernel", "proj_1/kernel", "proj_2/kernel", "w", "w_1"]
    assert strip_model_scope(["net/conv/kernel", "net/dense/bias"]) == ["conv/kernel", "dense/bias"]
    assert strip_model_scope(["dense/kernel", "dense/bias"]) == ["dense/kernel", "dense/bias"]  # a layer, not a scope
    assert strip_model_scope(["net/conv/kernel", "head/bias"]) == ["net/conv/kernel", "head/bias"]


def test_the_source_records_typed_roles(written):
    """TF2 sources record what the object graph says as ``TensorInfo.role`` (a ``SourceRole`` of a
    ``Role``), with the variable's ``full_name`` in ``extra``; the graph's own entry is ``meta``."""
    from shardconv.core.types import Role, SourceRole

    path, _ = written["keras3", "sequential", "checkpoint"]
    with open_source(path) as src:
        infos = {t.name: t for t in src.tensors()}
    assert infos["_CHECKPOINTABLE_OBJECT_GRAPH"].role == SourceRole(Role.META)
    variables = [t for name, t in infos.items() if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    roles = [t.role for t in variables if isinstance(t.role, SourceRole) and isinstance(t.role.role, Role)]
    assert variables and len(roles) == len(variables)
    assert all(not {"role", "model_name", "ema_of", "slot_of"} & set(t.extra) and "full_name" in t.extra
               for t in variables)
    assert {r.model_name for r in roles if r.role is Role.PARAM} == PARAMS["sequential"]
    slots = {r.model_name: r.slot_of for r in roles if r.slot_of}
    assert slots == {f"optimizer/{w}/{s}": w for w in PARAMS["sequential"] for s in SLOTS["keras3"]}


def test_names_outside_the_model_stay_unique():
    """Variables that are not params (here metrics: ``meta``) take their ``full_name`` only when
    no other variable has that name yet: the second falls back to its key."""
    from test_index_decoding import g_attr, g_graph, g_node, g_ref

    from shardconv.core.types import Role
    from shardconv.sources import tf_object_graph as og

    def var(full: bytes, key: bytes) -> bytes:
        return g_node(attributes=[g_attr(b"VARIABLE_VALUE", full, key + b"/.ATTRIBUTES/VARIABLE_VALUE")])

    blob = g_graph(g_node([g_ref(1, b"metrics")]), g_node([g_ref(2, b"m1"), g_ref(3, b"m2")]),
                   var(b"x", b"k/v"), var(b"k/v", b"metrics/m2"))
    notes = og.annotate(og.parse(blob, "g"))
    assert {k: (r.role, r.model_name, full) for k, (r, full) in notes.items()} == {
        "k/v/.ATTRIBUTES/VARIABLE_VALUE": (Role.META, "k/v", "x"),
        "metrics/m2/.ATTRIBUTES/VARIABLE_VALUE": (Role.META, "metrics/m2", "k/v")}
