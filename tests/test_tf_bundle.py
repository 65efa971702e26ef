"""The TF bundle reader: TF-written fixtures and the real checkpoints in tests/data."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import TESTDATA
from reference import load_reference, reference_prefix

import shardconv
from shardconv.errors import SourceError
from shardconv.sources.tf_bundle import TFBundleSource, resolve_prefix, slice_key
from shardconv.testing.source_suite import SourceTests

TF_SERVING = TESTDATA / "tf-serving"
T5X = TESTDATA / "t5x"


def _private_copy(fixture, tmp_path):
    """A copy of a session fixture that this test may change (SourceTests.mutate_input does)."""
    return shutil.copytree(fixture, tmp_path / fixture.name)


class TestTF1Dtypes(SourceTests):
    """tf.compat.v1 sharded Saver: every dtype, strings, partitioned variables, 3 shards."""

    @pytest.fixture(autouse=True)
    def _ckpt(self, tf1_dtypes_ckpt):
        self.dir = tf1_dtypes_ckpt

    def make(self, tmp_path):
        d = _private_copy(self.dir, tmp_path)
        return TFBundleSource(reference_prefix(d)), load_reference(d)


class TestTF2Keras(SourceTests):
    @pytest.fixture(autouse=True)
    def _ckpt(self, tf2_keras_ckpt):
        self.dir = tf2_keras_ckpt

    def make(self, tmp_path):
        d = _private_copy(self.dir, tmp_path)
        return TFBundleSource(reference_prefix(d)), load_reference(d)


class TestSavedModel(SourceTests):
    @pytest.fixture(autouse=True)
    def _ckpt(self, savedmodel_ckpt):
        self.dir = savedmodel_ckpt

    def make(self, tmp_path):
        # The SavedModel directory itself, not the variables prefix.
        d = _private_copy(self.dir, tmp_path)
        return TFBundleSource(d / "sm"), load_reference(d)


class TestExoticDtypes(SourceTests):
    """float8 variants, int4/int2 and quantized types, written by SaveV2."""

    @pytest.fixture(autouse=True)
    def _ckpt(self, exotic_dtypes_ckpt):
        self.dir = exotic_dtypes_ckpt

    def make(self, tmp_path):
        d = _private_copy(self.dir, tmp_path)
        return TFBundleSource(reference_prefix(d)), load_reference(d)


def _expected_bundles():
    return sorted(json.loads((TF_SERVING / "expected.json").read_text()).items())


@pytest.mark.parametrize("prefix,tensors", _expected_bundles(), ids=[p.split("/")[0] for p, _ in _expected_bundles()])
def test_tf_serving_bundles_match_tensorflow(prefix, tensors):
    with TFBundleSource(TF_SERVING / prefix) as s:
        listed = {t.name: t for t in s.tensors()}
        assert set(listed) == set(tensors)
        for name, want in tensors.items():
            t = listed[name]
            assert (t.dtype, list(t.shape)) == (want["dtype"], want["shape"])
            if t.is_string:
                assert len(s.read_strings(name)[0]) == want["len"]
            else:
                got = s.read(name).reshape(-1)
                assert got[: len(want["values"])].tolist() == want["values"]


def test_tf2_object_graph_string_tensor_reads_with_its_checksum():
    s = TFBundleSource(TF_SERVING / "saved_model_half_plus_two_tf2_cpu/00000123")
    (graph,) = s.read_strings("_CHECKPOINTABLE_OBJECT_GRAPH")
    assert len(graph) == 613


def test_mtf_two_shard_index_lists_like_tensorflow():
    want = json.loads((T5X / "mtf_tiny_t5" / "expected_listing.json").read_text())
    with TFBundleSource(T5X / "mtf_tiny_t5") as s:  # directory -> checkpoint state file
        got = {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in s.tensors()}
        assert got == want
        assert s.read("global_step").tolist() == 0  # in the shard that is present


def test_reading_from_the_absent_shard_is_a_clear_error():
    with TFBundleSource(T5X / "mtf_tiny_t5") as s:
        with pytest.raises(SourceError, match=r"data-00001-of-00002: data shard 1 of 2 is missing.*SelfAttention/k"):
            s.read("decoder/block_000/layer_000/SelfAttention/k")


def test_convert_from_the_absent_shard_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(SourceError, match="missing"):
        shardconv.convert(T5X / "mtf_tiny_t5", tmp_path / "o.npz")
    assert not (tmp_path / "o.npz").exists()


def test_resolve_prefix_accepts_every_way_of_pointing_at_a_checkpoint(tf2_keras_ckpt, savedmodel_ckpt):
    d = tf2_keras_ckpt
    assert resolve_prefix(d) == d / "ckpt-2"                    # follows the checkpoint state file
    assert resolve_prefix(d, step=1) == d / "ckpt-1"            # --step
    assert resolve_prefix(d / "ckpt-1.index") == d / "ckpt-1"   # the .index file
    assert resolve_prefix(d / "ckpt-1") == d / "ckpt-1"         # the prefix
    assert resolve_prefix(savedmodel_ckpt / "sm") == savedmodel_ckpt / "sm/variables/variables"
    assert resolve_prefix(savedmodel_ckpt / "sm/variables") == savedmodel_ckpt / "sm/variables/variables"
    with pytest.raises(SourceError, match="no checkpoint for step 9"):
        resolve_prefix(d, step=9)


def test_state_file_naming_a_missing_checkpoint_is_an_error(tmp_path, tf2_keras_ckpt):
    d = tmp_path / "ck"
    shutil.copytree(tf2_keras_ckpt, d)
    for p in d.glob("ckpt-2*"):
        p.unlink()
    with pytest.raises(SourceError, match="names checkpoint"):
        resolve_prefix(d)


def test_partition_slice_keys_match_tensorflow(tf1_dtypes_ckpt):
    """Our encoding of EncodeTensorNameSlice equals the keys TF wrote."""
    from shardconv.formats.sstable import SSTable

    prefix = reference_prefix(tf1_dtypes_ckpt)
    with SSTable(str(prefix) + ".index") as t:
        keys = {k for k, _ in t.items() if k[:1] == b"\x00"}
    assert slice_key("partitioned/rows", [(0, 4), (0, 4)]) in keys
    assert len(keys) == 3 + 2 + 2 + 3


def test_listing_reads_no_tensor_data(tf1_dtypes_ckpt, monkeypatch):
    import os

    calls = []
    real = os.preadv

    def counting(*a):
        calls.append(a)
        return real(*a)

    monkeypatch.setattr(os, "preadv", counting)
    shardconv.list_tensors(reference_prefix(tf1_dtypes_ckpt))
    assert calls == []


def test_every_fixture_tensor_converts_to_npz_exactly(tf1_dtypes_ckpt, tmp_path):
    from test_npz import load_npz

    ref = load_reference(tf1_dtypes_ckpt)
    r = shardconv.convert(reference_prefix(tf1_dtypes_ckpt), tmp_path / "o.npz", max_memory="1MiB")
    got = load_npz(tmp_path / "o.npz")
    arrays = {k: v for k, v in ref.items() if not isinstance(v, list)}
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k
    assert {n for n, _ in r.dropped} == {k for k, v in ref.items() if isinstance(v, list)}
    assert r.verified_units == len(TFBundleSource(reference_prefix(tf1_dtypes_ckpt)).units()) - 2  # 2 string units


@pytest.mark.parametrize("thing", [b"\xff", b"model.ckpt", 12, None, "a\x00b", ["x"]], ids=repr)
def test_the_probe_never_raises(thing):
    from shardconv.sources.tf_bundle import is_tf_bundle

    assert is_tf_bundle(thing) is False


def test_a_tf1_bundle_records_no_roles():
    with TFBundleSource(TF_SERVING / "saved_model_half_plus_two_cpu" / "00000123" / "variables" / "variables") as src:
        infos = src.tensors()
    assert infos and all(t.role is None and set(t.extra) == {"shard", "sliced"} for t in infos)


@pytest.mark.parametrize("enabled", [True, False])
def test_opening_leaves_the_garbage_collector_as_it_was(enabled, tmp_path):
    """The index is loaded with the cyclic GC paused (a quarter of a 100k-tensor listing's CPU);
    opening restores it, on or off, also when the index is refused."""
    import gc

    import tf_index_writer as w

    from shardconv.errors import FormatError

    (tmp_path / "bad.index").write_bytes(w.index([(b"", w.header()), (b"a", w.entry(1, [-3]))]))
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        with TFBundleSource(TF_SERVING / "saved_model_half_plus_two_cpu" / "00000123" / "variables" / "variables"):
            assert gc.isenabled() is enabled
        with pytest.raises(FormatError, match="negative dimension"):
            TFBundleSource(tmp_path / "bad")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
