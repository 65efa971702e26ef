"""Hostile and corrupt input: every case ends in the original values or one clear
line naming the file, a non-zero exit, nothing at the destination, the input
unchanged, and no hang. Cases run in-process (fast); bench/mutation_sweep.py
runs the same idea in separate processes with RSS measured."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import shutil
import signal
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import tf_index_writer as w
from reference import reference_prefix, write_fixture

from shardconv import cli

ARRAY = np.arange(12, dtype=np.float32).reshape(3, 4)
DATA = ARRAY.tobytes()
CRC = w.tensor_bytes_crc(DATA)


@contextlib.contextmanager
def deadline(seconds: int):
    def boom(*_):
        raise TimeoutError("hang")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def digest(d: Path) -> dict[str, str]:
    """sha256 of every file under ``d`` (checkpoint directories included), by relative path."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}


def _log(outcome: str) -> None:
    log = os.environ.get("SHARDCONV_CORPUS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(outcome + "\n")


def run_case(src: Path, dest: Path, reference: dict[str, bytes] | None) -> tuple[str, str]:
    """Convert in-process; return ('values', '') or ('error', the line) after checking the promises."""
    before = digest(src.parent)
    err = io.StringIO()
    with deadline(30), contextlib.redirect_stderr(err):
        rc = cli.main(["convert", str(src), str(dest), "--quiet", "--max-memory", "64MiB"])
    assert {k: v for k, v in digest(src.parent).items() if k in before} == before, "input modified"
    if rc == 0:
        with np.load(dest) as z:
            got = {k: z[k].tobytes() for k in z.files}
        assert reference is not None and got == reference, "wrong values"
        dest.unlink()
        Path(str(dest) + ".shardconv.json").unlink()
        _log("original values")
        return "values", ""
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardconv: error: "), err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert not dest.exists() and not Path(str(dest) + ".shardconv.json").exists()
    _log("one-line error")
    return "error", lines[0]


# ----------------------------------------------------------------- mutations of a real checkpoint

@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory):
    d = write_fixture("big", tmp_path_factory.mktemp("real"), "--mib", "0.25", "--shards", "2", "--no-reference")
    prefix = reference_prefix(d)
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    assert cli.main(["convert", str(prefix), str(out), "--quiet"]) == 0
    with np.load(out) as z:
        return prefix, {k: z[k].tobytes() for k in z.files}


def _mutations(n: int, seed: int):
    rng = random.Random(seed)
    for i in range(n):
        yield i, rng.choice(["index", "data0", "data1"]), rng.choice(["truncate", "flip", "flips", "zero"]), rng.random(), rng.randrange(1 << 30)


@pytest.mark.parametrize("case", list(_mutations(160, 3)), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_mutated_real_checkpoint(real_ckpt, tmp_path, case):
    prefix, reference = real_ckpt
    _, which, kind, where, seed = case
    d = tmp_path / "ck"
    shutil.copytree(prefix.parent, d)
    name = {"index": prefix.name + ".index", "data0": prefix.name + ".data-00000-of-00002",
            "data1": prefix.name + ".data-00001-of-00002"}[which]
    f = d / name
    data = bytearray(f.read_bytes())
    pos = int(where * len(data))
    rng = random.Random(seed)
    if kind == "truncate":
        data = data[:pos]
    elif kind == "flip":
        data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
    elif kind == "flips":
        for _ in range(8):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    else:
        data[pos:pos + 16] = bytes(len(data[pos:pos + 16]))
    f.write_bytes(bytes(data))
    run_case(d / prefix.name, tmp_path / "o.npz", reference)


# ----------------------------------------------------------------- crafted TF indexes

def _ckpt(tmp_path: Path, items, data: bytes = DATA, **kw) -> Path:
    (tmp_path / "m.data-00000-of-00001").write_bytes(data)
    (tmp_path / "m.index").write_bytes(w.index(items, **kw))
    return tmp_path / "m"


HEADER = (b"", w.header())
CRAFTED = {
    "valid control": ([HEADER, (b"x", w.entry(1, [3, 4], size=48, crc=CRC))], {}, None),
    "valid snappy control": ([HEADER, (b"x", w.entry(1, [3, 4], size=48, crc=CRC))], {"snappy": True}, None),
    "wrong magic": ([HEADER, (b"x", w.entry(1, [3, 4], size=48, crc=CRC))], {"magic": 0x1234}, "bad magic"),
    "shape overflows int64": ([HEADER, (b"x", w.entry(1, [2**40, 2**40], size=48, crc=CRC))], {}, "more elements than fit in int64"),
    "huge shape with small size": ([HEADER, (b"x", w.entry(1, [2**31, 4], size=48, crc=CRC))], {}, "needs"),
    "negative dimension": ([HEADER, (b"x", w.entry(1, [-3, 4], size=48, crc=CRC))], {}, "negative dimension"),
    "size disagrees with shape": ([HEADER, (b"x", w.entry(1, [3, 4], size=40, crc=CRC))], {}, "stores 40 bytes"),
    "offset past end of file": ([HEADER, (b"x", w.entry(1, [3, 4], offset=1 << 40, size=48, crc=CRC))], {}, "the file has 48"),
    "shard id outside shard count": ([HEADER, (b"x", w.entry(1, [3, 4], shard=5, size=48, crc=CRC))], {}, "shard 5 but the bundle has 1"),
    "zero shards": ([(b"", w.header(0)), (b"x", w.entry(1, [3, 4], size=48, crc=CRC))], {}, "declares 0 shards"),
    "absurd shard count": ([(b"", w.header(10**9)), (b"x", w.entry(1, [3, 4], size=48, crc=CRC))], {}, "shards"),
    "big endian": ([(b"", w.header(1, 1)), (b"x", w.entry(1, [3, 4], size=48, crc=CRC))], {}, "big-endian"),
    "unknown dtype enum": ([HEADER, (b"x", w.entry(99, [3, 4], size=48, crc=CRC))], {}, "unknown dtype enum 99"),
    "resource dtype": ([HEADER, (b"x", w.entry(20, [3, 4], size=48, crc=CRC))], {}, "resource"),
    "wrong tensor crc": ([HEADER, (b"x", w.entry(1, [3, 4], size=48, crc=CRC ^ 1))], {}, "checksum mismatch in tensor 'x'"),
    "duplicate keys": ([HEADER, (b"x", w.entry(1, [3, 4], size=48, crc=CRC)), (b"x", w.entry(1, [3, 4], size=48, crc=CRC))], {}, "duplicate key"),
    "unsorted keys": ([HEADER, (b"y", w.entry(1, [3, 4], size=48, crc=CRC)), (b"x", w.entry(1, [3, 4], size=48, crc=CRC))], {}, "out-of-order key"),
    "no header": ([(b"x", w.entry(1, [3, 4], size=48, crc=CRC))], {}, "no bundle header"),
    "bad varint in entry": ([HEADER, (b"x", b"\x08" + b"\xff" * 11)], {}, "longer than 10 bytes"),
    "truncated entry field": ([HEADER, (b"x", b"\x12\x40\x00")], {}, "declares 64 bytes"),
    "unsafe name": ([HEADER, (b"../evil", w.entry(1, [3, 4], size=48, crc=CRC))], {}, "unsafe"),
    "non-utf8 name": ([HEADER, (b"\xff\xfe", w.entry(1, [3, 4], size=48, crc=CRC))], {}, "not UTF-8"),
    # the bulk decoder meets the bad name, then an entry it leaves to the one-by-one path
    "non-utf8 name then an odd entry": ([HEADER, (b"\xff\xfe", w.entry(1, [3, 4], size=48, crc=CRC)),
                                         (b"\xff\xff", b"\x12\x40\x00")], {}, "not UTF-8"),
    "snappy garbage": ([HEADER], {"raw_data_block": b"\x40" + b"\xff" * 20}, "snappy"),
    "snappy declares 4 GiB": ([HEADER], {"raw_data_block": w.varint(1 << 32) + b"\x00" * 8}, "over the"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_tf_index(tmp_path, case):
    items, kw, message = CRAFTED[case]
    (tmp_path / "in").mkdir()
    src = _ckpt(tmp_path / "in", items, **kw)
    outcome, line = run_case(src, tmp_path / "o.npz", {"x": DATA} if message is None else None)
    if message is None:
        assert outcome == "values"
    else:
        assert outcome == "error"
        assert message in line and str(tmp_path / "in") in line, line


# ----------------------------------------------------------------- crafted npz

def _npz(path: Path, members: dict[str, bytes], method=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _patch_name(path: Path, old: bytes, new: bytes) -> Path:
    assert len(old) == len(new)
    path.write_bytes(path.read_bytes().replace(old, new))
    return path


def _zip_bomb(path: Path) -> Path:
    """A deflated member claiming 4 GiB from a few hundred bytes: more than deflate can expand."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = comp.compress(_npy(np.zeros(1 << 18, np.float32))) + comp.flush()
    name = b"bomb.npy"
    usize = 0xFFFFFFF0
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 33, 0, len(body), usize, len(name), 0) + name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 33, 0, len(body), usize,
                          len(name), 0, 0, 0, 0, 0, 0) + name
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(body), 0)
    path.write_bytes(local + body + central + eocd)
    return path


NPZ_CASES = {
    "pickled object member": (lambda p: _npz(p, {"x.npy": _npy(np.array([{"a": 1}], dtype=object))}), "pickled"),
    "parent path member": (lambda p: _npz(p, {"../x.npy": _npy(ARRAY)}), "unsafe"),
    "absolute path member": (lambda p: _npz(p, {"/etc/x.npy": _npy(ARRAY)}), "unsafe"),
    "NUL in member name": (lambda p: _patch_name(_npz(p, {"aXb.npy": _npy(ARRAY)}), b"aXb.npy", b"a\x00b.npy"), "unsafe"),
    "duplicate member names": (lambda p: _npz(p, {"x.npy": _npy(ARRAY), "y.npy": _npy(ARRAY)}) and _patch_name(p, b"y.npy", b"x.npy"), "duplicate member"),
    "header shape larger than member": (lambda p: _npz(p, {"x.npy": _npy(ARRAY).replace(b"(3, 4)", b"(9, 4)")}), "holds"),
    "huge header length": (lambda p: _npz(p, {"x.npy": b"\x93NUMPY\x02\x00" + struct.pack("<I", 1 << 31) + b"{}"}), "over the"),
    "not npy": (lambda p: _npz(p, {"x.npy": b"hello world"}), "not an .npy"),
    "zip bomb": (_zip_bomb, "zip bomb"),
    "truncated zip": (lambda p: p.write_bytes(_npz(p, {"x.npy": _npy(ARRAY)}).read_bytes()[:-30]) and p, "not a zip file"),
    "not a zip at all": (lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 100) and p, "not a zip file"),
    "fortran order": (lambda p: _npz(p, {"x.npy": _npy(np.asfortranarray(ARRAY))}), "Fortran"),
    "string dtype": (lambda p: _npz(p, {"x.npy": _npy(np.array(["a", "b"]))}), "not supported"),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_crafted_npz(tmp_path, case):
    make, message = NPZ_CASES[case]
    (tmp_path / "in").mkdir()
    src = make(tmp_path / "in" / "x.npz")
    outcome, line = run_case(src, tmp_path / "o.npz", None)
    assert outcome == "error"
    assert message in line and "x.npz" in line, line


# ----------------------------------------------------------------- crafted checkpoint directories
# Orbax (both layouts), Zarr stores and t5x TensorStore checkpoints, each written by the real
# library and then damaged. These formats record no checksums, so value-changing bit flips in
# chunk data cannot be caught by anyone; the cases are damage a reader can and must detect.

def _json_edit(path: Path, edit) -> None:
    import json

    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _orbax(d: Path, ocdbt: bool = False) -> Path:
    ocp = pytest.importorskip("orbax.checkpoint")
    tree = {"params": {"w": ARRAY, "b": np.arange(5, dtype=np.int32)}}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt)) as ckptr:
        ckptr.save(d / "ckpt", tree)
    return d / "ckpt"


def _zarr_store(d: Path) -> Path:
    zarr = pytest.importorskip("zarr")
    g = zarr.open_group(str(d / "x.zarr"), mode="w", zarr_format=3)
    a = g.create_array("w", shape=ARRAY.shape, dtype=ARRAY.dtype, chunks=(2, 2), config={"write_empty_chunks": True})
    a[...] = ARRAY
    return d / "x.zarr"


def _t5x(d: Path) -> Path:
    from conftest import TESTDATA

    src = TESTDATA / "t5x" / "tiny_t5" / "checkpoint_1"
    shutil.copytree(src, d / "checkpoint_1")
    for p in (d / "checkpoint_1").rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    (d / "checkpoint_1").chmod(0o755)
    return d / "checkpoint_1"


def _t5x_spec_edit(c: Path, edit) -> None:
    import msgpack

    tree = msgpack.unpackb((c / "checkpoint").read_bytes(), strict_map_key=False)
    edit(tree["optimizer"]["state"]["param_states"]["bias"])
    (c / "checkpoint").write_bytes(msgpack.packb(tree))


def _outside_symlink(leaf: Path) -> None:
    outside = leaf.parent.parent / "elsewhere"
    shutil.copytree(leaf, outside)
    shutil.rmtree(leaf)
    os.symlink(outside, leaf)


def _first_chunk(d: Path) -> Path:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name[0].isdigit())[0]


def _split_npz(d: Path) -> Path:
    import shardconv

    np.savez(d / "src.npz", a=np.arange(150_000, dtype=np.float32), b=np.ones((400, 400), np.float32))
    shardconv.convert(d / "src.npz", d / "m", to="npz", sink_options={"max_file_size": 1 << 20}, progress=False)
    (d / "src.npz").unlink()
    return d / "m"


def _index_edit(d: Path, edit) -> None:
    _json_edit(_split_npz(d) / "m.npz.index.json", lambda i: edit(i["weight_map"]))


DIR_CASES = {
    # Orbax, one directory per array
    "orbax: leaf key '..'": (lambda d: _json_edit(_orbax(d) / "_METADATA", lambda m: next(iter(
        m["tree_metadata"].values()))["key_metadata"].__setitem__(0, {"key": "..", "key_type": 2})), "unsafe"),
    "orbax: array directory is a symlink out of the checkpoint": (
        lambda d: _outside_symlink(_orbax(d) / "params.w"), "outside the checkpoint"),
    "orbax: _METADATA names an array that is missing": (
        lambda d: shutil.rmtree(_orbax(d) / "params.b"), "no array data"),
    "orbax: .zarray missing": (lambda d: (_orbax(d) / "params.w" / ".zarray").unlink(), "no array data"),
    "orbax: _METADATA not JSON": (lambda d: (_orbax(d) / "_METADATA").write_text("{oops"), "not valid JSON"),
    "orbax: _METADATA without tree": (lambda d: (_orbax(d) / "_METADATA").write_text("{}"), "no tree_metadata"),
    "orbax: shape overflows int64": (lambda d: _json_edit(_orbax(d) / "params.w" / ".zarray",
                                                          lambda m: m.update(shape=[1 << 40, 1 << 40])), "int64"),
    "orbax: negative shape": (lambda d: _json_edit(_orbax(d) / "params.w" / ".zarray",
                                                   lambda m: m.update(shape=[-3, 4])), "bad shape"),
    "orbax: zero chunk size": (lambda d: _json_edit(_orbax(d) / "params.w" / ".zarray",
                                                    lambda m: m.update(chunks=[0, 4])), "chunk"),
    "orbax: object dtype": (lambda d: _json_edit(_orbax(d) / "params.w" / ".zarray",
                                                 lambda m: m.update(dtype="|O")), "not supported"),
    "orbax: shape larger than the stored chunks": (lambda d: _json_edit(
        _orbax(d) / "params.w" / ".zarray", lambda m: m.update(shape=[3, 40000], chunks=[3, 40000])), "params.w"),
    "orbax: chunk truncated": (lambda d: (lambda c: c.write_bytes(c.read_bytes()[:9]))(
        _first_chunk(_orbax(d) / "params.w")), "params.w"),
    "orbax: chunk replaced by garbage": (lambda d: _first_chunk(_orbax(d) / "params.w").write_bytes(
        b"\x28\xb5\x2f\xfd" + bytes(range(200))), "params.w"),
    # Orbax, OCDBT
    "ocdbt: manifest missing": (lambda d: (_orbax(d, True) / "manifest.ocdbt").unlink(), "manifest.ocdbt"),
    "ocdbt: manifest truncated": (lambda d: (lambda m: m.write_bytes(m.read_bytes()[:20]))(
        _orbax(d, True) / "manifest.ocdbt"), "ckpt"),
    "ocdbt: data files missing": (lambda d: shutil.rmtree(_orbax(d, True) / "d"), "ckpt"),
    "ocdbt: data file truncated": (lambda d: [f.write_bytes(f.read_bytes()[:10]) for f in
                                              (_orbax(d, True) / "d").iterdir()], "ckpt"),
    # Zarr (zarr-python v3)
    "zarr: array symlinked out of the store": (lambda d: _outside_symlink(_zarr_store(d) / "w"), "outside"),
    "zarr: chunk missing": (lambda d: _first_chunk(_zarr_store(d) / "w").unlink(), "missing"),
    "zarr: zarr.json not JSON": (lambda d: (_zarr_store(d) / "w" / "zarr.json").write_text("[1,"), "zarr.json"),
    "zarr: unknown data type": (lambda d: _json_edit(_zarr_store(d) / "w" / "zarr.json",
                                                     lambda m: m.update(data_type="float128x")), "float128x"),
    "zarr: shape overflows int64": (lambda d: _json_edit(_zarr_store(d) / "w" / "zarr.json",
                                                         lambda m: m.update(shape=[1 << 40, 1 << 40])), "int64"),
    "zarr: chunk truncated": (lambda d: (lambda c: c.write_bytes(c.read_bytes()[:5]))(
        _first_chunk(_zarr_store(d) / "w")), "w"),
    # npz split into files with an index (shardconv --max-file-size)
    "npz-split: index points outside the directory": (lambda d: _index_edit(
        d, lambda w: w.update(a="../m-00001-of-00002.npz")), "not a file in this directory"),
    "npz-split: a file is missing": (lambda d: (_split_npz(d) / "m-00002-of-00002.npz").unlink(), "missing"),
    "npz-split: index not JSON": (lambda d: (_split_npz(d) / "m.npz.index.json").write_text("{"), "not valid JSON"),
    "npz-split: index without weight_map": (lambda d: (_split_npz(d) / "m.npz.index.json").write_text("{}"),
                                            "weight_map"),
    "npz-split: index maps a tensor to the wrong file": (lambda d: _index_edit(
        d, lambda w: w.update(a=w["b"])), "which the index maps to it"),
    "npz-split: a file truncated": (lambda d: (lambda f: f.write_bytes(f.read_bytes()[:-100]))(
        _split_npz(d) / "m-00001-of-00002.npz"), "m-00001-of-00002.npz"),
    # t5x TensorStore checkpoint (the real one in tests/data, copied and damaged)
    "t5x: spec path leads out of the checkpoint": (lambda d: _t5x_spec_edit(
        _t5x(d), lambda b: b["kvstore"].update(path="../../x/")), "outside the checkpoint"),
    "t5x: spec names a remote store": (lambda d: _t5x_spec_edit(
        _t5x(d), lambda b: b["kvstore"].update(driver="gcs", bucket="b")), "kvstore driver"),
    "t5x: array directory missing": (lambda d: shutil.rmtree(_t5x(d) / "state.param_states.bias"), "missing"),
    "t5x: checkpoint file truncated": (lambda d: (lambda c: c.write_bytes(c.read_bytes()[:100]))(
        _t5x(d) / "checkpoint"), "checkpoint"),
    "t5x: gzip chunk corrupt": (lambda d: (lambda c: c.write_bytes(c.read_bytes()[:12] + b"\xff" * 8))(
        _t5x(d) / "state.param_states.kernel" / "0.0"), "kernel"),
}


@pytest.mark.parametrize("case", sorted(DIR_CASES))
def test_crafted_checkpoint_dir(tmp_path, case):
    make, message = DIR_CASES[case]
    (tmp_path / "in").mkdir()
    make(tmp_path / "in")
    src = next(p for p in (tmp_path / "in").iterdir() if p.name != "elsewhere")
    outcome, line = run_case(src, tmp_path / "o.npz", None)
    assert outcome == "error"
    assert message in line, line
