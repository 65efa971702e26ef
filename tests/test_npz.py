"""NPZ source and sink through the shared suites, plus NPZ-specific rules."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import shardconv
from shardconv.errors import FormatError, UnsupportedError
from shardconv.sources.npz import NpzSource
from shardconv.testing.sink_suite import SinkTests, reference_tree, write_reference_npz
from shardconv.testing.source_suite import SourceTests


def load_npz(dest: Path) -> dict[str, np.ndarray]:
    """np.load, with true dtypes from the manifest (bfloat16 is stored as |V2)."""
    manifest = json.loads(Path(str(dest) + ".shardconv.json").read_text())
    dtypes = {t["name"]: t["dtype"] for t in manifest["tensors"]}
    with np.load(dest, allow_pickle=False) as z:
        out = {}
        for k in z.files:
            v = z[k]
            if v.dtype.kind == "V":
                v = v.view(getattr(ml_dtypes, dtypes[k]))
            out[k] = v
        return out


class TestNpzSink(SinkTests):
    suffix = ".npz"

    def read_back(self, dest: Path) -> dict[str, np.ndarray]:
        return load_npz(dest)


class TestNpzSourceFromNumpy(SourceTests):
    def make(self, tmp_path):
        tree = reference_tree()
        write_reference_npz(tmp_path / "x.npz", tree)
        return NpzSource(tmp_path / "x.npz"), tree


class TestNpzSourceCompressed(SourceTests):
    def make(self, tmp_path):
        tree = reference_tree()
        np.savez_compressed(tmp_path / "x.npz", **tree)
        return NpzSource(tmp_path / "x.npz"), tree


def test_output_is_a_valid_zip64_with_fixed_timestamps(tmp_path):
    write_reference_npz(tmp_path / "in.npz", reference_tree())
    shardconv.convert(tmp_path / "in.npz", tmp_path / "o.npz")
    with zipfile.ZipFile(tmp_path / "o.npz") as z:
        assert z.testzip() is None
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.date_time == (1980, 1, 1, 0, 0, 0)


def test_big_vision_load_checkpoint_np_reads_the_output(tmp_path):
    """big_vision's loader: np.load, unflatten '/'-names, view |V2 as bfloat16."""
    tree = reference_tree()
    write_reference_npz(tmp_path / "in.npz", tree)
    shardconv.convert(tmp_path / "in.npz", tmp_path / "o.npz")
    with np.load(tmp_path / "o.npz", allow_pickle=False) as npz:
        keys, values = zip(*list(npz.items()))

    def recover_dtype(a):  # big_vision.utils.recover_dtype
        if hasattr(a, "dtype") and a.dtype.type is np.void:
            assert a.itemsize == 2, "Unknown dtype!"
            return a.view(ml_dtypes.bfloat16)
        return a

    nested: dict = {}
    for k, v in zip(keys, values):
        *path, leaf = k.split("/")
        d = nested
        for p in path:
            d = d.setdefault(p, {})
        d[leaf] = recover_dtype(v)
    assert nested["params"]["emb"].dtype == ml_dtypes.bfloat16
    assert nested["params"]["emb"].tobytes() == tree["params/emb"].tobytes()
    assert nested["params"]["dense"]["kernel"].tobytes() == tree["params/dense/kernel"].tobytes()


def test_pickled_member_is_refused(tmp_path):
    np.savez(tmp_path / "p.npz", ok=np.arange(3), bad=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UnsupportedError, match="pickled"):
        NpzSource(tmp_path / "p.npz")


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/../../b", "a//b", "./x"])
def test_unsafe_member_names_are_refused(tmp_path, name):
    with zipfile.ZipFile(tmp_path / "u.npz", "w") as z:
        with z.open(name + ".npy", "w") as f:
            np.lib.format.write_array(f, np.arange(3))
    with pytest.raises(FormatError, match="unsafe"):
        NpzSource(tmp_path / "u.npz")


def test_header_shape_disagreeing_with_member_size_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "s.npz", "w") as z:
        with z.open("x.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2**31,)})
            f.write(b"\0" * 16)
    with pytest.raises(FormatError, match="holds"):
        NpzSource(tmp_path / "s.npz")
