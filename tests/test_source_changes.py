"""A source changed between a kill and the resume is refused, naming the file; formats
without stored checksums say in the plan how a change during the run is detected."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from procs import run_cli
from reference import reference_prefix, write_fixture

from shardconv.sources import open_source
from shardconv.sources.tf_bundle import TFBundleSource
from shardconv.testing.sink_suite import reference_tree, write_reference_npz
from shardconv.testing.source_suite import flip_byte_keeping_mtime

NOTE = "detected only from file metadata (size, times, inode)"


@pytest.fixture(scope="module")
def tf_ckpt(tmp_path_factory) -> Path:
    """A 4 MiB TF1 Saver checkpoint, one data shard, with its ``checkpoint`` state file."""
    return write_fixture("big", tmp_path_factory.mktemp("big"), "--mib", "4", "--shards", "1", "--no-reference")


def _zarr_store(path: Path) -> dict[str, np.ndarray]:
    """A zarr-python v3 store, uncompressed (a chunk rewritten with other values keeps its size)."""
    rng = np.random.default_rng(5)
    tree = {"w": rng.standard_normal((1024, 1024)).astype(np.float32), "b": np.arange(4096, dtype=np.int32)}
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, v in tree.items():
        a = g.create_array(name, shape=v.shape, dtype=v.dtype, chunks=(256,) + v.shape[1:], compressors=None)
        a[...] = v
    return tree


def _killed_run(src: Path, dest: Path, *flags: str) -> list[dict]:
    """Convert, SIGKILLed after the third chunk is journaled; the journal's chunk records."""
    r = run_cli("convert", src, dest, "--max-memory", "1MiB", "--quiet", *flags,
                env={"SHARDCONV_TEST_KILL": "journal:2"})
    assert r.returncode == -9, r.stderr
    lines = (Path(str(dest) + ".partial") / "journal.jsonl").read_text().splitlines()
    return [json.loads(ln) for ln in lines[1:]]


def _refused_line(src: Path, dest: Path) -> str:
    r = run_cli("convert", src, dest, "--max-memory", "1MiB", "--quiet")
    assert r.returncode != 0, "the resume accepted a changed source"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_zarr_chunk_rewritten_between_kill_and_resume_is_refused(tmp_path):
    src, dest = tmp_path / "in.zarr", tmp_path / "out.npz"
    _zarr_store(src)
    records = _killed_run(src, dest)
    assert {u for rec in records for u, *_ in rec["s"]} == set()  # zarr-python stores: no checksums to catch it
    chunk = src / "w" / "c" / "0" / "0"
    size = chunk.stat().st_size
    arr = zarr.open_array(str(src / "w"), mode="r+")
    arr[0:256] = -arr[0:256]  # rows the killed run already converted
    assert chunk.stat().st_size == size

    line = _refused_line(src, dest)
    assert "'w/c/0/0' changed" in line and "--restart" in line, line

    r = run_cli("convert", src, dest, "--max-memory", "1MiB", "--quiet", "--restart")
    assert r.returncode == 0, r.stderr
    with np.load(dest) as out:
        for name in ("w", "b"):
            want = zarr.open_array(str(src / name), mode="r")[...]
            assert out[name].dtype == want.dtype and out[name].tobytes() == want.tobytes(), name


def test_tf_data_rewritten_with_size_and_mtime_restored_is_refused(tf_ckpt, tmp_path):
    d = Path(shutil.copytree(tf_ckpt, tmp_path / "ckpt"))
    prefix, dest = reference_prefix(d), tmp_path / "out.npz"
    records = _killed_run(prefix, dest)
    unit, seg_offset, *_ = records[0]["s"][0]  # a tensor the killed run converted (and CRC-checked)
    with TFBundleSource(prefix) as s:
        entry = s._entries[unit]
        data = s.data_path(entry.shard)
    flip_byte_keeping_mtime(str(data), entry.offset + seg_offset)

    line = _refused_line(prefix, dest)
    assert f"{data.name!r} changed (ctime_ns)" in line, line

    # Started over, every byte is read again and the stored CRC catches the change.
    r = run_cli("convert", prefix, dest, "--max-memory", "1MiB", "--quiet", "--restart")
    assert r.returncode != 0 and repr(unit) in r.stderr and not dest.exists(), r.stderr


def test_tf_input_files_include_the_state_file_only_when_it_chose_the_checkpoint(tf_ckpt):
    prefix = reference_prefix(tf_ckpt)
    data = [f"{prefix}.data-00000-of-00001"]
    with TFBundleSource(tf_ckpt) as s:
        assert sorted(s.input_files()) == sorted([f"{prefix}.index", *data, str(tf_ckpt / "checkpoint")])
    with TFBundleSource(prefix) as s:
        assert sorted(s.input_files()) == sorted([f"{prefix}.index", *data])


def test_plan_says_how_changes_are_detected_for_formats_without_checksums(tf_ckpt, tmp_path):
    _zarr_store(tmp_path / "in.zarr")
    write_reference_npz(tmp_path / "in.npz", reference_tree())
    zarr_plan = run_cli("plan", tmp_path / "in.zarr")
    assert zarr_plan.returncode == 0 and f"note: zarr input stores no checksums: a change to it during the run is " \
                                          f"{NOTE}" in zarr_plan.stdout, zarr_plan.stdout + zarr_plan.stderr
    for checked in (tmp_path / "in.npz", tf_ckpt):
        r = run_cli("plan", checked)
        assert r.returncode == 0 and NOTE not in r.stdout, r.stdout + r.stderr


def test_fingerprint_lists_every_metadata_and_chunk_file_of_a_zarr_store(tmp_path):
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    a = g.create_array("x", shape=(64, 64), dtype=np.int8, chunks=(8, 8), compressors=None)
    a[...] = 1
    with open_source(tmp_path / "s.zarr") as src:
        files = src.fingerprint()["files"]
        assert sorted(src.input_files()) == sorted(str(p) for p in (tmp_path / "s.zarr").rglob("*") if p.is_file())
    assert {"zarr.json", "x/zarr.json"} <= set(files)
    assert sum(k.startswith("x/c/") for k in files) == 64
    assert set(files["x/c/0/0"]) == {"size", "mtime_ns", "ctime_ns", "inode"}
