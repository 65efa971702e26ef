"""TensorFlow side of tests/test_savedmodel.py, run as a subprocess so pytest never imports TF.

``python tests/tf_sink_helper.py serve`` imports TensorFlow, Keras and shardconv once,
prints ``ready``, then reads one JSON request per line on stdin and answers one JSON
line on stdout. Each request runs in a ``fork()`` of this process (TF is already
imported, so a request costs milliseconds, not the 5 s of ``import tensorflow``); a
child killed by SIGKILL (the engine's SHARDCONV_TEST_KILL hook) is answered with
``rc = -9``, as a killed subprocess would be. Requests::

    {"op": "convert", "src", "dest", "kwargs", "faults"}  shardconv.api.convert in the child (faults injected)
    {"op": "cli", "argv", "kill", "cwd", "env"}     shardconv.cli.main(argv), killed at "kill"
    {"op": "read", "path", "kind", "out"}           values as TF loads them (savedmodel | checkpoint)
    {"op": "signature", "path", "input", "out"}     run serving_default on a .npy input
    {"op": "make_dv", "out"}                        the DeepVariant-shaped fixture
    {"op": "restore_builder", ...}                  restore a tf-checkpoint into the built model, run it

``read`` writes ``out/index.json`` ({name: {dtype, shape, file}}) and raw C-order
``.bin`` files; dtype names are NumPy's / ml_dtypes' (bfloat16 stays bfloat16).
"""
from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TextIO  # noqa: E402

import numpy as np  # noqa: E402


def _dump(arrays: dict[str, np.ndarray], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for n, (name, a) in enumerate(sorted(arrays.items())):
        a = np.asarray(a)  # (ascontiguousarray would make scalars 1-d)
        (out / f"{n}.bin").write_bytes(a.tobytes())
        index[name] = {"dtype": a.dtype.name, "shape": list(a.shape), "file": f"{n}.bin"}
    (out / "index.json").write_text(json.dumps(index))
    return index


def _loaded_variables(obj, tf, path: str = "", seen=None) -> dict[str, np.ndarray]:
    """Variables of a loaded SavedModel by attribute path (plain getattr walk, not TF's tracking)."""
    seen = set() if seen is None else seen
    out = {}
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    for k, v in sorted(vars(obj).items()):
        if k.startswith("_") or k in ("signatures", "tensorflow_version", "tensorflow_git_version", "graph_debug_info"):
            continue
        if isinstance(v, tf.Variable):
            out[path + k] = v.numpy()
        elif hasattr(v, "__dict__") and not callable(v):
            out.update(_loaded_variables(v, tf, path + k + "/", seen))
    return out


def op_read(req: dict) -> dict:
    import tensorflow as tf

    path = req["path"]
    if req["kind"] == "savedmodel":
        m = tf.saved_model.load(path)
        arrays = _loaded_variables(m, tf)
        extra = {"signatures": sorted(m.signatures.keys())}
    else:
        reader = tf.train.load_checkpoint(path)
        arrays = {k: reader.get_tensor(k) for k in reader.get_variable_to_dtype_map()
                  if reader.get_variable_to_dtype_map()[k] != tf.string}
        extra = {}
    return {"index": _dump(arrays, Path(req["out"])), **extra}


def op_signature(req: dict) -> dict:
    import tensorflow as tf
    from tensorflow.python.tools import saved_model_utils

    # What `saved_model_cli show --dir D --tag_set serve` lists.
    meta = saved_model_utils.get_meta_graph_def(req["path"], "serve")
    listed = {k: {"inputs": sorted(v.inputs), "outputs": sorted(v.outputs)} for k, v in meta.signature_def.items()}
    m = tf.saved_model.load(req["path"])
    fn = m.signatures["serving_default"]
    (arg,) = fn.structured_input_signature[1].keys()
    x = np.load(req["input"])
    outs = {k: v.numpy() for k, v in fn(**{arg: tf.constant(x)}).items()}
    return {"signature_defs": listed, "index": _dump(outs, Path(req["out"]))}


def op_convert(req: dict) -> dict:
    """shardconv.convert; with ``faults`` (``testing.faults.Fault`` fields) injected into ``os``
    here, and how many calls each matched returned as ``counts``."""
    import shardconv
    from shardconv.errors import ShardconvError
    from shardconv.testing.faults import Fault, injected

    with injected([Fault(**f) for f in req.get("faults", [])]) as counts:
        try:
            r = shardconv.convert(req["src"], req["dest"], **req.get("kwargs", {}))
        except ShardconvError as e:
            return {"error": type(e).__name__, "message": str(e), "counts": counts}
    return {"result": {"chunks_written": r.chunks_written, "chunks_resumed": r.chunks_resumed,
                       "tensors": r.tensors, "bytes_total": r.bytes_total, "chunk_bytes": r.chunk_bytes,
                       "seconds": r.seconds}, "counts": counts}


def op_cli(req: dict) -> dict:
    from shardconv import cli
    from shardconv.core import pipeline

    pipeline._KILL = req.get("kill") or ""
    os.environ.update(req.get("env") or {})  # this fork's only
    if req.get("cwd"):
        os.chdir(req["cwd"])
        sys.path.insert(0, req["cwd"])
    rc = cli.main(req["argv"])
    return {"rc": rc}


# ---------------------------------------------------------------------------- DeepVariant-shaped fixture

#: The model builder the test hands to --model-builder (written next to the fixture).
DV_BUILDER = '''
"""A small InceptionV3-style Keras model built from an example_info.json, as DeepVariant does."""
import json

import keras

L = keras.layers


def _cbr(x, filters, size, name, strides=1):
    x = L.Conv2D(filters, size, strides=strides, padding="same", use_bias=False, name=name + "_conv")(x)
    x = L.BatchNormalization(scale=False, name=name + "_bn")(x)
    return L.Activation("relu", name=name + "_relu")(x)


def build(config_path):
    info = json.load(open(config_path))
    inp = keras.Input(tuple(info["shape"]), name="image")
    x = _cbr(inp, 8, 3, "stem", strides=2)
    for b in range(2):  # InceptionV3 "mixed" blocks: 1x1, 1x1->3x3, 1x1->3x3->3x3, pool->1x1
        b1 = _cbr(x, 4, 1, f"mixed{b}_1x1")
        b3 = _cbr(_cbr(x, 4, 1, f"mixed{b}_3x3a"), 6, 3, f"mixed{b}_3x3b")
        bd = _cbr(_cbr(_cbr(x, 4, 1, f"mixed{b}_dbla"), 6, 3, f"mixed{b}_dblb"), 6, 3, f"mixed{b}_dblc")
        bp = _cbr(L.AveragePooling2D(3, 1, padding="same", name=f"mixed{b}_pool")(x), 2, 1, f"mixed{b}_pp")
        x = L.Concatenate(name=f"mixed{b}")([b1, b3, bd, bp])
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    out = L.Dense(info["num_classes"], activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name="inceptionv3_tiny")
'''


def op_make_dv(req: dict) -> dict:
    """Train the builder's model two steps with Adam(use_ema=True) via train_on_batch (the EMA
    stays in the optimizer), checkpoint it, and record: the raw and the EMA model's outputs on a
    sample input (the EMA one from a fresh model restored with TF), and explicit rules that pick
    the EMA values by checkpoint key."""
    import keras
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    out = Path(req["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "dv_model.py").write_text(DV_BUILDER)
    config = out / "example_info.json"
    config.write_text(json.dumps({"shape": [10, 12, 4], "num_classes": 3}))
    sys.path.insert(0, str(out))
    import dv_model

    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)

    def make():
        model = dv_model.build(str(config))
        opt = keras.optimizers.Adam(learning_rate=0.05, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=None)
        model.compile(optimizer=opt, loss="categorical_crossentropy")
        return model, opt

    model, opt = make()
    for _ in range(2):
        x = rng.standard_normal((8, 10, 12, 4)).astype(np.float32)
        y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
        model.train_on_batch(x, y)
    prefix = tf.train.Checkpoint(model=model, optimizer=opt).save(str(out / "ckpt" / "ckpt"))
    sample = rng.standard_normal((4, 10, 12, 4)).astype(np.float32)
    np.save(out / "sample.npy", sample)
    raw_out = model(sample, training=False).numpy()

    # The original model restored with TensorFlow, EMA values swapped in (what fit() would do).
    fresh, fresh_opt = make()
    fresh_opt.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).restore(prefix).assert_existing_objects_matched()
    for v, ema in zip(fresh.trainable_variables, fresh_opt._model_variables_moving_average):
        v.assign(ema)
    ema_out = fresh(sample, training=False).numpy()

    # Explicit mapping (names = raw keys): EMA slot -> model path; BN statistics as they are.
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(tf.train.load_checkpoint(prefix).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    key_of = {a.full_name: a.checkpoint_key for n in graph.nodes for a in n.attributes if a.name == "VARIABLE_VALUE"}
    rules = [{"match": re.escape(key_of[ema.path]), "rename": v.path}
             for v, ema in zip(model.trainable_variables, opt._model_variables_moving_average)]
    rules += [{"match": re.escape(key_of[v.path]), "rename": v.path} for v in model.non_trainable_variables]
    rules.append({"match": ".*", "drop": True})
    with open(out / "ema_rules.toml", "w") as f:
        for r in rules:
            f.write("[[rules]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in r.items()))
    np.save(out / "raw_out.npy", raw_out)
    np.save(out / "ema_out.npy", ema_out)
    return {"prefix": prefix, "config": str(config), "variables": len(model.variables),
            "ema_differs": bool(not np.allclose(raw_out, ema_out, rtol=1e-4, atol=1e-5))}


def op_restore_builder(req: dict) -> dict:
    """Build the model with the builder, restore a --to tf-checkpoint output into it with
    tf.train.Checkpoint, and run it on the sample input."""
    import tensorflow as tf

    sys.path.insert(0, req["cwd"])
    import dv_model

    model = dv_model.build(req["config"])
    tf.train.Checkpoint(model=model).restore(req["prefix"]).assert_existing_objects_matched()
    out = model(np.load(req["input"]), training=False).numpy()
    return {"index": _dump({"out": out}, Path(req["out"]))}


OPS = {"convert": op_convert, "cli": op_cli, "read": op_read, "signature": op_signature, "make_dv": op_make_dv,
       "restore_builder": op_restore_builder}


def _run_child(req: dict, result_path: str, log_path: str) -> None:
    """In the forked child: run the op, write its JSON result, exit without cleanup."""
    rc = 0
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        res = OPS[req["op"]](req)
        rc = int(res.get("rc", 0)) if req["op"] == "cli" else 0
        Path(result_path).write_text(json.dumps(res))
    except BaseException:
        Path(result_path).write_text(json.dumps({"exception": traceback.format_exc()}))
        rc = 70
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def serve() -> int:
    import keras  # noqa: F401  (imported once here, shared by every child)
    import tensorflow  # noqa: F401

    import shardconv.cli  # noqa: F401
    import shardconv.sinks.savedmodel  # noqa: F401

    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol
    tmp = Path(tempfile.mkdtemp(prefix="tf-sink-helper-"))
    proto.write("ready\n")
    proto.flush()
    try:
        _serve_requests(proto, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _serve_requests(proto: TextIO, tmp: Path) -> None:
    for n, line in enumerate(sys.stdin):
        req = json.loads(line)
        result_path, log_path = str(tmp / f"{n}.json"), str(tmp / f"{n}.log")
        pid = os.fork()
        if pid == 0:
            _run_child(req, result_path, log_path)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        try:
            res = json.loads(Path(result_path).read_text())
        except (OSError, ValueError):
            res = {}
        log = Path(log_path).read_text(errors="replace") if Path(log_path).exists() else ""
        proto.write(json.dumps({"rc": rc, "res": res, "log": log[-4000:]}) + "\n")
        proto.flush()


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: tf_sink_helper.py serve")
    sys.exit(serve())
