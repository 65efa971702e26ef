"""One test per rule of docs/manifest-format.md, on manifests written by shardconv."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import shardconv
from shardconv.util import safefs


@pytest.fixture
def src(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    tree = {"w": rng.standard_normal((1024, 300)).astype(np.float32),  # 1.2 MB: a file of its own at 1 MiB
            "emb": rng.standard_normal((40, 8)).astype(ml_dtypes.bfloat16),
            "n": np.array(7, np.int64)}
    np.savez(tmp_path / "in.npz", **tree)
    return tmp_path / "in.npz", tree


def manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def test_rule1_where_the_manifest_is(src, tmp_path):
    s, _ = src
    shardconv.convert(s, tmp_path / "o.npz")
    shardconv.convert(s, tmp_path / "o.safetensors")
    assert manifest(tmp_path / "o.npz.shardconv.json")["sink"] == "npz"
    assert manifest(tmp_path / "o.safetensors.shardconv.json")["sink"] == "safetensors"
    shardconv.convert(s, tmp_path / "split", to="npz", sink_options={"max_file_size": 1 << 20})
    files = sorted((tmp_path / "split").glob("*.npz"))
    assert len(files) == 2
    parts = [manifest(Path(f"{f}.shardconv.json")) for f in files]
    assert [t["name"] for p in parts for t in p["tensors"]] == ["w", "emb", "n"]
    shardconv.convert(s, tmp_path / "ck", to="tf-checkpoint")
    assert manifest(tmp_path / "ck" / "shardconv.json")["sink"] == "tf-checkpoint"


def test_rule2_bytes_are_indented_sorted_and_a_function_of_the_plan(src, tmp_path):
    s, _ = src
    shardconv.convert(s, tmp_path / "a.npz", max_memory="1MiB")
    shardconv.convert(s, tmp_path / "b.npz", max_memory="256MiB")
    a = (tmp_path / "a.npz.shardconv.json").read_bytes()
    obj = json.loads(a)
    assert a == (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    assert a == (tmp_path / "b.npz.shardconv.json").read_bytes()


def test_rule3_top_level(src, tmp_path):
    s, _ = src
    shardconv.convert(s, tmp_path / "o.npz")
    m = manifest(tmp_path / "o.npz.shardconv.json")
    assert set(m) == {"format", "version", "shardconv", "sink", "source", "plan", "options", "dropped", "tensors"}
    assert m["format"] == "shardconv-manifest" and m["version"] == 1 and m["shardconv"] == shardconv.__version__
    assert m["source"] == {"format": "npz", "location": "in.npz"}
    assert len(m["plan"]) == 64 and m["plan"] == shardconv.plan(s).digest()
    assert isinstance(m["options"], dict) and m["dropped"] == []


def test_rule4_tensors_in_plan_order_with_true_dtypes_and_provenance(src, tmp_path):
    s, tree = src
    shardconv.convert(s, tmp_path / "o.npz")
    m = manifest(tmp_path / "o.npz.shardconv.json")
    assert [t["name"] for t in m["tensors"]] == [o.name for o in shardconv.plan(s).outputs]
    for t in m["tensors"]:
        v = tree[t["name"]]
        assert t["dtype"] == v.dtype.name and t["shape"] == list(v.shape) and t["nbytes"] == v.nbytes
        assert t["from"] == {"from": t["name"], "op": "copy"}
        assert t["source_dtypes"] == {t["name"]: "bfloat16" if t["name"] == "emb" else v.dtype.name}
        alg, crc = t["source_checksums"][t["name"]].split(":")
        assert alg == "crc32" and int(crc) == zlib.crc32(v.tobytes())


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_rule5_crc32_of_the_stored_data(src, tmp_path, suffix):
    s, tree = src
    shardconv.convert(s, tmp_path / f"o{suffix}")
    for t in manifest(tmp_path / f"o{suffix}.shardconv.json")["tensors"]:
        assert t["crc32"] == zlib.crc32(np.ascontiguousarray(tree[t["name"]]).tobytes()), t["name"]


def test_rule6_the_manifest_is_fsynced_and_published_before_the_output(src, tmp_path, monkeypatch):
    s, _ = src
    dest = tmp_path / "o.npz"
    events: list[tuple[str, str]] = []
    real_fsync, real_publish = os.fsync, safefs.publish
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(safefs, "publish", lambda a, b, *r: (events.append(("publish", str(b))),
                                                             real_publish(a, b, *r))[1])
    shardconv.convert(s, dest)
    published = [p for e, p in events if e == "publish"]
    assert published == [f"{dest}.shardconv.json", str(dest)]
    first_publish = events.index(("publish", published[0]))
    synced = [p for e, p in events[:first_publish] if e == "fsync"]
    assert any(p.endswith("manifest.json.tmp") or p.endswith("manifest.json") for p in synced), synced
    # killed after finishing but before the renames: nothing, not even the manifest, is at DEST
    d2 = tmp_path / "k.npz"
    argv = [sys.executable, "-m", "shardconv", "convert", str(s), str(d2), "--quiet"]
    assert subprocess.run(argv, env={**os.environ, "SHARDCONV_TEST_KILL": "finish"}).returncode == -9
    assert not d2.exists() and not Path(f"{d2}.shardconv.json").exists()
