"""One test per rule of docs/npz-format.md, on an output written by shardconv."""
from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import shardconv
from shardconv.core.plan import check_name
from shardconv.formats import zipformat
from shardconv.testing.sink_suite import reference_tree, write_reference_npz
from shardconv.util.checksums import combine_crc32, crc32


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    d = tmp_path_factory.mktemp("spec")
    tree = reference_tree()
    tree["f8"] = np.arange(6, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)
    tree["ünï/cödé"] = np.arange(3, dtype=np.int8)
    write_reference_npz(d / "in.npz", tree)
    # np.savez stores float8 as '<V1'; a manifest beside the input names its real dtype.
    (d / "in.npz.shardconv.json").write_text(json.dumps({"tensors": [{"name": "f8", "dtype": "float8_e4m3fn"}]}))
    shardconv.convert(d / "in.npz", d / "out.npz", max_memory="1MiB")
    return d / "out.npz", tree


def _members(path: Path) -> list[zipfile.ZipInfo]:
    with zipfile.ZipFile(path) as z:
        return z.infolist()


def test_rule1_zip64_end_records(out):
    data = out[0].read_bytes()
    eocd = data[-zipformat.EOCD_FIXED:]
    assert struct.unpack("<I", eocd[:4])[0] == zipformat.EOCD_SIG
    loc = data[-zipformat.EOCD_FIXED - zipformat.LOCATOR_FIXED:-zipformat.EOCD_FIXED]
    assert struct.unpack("<I", loc[:4])[0] == zipformat.LOCATOR_SIG
    (e64_at,) = struct.unpack("<Q", loc[8:16])
    assert struct.unpack("<I", data[e64_at:e64_at + 4])[0] == zipformat.EOCD64_SIG


def test_rule2_stored_with_zip64_extras(out):
    data = out[0].read_bytes()
    for info in _members(out[0]):
        assert info.compress_type == zipfile.ZIP_STORED
        assert info.extra[:2] == b"\x01\x00" and len(info.extra) == 28  # central: sizes + offset
        off = info.header_offset
        nlen, xlen = struct.unpack("<HH", data[off + 26:off + 30])
        extra = data[off + 30 + nlen:off + 30 + nlen + xlen]
        assert extra[:4] == b"\x01\x00\x10\x00" and struct.unpack("<QQ", extra[4:20]) == (info.file_size,) * 2


def test_rule3_fixed_timestamps_and_flags(out):
    for info in _members(out[0]):
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        ascii_name = info.filename.isascii()
        assert info.flag_bits == (0 if ascii_name else 0x800)


def test_rule4_member_names(out):
    names = [i.filename for i in _members(out[0])]
    assert sorted(n[:-4] for n in names) == sorted(out[1])
    for n in names:
        assert n.endswith(".npy") and check_name(n[:-4]) is None


def test_rule5_members_are_what_np_save_writes(out):
    path, tree = out
    with zipfile.ZipFile(path) as z:
        for name, arr in tree.items():
            raw = z.read(name + ".npy")
            buf = io.BytesIO()
            np.save(buf, arr)
            assert raw == buf.getvalue(), name
            assert raw[6:8] == b"\x01\x00"
            hlen = struct.unpack("<H", raw[8:10])[0]
            assert (10 + hlen) % 64 == 0 and raw[10 + hlen - 1:10 + hlen] == b"\n"
            if arr.dtype in (np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)):
                assert f"'descr': '<V{arr.dtype.itemsize}'".encode() in raw[:10 + hlen]


def test_rule6_contiguous_members_then_directory_big_arrays_on_a_page(out):
    infos = sorted(_members(out[0]), key=lambda i: i.header_offset)
    data = out[0].read_bytes()
    pos = 0
    aligned = 0
    for info in infos:
        assert info.header_offset == pos
        nlen, xlen = struct.unpack("<HH", data[pos + 26:pos + 30])
        extra = data[pos + 30 + nlen + 20:pos + 30 + nlen + xlen]  # after the zip64 field
        start = pos + 30 + nlen + xlen  # the .npy header
        hlen = struct.unpack("<H", data[start + 8:start + 10])[0]
        array_at, array_bytes = start + 10 + hlen, info.file_size - 10 - hlen
        if array_bytes >= 1 << 20:
            aligned += 1
            assert array_at % 4096 == 0, info.filename
            tag, size, alignment = struct.unpack("<HHH", extra[:6])
            assert (tag, size, alignment) == (0x5343, len(extra) - 4, 4096) and 6 <= len(extra) <= 4101
            assert extra[6:] == bytes(len(extra) - 6)
        else:
            assert extra == b"", info.filename
        pos = start + info.file_size
    assert aligned and aligned < len(infos)  # both kinds were checked
    assert struct.unpack("<I", data[pos:pos + 4])[0] == zipformat.CENTRAL_SIG


def test_rule7_bytes_are_a_function_of_the_plan(out, tmp_path):
    src = out[0].parent / "in.npz"
    shardconv.convert(src, tmp_path / "a.npz", max_memory="64MiB")
    assert (tmp_path / "a.npz").read_bytes() == out[0].read_bytes()
    # interrupted and resumed runs: tests/test_engine.py and the sink suite's kill sweep


def test_rule8_manifest_lists_true_dtypes_and_data_crcs(out):
    path, tree = out
    manifest = json.loads(Path(str(path) + ".shardconv.json").read_text())
    entries = {t["name"]: t for t in manifest["tensors"]}
    assert [t["name"] + ".npy" for t in manifest["tensors"]] == [i.filename for i in sorted(_members(path), key=lambda i: i.header_offset)]
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename[:-4]
            e = entries[name]
            assert (e["dtype"], e["shape"], e["nbytes"]) == (tree[name].dtype.name, list(tree[name].shape), tree[name].nbytes)
            raw = z.read(info.filename)
            header_len = len(raw) - e["nbytes"]
            assert e["crc32"] == crc32(raw[header_len:])
            assert info.CRC == combine_crc32(crc32(raw[:header_len]), e["crc32"], e["nbytes"])


def test_rule9_nothing_at_dest_before_complete(out, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    src = out[0].parent / "in.npz"
    dest = tmp_path / "o.npz"
    for point in ("journal:0", "finish"):
        p = subprocess.run([sys.executable, "-m", "shardconv", "convert", str(src), str(dest), "--quiet"],
                           env={**os.environ, "SHARDCONV_TEST_KILL": point})
        assert p.returncode == -signal.SIGKILL
        assert not dest.exists()


@pytest.fixture(scope="module")
def split(out, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    dest = tmp_path_factory.mktemp("split") / "model.npz"
    shardconv.convert(out[0].parent / "in.npz", dest, max_memory="1MiB", sink_options={"max_file_size": 1 << 20})
    return dest, out[1]


def test_rule10_split_files_manifests_and_index(split):
    dest, tree = split
    index = json.loads((dest / "model.npz.index.json").read_text())
    files = sorted(p.name for p in dest.glob("*.npz"))
    n = len(files)
    assert n > 1 and files == [f"model-{k:05d}-of-{n:05d}.npz" for k in range(1, n + 1)]
    assert set(index["weight_map"]) == set(tree) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tree.values())
    for f in files:
        manifest = json.loads((dest / (f + ".shardconv.json")).read_text())
        names = [t["name"] for t in manifest["tensors"]]
        assert names == [i.filename[:-4] for i in _members(dest / f)]
        assert all(index["weight_map"][name] == f for name in names)
        with zipfile.ZipFile(dest / f) as z:
            assert z.testzip() is None


def test_rule11_plan_order_and_size(split, out):
    dest, _ = split
    index = json.loads((dest / "model.npz.index.json").read_text())
    order = [i.filename[:-4] for i in sorted(_members(out[0]), key=lambda i: i.header_offset)]  # plan order
    assert [index["weight_map"][name] for name in order] == sorted(index["weight_map"][name] for name in order)
    for f in dest.glob("*.npz"):
        members = _members(f)
        end = max(i.header_offset for i in members)  # start of the last member: all before it fit
        assert len(members) == 1 or end + members[-1].file_size <= 1 << 20, f.name


def test_rule12_split_directory_appears_only_complete(out, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    src = out[0].parent / "in.npz"
    dest = tmp_path / "m"
    for point in ("journal:0", "finish"):
        p = subprocess.run([sys.executable, "-m", "shardconv", "convert", str(src), str(dest), "--to", "npz",
                            "--max-file-size", "1MiB", "--quiet"], env={**os.environ, "SHARDCONV_TEST_KILL": point})
        assert p.returncode == -signal.SIGKILL
        assert not dest.exists()
