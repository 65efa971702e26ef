"""Write TensorFlow checkpoint fixtures with real TensorFlow, plus reference values.

Usage::

    python tests/tf_fixtures.py KIND OUTDIR [--mib N] [--shards K] [--no-reference]

KIND is one of ``tf1_dtypes``, ``tf2_keras``, ``savedmodel``, ``big``,
``exotic_dtypes``.

The checkpoint is written into OUTDIR; then every tensor listed by
``tf.train.load_checkpoint(prefix).get_variable_to_dtype_map()`` is read back
with ``reader.get_tensor(name)`` and stored under ``OUTDIR/reference/``:

* ``index.json``: ``{"kind": KIND, "prefix": "<prefix relative to OUTDIR>",
  "tensors": {name: {"dtype": "float32" | "bfloat16" | "bool" | ... | "string",
  "tf_dtype": TF's name, "shape": [...],
  "file": "<n>.bin" | "<n>.json" | null}}}`` (``file`` is null
  only for ``big --no-reference``). tf1_dtypes also records
  ``"partitioned": {name: {"shape": [...], "partitions": [...]}}``.
* ``<n>.bin``: raw C-order little-endian bytes of a numeric tensor.
* ``<n>.json``: for string tensors, a JSON list of base64 strings (flattened,
  C order).

This script imports TensorFlow; the test-suite runs it in a subprocess (see
``tests/reference.py``) so the pytest process never imports TF. It prints
nothing except errors and exits non-zero on failure.

Dtype coverage (checked with TF 2.21 on CPU):

* tf1_dtypes: every common dtype saves fine from a resource
  variable through the TF1 Saver -- float16/32/64, bfloat16, int8/16/32/64,
  uint8/16/32/64, bool, complex64/128, string. Nothing had to be left out.
* exotic_dtypes (extra kind): TF 2.21 also writes float8_e4m3fn, float8_e5m2,
  int4, uint4, int2, uint2, qint8, quint8, qint32 from variables, and
  float8_e4m3fnuz, float8_e4m3b11fnuz, float8_e5m2fnuz, qint16, quint16 only
  through the SaveV2 op (no AssignVariableOp kernel for them on CPU). int4,
  uint4, int2 and uint2 take one byte per element in the data file (value in
  the low bits, not sign-extended: int4 -1 is 0x0f). ``get_tensor`` returns
  quantized types as their plain integer type, so their reference "dtype" is
  int8/uint8/int16/uint16/int32 and "tf_dtype" says qint8 etc.
* Not savable at all: resource and variant tensors (handles, not values) and
  the *_ref dtypes (graph-only reference types).
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
# Suppresses the "oneDNN custom operations are on" line that is printed
# before TF_CPP_MIN_LOG_LEVEL takes effect. Numerics do not matter here.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import argparse  # noqa: E402
import base64  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

warnings.filterwarnings("ignore")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

tf = None  # imported by _import_tensorflow() once the arguments are parsed


def _import_tensorflow() -> None:
    global tf
    import tensorflow

    tf = tensorflow
    tf.get_logger().setLevel(logging.ERROR)
    try:  # absl logging is what TF's python warnings go through
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except Exception:  # pragma: no cover
        pass


KINDS = ("tf1_dtypes", "tf2_keras", "savedmodel", "big", "exotic_dtypes", "keras_ema", "tf1_ema", "tf2_v1_slots")

# Every common dtype TF can save from a variable (tf.<name>).
DTYPES = ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32",
          "int64", "uint8", "uint16", "uint32", "uint64", "bool", "complex64",
          "complex128", "string")


# ---------------------------------------------------------------------------
# value generation (numpy, deterministic)


def _random_array(rng: np.random.Generator, dtype: str, shape) -> np.ndarray:
    shape = tuple(shape)
    if dtype in ("float16", "float32", "float64"):
        return (rng.standard_normal(shape) * 3.0).astype(dtype)
    if dtype == "bfloat16":
        return (rng.standard_normal(shape) * 3.0).astype(np.float32).astype(ml_dtypes.bfloat16)
    if dtype.startswith("complex"):
        real = rng.standard_normal(shape)
        imag = rng.standard_normal(shape)
        return (real + 1j * imag).astype(dtype)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.startswith("int") or dtype.startswith("uint"):
        info = np.iinfo(dtype)
        # Use the full range (incl. negative values, values above 2**63 for
        # uint64) so byte order and signedness bugs show up.
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    raise ValueError(f"no generator for {dtype}")


def _string_array(rng: np.random.Generator) -> np.ndarray:
    # Mix of empty, ASCII, non-UTF-8 bytes, embedded NUL and a string longer
    # than 127 bytes (multi-byte varint length) and one over 16 KiB.
    vals = [
        b"",
        b"hello",
        "gr\u00fc\u00dfe \u2603".encode("utf-8"),
        bytes(range(256)),
        b"nul\x00inside",
        rng.bytes(300),
        b"x" * 20000,
        b"last",
    ]
    return np.array(vals, dtype=object).reshape(2, 4)


# ---------------------------------------------------------------------------
# reference writer


_QUANTIZED = {"qint8": "int8", "quint8": "uint8", "qint16": "int16",
              "quint16": "uint16", "qint32": "int32"}


def _np_dtype_name(tf_dtype) -> str:
    """Numpy dtype name of what ``reader.get_tensor`` returns for ``tf_dtype``
    (quantized types come back as their plain integer storage type)."""
    if tf_dtype == tf.string:
        return "string"
    if tf_dtype.name in _QUANTIZED:
        return _QUANTIZED[tf_dtype.name]
    return np.dtype(tf_dtype.as_numpy_dtype).name


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype == object or b.dtype == object:
        return [bytes(x) for x in a.reshape(-1)] == [bytes(x) for x in b.reshape(-1)]
    return a.tobytes() == np.asarray(b, dtype=a.dtype).tobytes()


def write_reference(outdir: Path, prefix: Path, kind: str, *, values: bool = True,
                    extra: dict | None = None, expected: dict | None = None,
                    digests: bool = False) -> None:
    """Read every tensor of the checkpoint at ``prefix`` back with TF and write
    ``outdir/reference``. ``expected`` (name -> array) is a self-check that TF
    read back exactly the values this script put in."""
    refdir = outdir / "reference"
    refdir.mkdir(parents=True, exist_ok=True)
    reader = tf.train.load_checkpoint(str(prefix))
    dtypes = reader.get_variable_to_dtype_map()
    shapes = reader.get_variable_to_shape_map()
    if expected:
        missing = sorted(set(expected) - set(dtypes))
        if missing:
            raise AssertionError(f"tensors missing from checkpoint: {missing}")
    tensors = {}
    for n, name in enumerate(sorted(dtypes)):
        dtype_name = _np_dtype_name(dtypes[name])
        shape = [int(d) for d in shapes[name]]
        entry = {"dtype": dtype_name, "tf_dtype": dtypes[name].name,
                 "shape": shape, "file": None}
        if digests and dtype_name != "string":
            # sha256 of the C-order bytes TF returns: large tensors without large reference files.
            arr = np.ascontiguousarray(reader.get_tensor(name))
            entry["sha256"] = hashlib.sha256(arr.tobytes(order="C")).hexdigest()
            del arr
        if values:
            arr = reader.get_tensor(name)
            if expected and name in expected and not _same(arr, expected[name]):
                raise AssertionError(f"{name}: value read back differs from value written")
            if dtype_name == "string":
                flat = np.asarray(arr, dtype=object).reshape(-1)
                if list(np.shape(arr)) != shape:
                    raise AssertionError(f"{name}: shape {np.shape(arr)} != {shape}")
                fname = f"{n}.json"
                (refdir / fname).write_text(json.dumps(
                    [base64.b64encode(bytes(x)).decode("ascii") for x in flat]))
            else:
                arr = np.asarray(arr)
                if arr.dtype.name != dtype_name or list(arr.shape) != shape:
                    raise AssertionError(
                        f"{name}: got {arr.dtype.name}{list(arr.shape)}, "
                        f"expected {dtype_name}{shape}")
                if arr.dtype.byteorder == ">":
                    arr = arr.astype(arr.dtype.newbyteorder("<"))
                fname = f"{n}.bin"
                (refdir / fname).write_bytes(np.ascontiguousarray(arr).tobytes(order="C"))
            entry["file"] = fname
        tensors[name] = entry
    index = {"kind": kind,
             "prefix": os.path.relpath(prefix, outdir).replace(os.sep, "/"),
             "tensors": tensors}
    if extra:
        index.update(extra)
    (refdir / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))


def _data_shards(prefix: Path) -> list[Path]:
    return sorted(prefix.parent.glob(prefix.name + ".data-*-of-*"))


# ---------------------------------------------------------------------------
# kinds


def make_tf1_dtypes(outdir: Path) -> Path:
    """TF1 graph-mode sharded Saver: every dtype, strings, scalars, an empty
    tensor, rank 3/4, partitioned variables; variables spread over 3 CPU
    devices -> 3 data shards."""
    rng = np.random.default_rng(1234)
    n_dev = 3
    expected: dict[str, np.ndarray] = {}
    partitioned: dict[str, dict] = {}
    g = tf.Graph()

    def var(name: str, value: np.ndarray, tf_dtype=None) -> None:
        expected[name] = value
        tf.compat.v1.get_variable(name, initializer=tf.constant(value, dtype=tf_dtype),
                                  use_resource=True)

    with g.as_default():
        dev = itertools.cycle(range(n_dev))
        for dtype_name in DTYPES:
            tf_dtype = getattr(tf, dtype_name)
            if dtype_name == "string":
                value = _string_array(rng)
            else:
                value = _random_array(rng, dtype_name, (3, 5))
            with tf.compat.v1.device(f"/device:CPU:{next(dev)}"):
                var(f"dtypes/{dtype_name}", value, tf_dtype)
        with tf.compat.v1.device("/device:CPU:1"):
            var("shapes/scalar", np.float32(rng.standard_normal() + 7.0))
            var("shapes/scalar_int64", np.int64(-(2 ** 40) - 17))
            var("shapes/scalar_string", np.array(b"a scalar string", dtype=object), tf.string)
            var("shapes/empty_0x3", np.zeros((0, 3), np.float32))
        with tf.compat.v1.device("/device:CPU:2"):
            var("shapes/rank3", _random_array(rng, "float32", (2, 3, 4)))
            var("shapes/rank4_int32", _random_array(rng, "int32", (2, 1, 3, 2)))
            var("outer/inner/deeply/nested/name.with.dots", _random_array(rng, "float64", (4,)))

        # Partitioned variables: each partition's VarHandleOp is placed
        # round-robin on a device, so the slices of one variable land in
        # different data shards.
        counter = itertools.count()

        def round_robin(op):
            if op.type in ("VarHandleOp", "VariableV2"):
                return f"/device:CPU:{next(counter) % n_dev}"
            return op.device

        def partitioned_var(name, dtype_name, shape, partitions):
            full = _random_array(rng, dtype_name, shape)

            def init(shape, dtype=None, partition_info=None):
                # Each partition gets its own slice of ``full``.
                offset = partition_info.var_offset if partition_info else [0] * len(shape)
                index = tuple(slice(o, o + int(s)) for o, s in zip(offset, shape))
                return tf.constant(full[index], dtype=dtype)

            tf.compat.v1.get_variable(
                name, shape=list(shape), dtype=getattr(tf, dtype_name), initializer=init,
                partitioner=lambda shape, dtype: list(partitions))
            expected[name] = full
            partitioned[name] = {"shape": list(shape), "partitions": list(partitions)}

        with g.device(round_robin):
            # fixed_size_partitioner(3) along axis 0 -> rows 4, 3, 3
            partitioned_var("partitioned/rows", "float32", (10, 4), (3, 1))
            # along axis 1 -> columns 3, 3
            partitioned_var("partitioned/cols", "float32", (5, 6), (1, 2))
            # uneven split of an int64 along axis 0 -> rows 4, 3
            partitioned_var("partitioned/int64_rows", "int64", (7, 3), (2, 1))
            # 2-byte dtype, 3 slices along axis 1 of 9 columns
            partitioned_var("partitioned/bf16_cols", "bfloat16", (4, 9), (1, 3))

        saver = tf.compat.v1.train.Saver(sharded=True)
        config = tf.compat.v1.ConfigProto(device_count={"CPU": n_dev})
        with tf.compat.v1.Session(graph=g, config=config) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            prefix = saver.save(sess, str(outdir / "model.ckpt"), global_step=7,
                                write_meta_graph=False)
    prefix = Path(prefix)
    shards = _data_shards(prefix)
    if len(shards) < 2:
        raise RuntimeError(f"expected >=2 data shards, got {shards}")
    write_reference(outdir, prefix, "tf1_dtypes", expected=expected,
                    extra={"partitioned": partitioned})
    return prefix


def _conv_bn_dense(size: int, filters: int, units: int):
    """A small Keras model named ``net``: conv, batch norm, flatten, dense (on size x size x 2 inputs)."""
    import keras

    return keras.Sequential([
        keras.Input(shape=(size, size, 2)),
        keras.layers.Conv2D(filters, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(units, name="dense"),
    ], name="net")


def make_tf2_keras(outdir: Path) -> Path:
    import keras

    keras.utils.set_random_seed(42)
    rng = np.random.default_rng(42)
    model = _conv_bn_dense(size=6, filters=3, units=4)
    opt = keras.optimizers.Adam(learning_rate=0.01)
    loss_fn = keras.losses.MeanSquaredError()

    def train_step():
        x = tf.constant(rng.standard_normal((8, 6, 6, 2)).astype(np.float32))
        y = tf.constant(rng.standard_normal((8, 4)).astype(np.float32))
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    train_step()
    ckpt.save(str(outdir / "ckpt"))
    train_step()
    prefix = ckpt.save(str(outdir / "ckpt"))
    prefix = Path(prefix)
    latest = tf.train.latest_checkpoint(str(outdir))
    if Path(latest) != prefix or prefix.name != "ckpt-2":
        raise RuntimeError(f"unexpected checkpoint prefix {prefix} (latest {latest})")
    write_reference(outdir, prefix, "tf2_keras")
    return prefix


def _write_model_values(outdir: Path, values: dict[str, dict[str, np.ndarray]]) -> None:
    """reference/model.json: for each model variable path, the values TF/Keras hold for it
    (``raw`` weight and, where one exists, its ``ema``), as .bin files."""
    refdir = outdir / "reference"
    out = {}
    for n, (path, kinds) in enumerate(sorted(values.items())):
        entry = {}
        for kind, arr in kinds.items():
            arr = np.ascontiguousarray(arr)
            fname = f"model_{n}_{kind}.bin"
            (refdir / fname).write_bytes(arr.tobytes())
            entry[kind] = {"file": fname, "dtype": arr.dtype.name, "shape": list(arr.shape)}
        out[path] = entry
    (refdir / "model.json").write_text(json.dumps(out, indent=1, sort_keys=True))


def make_keras_ema(outdir: Path) -> Path:
    """Keras 3 model trained with Adam(use_ema=True) by train_on_batch (so the EMA is
    not copied into the model), checkpointed with tf.train.Checkpoint(model, optimizer).
    The model's trainable variables appear only under optimizer/_trainable_variables."""
    import keras

    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    model = _conv_bn_dense(size=5, filters=4, units=3)
    opt = keras.optimizers.Adam(learning_rate=0.05, use_ema=True, ema_momentum=0.5,
                                ema_overwrite_frequency=None)
    model.compile(optimizer=opt, loss="mse")
    for _ in range(3):
        x = rng.standard_normal((8, 5, 5, 2)).astype(np.float32)
        y = rng.standard_normal((8, 3)).astype(np.float32)
        model.train_on_batch(x, y)
    prefix = Path(tf.train.Checkpoint(model=model, optimizer=opt).save(str(outdir / "ckpt")))
    write_reference(outdir, prefix, "keras_ema")
    emas = {id(v): a for v, a in zip(model.trainable_variables, opt._model_variables_moving_average)}
    values = {}
    for v in model.variables:
        entry = {"raw": np.asarray(v.numpy())}
        if id(v) in emas:
            entry["ema"] = np.asarray(emas[id(v)].numpy())
            if np.array_equal(entry["ema"], entry["raw"]):
                raise RuntimeError(f"{v.path}: EMA equals the raw weight; the test would prove nothing")
        # listed without the Sequential's own name scope ("net/conv/kernel" is "conv/kernel", as Keras 2
        # names it: docs/mapping.md, "TF2 names")
        values[v.path.removeprefix(model.name + "/")] = entry
    _write_model_values(outdir, values)
    return prefix


def make_tf1_ema(outdir: Path) -> Path:
    """TF1 graph: MomentumOptimizer + tf.train.ExponentialMovingAverage, a few steps, Saver."""
    g = tf.Graph()
    rng = np.random.default_rng(11)
    with g.as_default():
        tf.compat.v1.set_random_seed(11)
        x = tf.compat.v1.placeholder(tf.float32, [None, 4])
        y = tf.compat.v1.placeholder(tf.float32, [None, 2])
        with tf.compat.v1.variable_scope("dense"):
            w = tf.compat.v1.get_variable("kernel", [4, 2])
            b = tf.compat.v1.get_variable("bias", [2], initializer=tf.compat.v1.zeros_initializer())
        with tf.compat.v1.variable_scope("bn"):
            mean = tf.compat.v1.get_variable("moving_mean", [2], trainable=False,
                                             initializer=tf.compat.v1.ones_initializer())
        loss = tf.reduce_mean((tf.matmul(x, w) + b - y) ** 2) + 0.0 * tf.reduce_sum(mean)
        step = tf.compat.v1.train.get_or_create_global_step()
        train = tf.compat.v1.train.MomentumOptimizer(0.1, 0.9).minimize(loss, global_step=step)
        ema = tf.compat.v1.train.ExponentialMovingAverage(0.5)
        with tf.control_dependencies([train]):
            train_ema = ema.apply([w, b])
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for _ in range(3):
                sess.run(train_ema, {x: rng.standard_normal((8, 4)), y: rng.standard_normal((8, 2))})
            values = {"dense/kernel": {"raw": sess.run(w), "ema": sess.run(ema.average(w))},
                      "dense/bias": {"raw": sess.run(b), "ema": sess.run(ema.average(b))},
                      "bn/moving_mean": {"raw": sess.run(mean)}}
            prefix = Path(saver.save(sess, str(outdir / "model.ckpt"), global_step=3, write_meta_graph=False))
    write_reference(outdir, prefix, "tf1_ema")
    _write_model_values(outdir, values)
    return prefix


def make_tf2_v1_slots(outdir: Path) -> Path:
    """tf.train.Checkpoint of a tf.Module and a v1 AdamOptimizer in eager mode:
    slot variables appear as ``.OPTIMIZER_SLOT`` keys."""
    class Net(tf.Module):
        def __init__(self):
            super().__init__(name="net")
            self.w = tf.Variable(tf.random.stateless_normal([3, 2], seed=[1, 2]), name="w")
            self.b = tf.Variable(tf.zeros([2]), name="b")

    net = Net()
    opt = tf.compat.v1.train.AdamOptimizer(0.1)
    x = tf.constant(np.random.default_rng(3).standard_normal((5, 3)).astype(np.float32))
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((tf.matmul(x, net.w) + net.b) ** 2)
        grads = tape.gradient(loss, [net.w, net.b])
        opt.apply_gradients(zip(grads, [net.w, net.b]))
    prefix = Path(tf.train.Checkpoint(model=net, optimizer=opt).save(str(outdir / "ckpt")))
    write_reference(outdir, prefix, "tf2_v1_slots")
    _write_model_values(outdir, {"model/w": {"raw": net.w.numpy()}, "model/b": {"raw": net.b.numpy()}})
    return prefix


def make_savedmodel(outdir: Path) -> Path:
    rng = np.random.default_rng(7)

    class Small(tf.Module):
        def __init__(self):
            super().__init__(name="small")
            self.w = tf.Variable(rng.standard_normal((4, 3)).astype(np.float32), name="w")
            self.b = tf.Variable(
                tf.constant(rng.standard_normal(3).astype(np.float32) * 2, dtype=tf.bfloat16),
                name="b")
            self.step = tf.Variable(np.int64(123456789012), name="step")

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x):
            return tf.matmul(x, self.w) + tf.cast(self.b, tf.float32)

    m = Small()
    sm_dir = outdir / "sm"
    tf.saved_model.save(m, str(sm_dir), signatures={"serving_default": m.__call__})
    prefix = sm_dir / "variables" / "variables"
    write_reference(outdir, prefix, "savedmodel")
    return prefix


# Dtypes TF 2.21 can write to a bundle beyond the common ones above. They are
# in their own kind so that a reader can support them separately.
# float8_e4m3fn/float8_e5m2/int4/uint4/int2/uint2 can be variables; the *fnuz
# float8 types and qint16/quint16 have no AssignVariableOp kernel on CPU, so
# they can only be written by the SaveV2 op, which is what this kind uses for
# all of them (same bundle format as a Saver writes, one shard).
EXOTIC_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                 "float8_e4m3b11fnuz", "float8_e5m2fnuz",
                 "int4", "uint4", "int2", "uint2",
                 "qint8", "quint8", "qint16", "quint16", "qint32")


def make_exotic_dtypes(outdir: Path) -> Path:
    from tensorflow.python.framework import dtypes as tf_dtypes

    rng = np.random.default_rng(99)
    names, tensors, expected = [], [], {}
    for dtype_name in EXOTIC_DTYPES:
        tf_dtype = getattr(tf_dtypes, dtype_name, None)
        if tf_dtype is None:  # older/newer TF without this dtype
            continue
        for shape in ((3, 5), (7,)):
            if dtype_name in _QUANTIZED:
                storage = _QUANTIZED[dtype_name]
                value = _random_array(rng, storage, shape)
            elif dtype_name.startswith("float8"):
                np_dtype = getattr(ml_dtypes, dtype_name)
                value = (rng.standard_normal(shape) * 4).astype(np.float32).astype(np_dtype)
            else:
                np_dtype = getattr(ml_dtypes, dtype_name)
                info = ml_dtypes.iinfo(np_dtype)
                value = rng.integers(int(info.min), int(info.max), size=shape,
                                     endpoint=True).astype(np_dtype)
            name = f"exotic/{dtype_name}" + ("_odd7" if shape == (7,) else "")
            names.append(name)
            tensors.append(tf.constant(value, dtype=tf_dtype))
            expected[name] = value
    prefix = outdir / "exotic"
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names,
                      shape_and_slices=[""] * len(names), tensors=tensors)
    write_reference(outdir, prefix, "exotic_dtypes", expected=expected)
    return prefix


def _big_shapes(mib: float) -> list[tuple[str, tuple[int, ...]]]:
    """Float32 variables adding up to about ``mib`` MiB, varied shapes, the
    first one at least mib/4 MiB."""
    total = int(mib * (1 << 20)) // 4  # float32 elements
    big_rows = max(1, -(-int(total * 0.3) // 1024))  # ~30% of total, >= 1/4
    shapes: list[tuple[str, tuple[int, ...]]] = [("big/embedding", (big_rows, 1024))]
    rest = max(0, total - big_rows * 1024)
    # (name, fraction of the remainder, shape-maker)
    parts = [
        ("layer_0/kernel", 0.30, lambda e: (max(1, e // 768), 768)),
        ("layer_0/bias", 0.01, lambda e: (max(1, e),)),
        ("conv/kernel", 0.20, lambda e: (3, 3, 64, max(1, e // 576))),
        ("layer_1/kernel", 0.25, lambda e: (max(1, e // 333), 333)),
        ("attn/qkv", 0.15, lambda e: (max(1, e // (8 * 64)), 8, 64)),
        ("layer_1/bias", 0.01, lambda e: (max(1, e),)),
        ("head/kernel", 0.08, lambda e: (max(1, e // 10), 10)),
    ]
    for name, frac, mk in parts:
        shapes.append((name, mk(int(rest * frac))))
    shapes.append(("global_step", ()))
    return shapes


def make_big(outdir: Path, mib: float, shards: int, reference: bool, digests: bool = False) -> Path:
    if shards < 1:
        raise ValueError("--shards must be >= 1")
    shapes = _big_shapes(mib)
    # Greedy balance: largest first onto the least-loaded device.
    load = [0] * shards
    placement = {}
    for name, shape in sorted(shapes, key=lambda s: -int(np.prod(s[1]))):
        d = load.index(min(load))
        placement[name] = d
        load[d] += int(np.prod(shape))
    g = tf.Graph()
    with g.as_default():
        for i, (name, shape) in enumerate(shapes):
            with tf.compat.v1.device(f"/device:CPU:{placement[name]}"):
                if shape == ():
                    init = tf.constant(np.float32(1000.0))
                    tf.compat.v1.get_variable(name, initializer=init)
                else:
                    tf.compat.v1.get_variable(
                        name, shape=list(shape), dtype=tf.float32,
                        initializer=tf.compat.v1.random_normal_initializer(seed=1000 + i))
        saver = tf.compat.v1.train.Saver(sharded=True)
        config = tf.compat.v1.ConfigProto(device_count={"CPU": shards})
        with tf.compat.v1.Session(graph=g, config=config) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            prefix = saver.save(sess, str(outdir / "model.ckpt"), write_meta_graph=False)
    prefix = Path(prefix)
    got = _data_shards(prefix)
    if len(got) != shards:
        raise RuntimeError(f"expected {shards} data shards, got {len(got)}")
    write_reference(outdir, prefix, "big", values=reference, digests=digests,
                    extra={"mib": mib, "shards": shards})
    return prefix


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("outdir", type=Path)
    p.add_argument("--mib", type=float, default=8.0, help="big: total MiB")
    p.add_argument("--shards", type=int, default=2, help="big: number of data shards")
    p.add_argument("--no-reference", action="store_true",
                   help="big: write only index.json (dtype/shape), no values")
    p.add_argument("--digests", action="store_true",
                   help="big: record the sha256 of each tensor as TF reads it")
    args = p.parse_args(argv)
    _import_tensorflow()
    outdir = args.outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    tf.compat.v1.reset_default_graph()
    if args.kind == "big":
        make_big(outdir, args.mib, args.shards, reference=not args.no_reference, digests=args.digests)
    else:
        makers = {"tf1_dtypes": make_tf1_dtypes, "tf2_keras": make_tf2_keras, "savedmodel": make_savedmodel,
                  "exotic_dtypes": make_exotic_dtypes, "keras_ema": make_keras_ema, "tf1_ema": make_tf1_ema,
                  "tf2_v1_slots": make_tf2_v1_slots}
        makers[args.kind](outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
