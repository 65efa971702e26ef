"""Format detection: every input is claimed by exactly one probe, its own, whatever the
order of ``sources.REGISTRY``; zips that are not npz (a ``.keras`` model, a PyTorch ``.pt``)
and other files are claimed by none; probes never raise.

Fixtures are written by the libraries that write each format (NumPy, safetensors,
zarr-python, Orbax, flax, Keras in a subprocess, TensorFlow through ``conftest``'s fixtures)
or vendored from other software (``tests/data``).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TESTDATA

import shardconv
from shardconv.errors import SourceError
from shardconv.sources import REGISTRY, detect, open_source

TREE = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.int64)}


def _npz(d: Path) -> Path:
    np.savez(d / "plain.npz", **TREE)
    return d / "plain.npz"


def _npz_no_suffix(d: Path) -> Path:
    np.savez_compressed(d / "compressed.npz", **TREE)
    os.rename(d / "compressed.npz", d / "compressed.bin")
    return d / "compressed.bin"


def _npz_split(d: Path) -> Path:
    np.savez(d / "in.npz", w=np.zeros((300, 1024), np.float32), b=TREE["b"])  # two files of at least 1 MiB
    shardconv.convert(d / "in.npz", d / "split", to="npz", sink_options={"max_file_size": 1 << 20})
    return d / "split"


def _safetensors(d: Path) -> Path:
    from safetensors.numpy import save_file

    save_file(TREE, str(d / "m.safetensors"))
    return d / "m.safetensors"


def _safetensors_no_suffix(d: Path) -> Path:
    from safetensors.numpy import save_file

    save_file(TREE, str(d / "weights.bin"))
    return d / "weights.bin"


def _safetensors_split(d: Path) -> Path:
    """transformers' layout: shards and ``model.safetensors.index.json`` naming each tensor's file."""
    from safetensors.numpy import save_file

    out = d / "hf"
    out.mkdir()
    save_file({"w": TREE["w"]}, str(out / "model-00001-of-00002.safetensors"))
    save_file({"b": TREE["b"]}, str(out / "model-00002-of-00002.safetensors"))
    index = {"metadata": {"total_size": 104}, "weight_map": {"w": "model-00001-of-00002.safetensors",
                                                             "b": "model-00002-of-00002.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def _zarr(d: Path) -> Path:
    zarr = pytest.importorskip("zarr")
    g = zarr.open_group(str(d / "z.zarr"), mode="w")
    for k, v in TREE.items():
        g.create_array(k, data=v)
    return d / "z.zarr"


def _shardconv_orbax(d: Path) -> Path:
    """An Orbax checkpoint shardconv wrote: the Zarr source reads it (with its CRCs)."""
    np.savez(d / "in.npz", **TREE)
    shardconv.convert(d / "in.npz", d / "orbax-out", to="zarr", sink_options={"layout": "orbax"})
    return d / "orbax-out"


def _orbax(d: Path) -> Path:
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(d / "ckpt", TREE)
    return d / "ckpt"


def _orbax_steps(d: Path) -> Path:
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.CheckpointManager(d / "run") as mgr:
        mgr.save(5, args=ocp.args.StandardSave(TREE))
        mgr.wait_until_finished()
    return d / "run"


def _flax(d: Path) -> Path:
    serialization = pytest.importorskip("flax.serialization")
    (d / "params.msgpack").write_bytes(serialization.to_bytes({"params": TREE}))
    return d / "params.msgpack"


def _vendored(rel: str):
    def make(d: Path) -> Path:
        p = TESTDATA / rel
        if not p.exists():
            pytest.skip(f"tests/data/{rel} is not in this checkout")
        return p
    return make


#: fixture -> the one format that must claim it.
CHECKPOINTS = {
    "npz": (_npz, "npz"),
    "npz-compressed-no-suffix": (_npz_no_suffix, "npz"),
    "npz-split": (_npz_split, "npz-split"),
    "safetensors": (_safetensors, "safetensors"),
    "safetensors-no-suffix": (_safetensors_no_suffix, "safetensors"),
    "safetensors-split": (_safetensors_split, "safetensors-split"),
    "zarr": (_zarr, "zarr"),
    "orbax-by-shardconv": (_shardconv_orbax, "zarr"),
    "orbax": (_orbax, "orbax"),
    "orbax-steps": (_orbax_steps, "orbax"),
    "orbax-legacy-aggregate": (_vendored("ecosystem/orbax-aggregate-all"), "orbax"),
    "flax-msgpack": (_flax, "flax-msgpack"),
    "flax-msgpack-t5x-named": (_vendored("t5x/test_t5_tiny.checkpoint_0"), "flax-msgpack"),
    "t5x-steps": (_vendored("t5x/tiny_t5"), "t5x"),
    "t5x-file": (_vendored("t5x/tiny_t5/checkpoint_1/checkpoint"), "t5x"),
    "tf-estimator": (_vendored("ecosystem/tfx-estimator-tf1"), "tf"),
    "tf-mesh": (_vendored("t5x/mtf_tiny_t5"), "tf"),
    "tf-savedmodel": (_vendored("tf-serving/saved_model_half_plus_two_cpu/00000123"), "tf"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_each_checkpoint_is_claimed_by_its_own_probe_alone(case, tmp_path):
    make, want = CHECKPOINTS[case]
    path = make(tmp_path)
    assert detect(path) == [want]
    with open_source(path) as src:
        assert src.tensors()


def test_tf_checkpoints_written_by_tensorflow_are_claimed_by_tf_alone(tf2_keras_ckpt, savedmodel_ckpt):
    for path in (tf2_keras_ckpt, savedmodel_ckpt / "sm"):
        assert detect(path) == ["tf"], path


def _keras_file(d: Path) -> Path:
    """A ``.keras`` model saved by Keras (a zip of config.json, metadata.json, model.weights.h5),
    in a subprocess with the JAX backend (this process never imports TensorFlow)."""
    pytest.importorskip("keras")
    code = ("import keras, sys; m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]); "
            "m.save(sys.argv[1])")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    r = subprocess.run([sys.executable, "-c", code, str(d / "model.keras")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return d / "model.keras"


def _torch_like(d: Path) -> Path:
    """A zip laid out as ``torch.save`` writes one (``archive/data.pkl``, ``archive/data/0``, ...).
    PyTorch is not a test dependency, so the members are written here with its names."""
    with zipfile.ZipFile(d / "model.pt", "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", np.ones(4, np.float32).tobytes())
        z.writestr("archive/version", b"3\n")
    return d / "model.pt"


def _mixed_zip(d: Path) -> Path:
    """An npz with one member that is not an array: still a zip of something else."""
    np.savez(d / "mixed.npz", **TREE)
    with zipfile.ZipFile(d / "mixed.npz", "a") as z:
        z.writestr("README.txt", "not an array")
    os.rename(d / "mixed.npz", d / "mixed.zip")
    return d / "mixed.zip"


def _text(d: Path) -> Path:
    (d / "notes.txt").write_text("hello")
    return d / "notes.txt"


def _empty_dir(d: Path) -> Path:
    (d / "empty").mkdir()
    return d / "empty"


NOT_CHECKPOINTS = {"keras": _keras_file, "torch-like": _torch_like, "zip-with-a-text-member": _mixed_zip,
                   "text": _text, "empty-dir": _empty_dir}


@pytest.mark.parametrize("case", sorted(NOT_CHECKPOINTS))
def test_other_files_are_claimed_by_no_probe(case, tmp_path):
    path = NOT_CHECKPOINTS[case](tmp_path)
    assert detect(path) == []
    with pytest.raises(SourceError, match="not a checkpoint shardconv can read"):
        open_source(path)


#: Format names of the sources: a split output reads as its format.
FORMAT_OF = {"npz-split": "npz", "safetensors-split": "safetensors"}


def test_detection_does_not_depend_on_registry_order(tmp_path, monkeypatch):
    paths = {}
    for case, (make, want) in CHECKPOINTS.items():
        if not case.startswith(("tf", "t5x")):
            (tmp_path / case).mkdir()
            paths[case] = (make(tmp_path / case), want)
    monkeypatch.setattr("shardconv.sources.REGISTRY", list(reversed(REGISTRY)))
    for case, (path, want) in paths.items():
        with open_source(path) as src:
            assert detect(path) == [want] and src.format == FORMAT_OF.get(want, want), case


@pytest.mark.parametrize("bad", ["", "\x00", "/proc/self/mem", "no/such/dir/x.npz", 12, b"\xff"])
def test_probes_never_raise(bad):
    for f in REGISTRY:
        fn = getattr(importlib.import_module(f"shardconv.sources{f.probe_module}"), f.probe)
        assert fn(bad) in (True, False), f.name


def test_an_unreadable_file_is_claimed_by_no_probe(tmp_path):
    p = _npz(tmp_path)
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):
            pytest.skip("running as root: permissions do not stop reads")
        assert detect(p) in ([], ["npz"])  # a .npz suffix alone may claim it; opening then says why
    finally:
        p.chmod(0o644)
