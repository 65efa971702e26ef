"""flax msgpack / t5x msgpack checkpoints, read lazily; values as flax's own reader gives them."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from conftest import TESTDATA
from test_npz import load_npz

import shardconv
from shardconv.errors import ShardconvError
from shardconv.sources.flax_msgpack import FlaxMsgpackSource
from shardconv.testing.source_suite import SourceTests

serialization = pytest.importorskip("flax.serialization")
T5X = TESTDATA / "t5x"


def flatten(tree, prefix=""):
    """'/'-joined leaves (big_vision convention), as flax restored them."""
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else None
    if items is None:
        return {prefix: tree}
    for k, v in items:
        out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def as_array(v):
    if isinstance(v, bool):
        return np.bool_(v)
    if isinstance(v, int):
        return np.int64(v)
    if isinstance(v, float):
        return np.float64(v)
    return np.asarray(v)


def _tree():
    rng = np.random.default_rng(0)
    return {"params": {"dense": {"kernel": rng.standard_normal((8, 5)).astype(np.float32),
                                 "bias": rng.standard_normal(5).astype(ml_dtypes.bfloat16)},
                       "layers": [rng.integers(-9, 9, (3,)).astype(np.int32), rng.standard_normal((2, 2))]},
            "step": 1234567890123, "scale": np.float32(0.5), "flag": True, "ema": {"decay": 0.999},
            "empty": np.zeros((0, 4), np.float16)}


class TestFlaxToBytes(SourceTests):
    def make(self, tmp_path):
        (tmp_path / "c.msgpack").write_bytes(serialization.to_bytes(_tree()))
        ref = {k: as_array(v) for k, v in flatten(serialization.msgpack_restore((tmp_path / "c.msgpack").read_bytes())).items()}
        return FlaxMsgpackSource(tmp_path / "c.msgpack"), ref


class TestFlaxChunkedArrays(SourceTests):
    """Arrays over flax's chunk limit are stored as chunk dicts; shrink the limit so flax writes them."""

    def make(self, tmp_path):
        mp = pytest.MonkeyPatch()
        mp.setattr(serialization, "MAX_CHUNK_SIZE", 64)
        try:
            tree = {"big": np.arange(100, dtype=np.float32).reshape(10, 10), "small": np.arange(4, dtype=np.int8)}
            (tmp_path / "c.msgpack").write_bytes(serialization.to_bytes(tree))
            restored = serialization.msgpack_restore((tmp_path / "c.msgpack").read_bytes())
        finally:
            mp.undo()
        return FlaxMsgpackSource(tmp_path / "c.msgpack"), {k: as_array(v) for k, v in flatten(restored).items()}


def test_real_t5x_msgpack_checkpoint_matches_expected_and_flax():
    path = T5X / "test_t5_tiny.checkpoint_0"
    expected = json.loads((T5X / "expected.json").read_text())["test_t5_tiny.checkpoint_0"]
    flax_values = {k: as_array(v) for k, v in flatten(serialization.msgpack_restore(path.read_bytes())).items()}
    with shardconv.open_source(path) as s:
        assert isinstance(s, FlaxMsgpackSource)
        listed = {t.name: t for t in s.tensors()}
        assert set(listed) == set(expected) == set(flax_values)
        for name, want in expected.items():
            t = listed[name]
            assert (t.dtype, list(t.shape)) == (want["dtype"], want["shape"]), name
            got = s.read(name)
            assert got.reshape(-1)[: len(want["values"])].tolist() == want["values"], name
            assert got.tobytes() == flax_values[name].astype(got.dtype).tobytes(), name


def test_t5x_msgpack_converts_to_npz_exactly(tmp_path):
    path = T5X / "test_t5_tiny.checkpoint_0"
    flax_values = {k: as_array(v) for k, v in flatten(serialization.msgpack_restore(path.read_bytes())).items()}
    shardconv.convert(path, tmp_path / "o.npz", max_memory="1MiB")
    got = load_npz(tmp_path / "o.npz")
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in flax_values.items()}


def _ext_array(shape, dtype, data: bytes, code=1) -> bytes:
    import msgpack

    payload = msgpack.packb((shape, dtype, data), use_bin_type=True)
    return msgpack.packb({"x": msgpack.ExtType(code, payload)}, use_bin_type=True)


CORRUPT = {
    "truncated": (lambda: serialization.to_bytes(_tree())[:-7], "truncated"),
    "deep nesting": (lambda: b"\x81\xa1a" * 200 + b"\xc0", "nesting deeper"),
    "huge declared bin": (lambda: b"\x81\xa1x\xc6\x7f\xff\xff\xff" + b"\0" * 10, "file ends"),
    "huge declared map": (lambda: b"\xdf\x7f\xff\xff\xff", "cannot fit"),
    "negative shape": (lambda: _ext_array((-1,), "float32", b"\0" * 4), "invalid shape"),
    "shape disagrees with bytes": (lambda: _ext_array((4,), "float32", b"\0" * 4), "holds 4"),
    "unknown ext code": (lambda: _ext_array((1,), "float32", b"\0" * 4, code=9), "unknown msgpack ext code 9"),
    "object dtype": (lambda: _ext_array((1,), "object", b"\0" * 8), "unsupported dtype"),
    "unsafe name": (lambda: __import__("msgpack").packb({"..": {"x": 1}}), "unsafe"),
    "invalid type byte": (lambda: b"\x81\xa1x\xc1", "invalid type byte"),
    "trailing bytes": (lambda: serialization.to_bytes({"a": 1}) + b"\0", "after the msgpack value"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_msgpack_gives_one_clear_error(tmp_path, case):
    make, message = CORRUPT[case]
    p = tmp_path / "c.msgpack"
    p.write_bytes(make())
    with pytest.raises(ShardconvError, match=message) as e:
        FlaxMsgpackSource(p)
    assert str(p) in str(e.value)


def test_float8_leaves_list_in_a_process_that_has_not_imported_ml_dtypes(tmp_path):
    """flax writes an array's dtype by name (``float8_e4m3fn``); NumPy knows that name only once
    ml_dtypes is imported, which shardconv defers. The listing must not depend on who imported it."""
    import subprocess
    import sys

    path = tmp_path / "fp8.msgpack"
    tree = {"w": np.arange(6, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).reshape(2, 3),
            "b": np.ones(3, ml_dtypes.bfloat16)}
    path.write_bytes(serialization.to_bytes(tree))
    code = ("import sys; from shardconv.sources import open_source; s = open_source(sys.argv[1]); "
            "print(sorted((t.name, t.dtype) for t in s.tensors())); print(s.read('w').tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listing, data = out.stdout.splitlines()
    assert listing == str([("b", "bfloat16"), ("w", "float8_e4m3fn")])
    assert data == tree["w"].tobytes().hex()
