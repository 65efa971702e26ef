"""The TF-written fixtures are what they claim to be (and TF stays out of pytest)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from reference import (
    load_reference,
    load_reference_index,
    numpy_dtype,
    reference_prefix,
    write_fixture,
)

ALL_DTYPES = ["float16", "float32", "float64", "bfloat16", "int8", "int16", "int32",
              "int64", "uint8", "uint16", "uint32", "uint64", "bool", "complex64",
              "complex128", "string"]

PARTITIONED = {  # name -> (full shape, partitions)
    "partitioned/rows": ([10, 4], [3, 1]),
    "partitioned/cols": ([5, 6], [1, 2]),
    "partitioned/int64_rows": ([7, 3], [2, 1]),
    "partitioned/bf16_cols": ([4, 9], [1, 3]),
}


def data_shards(prefix: Path) -> list[Path]:
    return sorted(prefix.parent.glob(prefix.name + ".data-*-of-*"))


def test_pytest_never_imports_tensorflow(tf1_dtypes_ckpt):
    assert "tensorflow" not in sys.modules


# --------------------------------------------------------------- tf1_dtypes


def test_tf1_has_several_shards(tf1_dtypes_ckpt):
    prefix = reference_prefix(tf1_dtypes_ckpt)
    assert prefix.name == "model.ckpt-7"
    assert prefix.with_name(prefix.name + ".index").is_file()
    shards = data_shards(prefix)
    assert len(shards) >= 2
    n = len(shards)
    assert [s.name for s in shards] == [
        f"{prefix.name}.data-{i:05d}-of-{n:05d}" for i in range(n)]
    assert all(s.stat().st_size > 0 for s in shards)
    assert (tf1_dtypes_ckpt / "checkpoint").is_file()


def test_tf1_every_dtype(tf1_dtypes_ckpt):
    index = load_reference_index(tf1_dtypes_ckpt)["tensors"]
    for dt in ALL_DTYPES:
        entry = index[f"dtypes/{dt}"]
        assert entry["dtype"] == dt
    ref = load_reference(tf1_dtypes_ckpt)
    for dt in ALL_DTYPES:
        value = ref[f"dtypes/{dt}"]
        if dt == "string":
            assert isinstance(value, list) and all(isinstance(x, bytes) for x in value)
            assert len(value) == 8
            assert b"" in value and bytes(range(256)) in value
            assert max(len(x) for x in value) == 20000
            continue
        assert value.dtype == numpy_dtype(dt)
        assert value.shape == (3, 5)
        assert np.count_nonzero(value) > 0
    assert ref["dtypes/bfloat16"].dtype == np.dtype(ml_dtypes.bfloat16)
    # uint64 uses values above 2**63, int64 negative ones
    assert ref["dtypes/uint64"].max() > 2 ** 63
    assert ref["dtypes/int64"].min() < 0
    assert np.iscomplexobj(ref["dtypes/complex128"])
    assert np.any(ref["dtypes/complex64"].imag != 0)


def test_tf1_shapes(tf1_dtypes_ckpt):
    ref = load_reference(tf1_dtypes_ckpt)
    assert ref["shapes/scalar"].shape == ()
    assert ref["shapes/scalar"].dtype == np.float32
    assert int(ref["shapes/scalar_int64"]) == -(2 ** 40) - 17
    assert ref["shapes/scalar_string"] == [b"a scalar string"]
    assert ref["shapes/empty_0x3"].shape == (0, 3)
    assert ref["shapes/rank3"].shape == (2, 3, 4)
    assert ref["shapes/rank4_int32"].shape == (2, 1, 3, 2)
    assert ref["outer/inner/deeply/nested/name.with.dots"].shape == (4,)


def test_tf1_partitioned(tf1_dtypes_ckpt):
    index = load_reference_index(tf1_dtypes_ckpt)
    ref = load_reference(tf1_dtypes_ckpt)
    for name, (shape, partitions) in PARTITIONED.items():
        assert index["tensors"][name]["shape"] == shape
        assert index["partitioned"][name] == {"shape": shape, "partitions": partitions}
        assert list(ref[name].shape) == shape
        assert np.count_nonzero(ref[name]) > 0
    assert ref["partitioned/bf16_cols"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert ref["partitioned/int64_rows"].dtype == np.int64
    # no per-partition names leak into the reader's variable list
    assert not any("/part_" in n for n in index["tensors"])


def test_tf1_values_distinct(tf1_dtypes_ckpt):
    ref = load_reference(tf1_dtypes_ckpt)
    blobs = [v.tobytes() for v in ref.values()
             if isinstance(v, np.ndarray) and v.size > 1]
    assert len(blobs) == len(set(blobs))


# ---------------------------------------------------------------- tf2_keras


def test_tf2_keras(tf2_keras_ckpt):
    prefix = reference_prefix(tf2_keras_ckpt)
    assert prefix.name == "ckpt-2"
    for p in ("ckpt-1", "ckpt-2"):
        assert (tf2_keras_ckpt / f"{p}.index").is_file()
        assert (tf2_keras_ckpt / f"{p}.data-00000-of-00001").is_file()
    state = (tf2_keras_ckpt / "checkpoint").read_text()
    assert 'model_checkpoint_path: "ckpt-2"' in state
    ref = load_reference(tf2_keras_ckpt)
    graph = ref["_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert isinstance(graph, list) and len(graph) == 1 and len(graph[0]) > 100
    names = list(ref)
    assert any(".OPTIMIZER_SLOT" in n or n.startswith("optimizer/") for n in names)
    assert any("moving_mean" in n for n in names)
    assert ref["save_counter/.ATTRIBUTES/VARIABLE_VALUE"] == 2
    assert ref["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"] == 2
    shapes = {tuple(v.shape) for v in ref.values() if isinstance(v, np.ndarray)}
    assert (3, 3, 2, 3) in shapes  # conv kernel
    assert (48, 4) in shapes  # dense kernel


# --------------------------------------------------------------- savedmodel


def test_savedmodel(savedmodel_ckpt):
    prefix = reference_prefix(savedmodel_ckpt)
    assert prefix == savedmodel_ckpt / "sm" / "variables" / "variables"
    assert (savedmodel_ckpt / "sm" / "saved_model.pb").is_file()
    ref = load_reference(savedmodel_ckpt)
    assert ref["w/.ATTRIBUTES/VARIABLE_VALUE"].dtype == np.float32
    assert ref["w/.ATTRIBUTES/VARIABLE_VALUE"].shape == (4, 3)
    assert ref["b/.ATTRIBUTES/VARIABLE_VALUE"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert ref["b/.ATTRIBUTES/VARIABLE_VALUE"].shape == (3,)
    step = ref["step/.ATTRIBUTES/VARIABLE_VALUE"]
    assert step.dtype == np.int64 and step.shape == () and int(step) == 123456789012
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" in ref


# ------------------------------------------------------------ exotic_dtypes


def test_exotic_dtypes(exotic_dtypes_ckpt):
    index = load_reference_index(exotic_dtypes_ckpt)["tensors"]
    ref = load_reference(exotic_dtypes_ckpt)
    for name in ("float8_e4m3fn", "float8_e5m2", "int4", "uint4"):
        assert index[f"exotic/{name}"]["dtype"] == name
        assert ref[f"exotic/{name}"].dtype == np.dtype(getattr(ml_dtypes, name))
        assert ref[f"exotic/{name}_odd7"].shape == (7,)
    # quantized types come back as their integer storage type
    assert index["exotic/qint8"]["tf_dtype"] == "qint8"
    assert ref["exotic/qint8"].dtype == np.int8
    assert ref["exotic/qint32"].dtype == np.int32


# ---------------------------------------------------------------------- big


def test_big_no_reference(tmp_path):
    out = write_fixture("big", tmp_path / "big", "--mib", "2", "--shards", "3",
                        "--no-reference")
    index = load_reference_index(out)
    prefix = reference_prefix(out)
    assert len(data_shards(prefix)) == 3
    assert load_reference(out) == {}
    assert not list((out / "reference").glob("*.bin"))
    sizes = {n: 4 * int(np.prod(e["shape"], dtype=np.int64))
             for n, e in index["tensors"].items()}
    assert all(e["dtype"] == "float32" for e in index["tensors"].values())
    total = sum(sizes.values())
    assert abs(total - 2 * 2 ** 20) < 0.05 * 2 * 2 ** 20
    assert max(sizes.values()) >= 2 ** 20 / 2
    data_bytes = sum(p.stat().st_size for p in data_shards(prefix))
    assert data_bytes == total


# ---------------------------------------------------------- load_reference


def test_load_reference_round_trip(tmp_path):
    refdir = tmp_path / "reference"
    refdir.mkdir()
    values = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1.5, -2.25], dtype=ml_dtypes.bfloat16),
        "c": np.array([[True, False]]),
        "d": np.array(3 + 4j, dtype=np.complex64),
        "e": np.zeros((0, 3), np.int16),
    }
    tensors = {}
    for i, (k, v) in enumerate(values.items()):
        (refdir / f"{i}.bin").write_bytes(v.tobytes())
        tensors[k] = {"dtype": v.dtype.name, "shape": list(v.shape), "file": f"{i}.bin"}
    (refdir / "s.json").write_text(json.dumps(["", "aGk="]))
    tensors["s"] = {"dtype": "string", "shape": [2], "file": "s.json"}
    (refdir / "index.json").write_text(json.dumps({"prefix": "x/ckpt", "tensors": tensors}))
    ref = load_reference(tmp_path)
    assert reference_prefix(tmp_path) == tmp_path / "x" / "ckpt"
    for k, v in values.items():
        assert ref[k].dtype == v.dtype and ref[k].shape == v.shape
        assert ref[k].tobytes() == v.tobytes()
    assert ref["s"] == [b"", b"hi"]
    assert ref["a"].flags.writeable


@pytest.mark.parametrize("bad", ["nope"])
def test_write_fixture_reports_errors(tmp_path, bad):
    with pytest.raises(RuntimeError, match="invalid choice"):
        write_fixture(bad, tmp_path)
