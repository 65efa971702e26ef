"""SavedModel and TF checkpoint output (issue 7): values exactly as TensorFlow loads them,
resume after SIGKILL, the model-builder (DeepVariant) path.

This process never imports TensorFlow. Conversions with these sinks, and every read
through TensorFlow, run in ``tests/tf_sink_helper.py``: one subprocess that imports TF
once and forks per request (``import tensorflow`` costs ~5 s; a fork costs ms). A kill
point (SHARDCONV_TEST_KILL) SIGKILLs the forked child, exactly as it would a CLI process.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import shardconv
from shardconv import errors
from shardconv.sources.tf_bundle import TFBundleSource
from shardconv.testing.faults import Fault
from shardconv.testing.sink_suite import BEFORE_RESTART, SinkTests, reference_tree, write_reference_npz
from shardconv.util.dtypes import numpy_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import assert_exact, load_reference  # noqa: E402

HELPER = Path(__file__).resolve().with_name("tf_sink_helper.py")


class TFWorker:
    """The helper subprocess: send a request, get its answer (rc, result, child's log)."""

    def __init__(self) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
        self.proc = subprocess.Popen([sys.executable, str(HELPER), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{HELPER} did not start (got {line!r})")

    def call(self, op: str, **req: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"op": op, **req}, default=str) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"{HELPER} exited")
        out = json.loads(answer)
        if "exception" in out["res"]:
            raise AssertionError(f"{op} failed in the TF helper:\n{out['res']['exception']}\n{out['log']}")
        return out

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_WORKER: TFWorker | None = None


def worker() -> TFWorker:
    global _WORKER
    if _WORKER is None:
        _WORKER = TFWorker()
    return _WORKER


@pytest.fixture(scope="module", autouse=True)
def _stop_worker():
    yield
    global _WORKER
    if _WORKER is not None:
        _WORKER.close()
        _WORKER = None


def tf_convert(src: Path, dest: Path, **kwargs: Any) -> SimpleNamespace:
    """shardconv.convert in the helper; ShardconvErrors are raised here as the same class."""
    res = worker().call("convert", src=str(src), dest=str(dest), kwargs=kwargs)
    assert res["rc"] == 0, res["log"]
    r = res["res"]
    if "error" in r:
        raise _error(r)
    return SimpleNamespace(**r["result"])


def _error(r: dict[str, Any]) -> Exception:
    """The helper's ShardconvError (class name and message) as the same class here."""
    cls = getattr(errors, r["error"])
    e = cls.__new__(cls)
    Exception.__init__(e, r["message"])
    return e


def tf_cli(*argv: Any, kill: str | None = None, cwd: Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    res = worker().call("cli", argv=[str(a) for a in argv], kill=kill, cwd=str(cwd) if cwd else None, env=env)
    return subprocess.CompletedProcess(argv, res["rc"], "", res["log"].encode())


def _load_dump(out: Path, index: dict) -> dict[str, np.ndarray]:
    return {name: np.frombuffer((out / e["file"]).read_bytes(), numpy_dtype(e["dtype"]) if e["dtype"] != "bool"
                                else np.bool_).reshape(e["shape"]) for name, e in index.items()}


def tf_read(path: Path, kind: str) -> dict[str, np.ndarray]:
    """Every variable (SavedModel: by attribute path) or tensor (checkpoint) as TF loads it."""
    out = Path(tempfile.mkdtemp(prefix="tf-read-"))
    try:
        res = worker().call("read", path=str(path), kind=kind, out=str(out))
        assert res["rc"] == 0, res["log"]
        return {k: v.copy() for k, v in _load_dump(out, res["res"]["index"]).items()}
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------- the shared sink suite

class _TFSinkTests(SinkTests):
    byte_identical = False
    suffix = ""
    kind = ""

    def convert(self, src: Path, dest: Path, **kw: Any):
        return tf_convert(src, dest, to=self.to, **kw)

    def read_back(self, dest: Path) -> dict[str, np.ndarray]:
        return tf_read(dest, self.kind)

    def _kill_at(self, src: Path, dest: Path, point: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return tf_cli("convert", src, dest, "--max-memory", "1MiB", "--quiet", "--to", self.to, kill=point, env=env)

    def convert_faulty(self, src: Path, dest: Path, faults: list[Fault], **kw: Any) -> tuple[Any, list[int]]:
        """The suite's faults installed in the TF helper's child, where the conversion runs."""
        res = worker().call("convert", src=str(src), dest=str(dest), kwargs={"to": self.to, "max_memory": "1MiB", **kw},
                            faults=[dataclasses.asdict(f) for f in faults])
        assert res["rc"] == 0, res["log"]
        r = res["res"]
        return (_error(r) if "error" in r else None), r["counts"]


class TestSavedModelSink(_TFSinkTests):
    to = "savedmodel"
    kind = "savedmodel"

    def snapshot(self, dest: Path) -> Any:
        """The variables bundle's bytes (shardconv writes them: deterministic) and the values TF loads."""
        files = {p.name: p.read_bytes() for p in sorted((dest / "variables").iterdir())}
        return files, super().snapshot(dest)


# --to tf-checkpoint no longer goes through TensorFlow: its suite is in test_tf_checkpoint_writer.py.


# ------------------------------------------------------------------------- conversions

def tree_npz(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The shared reference tree written by np.savez, and the tree."""
    tree = reference_tree()
    write_reference_npz(tmp_path / "tree.npz", tree)
    return tmp_path / "tree.npz", tree


def _plan_values(src: Path, **mapping: Any) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """What the plan says each output holds, computed by shardconv without TF; and its source key."""
    p = shardconv.api.plan(src, **mapping)
    values, origin = {}, {}
    for o in p.outputs:
        buf = np.empty(o.nbytes, np.uint8)
        o.producer.fill(0, memoryview(buf), p.source.read_into)
        values[o.name] = buf.view(numpy_dtype(o.dtype)).reshape(o.shape)
        origin[o.name] = getattr(o.producer, "source", None)
    p.source.close()
    return values, origin


def test_tf2_checkpoint_to_savedmodel_values_equal_what_tf_wrote(tf2_keras_ckpt, tmp_path):
    want, origin = _plan_values(tf2_keras_ckpt)
    ref = load_reference(tf2_keras_ckpt)
    for name, key in origin.items():  # the plan's values are TF's own (checked against TF's reads)
        assert want[name].tobytes() == np.asarray(ref[key]).tobytes(), name
    dest = tmp_path / "sm"
    tf_convert(tf2_keras_ckpt, dest, to="savedmodel", max_memory="1MiB")
    assert_exact(tf_read(dest, "savedmodel"), want)
    assert "dense/kernel" in want and "optimizer/dense/kernel/momentum" in want, sorted(want)  # model names


def test_pytree_npz_to_savedmodel_cli_serving_versions(tmp_path):
    """A flattened JAX-style tree ('/'-names, bfloat16) through the real CLI: DEST/3/ is a
    SavedModel whose nested modules follow the names; a second version lands beside it."""
    src, tree = tree_npz(tmp_path)
    dest = tmp_path / "served"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-m", "shardconv", "convert", str(src), str(dest), "--to", "savedmodel",
                           "--serving-version", "3", "--max-memory", "4MiB", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "3" / "saved_model.pb").is_file() and (dest / "3" / "variables" / "variables.index").is_file()
    assert not list((dest / "3" / "variables").glob("*.tempstate*"))
    manifest = json.loads((dest / "3" / "assets.extra" / "shardconv.json").read_text())
    assert manifest["tf_keys"]["params/dense/kernel"] == ["params/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE"]
    assert_exact(tf_read(dest / "3", "savedmodel"), tree)
    tf_convert(src, dest, to="savedmodel", sink_options={"serving_version": 4})
    assert sorted(p.name for p in dest.iterdir()) == ["3", "4"]
    with pytest.raises(errors.DestinationError):
        tf_convert(src, dest, to="savedmodel", sink_options={"serving_version": 4})


def test_npz_to_tf_checkpoint_readable_by_shardconv_and_tf(tmp_path):
    src, tree = tree_npz(tmp_path)
    dest = tmp_path / "ckpt"
    tf_convert(src, dest, to="tf-checkpoint", max_memory="1MiB")
    assert (dest / "checkpoint").read_text().startswith('model_checkpoint_path: "ckpt"')
    with TFBundleSource(dest) as s:  # our own reader (partitioned entries: many chunks per tensor)
        assert_exact({t.name: s.read(t.name) for t in s.tensors()}, tree)
    assert shardconv.verify(dest, src)["bytes_compared"] == sum(v.nbytes for v in tree.values())


def test_verify_reads_a_savedmodel_output_by_its_model_names(tmp_path):
    src, tree = tree_npz(tmp_path)
    dest = tmp_path / "sm"
    tf_convert(src, dest, to="savedmodel", max_memory="1MiB")
    r = shardconv.verify(dest, src)
    assert r["tensors"] == len(tree) and r["bytes_compared"] == sum(v.nbytes for v in tree.values())


def test_import_shardconv_never_imports_tensorflow(tmp_path):
    code = ("import sys, shardconv\n"
            "from shardconv.sinks import sink_for\n"
            "from shardconv.cli import build_parser\n"
            "for to in ('savedmodel', 'tf-checkpoint'):\n"
            "    s = sink_for('x', to, model_builder='m:f'); s.options(); s.baseline_bytes()\n"
            "build_parser().parse_args(['convert', 'a', 'b', '--to', 'savedmodel', '--serving-version', '2'])\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_sink_options_are_checked_before_any_work(tmp_path):
    from shardconv.sinks import sink_for

    with pytest.raises(errors.UsageError, match="savedmodel only"):
        sink_for("x", "tf-checkpoint", serving_version=1)
    with pytest.raises(errors.UsageError, match="--model-builder"):
        sink_for("x", "savedmodel", model_config=tmp_path / "c.json")
    with pytest.raises(errors.UsageError, match="does not exist"):
        sink_for("x", "savedmodel", model_builder="m:f", model_config=tmp_path / "nope.json")


# ------------------------------------------------------------------------- resume

def _entry(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_a_resumed_run_keeps_the_skeleton_and_redoes_a_corrupt_chunk(tmp_path):
    """Killed twice (the second time on an earlier boot: a restart follows), then the partial
    data file's values flipped (the carried object graph left intact): the resumed runs keep
    saved_model.pb and the data file (never rebuilt: attaching needs no TensorFlow), redo every
    damaged chunk, and give the bytes of an uninterrupted run."""
    src, tree = tree_npz(tmp_path)
    dest, clean = tmp_path / "sm", tmp_path / "clean"
    argv = ("convert", src, dest, "--to", "savedmodel", "--max-memory", "1MiB")
    assert tf_cli(*argv, kill="journal:6").returncode == -9
    partial = Path(str(dest) + ".partial") / dest.name
    data = partial / "variables" / "variables.data-00000-of-00001"
    skeleton, inode = _entry(partial / "saved_model.pb"), data.stat().st_ino
    assert tf_cli(*argv, kill="journal:12", env=BEFORE_RESTART).returncode == -9
    assert _entry(partial / "saved_model.pb") == skeleton and data.stat().st_ino == inode
    staged = Path(str(dest) + ".partial")
    journaled = sum(1 for line in (staged / "journal.jsonl").read_text().splitlines()[1:] if '"i"' in line)
    (graph,) = json.loads((staged / "sm.tfwork" / "layout.json").read_text())["carried"]  # first in key order
    raw = bytearray(data.read_bytes())
    for pos in range(graph[3], len(raw)):  # [key, dtype, shape, size, ...]: every value byte after it flipped
        raw[pos] ^= 0xFF
    data.write_bytes(bytes(raw))
    r = tf_convert(src, dest, to="savedmodel", max_memory="1MiB")
    assert journaled >= 12 and r.chunks_resumed <= 1  # only the empty tensor's chunk (no bytes) stays intact
    tf_convert(src, clean, to="savedmodel", max_memory="8MiB")
    for name in ("variables.index", "variables.data-00000-of-00001"):
        assert (dest / "variables" / name).read_bytes() == (clean / "variables" / name).read_bytes(), name
    assert_exact(tf_read(dest, "savedmodel"), tree)


def test_variables_are_one_bundle_whatever_the_chunk_size(tmp_path):
    """The values are written by shardconv's bundle writer, not TensorFlow's SaveV2 groups: one data
    file, the same bytes at 1 MiB and 64 MiB, every entry's CRC what TensorFlow checks on load."""
    src, tree = tree_npz(tmp_path)
    outs = []
    for mem in ("1MiB", "64MiB"):
        dest = tmp_path / f"sm-{mem}"
        tf_convert(src, dest, to="savedmodel", max_memory=mem)
        assert sorted(p.name for p in (dest / "variables").iterdir()) == ["variables.data-00000-of-00001",
                                                                       "variables.index"]
        outs.append({p.name: p.read_bytes() for p in (dest / "variables").iterdir()})
    assert outs[0] == outs[1]
    assert_exact(tf_read(tmp_path / "sm-1MiB", "savedmodel"), tree)


# ------------------------------------------------------------------------- model builder / DeepVariant

@pytest.fixture(scope="module")
def dv(tmp_path_factory) -> dict[str, Any]:
    """Small InceptionV3-style Keras model, Adam(use_ema=True), train_on_batch x2, checkpointed
    (see tf_sink_helper.op_make_dv): builder module, example_info.json, outputs of raw and EMA."""
    out = tmp_path_factory.mktemp("deepvariant")
    res = worker().call("make_dv", out=str(out))
    assert res["rc"] == 0, res["log"]
    assert res["res"]["ema_differs"], "EMA outputs equal the raw ones; the test would prove nothing"
    return {"dir": out, **res["res"]}


def _serve(dest: Path, dv: dict[str, Any], tmp_path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    out = tmp_path / "sig"
    res = worker().call("signature", path=str(dest), input=str(dv["dir"] / "sample.npy"), out=str(out))
    assert res["rc"] == 0, res["log"]
    return res["res"]["signature_defs"], _load_dump(out, res["res"]["index"])


def _assert_serves_ema(dest: Path, dv: dict[str, Any], tmp_path: Path) -> None:
    sigs, outs = _serve(dest, dv, tmp_path)
    assert "serving_default" in sigs, sigs  # what `saved_model_cli show --tag_set serve` lists
    (got,) = outs.values()
    ema, raw = np.load(dv["dir"] / "ema_out.npy"), np.load(dv["dir"] / "raw_out.npy")
    np.testing.assert_allclose(got, ema, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, raw, rtol=1e-4, atol=1e-5)


def test_deepvariant_builder_savedmodel_serves_the_ema_model(dv, tmp_path):
    """Checkpoint + example_info.json -> SavedModel with the builder's serving signature whose
    outputs are the EMA model's. EMA values are picked by explicit rules on the raw keys.
    TODO(mapping): switch to ``--prefer-ema --drop-optimizer`` alone once the lead wires it for
    this path (test_deepvariant_builder_with_prefer_ema checks what the flag does today)."""
    dest = tmp_path / "dv-sm"
    r = tf_cli("convert", dv["prefix"], dest, "--to", "savedmodel", "--model-builder", "dv_model:build",
               "--model-config", dv["config"], "--names", "keys", "--rules", dv["dir"] / "ema_rules.toml",
               "--max-memory", "2MiB", "--quiet", cwd=dv["dir"])
    assert r.returncode == 0, r.stderr.decode()
    _assert_serves_ema(dest, dv, tmp_path)


def test_deepvariant_builder_with_prefer_ema(dv, tmp_path):
    dest = tmp_path / "dv-sm"
    r = tf_cli("convert", dv["prefix"], dest, "--to", "savedmodel", "--model-builder", "dv_model:build",
               "--model-config", dv["config"], "--prefer-ema", "--drop-optimizer", "--quiet", cwd=dv["dir"])
    assert r.returncode == 0, r.stderr.decode()
    _assert_serves_ema(dest, dv, tmp_path)


def test_builder_reports_missing_and_unused_variables(dv, tmp_path):
    """Without --prefer-ema/--drop-optimizer the optimizer's tensors match no model variable;
    with a rule that drops a model variable it is reported missing. Both in one message."""
    dest = tmp_path / "bad"
    rules = tmp_path / "r.toml"
    rules.write_text("[[rules]]\nmatch = 'predictions/bias'\ndrop = true\n[[rules]]\nmatch = '.*'\n")
    r = tf_cli("convert", dv["prefix"], dest, "--to", "savedmodel", "--model-builder", "dv_model:build",
               "--model-config", dv["config"], "--rules", rules, cwd=dv["dir"])
    msg = r.stderr.decode()
    assert r.returncode == 1 and "model variable(s) get no converted tensor: predictions/bias" in msg, msg
    assert "match no model variable" in msg and "optimizer" in msg, msg
    assert not dest.exists()
    r = tf_cli("convert", dv["prefix"], dest, "--to", "savedmodel", "--model-builder", "no_such_module:build",
               cwd=dv["dir"])
    assert r.returncode == 2 and "no module 'no_such_module'" in r.stderr.decode()


def test_deepvariant_builder_tf_checkpoint_restores_into_the_model(dv, tmp_path):
    """--to tf-checkpoint with the builder: keys of tf.train.Checkpoint(model=...), one per
    variable; restoring it into a freshly built model gives the EMA model's outputs."""
    dest = tmp_path / "dv-ckpt"
    r = tf_cli("convert", dv["prefix"], dest, "--to", "tf-checkpoint", "--model-builder", "dv_model:build",
               "--model-config", dv["config"], "--prefer-ema", "--drop-optimizer", "--quiet", cwd=dv["dir"])
    assert r.returncode == 0, r.stderr.decode()
    got = tf_read(dest, "checkpoint")
    model_keys = [k for k in got if k != "save_counter/.ATTRIBUTES/VARIABLE_VALUE"]
    assert len(model_keys) == dv["variables"] and all(k.startswith("model/") for k in model_keys), sorted(got)[:5]
    res = worker().call("restore_builder", cwd=str(dv["dir"]), config=dv["config"], prefix=str(dest / "ckpt"),
                        input=str(dv["dir"] / "sample.npy"), out=str(tmp_path / "restored"))
    assert res["rc"] == 0, res["log"]
    out = _load_dump(tmp_path / "restored", res["res"]["index"])["out"]
    np.testing.assert_allclose(out, np.load(dv["dir"] / "ema_out.npy"), rtol=1e-5, atol=1e-6)


def test_names_that_cannot_be_nested_modules_are_refused_before_tensorflow_loads(tmp_path):
    """'a' is a tensor and a module holding 'a/b': refused with a message naming both, without
    importing TensorFlow (the check runs before the skeleton is built). Checked in a fresh process:
    libraries other tests use in this one (flax.training.checkpoints) import TensorFlow themselves."""
    src = tmp_path / "clash.npz"
    np.savez(src, **{"a": np.zeros(2, np.float32), "a/b": np.ones(3, np.float32),
                     "signatures/x": np.ones(1, np.float32)})
    code = ("import sys, shardconv\n"
            "try:\n    shardconv.convert(sys.argv[1], sys.argv[2], to='savedmodel')\n"
            "except shardconv.PlanError as e:\n    print(e)\n"
            "print('tensorflow' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "sm")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    message, tf_loaded = proc.stdout.strip().rsplit("\n", 1)
    assert "'a' is a tensor and also holds 'a/b'" in message and "'signatures' is reserved" in message, message
    assert tf_loaded == "False"
    assert not (tmp_path / "sm").exists()
