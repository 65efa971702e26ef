"""NPZ source and sink through the shared suites, plus NPZ-specific rules."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from procs import run_cli

import shardconv
from shardconv.errors import FormatError, ResumeError, UnsupportedError, UsageError
from shardconv.sources.npz import NpzSource, SplitNpzSource
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


class TestSplitNpzSink(SinkTests):
    """--max-file-size: several npz files and an index; every file byte-identical after resume."""

    label = "npz split (--max-file-size)"

    suffix = ""
    to = "npz"
    sink_options = {"max_file_size": 1 << 20}
    cli_flags = ["--max-file-size", "1MiB"]

    def snapshot(self, dest: Path) -> Any:
        """Every file's bytes, by name without DEST's own name (which the file names carry)."""
        stem = dest.name
        snap: dict[str, Any] = {p.name[len(stem):]: p.read_bytes() for p in sorted(dest.iterdir())}
        index = json.loads(snap.pop(".npz.index.json"))
        snap["index"] = (index["metadata"], {k: v[len(stem):] for k, v in index["weight_map"].items()})
        return snap

    def read_back(self, dest: Path) -> dict[str, np.ndarray]:
        index = json.loads(next(dest.glob("*.npz.index.json")).read_text())
        out: dict[str, np.ndarray] = {}
        for fname in sorted(set(index["weight_map"].values())):
            part = load_npz(dest / fname)  # each file on its own, as np.load reads it
            assert {n for n, f in index["weight_map"].items() if f == fname} == set(part)
            out.update(part)
        return out


class TestSplitNpzSource(SourceTests):
    def make(self, tmp_path):
        tree = reference_tree()
        write_reference_npz(tmp_path / "x.npz", tree)
        shardconv.convert(tmp_path / "x.npz", tmp_path / "split", to="npz", sink_options={"max_file_size": 1 << 20})
        return SplitNpzSource(tmp_path / "split"), tree


def test_split_files_follow_the_size_and_a_large_tensor_gets_its_own(tmp_path):
    tree = {"a": np.zeros((300, 1024), np.float32), "b": np.ones(100, np.int8),
            "huge": np.arange(3 << 18, dtype=np.float32), "c": np.full(7, 2.5, np.float64)}
    np.savez(tmp_path / "in.npz", **tree)
    shardconv.convert(tmp_path / "in.npz", tmp_path / "m.npz", sink_options={"max_file_size": 2 << 20})
    index = json.loads((tmp_path / "m.npz" / "m.npz.index.json").read_text())
    assert index["weight_map"] == {"a": "m-00001-of-00003.npz", "b": "m-00001-of-00003.npz",
                                   "huge": "m-00002-of-00003.npz", "c": "m-00003-of-00003.npz"}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tree.values())
    assert (tmp_path / "m.npz" / "m-00001-of-00003.npz").stat().st_size <= 2 << 20
    with SplitNpzSource(tmp_path / "m.npz" / "m.npz.index.json") as s:  # the index file works as the path too
        assert {t.name: s.read(t.name).tobytes() for t in s.tensors()} == {k: v.tobytes() for k, v in tree.items()}
    # a different size changes the layout: resuming a partial output with it is refused
    p = run_cli("convert", tmp_path / "in.npz", tmp_path / "r", "--to", "npz", "--max-file-size", "2MiB",
                "--max-memory", "1MiB", "--quiet", env={"SHARDCONV_TEST_KILL": "journal:2"})
    assert p.returncode == -9
    with pytest.raises(ResumeError, match="max_file_size"):
        shardconv.convert(tmp_path / "in.npz", tmp_path / "r", to="npz", sink_options={"max_file_size": 3 << 20})
    with pytest.raises(UsageError, match="1 MiB minimum"):
        shardconv.convert(tmp_path / "in.npz", tmp_path / "t", to="npz", sink_options={"max_file_size": 1000})


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


def test_very_compressible_savez_compressed_members_convert_exactly(tmp_path):
    """Zeros and ones deflate ~1000:1, so zlib takes in the last compressed bytes while
    it still holds output; that output is drained, not taken for a truncated member."""
    mixed = np.zeros(16 << 20, np.float32)
    mixed[::4097] = np.arange(mixed[::4097].size, dtype=np.float32)
    src = tmp_path / "c.npz"
    np.savez_compressed(src, zeros=np.zeros(256 << 20, np.uint8), ones=np.ones(16 << 20, np.float32), mixed=mixed)
    del mixed
    dest = tmp_path / "o.npz"
    shardconv.convert(src, dest, max_memory="16MiB")
    with np.load(src) as want, np.load(dest, mmap_mode="r") as got:
        assert sorted(got.files) == ["mixed", "ones", "zeros"]
        for k in got.files:
            w = want[k]
            assert got[k].dtype == w.dtype and np.array_equal(got[k], w), k
