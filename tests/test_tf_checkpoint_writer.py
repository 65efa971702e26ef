"""``--to tf-checkpoint`` written by shardconv's own bundle writer (issue 17, item 3).

The writer never imports TensorFlow; TensorFlow only checks its output, in child processes:
the files equal what ``tf.raw_ops.SaveV2`` writes for the same tensors (every dtype the
reader knows, string tensors, several index blocks), ``tf.train.load_checkpoint`` reads
every value bit-exact, a TF1 ``Saver`` restores it by name, and a TF2 Keras checkpoint
converted with ``--names keys`` (its object graph carried over) restores through
``tf.train.Checkpoint(model=..., optimizer=...)``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import shardconv
from shardconv.formats import bundleformat
from shardconv.sources.tf_bundle import TFBundleSource
from shardconv.testing.sink_suite import SinkTests, reference_tree, write_reference_npz
from shardconv.util.checksums import crc32c, mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import skip_unless_installed  # noqa: E402
from reference import load_reference  # noqa: E402
from test_savedmodel import _load_dump, _stop_worker, assert_exact, tf_read  # noqa: E402,F401

HERE = Path(__file__).resolve().parent


def dtype_tree() -> dict[str, np.ndarray]:
    """One tensor of every dtype TF checkpoints hold (scalars and empty ones too), fixed seed."""
    rng = np.random.default_rng(7)
    def bits(shape: tuple[int, ...], dt: Any) -> np.ndarray:  # every bit pattern (NaNs, signs, extremes)
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        return rng.integers(0, 256, size=n, dtype=np.uint8).view(dt).reshape(shape)

    tree = {f"float/{n}": rng.standard_normal((5, 3)).astype(n) for n in ("float16", "float32", "float64")}
    tree.update({f"ml/{n}": rng.standard_normal((4, 6)).astype(getattr(ml_dtypes, n))
                 for n in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                           "float8_e4m3b11fnuz")})
    tree.update({f"ml/{n}": (rng.integers(0, 4, 9) if "2" in n else rng.integers(-8 if n == "int4" else 0, 8, 9))
                 .astype(getattr(ml_dtypes, n)) for n in ("int4", "uint4", "int2", "uint2")})
    tree.update({f"int/{n}": bits((3, 4), np.dtype(n)) for n in ("int8", "int16", "int32", "int64", "uint8",
                                                                  "uint16", "uint32", "uint64")})
    tree.update({"other/bool": rng.random((2, 5)) > 0.5, "other/complex64": bits((3,), np.complex64),
                 "other/complex128": bits((2, 2), np.complex128), "scalar/f32": np.array(1.5, np.float32),
                 "scalar/i64": np.array(-(2 ** 40), np.int64), "empty/f32": np.zeros((0, 3), np.float32),
                 "empty/bf16": np.zeros((4, 0), ml_dtypes.bfloat16), "Z_after_lowercase": np.arange(3, dtype=np.int32),
                 "unicode/ä": np.ones(2, np.float32)})
    return tree


STRINGS = [b"", b"hello", b"x" * 300, bytes(range(256)), b"nul\x00inside"]

#: TensorFlow's side, run in a child process: ``python -c CHILD OP REQUEST-JSON``.
CHILD = r'''
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, sys.argv[3])
from pathlib import Path
import numpy as np, tensorflow as tf
from tf_sink_helper import _dump as dump_arrays

def _dump(arrays, out):
    dump_arrays(arrays, Path(out))

def savev2(req):
    from test_tf_checkpoint_writer import STRINGS, dtype_tree, many_tree
    for name, tree in (("dtypes", dtype_tree()), ("many", many_tree())):
        keys = sorted(tree, key=lambda k: k.encode())
        tf.raw_ops.SaveV2(prefix=os.path.join(req["out"], name), tensor_names=keys, shape_and_slices=[""] * len(keys),
                          tensors=[tf.constant(tree[k]) for k in keys])
    tf.raw_ops.SaveV2(prefix=os.path.join(req["out"], "strings"), tensor_names=["a", "s", "t"],
                      shape_and_slices=[""] * 3, tensors=[tf.constant(np.float32(2)), tf.constant(STRINGS),
                                                          tf.constant([[b"q"], [b""]])])
    r = tf.train.load_checkpoint(req["mine"])
    _dump({k: r.get_tensor(k) for k in r.get_variable_to_dtype_map()}, os.path.join(req["out"], "read"))

def saver(req):
    values = {}
    with tf.Graph().as_default():
        vs = {n: tf.compat.v1.Variable(np.zeros(s, dtype=d), name=n) for n, (d, s) in req["vars"].items()}
        assert sorted(v.op.name for v in vs.values()) == sorted(vs), [v.op.name for v in vs.values()]
        with tf.compat.v1.Session() as sess:
            tf.compat.v1.train.Saver().restore(sess, req["prefix"])
            values = sess.run(vs)
    _dump(values, req["out"])

def keras_restore(req):
    import keras
    from tf_fixtures import _conv_bn_dense
    for name, prefix in (("src", req["src"]), ("dest", req["dest"])):
        keras.backend.clear_session()  # the same names (adam, not adam_1) for both
        keras.utils.set_random_seed(0)
        model, opt = _conv_bn_dense(size=6, filters=3, units=4), keras.optimizers.Adam(learning_rate=0.01)
        opt.build(model.trainable_variables)
        tf.train.Checkpoint(model=model, optimizer=opt).restore(prefix).assert_existing_objects_matched()
        _dump({f"{i:03d}:{v.path}": v.numpy() for i, v in enumerate(model.weights + opt.variables)},
              os.path.join(req["out"], name))

globals()[sys.argv[1]](json.loads(sys.argv[2]))
'''


def many_tree() -> dict[str, np.ndarray]:
    """Enough keys for several index data blocks (256 KiB each) and restart points."""
    return {f"layer_{i:05d}/{'kernel' if i % 3 else 'b'}": np.full((i % 4,), i, np.float32) for i in range(12000)}


def run_tf(op: str, tmp_path: Path, **req: Any) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
    proc = subprocess.run([sys.executable, "-c", CHILD, op, json.dumps(req, default=str), str(HERE)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]


def read_dump(out: Path) -> dict[str, np.ndarray]:
    return _load_dump(out, json.loads((out / "index.json").read_text()))


def ckpt_files(dest: Path) -> dict[str, bytes]:
    return {p: (dest / p).read_bytes() for p in ("ckpt.index", "ckpt.data-00000-of-00001", "checkpoint")}


# ------------------------------------------------------------------------- the shared sink suite

class TestTFCheckpointWriterSink(SinkTests):
    """Converted in this process (no TensorFlow); read back by TensorFlow in a child."""

    to = "tf-checkpoint"
    suffix = ""
    label = "tf-checkpoint"

    def read_back(self, dest: Path) -> dict[str, np.ndarray]:
        return tf_read(dest, "checkpoint")

    def snapshot(self, dest: Path) -> Any:
        return ckpt_files(dest)  # deterministic bytes: index, data and state file


# ------------------------------------------------------------------------- bytes and values

def test_files_equal_what_savev2_writes_and_tf_reads_every_dtype_exactly(tmp_path):
    tree = dtype_tree()
    mine = tmp_path / "mine"
    shardconv.convert(tree, mine, to="tf-checkpoint", max_memory="1MiB")
    many = tmp_path / "many"
    shardconv.convert(many_tree(), many, to="tf-checkpoint")
    run_tf("savev2", tmp_path, out=str(tmp_path), mine=str(mine))
    for prefix, dest in (("dtypes", mine), ("many", many)):
        for suffix in (".index", ".data-00000-of-00001"):
            assert (tmp_path / (prefix + suffix)).read_bytes() == (dest / ("ckpt" + suffix)).read_bytes(), prefix
    assert len((many / "ckpt.index").read_bytes()) > bundleformat.BLOCK_SIZE  # two data blocks at least
    assert_exact(read_dump(tmp_path / "read"), tree)
    # String tensors (only the carried object graph is one in practice), through the format module alone.
    out = bytearray()
    table = bundleformat.TableWriter(out.extend)
    table.add(b"", bundleformat.header(1))
    data = bytearray()
    for key, dtype, shape, (raw, crc) in [(b"a", "float32", (), (np.float32(2).tobytes(), None)),
                                          (b"s", "string", (5,), bundleformat.string_tensor(STRINGS)),
                                          (b"t", "string", (2, 1), bundleformat.string_tensor([b"q", b""]))]:
        crc = crc32c(raw) if crc is None else crc
        table.add(key, bundleformat.entry(dtype, shape, offset=len(data), size=len(raw), crc=mask(crc)))
        data += raw
    table.finish()
    assert bytes(out) == (tmp_path / "strings.index").read_bytes()
    assert bytes(data) == (tmp_path / "strings.data-00000-of-00001").read_bytes()


def test_tf1_checkpoint_every_dtype_and_partitioned_reads_back_exactly(tf1_dtypes_ckpt, tmp_path):
    """TF's own 3-shard Saver checkpoint with partitioned variables -> one bundle, values equal."""
    dest = tmp_path / "out"
    r = shardconv.convert(tf1_dtypes_ckpt, dest, to="tf-checkpoint", max_memory="1MiB")
    ref = {k: v for k, v in load_reference(tf1_dtypes_ckpt).items() if isinstance(v, np.ndarray) and v.dtype != object}
    assert r.tensors == len(ref)
    assert_exact(tf_read(dest, "checkpoint"), ref)


def test_tf1_saver_restores_the_output_into_matching_variables(tmp_path):
    tree = reference_tree()
    src = tmp_path / "in.npz"
    write_reference_npz(src, tree)
    dest = tmp_path / "out"
    shardconv.convert(src, dest, to="tf-checkpoint", max_memory="1MiB")
    variables = {n: (v.dtype.name, list(v.shape)) for n, v in tree.items()}
    run_tf("saver", tmp_path, vars=variables, prefix=str(dest / "ckpt"), out=str(tmp_path / "restored"))
    assert_exact(read_dump(tmp_path / "restored"), tree)


def test_tf2_keras_checkpoint_with_raw_keys_restores_through_tf_train_checkpoint(tf2_keras_ckpt, tmp_path):
    """--names keys: the object graph is carried over, so tf.train.Checkpoint(model=...,
    optimizer=...).restore fills a fresh model and optimizer exactly as the source does."""
    dest = tmp_path / "out"
    shardconv.convert(tf2_keras_ckpt, dest, to="tf-checkpoint", names="keys", max_memory="1MiB")
    with TFBundleSource(dest) as s:
        assert any(t.name == "_CHECKPOINTABLE_OBJECT_GRAPH" and t.is_string for t in s.tensors())
    run_tf("keras_restore", tmp_path, src=str(tf2_keras_ckpt / "ckpt-2"), dest=str(dest / "ckpt"),
           out=str(tmp_path / "restored"))
    src, got = read_dump(tmp_path / "restored" / "src"), read_dump(tmp_path / "restored" / "dest")
    assert len(src) > 10
    assert_exact(got, src)
    assert_exact(raw_values(dest), raw_values(tf2_keras_ckpt))  # the object graph too
    # verify leaves out the graph and save_counter (bookkeeping); raw_values read them with their CRCs
    assert shardconv.verify(dest)["checksums_verified"] >= len(raw_values(dest)) - 2


def test_model_names_give_a_name_based_checkpoint_without_the_graph(tf2_keras_ckpt, tmp_path):
    dest = tmp_path / "out"
    shardconv.convert(tf2_keras_ckpt, dest, to="tf-checkpoint", drop_optimizer=True)
    with TFBundleSource(dest) as s:
        names = [t.name for t in s.tensors()]
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in names and any(n.endswith("conv/kernel") for n in names), names
    assert shardconv.verify(dest, tf2_keras_ckpt, drop_optimizer=True)["checksums_verified"] == len(names)


# ------------------------------------------------------------------------- without TensorFlow

NO_TF = r'''
import sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("tensorflow is not importable in this test")
sys.meta_path.insert(0, NoTensorFlow())
from shardconv import cli
for argv in map(lambda a: a.split("\t"), sys.argv[1:]):
    assert cli.main(argv) == 0, argv
assert "tensorflow" not in sys.modules
'''


def test_conversion_runs_with_tensorflow_unimportable_and_shardconv_verifies_it(tf2_keras_ckpt, tmp_path):
    src = tmp_path / "in.npz"
    tree = reference_tree()
    write_reference_npz(src, tree)
    a, b = tmp_path / "a", tmp_path / "b"
    runs = [["convert", src, a, "--to", "tf-checkpoint", "--max-memory", "1MiB", "--quiet"],
            ["convert", tf2_keras_ckpt, b, "--to", "tf-checkpoint", "--names", "keys", "--quiet"],
            ["verify", a, src], ["verify", b], ["ls", b]]
    proc = subprocess.run([sys.executable, "-c", NO_TF, *("\t".join(map(str, r)) for r in runs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = shardconv.verify(a, src)
    assert r["checksums_verified"] == len(tree) and r["bytes_compared"] == sum(v.nbytes for v in tree.values())
    with TFBundleSource(a) as s:
        assert_exact({t.name: s.read(t.name) for t in s.tensors()}, tree)
    assert_exact(raw_values(b), raw_values(tf2_keras_ckpt))


def raw_values(path: Path) -> dict[str, Any]:
    """Every tensor by raw key, as shardconv's reader reads it (string tensors as their elements)."""
    with TFBundleSource(path) as s:
        return {t.name: np.array(s.read_strings(t.name), dtype=bytes) if t.is_string else s.read(t.name)
                for t in s.tensors()}


def test_a_corrupt_byte_is_found_by_verify(tmp_path):
    dest = tmp_path / "out"
    shardconv.convert(dtype_tree(), dest, to="tf-checkpoint")
    data = dest / "ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(shardconv.VerifyError, match="checksum"):
        shardconv.verify(dest)


def test_table_writer_refuses_keys_out_of_order():
    table = bundleformat.TableWriter(lambda b: None)
    table.add(b"b", b"")
    with pytest.raises(ValueError, match="out of order"):
        table.add(b"a", b"")


# ------------------------------------------------------------------------- issue 17 leftovers

def test_verify_dest_src_of_a_tf2_output_with_its_object_graph(tf2_keras_ckpt, tmp_path):
    """verify DEST SRC of a --names keys output (object graph carried) compares every tensor,
    save_counter included: it is an output of the plan, so verify must not set it aside as
    bookkeeping (it once stopped at "missing ['save_counter']", as verify SRC SRC did)."""
    dest = tmp_path / "out"
    shardconv.convert(tf2_keras_ckpt, dest, to="tf-checkpoint", names="keys", max_memory="1MiB")
    numeric = {k: v for k, v in raw_values(tf2_keras_ckpt).items() if v.dtype.kind != "S"}
    for out in (dest, tf2_keras_ckpt):
        r = shardconv.verify(out, tf2_keras_ckpt)
        assert r["tensors"] == len(numeric), r
        assert r["bytes_compared"] == sum(v.nbytes for v in numeric.values()), r


#: Orbax's side, in a child process (JAX and Orbax stay out of this one): save a tree with
#: ``orbax.checkpoint``, restore it, and dump the restored leaves (``tf_sink_helper._dump`` layout).
ORBAX_CHILD = r'''
import sys
from pathlib import Path
import jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
sys.path.insert(0, sys.argv[2])
from tf_sink_helper import _dump
rng = np.random.default_rng(17)
tree = {"params": {"dense": {"kernel": rng.standard_normal((40, 24)).astype(np.float32),
                             "bias": jnp.asarray(rng.standard_normal(24), dtype=jnp.bfloat16)},
                   "emb": jnp.asarray(rng.standard_normal((300, 64)), dtype=jnp.bfloat16),
                   "layers": [rng.integers(-100, 100, (7, 3)).astype(np.int32), np.arange(5, dtype=np.int64)]},
        "opt": {"count": np.array(12, np.int32), "mu": jnp.full((4, 4), 0.5, jnp.float16)},
        "fp8": jnp.linspace(-4, 4, 24).astype(jnp.float8_e4m3fn).reshape(4, 6)}
out = Path(sys.argv[1])
with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=True)) as c:
    c.save(out / "ckpt", tree)
    restored = c.restore(out / "ckpt")
flat = {}
def walk(prefix, node):
    if isinstance(node, dict):
        for k, v in node.items():
            walk(f"{prefix}{k}/", v)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            walk(f"{prefix}{i}/", v)
    else:
        flat[prefix[:-1]] = np.asarray(node)
walk("", restored)
_dump(flat, out / "restored")
'''


def test_orbax_checkpoint_to_tf_checkpoint_equals_the_orbax_restore(tmp_path):
    """An Orbax (OCDBT) checkpoint written by orbax-checkpoint -> --to tf-checkpoint (no
    TensorFlow in this process) -> tf.train.load_checkpoint (in a child) equals Orbax's own
    restore, dtype, shape and bytes, bfloat16 and float8 included."""
    skip_unless_installed("jax", "orbax.checkpoint")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", ORBAX_CHILD, str(tmp_path), str(HERE)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    restored = read_dump(tmp_path / "restored")
    assert len(restored) == 8 and restored["params/emb"].dtype.name == "bfloat16", sorted(restored)
    dest = tmp_path / "tf"
    shardconv.convert(tmp_path / "ckpt", dest, to="tf-checkpoint", max_memory="1MiB")
    assert_exact(tf_read(dest, "checkpoint"), restored)
