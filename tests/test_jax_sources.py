"""JAX sources: in-memory pytrees (sharded jax.Arrays read shard by shard), Orbax
checkpoints (TensorStore-per-array and OCDBT layouts, step directories), t5x TensorStore
checkpoints, and big_vision-style npz, each against what the writing library holds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import pytest
from conftest import TESTDATA
from test_npz import load_npz

import shardconv
from shardconv.errors import FormatError, ShardconvError, SourceError, UnsupportedError
from shardconv.sources import open_source
from shardconv.sources.flax_msgpack import FlaxMsgpackSource
from shardconv.sources.jax_tree import JaxTreeSource, _plain_flatten, flatten_with_names
from shardconv.sources.orbax import OrbaxSource
from shardconv.sources.t5x import T5xSource
from shardconv.testing.source_suite import SourceTests

jax = pytest.importorskip("jax")
jnp = jax.numpy
ocp = pytest.importorskip("orbax.checkpoint")
msgpack = pytest.importorskip("msgpack")
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

T5X = TESTDATA / "t5x"
EXPECTED = json.loads((T5X / "expected.json").read_text())
needs_8_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                                                                    "(set by conftest before JAX starts)")


def host(tree: Any) -> dict[str, np.ndarray]:
    """'/'-named leaves as NumPy values (Python ints as int64, floats as float64, as stored)."""
    out = {}
    for name, v in flatten_with_names(tree):
        if isinstance(v, bool):
            v = np.bool_(v)
        elif isinstance(v, int):
            v = np.int64(v)
        elif isinstance(v, float):
            v = np.float64(v)
        out[name] = np.asarray(v)
    return out


def nested_tree() -> dict[str, Any]:
    rng = np.random.default_rng(6)
    return {
        "params": {
            "dense": {"kernel": rng.standard_normal((40, 24)).astype(np.float32),
                      "bias": jnp.asarray(rng.standard_normal(24), dtype=jnp.bfloat16)},
            "emb": jnp.asarray(rng.standard_normal((33, 8)), dtype=jnp.bfloat16),
            "layers": [rng.integers(-100, 100, (7, 3)).astype(np.int32), rng.integers(0, 9, (5,)).astype(np.int64)],
        },
        "opt": {"count": np.int32(12), "mu": jnp.zeros((4, 4), jnp.float32)},
        "step": 1234,
        "lr": np.float32(0.25),
    }


def _save(path: Path, tree: Any, **handler: Any) -> None:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**handler)) as ckptr:
        ckptr.save(path, tree)


def _mesh():
    return jax.make_mesh((4, 2), ("a", "b"))


def sharded_tree() -> dict[str, Any]:
    """Several NamedShardings over 8 CPU devices: split both ways, rows only, replicated,
    partially replicated, plus an uneven (non-divisible) single-device array and fp8."""
    mesh = _mesh()
    x = jnp.arange(64 * 12, dtype=jnp.float32).reshape(64, 12) / 7
    return {
        "both": jax.device_put(x, NamedSharding(mesh, P("a", "b"))),
        "rows": jax.device_put(x.astype(jnp.bfloat16), NamedSharding(mesh, P("a", None))),
        "replicated": jax.device_put(x[:8], NamedSharding(mesh, P())),
        "partial": jax.device_put(jnp.arange(6 * 8, dtype=jnp.int32).reshape(6, 8), NamedSharding(mesh, P(None, "b"))),
        "cube": jax.device_put(jnp.arange(8 * 4 * 8, dtype=jnp.float16).reshape(8, 4, 8), NamedSharding(mesh, P("b", None, "a"))),
        "odd": jnp.arange(7 * 5, dtype=jnp.float32).reshape(7, 5),
        "fp8": jnp.linspace(-4, 4, 24).astype(jnp.float8_e4m3fn).reshape(4, 6),
        "scalar": jax.device_put(jnp.float32(3.5), NamedSharding(mesh, P())),
    }


# -- Orbax ------------------------------------------------------------------------------


class TestOrbaxTensorStorePerArray(SourceTests):
    handler = {"use_ocdbt": False}

    def make(self, tmp_path):
        tree = nested_tree()
        _save(tmp_path / "ckpt", tree, **self.handler)
        return OrbaxSource(tmp_path / "ckpt"), host(tree)


class TestOrbaxOcdbt(TestOrbaxTensorStorePerArray):
    handler = {"use_ocdbt": True}


@needs_8_devices
class TestOrbaxManagerShardedOcdbtZarr3(SourceTests):
    """CheckpointManager steps (``ckpt/<step>/default``), sharded arrays (a chunk per shard), zarr3."""

    def make(self, tmp_path):
        tree = {k: v for k, v in sharded_tree().items() if k != "fp8"}
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)
        with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handler) as mgr:
            mgr.save(3, args=ocp.args.PyTreeSave({"x": np.zeros(2)}))
            mgr.save(7, args=ocp.args.PyTreeSave(tree))
            mgr.wait_until_finished()
        return open_source(tmp_path / "ckpt"), host(tree)


def test_orbax_steps_latest_or_chosen_and_items(tmp_path):
    for step, value in ((10, 1.0), (200, 2.0), (30, 3.0)):
        _save(tmp_path / "run" / str(step), {"w": np.full((3,), value, np.float32)})
    (tmp_path / "run" / "40.orbax-checkpoint-tmp-99").mkdir()  # unfinished save: ignored
    with open_source(tmp_path / "run") as s:
        assert isinstance(s, OrbaxSource) and s.location.endswith("200")
        assert s.read("w").tolist() == [2.0] * 3
    with open_source(tmp_path / "run", step=30) as s:
        assert s.read("w").tolist() == [3.0] * 3
    with pytest.raises(SourceError, match=r"no step 5 \(steps here: 10, 30, 200\)"):
        open_source(tmp_path / "run", step=5)
    # the CLI's --step reaches the source
    out = subprocess.run([sys.executable, "-m", "shardconv", "ls", str(tmp_path / "run"), "--step", "10", "--json"],
                         capture_output=True, text=True, check=True)
    assert [t["name"] for t in json.loads(out.stdout)] == ["w"]
    # two items in one step are listed under their item names
    with ocp.CheckpointManager(tmp_path / "mgr", item_names=("params", "opt")) as mgr:
        mgr.save(1, args=ocp.args.Composite(params=ocp.args.PyTreeSave({"w": np.ones(2, np.float32)}),
                                            opt=ocp.args.PyTreeSave({"m": np.zeros(3, np.int32)})))
        mgr.wait_until_finished()
    assert {t.name for t in shardconv.list_tensors(tmp_path / "mgr")} == {"params/w", "opt/m"}
    assert [t.name for t in OrbaxSource(tmp_path / "mgr", item="opt").tensors()] == ["m"]


def test_step_reaches_verify_and_is_refused_where_it_does_not_apply(tmp_path):
    for step, value in ((10, 1.0), (20, 2.0)):
        _save(tmp_path / "run" / str(step), {"w": np.full((3,), value, np.float32)})
    dest = tmp_path / "w.npz"
    shardconv.convert(tmp_path / "run", dest, step=10)
    assert np.load(dest)["w"].tolist() == [1.0] * 3
    shardconv.verify(dest, tmp_path / "run", step=10)
    with pytest.raises(shardconv.errors.VerifyError):
        shardconv.verify(dest, tmp_path / "run")  # latest step (20) holds other values
    # a single-file format has no steps: one line naming the flag, not a TypeError
    r = subprocess.run([sys.executable, "-m", "shardconv", "ls", str(dest), "--step", "3"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--step does not apply" in r.stderr


@pytest.mark.parametrize("ocdbt", [False, True])
def test_resume_refuses_an_orbax_checkpoint_rewritten_in_between(tmp_path, ocdbt):
    rng = np.random.default_rng(1)
    tree = {"a": rng.standard_normal((1024, 1024)).astype(np.float32), "b": np.arange(10, dtype=np.int32)}
    _save(tmp_path / "ckpt", tree, use_ocdbt=ocdbt)
    dest = tmp_path / "o.npz"
    r = subprocess.run([sys.executable, "-m", "shardconv", "convert", str(tmp_path / "ckpt"), str(dest),
                        "--max-memory", "1MiB", "--quiet"], env={**os.environ, "SHARDCONV_TEST_KILL": "journal:1"})
    assert r.returncode == -9
    chunk = max((p for p in (tmp_path / "ckpt").rglob("*") if p.is_file() and "_METADATA" not in p.name
                 and "manifest" not in p.name and not p.name.startswith(".z")), key=lambda p: p.stat().st_size)
    os.utime(chunk, ns=(chunk.stat().st_atime_ns, chunk.stat().st_mtime_ns + 10**9))  # the data was rewritten
    with pytest.raises(shardconv.errors.ResumeError, match="changed"):
        shardconv.convert(tmp_path / "ckpt", dest, max_memory="1MiB")
    shardconv.convert(tmp_path / "ckpt", dest, max_memory="1MiB", restart=True)
    assert load_npz(dest)["a"].tobytes() == tree["a"].tobytes()


def test_orbax_to_npz_and_zarr_equal_orbax_restore(tmp_path):
    tree = nested_tree()
    _save(tmp_path / "ckpt", tree, use_ocdbt=True)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as c:
        restored = host(c.restore(tmp_path / "ckpt"))
    shardconv.convert(tmp_path / "ckpt", tmp_path / "o.npz", max_memory="1MiB")
    got = load_npz(tmp_path / "o.npz")
    assert set(got) == set(restored)
    for k, v in restored.items():
        want = host(tree)[k]  # Orbax restores scalars as Python values; the stored dtype is the tree's
        assert got[k].dtype == want.dtype and got[k].tobytes() == want.tobytes() == v.astype(want.dtype).tobytes(), k
    shardconv.convert(tmp_path / "ckpt", tmp_path / "o.zarr", max_memory="1MiB")
    with open_source(tmp_path / "o.zarr") as z:
        assert {t.name: z.read(t.name).tobytes() for t in z.tensors()} == {k: v.tobytes() for k, v in got.items()}


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("ocdbt", [False, True])
def test_orbax_metadata_pointing_at_missing_array_is_one_clear_line(tmp_path, ocdbt):
    _save(tmp_path / "ckpt", {"a": np.ones(3, np.float32), "b": {"c": np.zeros(2)}}, use_ocdbt=ocdbt)
    meta = json.loads((tmp_path / "ckpt" / "_METADATA").read_text())
    entry = dict(meta["tree_metadata"]["('a',)"])
    entry["key_metadata"] = [{"key": "ghost", "key_type": 2}]
    meta["tree_metadata"]["('ghost',)"] = entry
    (tmp_path / "ckpt" / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"leaf 'ghost' .*has no array data: ghost/.zarray is missing") as e:
        OrbaxSource(tmp_path / "ckpt")
    assert str(tmp_path / "ckpt") in _one_line(e)
    r = subprocess.run([sys.executable, "-m", "shardconv", "convert", str(tmp_path / "ckpt"), str(tmp_path / "o.npz")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "ghost" in r.stderr, r.stderr


def test_orbax_damaged_inputs_give_one_line(tmp_path):
    _save(tmp_path / "ckpt", {"a": np.arange(6, dtype=np.float32)}, use_ocdbt=False)
    (tmp_path / "ckpt" / "a" / "0").unlink()  # the only chunk
    with OrbaxSource(tmp_path / "ckpt") as s, pytest.raises(FormatError, match="chunk '0' is missing") as e:
        s.read("a")
    assert "'a'" in _one_line(e)
    (tmp_path / "ckpt" / "_METADATA").write_text("{not json")
    with pytest.raises(FormatError, match="_METADATA: not valid JSON") as e:
        OrbaxSource(tmp_path / "ckpt")
    _one_line(e)
    meta = {"tree_metadata": {"x": {"key_metadata": [{"key": ".."}, {"key": "etc"}],
                                    "value_metadata": {"value_type": "np.ndarray"}}}}
    (tmp_path / "ckpt" / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="unsafe"):
        OrbaxSource(tmp_path / "ckpt")


# -- in-memory pytrees ------------------------------------------------------------------


class Pair(NamedTuple):
    first: Any
    second: Any


def mixed_tree() -> dict[str, Any]:
    """FrozenDict, a flax struct TrainState with optax state, NamedTuples, scalars, fp8, bf16."""
    import flax
    import optax
    from flax.training import train_state

    params = {"dense": {"kernel": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "bias": jnp.ones(4, jnp.bfloat16)}}
    state = train_state.TrainState.create(apply_fn=lambda *a: None, params=params, tx=optax.adam(1e-3))
    return {
        "state": state,
        "frozen": flax.core.FrozenDict({"z": np.arange(4, dtype=np.uint8), "a": np.float16(2)}),
        "pair": Pair(np.arange(3, dtype=np.int64)[::-1], (True, 2.5)),  # a reversed (strided) view
        "fp8": jnp.array([0.5, -1, 2], jnp.float8_e5m2),
        "int4": jnp.arange(-4, 4, dtype=jnp.int4).reshape(2, 4),  # packed on the device: sliced there
        "big_endian": np.arange(5, dtype=">i4"),
        "none": None,
    }


class TestJaxTreeMixed(SourceTests):
    def make(self, tmp_path):
        tree = mixed_tree()
        ref = host(tree)
        ref["big_endian"] = ref["big_endian"].astype("<i4")
        return JaxTreeSource(tree), ref


@needs_8_devices
class TestJaxTreeSharded(SourceTests):
    def make(self, tmp_path):
        tree = sharded_tree()
        return JaxTreeSource(tree), host(tree)


@needs_8_devices
class TestJaxTreeShardedDeviceSlicing(SourceTests):
    """The accelerator path (slice each shard on its device, copy the slice to the host),
    forced on CPU devices."""

    def make(self, tmp_path):
        tree = sharded_tree()
        src = JaxTreeSource(tree)
        src._slice_on_device = lambda data, idx: np.asarray(data[idx])
        for leaf in src._leaves.values():
            leaf.on_host = False
        return src, host(tree)


@needs_8_devices
def test_sharded_array_reads_each_distinct_shard_once_in_a_full_read():
    tree = sharded_tree()
    src = JaxTreeSource(tree)
    got = {t.name: t.extra.get("shards") for t in src.tensors()}
    # 8 devices: split 4x2 -> 8 distinct; rows over 'a' -> 4; replicated -> 1; over 'b' -> 2
    assert got == {"both": 8, "rows": 4, "replicated": 1, "partial": 2, "cube": 8, "odd": 1, "fp8": 1, "scalar": 1}
    seen = []
    src._slice_on_device = lambda data, idx: seen.append((id(data), idx)) or np.asarray(data[idx])
    for leaf in src._leaves.values():
        leaf.on_host = False
    src.read("rows")
    assert len(seen) == 4 and len({d for d, _ in seen}) == 4


@needs_8_devices
def test_pytree_converts_to_npz_and_zarr_with_the_python_api(tmp_path):
    tree = {**sharded_tree(), "mixed": mixed_tree()}
    want = host(tree)
    want["mixed/big_endian"] = want["mixed/big_endian"].astype("<i4")
    shardconv.convert(tree, tmp_path / "o.npz", max_memory="1MiB")
    got = load_npz(tmp_path / "o.npz")
    assert {k: (v.dtype, v.tobytes()) for k, v in got.items()} == {k: (v.dtype, v.tobytes()) for k, v in want.items()}
    shardconv.convert(tree, tmp_path / "o.zarr", max_memory="1MiB")
    with open_source(tmp_path / "o.zarr") as z:
        assert {t.name: z.read(t.name).tobytes() for t in z.tensors()} == {k: v.tobytes() for k, v in want.items()}


def test_plain_trees_flatten_like_jax_tree_util():
    tree = {"z": [np.arange(3), (np.float32(1), 2)], "a": Pair(np.ones(2), {"y": 1, "b": None}), "s": "x",
            "e": {}, "t": ()}
    mine = ["/".join(p) for p, _ in _plain_flatten(tree)]
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    theirs = ["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))) for k in path)
              for path, _ in flat]
    assert mine == theirs == ["a/first", "a/second/y", "s", "z/0", "z/1/0", "z/1/1"]


def test_pytree_leaf_problems_name_the_leaf():
    with pytest.raises(SourceError, match=r"leaf 'a/fn' is a builtins.function, not an array; pass non_arrays='drop'"):
        JaxTreeSource({"a": {"fn": lambda: 0, "w": np.ones(2)}})
    src = JaxTreeSource({"a": {"fn": lambda: 0, "w": np.ones(2)}}, non_arrays="drop")
    assert [t.name for t in src.tensors()] == ["a/w"] and src.skipped[0][0] == "a/fn"
    with pytest.raises(SourceError, match="both named 'a/b'"):
        JaxTreeSource({"a/b": np.ones(1), "a": {"b": np.ones(1)}})
    with pytest.raises(SourceError, match="unsafe|cannot be a tensor name"):
        JaxTreeSource({"..": np.ones(1)})
    with pytest.raises(UnsupportedError, match="leaf 'o'.*object"):
        JaxTreeSource({"o": np.array([{}], dtype=object)})
    with pytest.raises(UnsupportedError, match="leaf 'k'.*key_data"):
        JaxTreeSource({"k": jax.random.key(0)})
    with pytest.raises(SourceError, match="bare array has no name"):
        JaxTreeSource(np.ones(3))
    x = jnp.ones(3)
    x.delete()
    with pytest.raises(SourceError, match="leaf 'x'.*deleted"):
        JaxTreeSource({"x": x})
    # strings are listed as string tensors; the plan leaves them out with a reason
    src = JaxTreeSource({"name": "resnet", "w": np.ones(2, np.float32)})
    assert src.info("name").is_string and src.read_strings("name") == [b"resnet"]


def test_plain_numpy_tree_converts_without_importing_jax(tmp_path):
    # t5x's TensorStore checkpoints are read without JAX too (the real one in tests/data)
    t5x = f"""
        with shardconv.open_source({str(T5X / "tiny_t5")!r}) as s:
            s.read("optimizer/state/param_states/kernel")"""
    code = textwrap.dedent(f"""
        import sys, numpy as np, shardconv
        shardconv.convert({{"a": {{"b": np.arange(3.0)}}, "c": [np.int8(1)]}}, {str(tmp_path / "o.npz")!r}){t5x}
        print(sorted(m for m in ("jax", "flax", "orbax") if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
    assert set(load_npz(tmp_path / "o.npz")) == {"a/b", "c/0"}


RSS_CHILD = r"""
import os, sys, json, gc
import psutil, numpy as np, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import shardconv
mesh = jax.make_mesh((4, 2), ("a", "b"))
rows = int(sys.argv[2]) // (4096 * 4)
make = jax.jit(lambda: jnp.arange(rows * 4096, dtype=jnp.float32).reshape(rows, 4096),
               out_shardings=NamedSharding(mesh, P("a", "b")))
x = make()
x.block_until_ready()
tree = {"w": x, "small": jnp.ones(10)}
shardconv.convert({"w": jnp.ones(4)}, sys.argv[1] + "/warm.npz", max_memory="16MiB")  # imports, thread start
gc.collect()
print(psutil.Process().memory_info().rss, flush=True)
sys.stdin.readline()
shardconv.convert(tree, sys.argv[1] + "/o.npz", max_memory=sys.argv[3], fsync=False)
print("done", flush=True)
"""


@needs_8_devices
def test_sharded_array_larger_than_the_budget_converts_within_the_budget(tmp_path):
    """Peak RSS during the conversion, sampled from outside, grows by at most the budget,
    though the array is 8x the budget: it is never gathered into one host array."""
    import time

    import psutil

    array_bytes, budget = 256 << 20, 32 << 20
    (tmp_path / "warm").mkdir()
    proc = psutil.Popen([sys.executable, "-c", RSS_CHILD, str(tmp_path), str(array_bytes), str(budget)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    try:
        before = int(proc.stdout.readline())
        peak = proc.memory_info().rss
        proc.stdin.write("\n")
        proc.stdin.flush()
        while proc.poll() is None:
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.003)
        assert proc.wait() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    grew = peak - before
    print(f"RSS before {before >> 20} MiB, peak {peak >> 20} MiB, grew {grew >> 20} MiB")
    assert grew <= budget, f"peak RSS grew by {grew >> 20} MiB during the conversion (budget {budget >> 20} MiB)"
    rows = array_bytes // (4096 * 4)
    with np.load(tmp_path / "o.npz") as z:
        w = z["w"]
        assert w.shape == (rows, 4096) and w.dtype == np.float32
        for lo in range(0, rows, 2048):  # jnp.arange in float32 is iota: integers rounded to float32
            want = np.arange(lo * 4096, min(lo + 2048, rows) * 4096, dtype=np.int64).astype(np.float32)
            assert np.array_equal(w[lo:lo + 2048].reshape(-1), want), lo
        assert np.array_equal(z["small"], np.ones(10, np.float32))


# -- t5x ----------------------------------------------------------------------------------


def _check_expected(src, expected: dict[str, Any]) -> None:
    listed = {t.name: t for t in src.tensors()}
    assert set(listed) == set(expected)
    for name, want in expected.items():
        t = listed[name]
        assert (t.dtype, list(t.shape)) == (want["dtype"], want["shape"]), name
        got = src.read(name)
        assert got.reshape(-1)[: len(want["values"])].tolist() == want["values"], name
        assert float(got.astype(np.float64).sum()) == pytest.approx(want["sum"], rel=1e-6, abs=1e-9), name


@pytest.mark.parametrize("where", ["tiny_t5", "tiny_t5/checkpoint_1", "tiny_t5/checkpoint_1/checkpoint"])
def test_real_t5x_tensorstore_checkpoint_matches_expected(where, tmp_path):
    with open_source(T5X / where) as s:
        assert isinstance(s, T5xSource)
        _check_expected(s, EXPECTED["tiny_t5/checkpoint_1"])
    with open_source(T5X / "tiny_t5", step=1) as s:
        assert s.location.endswith("checkpoint_1/checkpoint")
    with pytest.raises(SourceError, match="no step 2"):
        open_source(T5X / "tiny_t5", step=2)


def test_real_t5x_checkpoints_convert_exactly(tmp_path):
    for key, path in (("tiny_t5/checkpoint_1", T5X / "tiny_t5"),
                      ("test_t5_tiny.checkpoint_0", T5X / "test_t5_tiny.checkpoint_0")):
        dest = tmp_path / (key.replace("/", "_") + ".npz")
        shardconv.convert(path, dest, max_memory="1MiB")
        got = load_npz(dest)
        with open_source(path) as s:
            _check_expected(s, EXPECTED[key])
            assert {k: (v.dtype.name, v.shape, v.tobytes()) for k, v in got.items()} == \
                   {t.name: (t.dtype, t.shape, s.read(t.name).tobytes()) for t in s.tensors()}


def _t5x_dir(tmp_path: Path, leaf: dict[str, Any], with_array: bool = True) -> Path:
    d = tmp_path / "checkpoint_5"
    d.mkdir()
    if with_array:
        import tensorstore as ts

        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(d / "target.w") + "/"},
                "metadata": {"shape": [6, 4], "chunks": [4, 4], "dtype": "<f4", "compressor": {"id": "gzip"}}}
        t = ts.open(spec, create=True).result()
        t.write(np.arange(24, dtype=np.float32).reshape(6, 4)).result()
    (d / "checkpoint").write_bytes(msgpack.packb({"version": 3, "target": {"w": leaf}}))
    return d


def test_t5x_spec_with_zarray_and_relative_gfile_path(tmp_path):
    d = _t5x_dir(tmp_path, {"driver": "zarr", "kvstore": {"driver": "gfile", "path": "target.w"}})
    with open_source(tmp_path) as s:
        assert s.read("target/w").tolist() == np.arange(24, dtype=np.float32).reshape(6, 4).tolist()
    assert d.exists()


@pytest.mark.parametrize("leaf, error, match", [
    ({"driver": "zarr", "kvstore": {"driver": "gfile", "path": "../outside"}}, FormatError, "leads outside"),
    ({"driver": "zarr", "kvstore": {"driver": "file", "path": "/etc"}}, FormatError, "leads outside"),
    ({"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": "b", "path": "x"}}, UnsupportedError, "'gcs'"),
    ({"driver": "json", "kvstore": {"driver": "file", "path": "x"}}, UnsupportedError, "driver 'json'"),
    ({"driver": "zarr", "kvstore": {"driver": "gfile", "path": "target.missing"}}, FormatError, "is missing"),
])
def test_t5x_hostile_or_broken_specs_are_refused(tmp_path, leaf, error, match):
    _t5x_dir(tmp_path, leaf)
    with pytest.raises(error, match=match) as e:
        open_source(tmp_path)
    assert "'target/w'" in _one_line(e)


def test_truncated_t5x_checkpoint_file_is_one_clear_line(tmp_path):
    d = _t5x_dir(tmp_path, {"driver": "zarr", "kvstore": {"driver": "gfile", "path": "target.w"}})
    raw = (d / "checkpoint").read_bytes()
    (d / "checkpoint").write_bytes(raw[:-5])
    with pytest.raises(FormatError, match="truncated") as e:
        open_source(d)
    assert str(d / "checkpoint") in _one_line(e)


def test_flax_to_bytes_of_a_train_state_reads_back_exactly(tmp_path):
    """flax.serialization.to_bytes of a TrainState (FrozenDict params, optax state)."""
    from flax import serialization

    state = mixed_tree()["state"]
    (tmp_path / "s.msgpack").write_bytes(serialization.to_bytes(state))
    want = {k: np.asarray(v) for k, v in flatten_with_names(serialization.to_state_dict(state))}
    with open_source(tmp_path / "s.msgpack") as s:
        assert isinstance(s, FlaxMsgpackSource)
        got = {t.name: s.read(t.name) for t in s.tensors()}
    assert {k: (v.dtype, v.tobytes()) for k, v in got.items()} == {k: (v.dtype, v.tobytes()) for k, v in want.items()}


# -- big_vision npz -------------------------------------------------------------------------


def test_big_vision_npz_with_bf16_converts_to_npz_and_zarr(tmp_path):
    rng = np.random.default_rng(1)
    flat = {"params/embedding/kernel": rng.standard_normal((16, 3, 3, 8)).astype(ml_dtypes.bfloat16),
            "params/head/bias": rng.standard_normal(10).astype(ml_dtypes.bfloat16),
            "params/head/kernel": rng.standard_normal((8, 10)).astype(np.float32),
            "step": np.array(99, np.int32)}
    np.savez(tmp_path / "bv.npz", **flat)  # bfloat16 is written as <V2
    with np.load(tmp_path / "bv.npz") as z:
        assert z["params/head/bias"].dtype.kind == "V"
    shardconv.convert(tmp_path / "bv.npz", tmp_path / "o.npz", max_memory="1MiB")
    got = load_npz(tmp_path / "o.npz")
    assert {k: (v.dtype, v.tobytes()) for k, v in got.items()} == {k: (v.dtype, v.tobytes()) for k, v in flat.items()}
    shardconv.convert(tmp_path / "bv.npz", tmp_path / "o.zarr", max_memory="1MiB")
    with open_source(tmp_path / "o.zarr") as z:
        assert {t.name: (t.dtype, z.read(t.name).tobytes()) for t in z.tensors()} == \
               {k: (v.dtype.name, v.tobytes()) for k, v in flat.items()}


# -- chunk streams (Zarr v2 chunks decoded piece by piece) -------------------------------------


STREAM_ARRAYS = {  # name: (shape, chunks, dtype, compressor, fill_value, values)
    "zstd_edges": ((37, 29), (8, 7), "<f4", {"id": "zstd", "level": 1}, None, "random"),
    "gzip_3d_bf16": ((5, 6, 7), (2, 4, 3), "bfloat16", {"id": "gzip", "level": 1}, None, "random"),
    "raw_int64": ((100,), (30,), "<i8", None, None, "random"),
    "zlib_f16": ((9, 9), (4, 4), "<f2", {"id": "zlib", "level": 1}, None, "random"),
    "scalar": ((), (), "<i4", {"id": "zstd", "level": 3}, None, "random"),
    "sparse_fill": ((12, 10), (4, 5), "<f4", {"id": "zstd", "level": 1}, 1.5, "sparse"),
    "blosc_by_tensorstore": ((6, 4), (4, 4), "<u2", {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1},
                             None, "random"),
}


def _stream_checkpoint(d: Path) -> dict[str, np.ndarray]:
    """A t5x-style checkpoint whose arrays TensorStore writes with many chunk layouts and codecs."""
    import tensorstore as ts

    rng = np.random.default_rng(3)
    d.mkdir()
    ref, leaves = {}, {}
    for name, (shape, chunks, dt, comp, fill, kind) in STREAM_ARRAYS.items():
        npdt = np.dtype(ml_dtypes.bfloat16) if dt == "bfloat16" else np.dtype(dt)
        v = (rng.standard_normal(shape) * 100).astype(npdt)
        if kind == "sparse":
            v = np.full(shape, fill, npdt)
            v[5:7, 1:3] = 2.0  # one stored chunk; the others equal the fill value and are not written
        md = {"shape": list(shape), "chunks": list(chunks), "dtype": dt, "compressor": comp, "fill_value": fill}
        t = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(d / f"target.{name}") + "/"},
                     "metadata": md}, create=True).result()
        t.write(v).result()
        leaves[name] = {"driver": "zarr", "kvstore": {"driver": "gfile", "path": f"target.{name}"}}
        ref[f"target/{name}"] = v
    # one array whose metadata lives only in the spec (no .zarray), as in the real tiny_t5
    (d / "target.zstd_edges" / ".zarray").unlink()
    leaves["zstd_edges"]["metadata"] = {"shape": [37, 29], "chunks": [8, 7], "compressor": {"id": "zstd", "level": 1}}
    leaves["zstd_edges"]["dtype"] = "float32"
    (d / "checkpoint").write_bytes(msgpack.packb({"target": leaves}))
    return ref


class TestT5xChunkStreams(SourceTests):
    def make(self, tmp_path):
        ref = _stream_checkpoint(tmp_path / "checkpoint_1")
        src = T5xSource(tmp_path)
        streamed = {n for n, leaf in src._leaves.items() if leaf.external.stream is not None}
        assert streamed == set(ref) - {"target/blosc_by_tensorstore"}
        return src, ref


class TestT5xChunkStreamsInTinyPieces(TestT5xChunkStreams):
    """Spans of 24 bytes: every region splits into many pieces, and into rows of rows."""

    @pytest.fixture(autouse=True)
    def tiny_pieces(self, monkeypatch):
        import shardconv.formats.chunkstream as cs

        monkeypatch.setattr(cs, "PIECE", 24)
        monkeypatch.setattr(cs, "FETCH", 16)


class TestT5xChunkStreamsDecodedByFourThreads(TestT5xChunkStreams):
    """Reads spanning several chunks decode them on 4 threads (whatever this machine has),
    in tiny pieces so the threads interleave a lot."""

    @pytest.fixture(autouse=True)
    def four_threads(self, monkeypatch):
        import shardconv.formats.chunkstream as cs

        monkeypatch.setattr(cs, "WORKERS", 4)
        monkeypatch.setattr(cs, "PIECE", 64)
        monkeypatch.setattr(cs, "FETCH", 32)


def test_corrupt_or_truncated_chunk_is_one_clear_line(tmp_path):
    _stream_checkpoint(tmp_path / "checkpoint_1")
    chunk = tmp_path / "checkpoint_1" / "target.gzip_3d_bf16" / "0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:-9])
    with T5xSource(tmp_path) as s, pytest.raises(FormatError, match=r"chunk '0.0.0'.*(truncated|corrupt)") as e:
        s.read("target/gzip_3d_bf16")
    assert "target.gzip_3d_bf16" in _one_line(e)
    chunk = tmp_path / "checkpoint_1" / "target.raw_int64" / "1"
    chunk.write_bytes(b"\x00" * 7)
    with T5xSource(tmp_path) as s, pytest.raises(FormatError, match=r"chunk '1'.*truncated"):
        s.read("target/raw_int64")


def test_fuzzed_chunks_give_shardconv_errors_only(tmp_path):
    """Random byte edits and cuts of zstd / gzip / raw chunks: a value or a ShardconvError, nothing else."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ref = _stream_checkpoint(tmp_path / "checkpoint_1")
    chunks = {name: tmp_path / "checkpoint_1" / f"target.{name}" / key
              for name, key in (("zstd_edges", "1.2"), ("gzip_3d_bf16", "1.0.1"), ("raw_int64", "2"))}
    originals = {n: p.read_bytes() for n, p in chunks.items()}

    @settings(max_examples=int(os.environ.get("SHARDCONV_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(name=st.sampled_from(sorted(chunks)), edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                                                                max_size=6),
           cut=st.one_of(st.none(), st.integers(0, 200)))
    def fuzz(name, edits, cut):
        b = bytearray(originals[name])
        for pos, val in edits:
            b[pos % len(b)] = val
        chunks[name].write_bytes(bytes(b[:cut] if cut is not None else b))
        try:
            with T5xSource(tmp_path) as s:
                assert s.read(f"target/{name}").shape == ref[f"target/{name}"].shape
        except ShardconvError as e:
            assert "\n" not in str(e)
        finally:
            chunks[name].write_bytes(originals[name])

    fuzz()
