"""Zarr output (TensorStore) and Zarr input through the shared suites, plus what is Zarr's own:
zarr-python and TensorStore read the same values, resume writes only missing chunks,
nothing looks complete early (locally and on S3), Orbax restores the orbax layout, and
the source refuses stores that point outside themselves or miss chunks."""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from procs import baseline_rss, peak_rss, run_cli, shardconv_cmd, tree_digest
from reference import load_reference, reference_prefix

import shardconv
from shardconv.core.types import TensorInfo
from shardconv.errors import BudgetError, DestinationError, FormatError, PlanError, SourceError, UnsupportedError
from shardconv.formats import zarr_dtypes
from shardconv.formats.regions import flat_boxes
from shardconv.sources.base import Source
from shardconv.sources.zarr import ZarrSource
from shardconv.testing.sink_suite import SinkTests, reference_tree, write_reference_npz
from shardconv.testing.source_suite import SourceTests
from shardconv.util.units import parse_size

ts = pytest.importorskip("tensorstore")
#: Zarr chunks (MiB) small enough that whole ones fit the 1 MiB budgets these tests use.
SMALL = 1 / 32
zarr = pytest.importorskip("zarr")
zarr_dtypes.register()  # zarr-python reads bfloat16 & co. only after this (see test_zarr_python_bf16)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    """Object-store runs keep their lock and journal here, not in the home directory."""
    monkeypatch.setenv("SHARDCONV_STATE_DIR", str(tmp_path / "state"))


def read_zarr_python(dest: Path | str) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(dest), mode="r")
    return {name: a[...] for name, a in g.arrays()} | {
        f"{gname}/{k}": v for gname, sub in g.groups() for k, v in read_zarr_python(Path(dest) / gname).items()}


def read_tensorstore(kvstore: dict[str, Any], names: list[str], fmt: int = 3) -> dict[str, np.ndarray]:
    out = {}
    for n in names:
        spec = {"driver": "zarr3" if fmt == 3 else "zarr",
                "kvstore": {**kvstore, "path": kvstore["path"] + n + "/"}, "fill_missing_data_reads": False}
        out[n] = ts.open(spec, read=True).result().read().result()
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        g = np.asarray(got[k])
        assert g.dtype == v.dtype and g.shape == v.shape, (k, g.dtype, g.shape, v.dtype, v.shape)
        assert g.tobytes() == v.tobytes(), k


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (inode, mtime_ns) of every file: a rewritten file gets a new inode."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def is_metadata(rel: str) -> bool:
    return Path(rel).name in ("zarr.json", ".zarray", ".zgroup", ".zattrs")


class ArraySource(Source):
    """In-memory arrays as a source (any dtype shardconv knows, float8 and int4 included)."""

    format = "arrays"

    def __init__(self, tree: dict[str, np.ndarray]) -> None:
        self.tree = tree

    @property
    def location(self) -> str:
        return "arrays"

    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(k, v.dtype.name, v.shape, v.nbytes) for k, v in self.tree.items()]

    def read_into(self, name: str, offset: int, out: memoryview) -> list:
        out[:] = self.tree[name].reshape(-1).view(np.uint8)[offset:offset + len(out)].data
        return []


# -- the shared sink suite ------------------------------------------------------------------


class TestZarrSinkV3(SinkTests):
    suffix = ".zarr"
    # Zarr chunks of 32 KiB: whole ones fit the suite's 1 MiB budget (the chunk grid never follows it)
    sink_options: dict[str, Any] = {"chunk_mib": 1 / 32}
    cli_flags = ["--chunk-mib", "0.03125"]

    def snapshot(self, dest: Path) -> Any:
        """Every file's bytes: the store is a pure function of the plan and the options."""
        if not dest.is_dir():
            return super().snapshot(dest)
        return {k.split("/", 1)[-1]: v for k, v in tree_digest(dest).items()}  # relative to DEST

    def read_back(self, dest: Path) -> dict[str, np.ndarray]:
        """zarr-python's values, checked equal to TensorStore's."""
        got = read_zarr_python(dest)
        fmt = int(self.sink_options.get("zarr_format", 3))
        assert_same(read_tensorstore({"driver": "file", "path": str(dest) + "/"}, list(got), fmt), got)
        return got


class TestZarrSinkV2Zstd(TestZarrSinkV3):
    label = "zarr v2 + zstd"
    sink_options = {"zarr_format": 2, "compression": "zstd", "chunk_mib": 1 / 32}
    cli_flags = ["--zarr-format", "2", "--compression", "zstd", "--chunk-mib", "0.03125"]
    # the shared suite's 22 kill points


# -- the shared source suite ----------------------------------------------------------------


def _zarr_python_store(path: Path, fmt: int, tree: dict[str, np.ndarray]) -> None:
    g = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    for name, v in tree.items():
        chunks = tuple(max(1, min(d, 7 if v.size < 10000 else 64)) for d in v.shape)  # edge chunks too
        # numcodecs' compressors cannot take bfloat16 buffers: zarr-python writes v2 uncompressed here
        a = g.create_array(name, shape=v.shape, dtype=v.dtype, chunks=chunks, config={"write_empty_chunks": True},
                           compressors=None if fmt == 2 else "auto")
        a[...] = v


class TestZarrSourceFromZarrPythonV3(SourceTests):
    fmt = 3

    def make(self, tmp_path):
        tree = reference_tree()
        _zarr_python_store(tmp_path / "x.zarr", self.fmt, tree)
        return ZarrSource(tmp_path / "x.zarr"), tree


class TestZarrSourceFromZarrPythonV2(TestZarrSourceFromZarrPythonV3):
    fmt = 2


class TestZarrSourceStreamedInTinyPieces(TestZarrSourceFromZarrPythonV3):
    """zarr-python's v3 chunks (zstd) decoded as streams in spans of 1000 bytes from fetches
    of 333: every region splits into many pieces and restarts decoders; v2 below
    (uncompressed) by pread."""

    @pytest.fixture(autouse=True)
    def tiny_pieces(self, monkeypatch):
        import shardconv.formats.chunkstream as cs

        monkeypatch.setattr(cs, "PIECE", 1000)
        monkeypatch.setattr(cs, "FETCH", 333)

    def make(self, tmp_path):
        src, tree = super().make(tmp_path)
        assert all(a.stream is not None for a in src._arrays.values())
        return src, tree


class TestZarrSourceV2StreamedInTinyPieces(TestZarrSourceStreamedInTinyPieces):
    fmt = 2


class TestZarrSourceFromShardconv(SourceTests):
    """Our own output: every tensor carries a CRC32 the source reports as a checksum unit."""

    def make(self, tmp_path):
        tree = reference_tree()
        write_reference_npz(tmp_path / "in.npz", tree)
        shardconv.convert(tmp_path / "in.npz", tmp_path / "x.zarr", max_memory="1MiB", sink_options={"chunk_mib": 0.02})
        src = ZarrSource(tmp_path / "x.zarr")
        assert set(src.units()) == set(tree)
        return src, tree


# -- Zarr specifics -----------------------------------------------------------------------


@pytest.fixture
def npz_in(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    tree = reference_tree()
    write_reference_npz(tmp_path / "in.npz", tree)
    return tmp_path / "in.npz", tree


def test_tf_checkpoint_to_zarr_equals_what_tensorflow_read(tf1_dtypes_ckpt, tmp_path):
    ref = load_reference(tf1_dtypes_ckpt)
    arrays = {k: v for k, v in ref.items() if not isinstance(v, list)}
    dest = tmp_path / "tf.zarr"
    r = shardconv.convert(reference_prefix(tf1_dtypes_ckpt), dest, max_memory="1MiB", sink_options={"chunk_mib": SMALL})
    assert {n for n, _ in r.dropped} == {k for k, v in ref.items() if isinstance(v, list)}
    got = read_zarr_python(dest)
    assert_same(got, arrays)
    assert_same(read_tensorstore({"driver": "file", "path": str(dest) + "/"}, list(arrays)), arrays)
    v = shardconv.verify(dest, reference_prefix(tf1_dtypes_ckpt))
    assert v["tensors"] == len(arrays) and v["checksums_verified"] == len(arrays)
    attrs = zarr.open_group(str(dest), mode="r")[sorted(arrays)[0]].attrs["shardconv"]
    assert {"name", "dtype", "crc32", "source_names", "source_dtypes", "source_checksums"} <= set(attrs)


def test_zarr_python_bf16_needs_registration_then_reads_exactly(npz_in, tmp_path):
    """zarr-python 3.1 knows no 'bfloat16' data type: it refuses the array (and listing its group)
    until shardconv.formats.zarr_dtypes.register(); then values are exact ml_dtypes.bfloat16."""
    from zarr.core.dtype import data_type_registry

    src, tree = npz_in
    for fmt in (3, 2):
        dest = tmp_path / f"bf{fmt}.zarr"
        shardconv.convert(src, dest, sink_options={"zarr_format": fmt})
        data_type_registry.unregister("bfloat16")
        try:
            with pytest.raises(ValueError, match="No Zarr data type found"):
                zarr.open_array(str(dest / "params/emb"), mode="r")
        finally:
            zarr_dtypes.register()
        got = zarr.open_array(str(dest / "params/emb"), mode="r")[...]
        assert got.dtype == ml_dtypes.bfloat16 and got.tobytes() == tree["params/emb"].tobytes()


def test_ml_dtypes_round_trip_through_tensorstore_and_zarr_python(tmp_path):
    rng = np.random.default_rng(1)
    tree = {f"x/{n}": rng.integers(-2, 2, size=(5, 3)).astype(getattr(ml_dtypes, n))
            for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
                      "int4", "int2")}
    tree["x/bf16"] = rng.standard_normal((4, 4)).astype(ml_dtypes.bfloat16)
    tree["x/u4"] = rng.integers(0, 15, size=(6,)).astype(ml_dtypes.uint4)  # stored as uint8
    shardconv.convert(ArraySource(tree), tmp_path / "m.zarr")
    with ZarrSource(tmp_path / "m.zarr") as src:
        assert_same({t.name: src.read(t.name) for t in src.tensors()}, tree)
    got = read_zarr_python(tmp_path / "m.zarr")
    assert got["x/u4"].dtype == np.uint8 and got.pop("x/u4").tobytes() == tree.pop("x/u4").tobytes()
    assert_same(got, tree)


def _chunk_files(src: Path, chunk_bytes: int, which: range) -> set[str]:
    """The Zarr chunk files (relative to the store) that engine chunks ``which`` write."""
    from shardconv.core.plan import chunk_plan, chunk_region
    from shardconv.sinks.zarr import V3_SEPARATOR, ZarrOptions, ZarrSink
    from shardconv.util.dtypes import itemsize

    sink = ZarrSink(ZarrOptions(chunk_mib=SMALL))
    outputs = shardconv.plan(src).outputs
    files = set()
    for c in [c for k, c in enumerate(chunk_plan(outputs, chunk_bytes, sink.chunk_grid)) if k in which]:
        o, grid = outputs[c.index], sink.chunk_grid(outputs[c.index])
        region = chunk_region(o.shape, itemsize(o.dtype), c.offset, c.length) if c.length else ()
        cells = [range(s.start // g, -(-s.stop // g)) for s, g in zip(region, grid)]
        files |= {o.name + "/" + V3_SEPARATOR.join(["c", *map(str, i)]) for i in itertools.product(*cells)} if c.length else set()
    return files


def test_sigkill_then_resume_writes_only_the_missing_chunks(npz_in, tmp_path):
    """Kill after chunk K is journaled (and after chunk K is written but not journaled): the
    resumed run keeps every chunk file of the journaled chunks, writes again those of chunks
    written but not journaled (the one at the kill, and any still in flight), and the store
    equals an uninterrupted run's file for file."""
    src, _ = npz_in
    clean = tmp_path / "clean.zarr"
    first = shardconv.convert(src, clean, max_memory="1MiB", sink_options={"chunk_mib": SMALL})
    n_chunks = first.chunks_written
    want = {k.split("/", 1)[1]: v for k, v in tree_digest(clean).items()}
    total = {k for k in want if not is_metadata(k)}
    for point, journaled in (("journal:12", 13), ("chunk:20", 20)):
        dest = tmp_path / f"out-{point.replace(':', '-')}.zarr"
        p = run_cli("convert", src, dest, "--max-memory", "1MiB", "--chunk-mib", str(SMALL), "--quiet", env={"SHARDCONV_TEST_KILL": point})
        assert p.returncode == -signal.SIGKILL, p.stderr
        partial = Path(str(dest) + ".partial") / dest.name
        before = files_under(partial)
        assert not dest.exists() and not [k for k in before if is_metadata(k)]  # nothing opens as Zarr yet
        r = shardconv.convert(src, dest, max_memory="1MiB", sink_options={"chunk_mib": SMALL})
        after = files_under(dest)
        kept = {k for k in before if after.get(k) == before[k]}
        written = {k for k in after if not is_metadata(k)} - kept
        # journaled chunks are kept; the chunk written but not journaled is written again
        assert _chunk_files(src, first.chunk_bytes, range(journaled)) <= kept, point
        if point.startswith("chunk"):
            at_kill = _chunk_files(src, first.chunk_bytes, range(journaled, journaled + 1))
            assert at_kill <= set(before) and not at_kill & kept, point
        assert (r.chunks_resumed, r.chunks_written) == (journaled, n_chunks - journaled), point
        assert written == total - kept, point  # every chunk file not kept was written once
        assert {k.split("/", 1)[1]: v for k, v in tree_digest(dest).items()} == want, point


def test_orbax_restores_the_orbax_layout_exactly(npz_in, tmp_path):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    ocp = pytest.importorskip("orbax.checkpoint")
    src, tree = npz_in
    for fmt in (3, 2):
        dest = tmp_path / f"ckpt{fmt}"
        shardconv.convert(src, dest, to="zarr", max_memory="1MiB", sink_options={"chunk_mib": SMALL, "layout": "orbax", "zarr_format": fmt})
        for restored in (ocp.StandardCheckpointer().restore(dest), ocp.PyTreeCheckpointer().restore(dest)):
            flat: dict[str, np.ndarray] = {}

            def walk(d: dict, prefix: str, flat: dict[str, np.ndarray] = flat) -> None:
                for k, v in d.items():
                    walk(v, f"{prefix}{k}/") if isinstance(v, dict) else flat.__setitem__(prefix + k, np.asarray(v))

            walk(restored, "")
            assert_same(flat, tree)
        assert shardconv.verify(dest, src)["checksums_verified"] == len(tree)


def test_cli_options_reach_the_store(npz_in, tmp_path):
    src, tree = npz_in
    dest = tmp_path / "c.zarr"
    p = run_cli("convert", src, dest, "--zarr-format", "2", "--compression", "blosc", "--chunk-mib", "0.25", "--quiet")
    assert p.returncode == 0, p.stderr
    meta = json.loads((dest / "params/big/.zarray").read_text())
    assert meta["compressor"]["id"] == "blosc" and meta["chunks"] == [64, 1024]
    assert_same(read_zarr_python(dest), tree)
    p = run_cli("convert", src, tmp_path / "x.npz", "--compression", "zstd", "--quiet")
    assert p.returncode == 2 and "does not take" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_names_that_cannot_be_a_hierarchy_are_refused(tmp_path):
    one: dict[str, Any] = {"a": np.zeros(2), "a/b": np.zeros(2)}
    np.savez(tmp_path / "in.npz", **one)
    with pytest.raises(PlanError, match="both a tensor and a group"):
        shardconv.convert(tmp_path / "in.npz", tmp_path / "o.zarr")
    two: dict[str, Any] = {"a.b/c": np.zeros(2), "a/b.c": np.zeros(2)}
    np.savez(tmp_path / "in2.npz", **two)
    with pytest.raises(PlanError, match="both map to array"):
        shardconv.convert(tmp_path / "in2.npz", tmp_path / "o2", to="zarr", sink_options={"layout": "orbax"})
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "o2").exists()


def test_source_refuses_missing_chunks_naming_the_array(npz_in, tmp_path):
    src, _ = npz_in
    dest = tmp_path / "m.zarr"
    shardconv.convert(src, dest, sink_options={"chunk_mib": 0.25})
    victim = sorted(p for p in (dest / "params/big").rglob("*")  # a chunk file, with either separator
                    if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs"))[3]
    victim.unlink()
    with pytest.raises(FormatError, match="'params/big'.*missing"):
        shardconv.verify(dest)
    with ZarrSource(dest, allow_missing_chunks=True) as s:
        assert s.read("params/big").shape == (512, 1024)


def test_source_refuses_metadata_pointing_outside_the_store(npz_in, tmp_path):
    src, _ = npz_in
    dest = tmp_path / "m.zarr"
    shardconv.convert(src, dest)
    outside = tmp_path / "elsewhere"
    shutil.copytree(dest / "params/dense", outside)
    os.symlink(outside, dest / "params/evil")
    with pytest.raises(FormatError, match="outside the store"):
        ZarrSource(dest)
    (dest / "params/evil").unlink()
    meta = json.loads((dest / "params/half/zarr.json").read_text())
    meta["attributes"]["shardconv"]["name"] = "../../etc/passwd"
    (dest / "params/half/zarr.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="unsafe tensor name"):
        ZarrSource(dest)
    meta["attributes"]["shardconv"]["name"] = "params/half"
    meta["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "/../"}}
    (dest / "params/half/zarr.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="chunk_key_encoding"):
        ZarrSource(dest)
    orbax = tmp_path / "ob"
    orbax.mkdir()
    (orbax / "_METADATA").write_text(json.dumps({"use_ocdbt": False, "tree_metadata": {
        "x": {"key_metadata": [{"key": "../../etc", "key_type": 2}]}}}))
    (orbax / "_CHECKPOINT_METADATA").write_text(json.dumps({"custom_metadata": {"shardconv": {}}}))
    with pytest.raises(FormatError, match="outside"):
        shardconv.verify(orbax)


@pytest.mark.filterwarnings("ignore")
def test_unsupported_zarr_dtypes_are_refused_naming_the_array(tmp_path):
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    g.create_array("names", shape=(2,), dtype="<U4")
    with pytest.raises(UnsupportedError, match="'names'"):
        ZarrSource(tmp_path / "s.zarr")


def test_flat_boxes_tile_any_element_range():
    shape = (3, 4, 5)
    idx = np.arange(60).reshape(shape)
    for lo, hi in [(0, 60), (7, 8), (3, 59), (20, 40), (19, 41), (0, 1), (59, 60)]:
        got = np.concatenate([idx[b].ravel() for b in flat_boxes(shape, lo, hi)])
        assert got.tolist() == list(range(lo, hi)) and len(flat_boxes(shape, lo, hi)) <= 5


def test_memory_destination_round_trip(npz_in):
    src, tree = npz_in
    url = "memory://shardconv-test/m.zarr"
    r = shardconv.convert(src, url, max_memory="1MiB", sink_options={"chunk_mib": SMALL, "compression": "zstd"})
    assert r.dest == url
    with pytest.raises(DestinationError, match="already exists"):
        shardconv.convert(src, url)
    assert shardconv.verify(url, src)["checksums_verified"] == len(tree)


# -- S3, against moto's server on 127.0.0.1 ------------------------------------------------


def _keys(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="shardconv-test", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _download(prefix: str, to: Path) -> Path:
    import boto3

    client = boto3.client("s3")
    for key in _keys(prefix):
        p = to / key
        p.parent.mkdir(parents=True, exist_ok=True)
        client.download_file("shardconv-test", key, str(p))
    return to / prefix.rstrip("/")


def test_s3_round_trip_read_by_tensorstore_zarr_python_and_verify(s3, npz_in, tmp_path):
    src, tree = npz_in
    url = "s3://shardconv-test/run1/model.zarr"
    r = shardconv.convert(src, url, max_memory="1MiB", sink_options={"chunk_mib": SMALL})
    assert r.dest == url and r.tensors == len(tree)
    kv = {"driver": "s3", "bucket": "shardconv-test", "path": "run1/model.zarr/", "endpoint": s3,
          "aws_region": "us-east-1"}
    assert_same(read_tensorstore(kv, list(tree)), tree)
    assert_same(read_zarr_python(_download("run1/model.zarr/", tmp_path / "dl")), tree)
    assert shardconv.verify(url, src)["checksums_verified"] == len(tree)
    assert ".shardconv.partial" not in {k.rsplit("/", 1)[-1] for k in _keys("run1/")}
    with pytest.raises(DestinationError, match="already exists"):
        shardconv.convert(src, url)
    shardconv.convert(src, url, overwrite=True, sink_options={"compression": "zstd"})
    assert shardconv.verify(url, src)["tensors"] == len(tree)


def test_s3_kill_leaves_nothing_complete_looking_and_resume_finishes(s3, npz_in, tmp_path):
    src, tree = npz_in
    url = "s3://shardconv-test/run2/model.zarr"
    p = run_cli("convert", src, url, "--max-memory", "1MiB", "--chunk-mib", str(SMALL), "--quiet", env={"SHARDCONV_TEST_KILL": "journal:9"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    keys = _keys("run2/")
    assert keys and "run2/model.zarr/.shardconv.partial" in keys
    assert not [k for k in keys if k.endswith(("zarr.json", ".zgroup", ".zarray"))]  # no array, no group yet
    with pytest.raises(SourceError):
        shardconv.verify(url)
    r = shardconv.convert(src, url, max_memory="1MiB", sink_options={"chunk_mib": SMALL})
    assert r.chunks_resumed == 10
    assert shardconv.verify(url, src)["checksums_verified"] == len(tree)
    assert "run2/model.zarr/.shardconv.partial" not in _keys("run2/")
    assert not list((tmp_path / "state").rglob("journal.jsonl"))  # local state released


def test_s3_errors_are_one_line_and_foreign_prefixes_are_refused(s3, npz_in):
    import boto3

    src, _ = npz_in
    with pytest.raises(DestinationError) as e:
        shardconv.convert(src, "s3://no-such-bucket-shardconv/x.zarr")
    assert "no-such-bucket-shardconv" in str(e.value) and "\n" not in str(e.value)
    boto3.client("s3").put_object(Bucket="shardconv-test", Key="theirs/data.bin", Body=b"x")
    with pytest.raises(DestinationError, match="did not write"):
        shardconv.convert(src, "s3://shardconv-test/theirs", to="zarr")
    assert _keys("theirs/") == ["theirs/data.bin"]


def test_destination_urls_map_to_kvstore_specs(monkeypatch):
    from shardconv.errors import UsageError
    from shardconv.formats.tsio import kvstore_spec

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert kvstore_spec("s3://b/p/m.zarr/") == {"driver": "s3", "bucket": "b", "path": "p/m.zarr/",
                                                "endpoint": "http://127.0.0.1:9", "aws_region": "eu-west-1",
                                                "aws_credentials": {"type": "environment"}}
    assert kvstore_spec("gs://b/m.zarr") == {"driver": "gcs", "bucket": "b", "path": "m.zarr/"}
    assert kvstore_spec("memory://x/m.zarr") == {"driver": "memory", "path": "x/m.zarr/"}
    assert kvstore_spec("file:///tmp/m.zarr") == {"driver": "file", "path": "/tmp/m.zarr/"}
    with pytest.raises(UsageError, match="bucket"):
        kvstore_spec("s3:///m.zarr")
    with pytest.raises(UsageError, match="scheme"):
        kvstore_spec("ftp://h/m.zarr")


def test_zarr_modules_import_neither_tensorstore_nor_zarr():
    code = ("import sys, shardconv.sinks.zarr, shardconv.sources.zarr, shardconv.formats.zarr_dtypes, shardconv.formats.tsio; "
            "print([m for m in ('tensorstore', 'zarr') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_engine_chunks_cover_whole_zarr_chunks():
    """With the sink's chunk grid, every engine chunk that can hold one Zarr chunk is a union of
    whole Zarr chunks: TensorStore never reads-modifies-writes and two workers never share one."""
    import math
    import random

    from shardconv.core.plan import Copy, OutputTensor, chunk_plan, chunk_region
    from shardconv.sinks.zarr import chunk_shape

    rng = random.Random(0)
    checked = 0
    for _ in range(600):
        shape = tuple(rng.choice([0, 1, 3, 7, 64, 1000, 4096, 10000]) for _ in range(rng.randint(0, 4)))
        if math.prod(shape) > 5e7:
            continue
        isz = rng.choice([1, 2, 4, 8])
        engine = rng.choice([65536, 73728, 102400, 1 << 20, 16 << 20])
        chunks = chunk_shape(shape, isz, rng.choice([1 << 15, 1 << 16, 4 << 20]))
        if math.prod(chunks) * isz > engine:
            continue  # refused before anything is written (test_a_budget_too_small_for_one_zarr_chunk...)
        checked += 1
        out = OutputTensor("x", {1: "uint8", 2: "float16", 4: "float32", 8: "float64"}[isz], shape, Copy("x"))
        def grid(_: OutputTensor, chunks: list[int] = chunks) -> list[int]:
            return chunks

        for c in chunk_plan([out], engine, grid):
            if c.length:
                for s, z, d in zip(chunk_region(shape, isz, c.offset, c.length), chunks, shape):
                    assert s.start % z == 0 and (s.stop % z == 0 or s.stop == d), (shape, isz, engine, chunks)
    assert checked > 200


def test_zarr_bytes_do_not_depend_on_the_budget_and_a_budget_too_small_is_refused(tmp_path):
    src = tmp_path / "in.npz"
    rng = np.random.default_rng(5)
    write_reference_npz(src, {"w": rng.standard_normal((2048, 1024)).astype(np.float32),
                              "b": rng.standard_normal(1024).astype(np.float32)})
    shardconv.convert(src, tmp_path / "a.zarr", max_memory="256MiB")
    shardconv.convert(src, tmp_path / "b.zarr", max_memory="64MiB")
    assert tree_digest(tmp_path / "a.zarr") == {k.replace("b.zarr", "a.zarr", 1): v
                                                for k, v in tree_digest(tmp_path / "b.zarr").items()}
    with pytest.raises(BudgetError) as e:
        shardconv.convert(src, tmp_path / "c.zarr", max_memory="16MiB")
    msg = str(e.value)
    assert "\n" not in msg and "'w'" in msg and "[1024, 1024]" in msg and "chunk_mib" in msg, msg
    found = re.search(r"at least ([0-9.]+ ?[KMG]i?B)", msg)
    assert found, msg
    need = parse_size(found.group(1).replace(" ", ""))
    assert need <= 64 << 20
    shardconv.convert(src, tmp_path / "c.zarr", max_memory=need)
    assert not (tmp_path / "c.zarr.partial").exists() and (tmp_path / "c.zarr").is_dir()


def test_tf_exotic_dtypes_to_zarr_read_back_exactly(exotic_dtypes_ckpt, tmp_path):
    """float8, int4/uint4, int2/uint2 and quantized types from a TF bundle, through Zarr."""
    ref = {k: v for k, v in load_reference(exotic_dtypes_ckpt).items() if not isinstance(v, list)}
    dest = tmp_path / "exotic.zarr"
    shardconv.convert(reference_prefix(exotic_dtypes_ckpt), dest, max_memory="1MiB", sink_options={"chunk_mib": SMALL})
    with ZarrSource(dest) as src:
        assert_same({t.name: src.read(t.name) for t in src.tensors()}, ref)
    assert shardconv.verify(dest, reference_prefix(exotic_dtypes_ckpt))["tensors"] == len(ref)


# -- chunks larger than the budget ----------------------------------------------------------

MiB = 1 << 20


def _one_chunk_arrays(path: Path, fmt: int, compressors: dict[str, Any]) -> dict[str, np.ndarray]:
    """Arrays of 48 MiB held in a single chunk each, written by zarr-python."""
    rng = np.random.default_rng(12)
    g = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    out = {}
    for name, comp in compressors.items():
        v = rng.integers(0, 1000, size=(3072, 4096), dtype=np.int32)  # compresses ~2:1
        g.create_array(name, shape=v.shape, dtype=v.dtype, chunks=v.shape, compressors=comp)[...] = v
        out[name] = v
    return out


@pytest.mark.parametrize("fmt", [3, 2])
def test_chunks_larger_than_the_budget_are_streamed_within_it(tmp_path, fmt):
    """A 48 MiB chunk through a 16 MiB budget, zstd and uncompressed: each chunk read once,
    in order, a few MiB at a time (RSS measured from outside the process)."""
    import numcodecs
    from zarr.codecs import ZstdCodec

    src = tmp_path / "big.zarr"
    want = _one_chunk_arrays(src, fmt, {"zstd": ZstdCodec() if fmt == 3 else numcodecs.Zstd(), "raw": None})
    for name in want:
        assert zarr.open_array(str(src / name), mode="r").nchunks == 1
    baseline = baseline_rss(src)
    rc, peak = peak_rss(shardconv_cmd("convert", src, tmp_path / "o.npz", "--max-memory", "16MiB", "--quiet"))
    assert rc == 0
    assert peak - baseline <= 16 * MiB, f"peak {peak / MiB:.0f} MiB, baseline {baseline / MiB:.0f} MiB"
    with np.load(tmp_path / "o.npz") as got:
        for name, v in want.items():
            assert np.array_equal(got[name], zarr.open_array(str(src / name), mode="r")[...]), name
            assert np.array_equal(got[name], v), name


def test_blosc_chunk_too_large_for_the_budget_is_refused_naming_the_minimum(tmp_path):
    """Blosc does not stream: a 48 MiB chunk (held decoded and encoded) does not fit 16 MiB.
    One line naming the array and the minimum, before any byte or lock; at that minimum it
    converts within the budget."""
    from zarr.codecs import BloscCodec

    src = tmp_path / "blosc.zarr"
    want = _one_chunk_arrays(src, 3, {"w": BloscCodec()})
    dest = tmp_path / "o.npz"
    p = run_cli("convert", src, dest, "--max-memory", "16MiB", "--quiet")
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "too small" in p.stderr and "'w'" in p.stderr and "48.0 MiB" in p.stderr
    assert not dest.exists() and not Path(str(dest) + ".partial").exists()
    minimum = p.stderr.split("at least ", 1)[1].split()[0]
    assert 96 * MiB < parse_size(minimum) <= 100 * MiB
    baseline = baseline_rss(src)
    rc, peak = peak_rss(shardconv_cmd("convert", src, dest, "--max-memory", minimum, "--quiet"))
    assert rc == 0 and peak - baseline <= parse_size(minimum)
    with np.load(dest) as got:
        assert np.array_equal(got["w"], want["w"])
