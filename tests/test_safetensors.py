"""safetensors sink and source: the shared suites, the format rules of
docs/safetensors-format.md (one test per rule), files the ``safetensors`` library
writes and reads, hostile headers and a fuzz target for the header parser."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import load_reference, reference_prefix
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_fuzz import _count, _mutate
from test_fuzz import _read_all as read_all_fuzzed

import shardconv
from shardconv import cli
from shardconv.errors import FormatError, PlanError, UnsupportedError
from shardconv.sinks.safetensors import CODES
from shardconv.sources import open_source
from shardconv.sources.safetensors import DTYPE_ORDER, SafetensorsSource, SplitSafetensorsSource
from shardconv.testing.sink_suite import SinkTests, reference_tree, write_reference_npz
from shardconv.testing.source_suite import SourceTests

INDEX = "model.safetensors.index.json"


@pytest.fixture(autouse=True)
def _numpy_names_float8(monkeypatch):
    """safetensors' NumPy reader looks float8 types up on ``numpy`` itself (0.8.0), where
    only ml_dtypes defines them: give them the names it looks for."""
    for name in ("float8_e4m3fn", "float8_e5m2"):
        monkeypatch.setattr(np, name, getattr(ml_dtypes, name), raising=False)


def writable_tree() -> dict[str, np.ndarray]:
    """The sink suite's tree without its complex tensor (safetensors has no complex code)."""
    return {k: v for k, v in reference_tree().items() if v.dtype.kind != "c"}


def every_dtype_tree() -> dict[str, np.ndarray]:
    """One tensor of every dtype shardconv writes, plus scalars and empty tensors."""
    rng = np.random.default_rng(7)
    tree: dict[str, np.ndarray] = {}
    for name in CODES:
        dt = np.dtype(getattr(ml_dtypes, name, None) or name)
        raw = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
        if dt == np.bool_:
            tree[f"t/{name}"] = raw % 2 == 1
        elif dt.kind == "f" or dt.name.startswith(("bfloat", "float8")):
            tree[f"t/{name}"] = (rng.standard_normal((4, 6)) * 3).astype(dt)
        else:
            tree[f"t/{name}"] = np.frombuffer(rng.bytes(24 * dt.itemsize), dt).reshape(4, 6).copy()
    tree["scalar/f32"] = np.array(1.5, np.float32)
    tree["scalar/bf16"] = np.array(-2.25, ml_dtypes.bfloat16)
    tree["empty/i64"] = np.zeros((0,), np.int64)
    tree["empty/f16"] = np.zeros((3, 0, 2), np.float16)
    return tree


def raw_header(path: Path) -> tuple[int, bytes, dict[str, Any]]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, data[8:8 + n], json.loads(data[8:8 + n])


def load_sharded(dest: Path) -> dict[str, np.ndarray]:
    """As transformers loads a sharded checkpoint: the index's weight_map names each
    tensor's file; each file is opened with safe_open."""
    index = json.loads((dest / INDEX).read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(dest / fname, framework="numpy") as f:
            assert f.metadata()["format"] == "pt"
            for k in f.keys():
                assert index["weight_map"][k] == fname
                out[k] = f.get_tensor(k)
    assert set(out) == set(index["weight_map"])
    return out


# ----------------------------------------------------------------- the shared sink suite

class TestSafetensorsSink(SinkTests):
    suffix = ".safetensors"

    def reference(self) -> dict[str, np.ndarray]:
        return writable_tree()

    def read_back(self, dest: Path) -> dict[str, np.ndarray]:
        return load_file(dest)


class TestSplitSafetensorsSink(TestSafetensorsSink):
    """--max-file-size: model-0000K-of-0000N.safetensors and model.safetensors.index.json."""

    label = "safetensors split (--max-file-size)"
    suffix = ""
    to = "safetensors"
    sink_options = {"max_file_size": 1 << 20}
    cli_flags = ["--max-file-size", "1MiB"]

    def snapshot(self, dest: Path) -> Any:
        return {p.name: p.read_bytes() for p in sorted(dest.iterdir())}

    def read_back(self, dest: Path) -> dict[str, np.ndarray]:
        return load_sharded(dest)


# ----------------------------------------------------------------- the shared source suite

class TestSafetensorsSource(SourceTests):
    """Files written by the safetensors library: every dtype, scalars, empty tensors."""

    def make(self, tmp_path):
        tree = every_dtype_tree()
        save_file(tree, tmp_path / "m.safetensors", metadata={"format": "pt"})
        return SafetensorsSource(tmp_path / "m.safetensors"), tree


class TestSplitSafetensorsSource(SourceTests):
    """Two library-written files and a transformers-style index, opened by their directory."""

    def make(self, tmp_path):
        tree = every_dtype_tree()
        names = sorted(tree)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        d = tmp_path / "ckpt"
        d.mkdir()
        for fname, keys in halves.items():
            save_file({k: tree[k] for k in keys}, d / fname)
        weight_map = {k: f for f, keys in halves.items() for k in keys}
        (d / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
        src = open_source(d)
        assert isinstance(src, SplitSafetensorsSource)
        return src, tree


# ----------------------------------------------------------------- the library reads shardconv output

@pytest.fixture(scope="module")
def out(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    d = tmp_path_factory.mktemp("st")
    tree = every_dtype_tree()
    save_file(tree, d / "in.safetensors")
    shardconv.convert(d / "in.safetensors", d / "o.safetensors", max_memory="1MiB")
    return d / "o.safetensors", tree


@pytest.fixture(scope="module")
def split(out, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    dest = tmp_path_factory.mktemp("split") / "out"
    src, tree = out
    big = {**tree, "big/a": np.arange(300_000, dtype=np.float32), "big/b": np.ones((700, 500), np.float32)}
    save_file(big, src.parent / "big.safetensors")
    shardconv.convert(src.parent / "big.safetensors", dest, to="safetensors", max_memory="1MiB",
                      sink_options={"max_file_size": 1 << 20})
    return dest, big


def test_safe_open_reads_every_tensor_exactly(out):
    dest, tree = out
    with safe_open(dest, framework="numpy") as f:
        assert set(f.keys()) == set(tree)
        for k, v in tree.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes(), k
    got = load_file(dest)
    assert {k: (v.dtype, v.tobytes()) for k, v in got.items()} == {k: (v.dtype, v.tobytes()) for k, v in tree.items()}


def test_sharded_output_loads_through_its_index_as_transformers_does(split):
    dest, tree = split
    got = load_sharded(dest)
    assert {k: (v.dtype, v.shape, v.tobytes()) for k, v in got.items()} == \
           {k: (v.dtype, v.shape, v.tobytes()) for k, v in tree.items()}
    assert len({f for f in json.loads((dest / INDEX).read_text())["weight_map"].values()}) >= 3


def test_layout_is_the_library_writers_own(out, tmp_path):
    """Same tensors saved by save_file: the same entries, in the same order, and the same
    data bytes (only __metadata__ differs)."""
    dest, tree = out
    save_file(tree, tmp_path / "lib.safetensors")
    n_lib, head_lib, lib = raw_header(tmp_path / "lib.safetensors")
    n_ours, _, ours = raw_header(dest)
    ours.pop("__metadata__")
    assert list(ours.items()) == list(lib.items())
    assert dest.read_bytes()[8 + n_ours:] == (tmp_path / "lib.safetensors").read_bytes()[8 + n_lib:]


def test_files_the_library_writes_convert_to_npz_exactly(tmp_path):
    from test_npz import load_npz

    tree = every_dtype_tree()
    save_file(tree, tmp_path / "m.safetensors")
    r = shardconv.convert(tmp_path / "m.safetensors", tmp_path / "o.npz", max_memory="1MiB")
    assert not r.dropped
    got = load_npz(tmp_path / "o.npz")
    assert {k: (v.dtype, v.shape, v.tobytes()) for k, v in got.items()} == \
           {k: (v.dtype, v.shape, v.tobytes()) for k, v in tree.items()}


def test_codes_only_newer_libraries_write_are_read(tmp_path):
    """C64 (safetensors 0.7+) is read as complex64 and converts to npz exactly."""
    from test_npz import load_npz

    tree = {"c": (np.arange(6) + 1j * np.arange(6)[::-1]).astype(np.complex64), "f": np.ones(3, np.float32)}
    try:
        save_file(tree, tmp_path / "m.safetensors")
    except Exception as e:  # an older library: no complex code to test
        pytest.skip(f"this safetensors cannot write complex64: {e}")
    assert raw_header(tmp_path / "m.safetensors")[2]["c"]["dtype"] == "C64"
    shardconv.convert(tmp_path / "m.safetensors", tmp_path / "o.npz")
    got = load_npz(tmp_path / "o.npz")
    assert {k: (v.dtype, v.tobytes()) for k, v in got.items()} == {k: (v.dtype, v.tobytes()) for k, v in tree.items()}


def test_tf_checkpoint_to_safetensors_exactly_leaving_out_what_it_cannot_hold(tf1_dtypes_ckpt, tmp_path):
    ref = load_reference(tf1_dtypes_ckpt)
    dest = tmp_path / "o.safetensors"
    r = shardconv.convert(reference_prefix(tf1_dtypes_ckpt), dest, max_memory="1MiB")
    got = load_file(dest)
    writable = {k: v for k, v in ref.items() if not isinstance(v, list) and v.dtype.name in CODES}
    assert set(got) == set(writable)
    for k, v in writable.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k
    assert {n for n, _ in r.dropped} == set(ref) - set(writable)
    assert any("no safetensors dtype" in why for _, why in r.dropped)
    shardconv.verify(dest, reference_prefix(tf1_dtypes_ckpt))


def test_plan_shows_what_is_left_out_and_why(tmp_path, capsys):
    write_reference_npz(tmp_path / "in.npz", reference_tree())
    assert cli.main(["plan", str(tmp_path / "in.npz"), "--to", "safetensors"]) == 0
    text = capsys.readouterr().out
    assert "left out 1: complex64 has no safetensors dtype" in text and "stats/c64" in text


def test_engine_refuses_unfitted_dtypes_before_the_first_byte(tmp_path):
    from shardconv.api import make_plan
    from shardconv.core import engine
    from shardconv.sinks import sink_for

    write_reference_npz(tmp_path / "in.npz", reference_tree())
    with open_source(tmp_path / "in.npz") as s, pytest.raises(PlanError, match="complex64 has no safetensors"):
        engine.run(make_plan(s), sink_for(tmp_path / "o.safetensors"), tmp_path / "o.safetensors", max_memory=1 << 26)
    assert not list(tmp_path.glob("o.safetensors*"))


# ----------------------------------------------------------------- docs/safetensors-format.md, one test per rule

def test_rule1_length_then_header_padded_to_8(out):
    dest, _ = out
    n, head, _ = raw_header(dest)
    assert n % 8 == 0 and head.startswith(b"{") and head.rstrip(b" ").endswith(b"}")
    head.decode("utf-8")
    assert b"\n" not in head and b": " not in head  # compact, as the library writes it


def test_rule2_entries_and_codes(out):
    dest, tree = out
    _, _, h = raw_header(dest)
    for k, v in tree.items():
        assert h[k]["dtype"] == CODES[v.dtype.name] and h[k]["shape"] == list(v.shape), k
        assert list(h[k]) == ["dtype", "shape", "data_offsets"]


def test_rule3_order_alignment_no_holes(out):
    dest, _ = out
    n, _, h = raw_header(dest)
    h.pop("__metadata__")
    rank = {c: i for i, c in enumerate(DTYPE_ORDER)}
    keys = list(h)
    assert keys == sorted(keys, key=lambda k: (-rank[h[k]["dtype"]], k))
    pos = 0
    for k in keys:
        b, e = h[k]["data_offsets"]
        assert b == pos and (8 + n + b) % np.dtype(shardconv.util.dtypes.numpy_dtype(
            {c: d for d, c in CODES.items()}[h[k]["dtype"]])).itemsize == 0, k
        pos = e
    assert 8 + n + pos == dest.stat().st_size


def test_rule4_metadata_says_where_tensors_came_from(out):
    dest, _ = out
    _, head, h = raw_header(dest)
    meta = h["__metadata__"]
    assert head.startswith(b'{"__metadata__":')
    manifest = json.loads(Path(str(dest) + ".shardconv.json").read_text())
    assert meta == {"format": "pt", "shardconv": shardconv.__version__, "source_format": "safetensors",
                    "plan": manifest["plan"]}
    assert list(meta) == sorted(meta)


def test_rule5_left_out_dtypes_are_listed(tmp_path):
    write_reference_npz(tmp_path / "in.npz", reference_tree())
    shardconv.convert(tmp_path / "in.npz", tmp_path / "o.safetensors")
    manifest = json.loads((tmp_path / "o.safetensors.shardconv.json").read_text())
    assert [d["name"] for d in manifest["dropped"]] == ["stats/c64"]
    assert "stats/c64" not in raw_header(tmp_path / "o.safetensors")[2]


def test_rule6_bytes_are_a_function_of_the_plan(out, tmp_path):
    dest, _ = out
    again = tmp_path / "again.safetensors"
    shardconv.convert(dest.parent / "in.safetensors", again, max_memory="64MiB")
    assert again.read_bytes() == dest.read_bytes()


def test_rule7_manifest_has_true_dtypes_and_crc32s(out):
    import zlib

    dest, tree = out
    manifest = json.loads(Path(str(dest) + ".shardconv.json").read_text())
    assert [t["name"] for t in manifest["tensors"]] == [t.name for t in shardconv.list_tensors(dest.parent / "in.safetensors")]
    for t in manifest["tensors"]:
        v = tree[t["name"]]
        assert (t["dtype"], t["shape"], t["nbytes"]) == (v.dtype.name, list(v.shape), v.nbytes)
        assert t["crc32"] == zlib.crc32(v.tobytes())
    assert shardconv.verify(dest)["checksums_verified"] == len(tree)


def test_rule8_nothing_at_dest_before_complete(out, tmp_path):
    src = out[0].parent / "in.safetensors"
    dest = tmp_path / "o.safetensors"
    for point in ("chunk:1", "finish"):
        p = subprocess.run([sys.executable, "-m", "shardconv", "convert", str(src), str(dest), "--quiet",
                            "--max-memory", "1MiB"], env={**os.environ, "SHARDCONV_TEST_KILL": point})
        assert p.returncode == -signal.SIGKILL
        assert not dest.exists()
        staged = next(Path(f"{dest}.partial").glob("*safetensors*"), None)
        if point == "chunk:1":  # the header is written last: a staged file is no safetensors file yet
            assert staged is not None and staged.read_bytes()[:8] == bytes(8)


def test_rule9_split_files_index_and_sizes(split):
    dest, tree = split
    index = json.loads((dest / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tree.values())
    assert sorted(p.name for p in dest.iterdir()) == sorted([INDEX, *files, *(f + ".shardconv.json" for f in files)])
    for f in files:
        size = (dest / f).stat().st_size
        assert size <= 1 << 20 or len(raw_header(dest / f)[2]) == 2, f  # over the size: one tensor alone


# ----------------------------------------------------------------- hostile headers: one line each

def _file(header: bytes | dict | str, data: bytes = b"", length: int | None = None) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def _t(dtype: str, shape: list, b: int, e: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


HOSTILE = {
    "header length past the end": (_file({"a": _t("F32", [2], 0, 8)}, bytes(8), length=1000), "runs past the end"),
    "header length over 100 MB": (_file(b"{}", length=100_000_001), "over the 100000000-byte limit"),
    "header length 2**64-1": (_file(b"{}", length=2**64 - 1), "over the 100000000-byte limit"),
    "file shorter than 8 bytes": (b"\x02\x00\x00", "too short"),
    "header shorter than it says": (_file(b'{"a":', length=5), "not valid JSON"),
    "overlapping offsets": (_file({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, bytes(12)), "overlap"),
    "offsets past the end of the file": (_file({"a": _t("F32", [2], 0, 8)}, bytes(4)), "holds 4 data bytes"),
    "trailing bytes after the tensors": (_file({"a": _t("F32", [2], 0, 8)}, bytes(12)), "holds 12 data bytes"),
    "hole between tensors": (_file({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, bytes(12)), "a hole"),
    "hole at the start": (_file({"a": _t("F32", [1], 4, 8)}, bytes(8)), "a hole"),
    "dtype and shape disagree with the offsets": (_file({"a": _t("F32", [3], 0, 8)}, bytes(8)), "is 12 bytes"),
    "end before begin": (_file({"a": _t("F32", [0], 8, 0)}, bytes(8)), "0 <= begin <= end"),
    "negative dimension": (_file({"a": _t("F32", [-2], 0, 8)}, bytes(8)), "non-negative"),
    "float dimension": (_file({"a": _t("F32", [2.0], 0, 8)}, bytes(8)), "non-negative"),
    "shape overflows int64": (_file({"a": _t("F32", [2**40, 2**40], 0, 8)}, bytes(8)), "int64"),
    "unknown dtype": (_file({"a": _t("F17", [2], 0, 8)}, bytes(8)), "unknown dtype"),
    "duplicate names": (_file('{"a":' + json.dumps(_t("F32", [1], 0, 4)) + ',"a":'
                              + json.dumps(_t("F32", [1], 4, 8)) + "}", bytes(8)), "duplicate key 'a'"),
    "non-UTF-8 name bytes": (_file(b'{"\xff\xfe":' + json.dumps(_t("U8", [1], 0, 1)).encode() + b"}", bytes(1)),
                             "not UTF-8"),
    "lone surrogate name": (_file('{"\\ud800":' + json.dumps(_t("U8", [1], 0, 1)) + "}", bytes(1)),
                            "not valid UTF-8"),
    "header not an object": (_file(b"[1, 2]   "), "starts with"),
    "metadata not strings": (_file({"__metadata__": {"a": 1}}), "map of strings"),
    "entry lacks offsets": (_file({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "lacks"),
    "NaN in header": (_file('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', bytes(4)), "NaN"),
    "deeply nested header": (_file("{" + '"a":' * 1 + "[" * 100_000 + "]" * 100_000 + "}"), "JSON"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE), ids=lambda c: c.replace(" ", "-"))
def test_hostile_safetensors_header_is_one_line_format_error(tmp_path, case):
    data, needle = HOSTILE[case]
    src = tmp_path / "m.safetensors"
    src.write_bytes(data)
    with pytest.raises(FormatError, match=None) as e:
        SafetensorsSource(src).close()
    assert needle in str(e.value) and "\n" not in str(e.value) and str(src) in str(e.value), str(e.value)
    dest = tmp_path / "o.npz"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["convert", str(src), str(dest), "--quiet"])
    lines = err.getvalue().strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("shardconv: error: "), err.getvalue()
    assert needle in lines[0], lines[0]
    assert not dest.exists() and not Path(f"{dest}.partial").exists()
    log = os.environ.get("SHARDCONV_CORPUS_LOG")
    if log:
        with open(log, "a") as f:
            f.write("one-line error\n")


def test_hostile_sub_byte_dtype_is_unsupported_not_misread(tmp_path):
    src = tmp_path / "m.safetensors"
    src.write_bytes(_file({"a": _t("F4", [2], 0, 1)}, bytes(1)))
    with pytest.raises(UnsupportedError, match="F4"):
        SafetensorsSource(src)


def test_opened_by_content_or_by_the_directory_holding_it(tmp_path):
    save_file({"a": np.arange(4, dtype=np.int16)}, tmp_path / "weights.bin")
    assert isinstance(open_source(tmp_path / "weights.bin"), SafetensorsSource)
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    save_file({"a": np.arange(4, dtype=np.int16)}, d / "model.safetensors")
    with open_source(d) as s:
        assert isinstance(s, SafetensorsSource) and s.read("a").tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "x.npz", a=np.ones(2))
    assert not isinstance(open_source(tmp_path / "x.npz"), SafetensorsSource)


def test_split_index_naming_a_file_elsewhere_is_refused(tmp_path):
    save_file({"a": np.ones(2, np.float32)}, tmp_path / "x.safetensors")
    d = tmp_path / "ck"
    d.mkdir()
    (d / INDEX).write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(FormatError, match="not a file in this directory"):
        open_source(d)


# ----------------------------------------------------------------- fuzz: the header parser

EXAMPLES = int(os.environ.get("SHARDCONV_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _valid_file() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save_file({"a": np.arange(6, dtype=np.int32).reshape(2, 3), "b": np.ones(3, ml_dtypes.bfloat16),
                   "c": np.zeros((0, 2), np.float16)}, Path(d, "m.safetensors"), metadata={"k": "v"})
        return Path(d, "m.safetensors").read_bytes()


VALID = _valid_file()


def _read_all(data: bytes) -> None:
    read_all_fuzzed(SafetensorsSource, "m.safetensors", data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       st.one_of(st.none(), st.integers(0, len(VALID))))
def test_safetensors_header_fuzz_mutations(edits, cut):
    _count("safetensors-mutation")
    _read_all(_mutate(VALID, edits, cut))


_json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=6),
                            lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids,
                                                                                      max_size=3), max_leaves=12)


@FUZZ
@given(st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]),
                       st.fixed_dictionaries({"dtype": st.sampled_from([*DTYPE_ORDER, "X"]) | _json_values,
                                              "shape": st.lists(st.integers(-2, 2**33), max_size=3) | _json_values,
                                              "data_offsets": st.lists(st.integers(-1, 64), max_size=3)}) | _json_values,
                       max_size=3),
       st.integers(0, 80))
def test_safetensors_header_fuzz_structured(header, data_len):
    _count("safetensors-header")
    _read_all(_file(header, bytes(data_len)))
