"""Orbax OCDBT checkpoints read by pread through the OCDBT index (``formats.ocdbt_index``):
chunks located from the B+tree TensorStore itself dumps, read straight from the data files,
checked exactly against Orbax's own restore; multi-level B+trees written by TensorStore;
references outside the checkpoint, missing data files and huge databases."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardconv.errors import FormatError
from shardconv.formats import chunkstream, ocdbt_index
from shardconv.formats.ocdbt_index import OcdbtIndex, parse_reference
from shardconv.sources.orbax import OrbaxSource
from shardconv.testing.source_suite import SourceTests

jax = pytest.importorskip("jax")
ocp = pytest.importorskip("orbax.checkpoint")
ts = pytest.importorskip("tensorstore")
ml_dtypes = pytest.importorskip("ml_dtypes")
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402


def _tree() -> dict:
    """Arrays whose chunks (one per shard) are stored out of line (> 1 KiB), and small ones
    stored inline in the B+tree; float32, bfloat16, int32, a partially replicated array."""
    rng = np.random.default_rng(3)
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("d",))
    rows = jax.device_put(rng.standard_normal((8 * n, 300)).astype(np.float32), NamedSharding(mesh, P("d")))
    cols = jax.device_put(rng.standard_normal((100, 16 * n)).astype(ml_dtypes.bfloat16),
                          NamedSharding(mesh, P(None, "d")))
    return {"params": {"rows": rows, "cols": cols,
                       "whole": rng.integers(-9, 9, (700, 3)).astype(np.int32),
                       "tiny": np.arange(5, dtype=np.float32)},
            "step": np.int32(7)}


def _save_standard(path: Path) -> dict[str, np.ndarray]:
    """Save with ``StandardCheckpointer``'s defaults (OCDBT, zstd); return Orbax's restore."""
    with ocp.StandardCheckpointer() as c:
        c.save(path, _tree())
    with ocp.StandardCheckpointer() as c:
        restored = c.restore(path)
    flat, _ = jax.tree_util.tree_flatten_with_path(restored)
    return {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in flat}


class TestOrbaxStandardOcdbtByPread(SourceTests):
    """Every chunk read from the data files: the kvstore is never opened for chunks."""

    @pytest.fixture(autouse=True)
    def no_kvstore_chunk_reads(self, monkeypatch):
        def refuse(*a, **k):
            raise AssertionError("a chunk was read through the OCDBT kvstore")
        monkeypatch.setattr(chunkstream.StreamReader, "_kvstore", refuse)

    def make(self, tmp_path):
        ref = _save_standard(tmp_path / "ckpt")
        src = OrbaxSource(tmp_path / "ckpt")
        assert all(a.stream is not None and a.stream.index is not None for a in src._arrays.values())
        assert src.baseline_bytes() >= ocdbt_index.index_bytes(len(src._arrays))
        return src, ref


class TestOrbaxStandardOcdbtByPreadInTinyPieces(TestOrbaxStandardOcdbtByPread):
    """Fetches of 40 bytes and spans of 56, decoded on 4 threads: many preads per value,
    decoders reused across chunks."""

    @pytest.fixture(autouse=True)
    def tiny(self, monkeypatch):
        monkeypatch.setattr(chunkstream, "PIECE", 56)
        monkeypatch.setattr(chunkstream, "FETCH", 40)
        monkeypatch.setattr(chunkstream, "WORKERS", 4)


@pytest.mark.parametrize("why", ["over the index limit", "no ocdbt.dump in this TensorStore"])
def test_without_an_index_chunks_are_read_through_the_kvstore(tmp_path, monkeypatch, why):
    ref = _save_standard(tmp_path / "ckpt")
    if why == "over the index limit":
        monkeypatch.setattr(ocdbt_index, "MAX_INDEX_BYTES", 4 * ocdbt_index.PER_KEY)
    else:
        monkeypatch.delattr(ts.ocdbt, "dump")
    src = OrbaxSource(tmp_path / "ckpt")
    with src:
        assert all(a.stream is not None and a.stream.index is None for a in src._arrays.values())
        for name, want in ref.items():
            assert src.read(name).tobytes() == want.tobytes(), name


def test_a_missing_data_file_is_one_clear_line(tmp_path):
    _save_standard(tmp_path / "ckpt")
    loc = OcdbtIndex(tmp_path / "ckpt").locate("params.rows/0.0")
    assert isinstance(loc, tuple)
    Path(loc[0]).unlink()
    with OrbaxSource(tmp_path / "ckpt") as src, pytest.raises(FormatError) as e:
        src.read("params/rows")
    msg = str(e.value)
    assert "\n" not in msg and "OCDBT data file" in msg and "missing" in msg and "params.rows" in msg


def test_references_outside_the_database_are_refused(tmp_path):
    root = str(tmp_path)
    assert parse_reference("value:ocdbt.process_0/:d/ab%3A:5:7", root, "x") == (f"{root}/ocdbt.process_0/d/ab:", 5, 7)
    for ref in ("value::../x:0:1", "value:..%2F:x:0:1", "value::%2Fetc%2Fpasswd:0:1", "value:::0:1",
                "value::d/x:1", "value::d/x:a:1"):
        with pytest.raises(FormatError, match="refused|bad OCDBT data reference"):
            parse_reference(ref, root, "x")


def test_multi_level_btree_written_by_tensorstore(tmp_path):
    """Small nodes force interior nodes; every key's located bytes equal TensorStore's read,
    inline and out-of-line values alike; absent keys are None."""
    spec = {"driver": "ocdbt", "base": f"file://{tmp_path}/db/",
            "config": {"max_decoded_node_bytes": 512, "max_inline_value_bytes": 16}}
    kv = ts.KvStore.open(spec).result()
    rng = np.random.default_rng(1)
    want = {f"a{i:03d}/{j}": rng.bytes(int(rng.integers(0, 60))) for i in range(40) for j in range(3)}
    for f in [kv.write(k, v) for k, v in want.items()]:
        f.result()
    kv["a000/late"] = b"written in a second version" * 3
    want["a000/late"] = b"written in a second version" * 3
    ix = OcdbtIndex(tmp_path / "db")
    root = ts.ocdbt.dump(ts.KvStore.open(f"file://{tmp_path}/db/").result()).result()
    assert root["versions"][-1]["root_height"] > 0  # interior nodes were walked
    assert ix.n_keys() == len(want)
    inline = 0
    for k, v in want.items():
        loc = ix.locate(k)
        if isinstance(loc, bytes):
            inline += 1
            got = loc
        else:
            assert loc is not None, k
            path, off, n = loc
            with open(path, "rb") as f:
                f.seek(off)
                got = f.read(n)
        assert got == v == kv[k], k
    assert 0 < inline < len(want)
    assert ix.locate("a000/nope") is None and ix.locate("") is None


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 2), (3, 2), (4, 3), (16, 8), (64, 8)])
def test_decoding_threads_use_a_second_core_where_there_is_one(monkeypatch, cores, threads):
    monkeypatch.setattr(chunkstream.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert chunkstream._default_workers() == threads
