"""The sink contract (shardconv/sinks/base.py) and what the front ends build on it.

- Three places: the throwaway ``rawdir`` format (tests/throwaway_sink.py, registered by its
  last line) passes the whole shared ``SinkTests`` suite through one subclass below, and
  the API and the command line take its generated option.
- Attach is non-destructive: opening a committed output to resume changes no byte of it.
- The engine closes a sink once, gives it a manifest it must not edit, and refuses an
  object-store URL for a sink that does not declare ``remote``.
- ``verify`` and ``plan`` close what they open; one default memory bound.
"""
from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import throwaway_sink
from procs import assert_python_runs
from throwaway_sink import read_rawdir

import shardconv
from shardconv import api
from shardconv.core import engine
from shardconv.core.budget import Budget
from shardconv.core.destination import Destination, SinkContext, state_dir
from shardconv.errors import DurabilityError, UsageError
from shardconv.sinks import REGISTRY, sink_for
from shardconv.testing.sink_suite import SinkTests, reference_tree, write_reference_npz

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _plugin(monkeypatch, tmp_path):
    """Commands run in a child process find the throwaway format as a plugin."""
    monkeypatch.setenv("SHARDCONV_PLUGINS", "throwaway_sink")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SHARDCONV_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def src(tmp_path) -> Path:
    path = tmp_path / "in.npz"
    write_reference_npz(path, reference_tree())
    return path


def run_cli(*argv: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardconv", *map(str, argv)], capture_output=True, text=True)


# -- three places: the module, its registry line, one SinkTests subclass -------------------


class TestRawDirSink(SinkTests):
    suffix = ".rawdir"
    sink_options = {"magic": "SHARDCONV"}
    cli_flags = ["--magic", "SHARDCONV"]
    byte_identical = False

    def read_back(self, dest: Path) -> dict[str, np.ndarray]:
        return read_rawdir(dest)


def test_the_registry_line_is_all_the_api_and_the_command_line_need(src, tmp_path):
    assert REGISTRY["rawdir"] == ("throwaway_sink", "RawDirSink", (".rawdir",))
    r = api.convert(src, tmp_path / "a.rawdir", sink_options={"magic": "XY"})
    assert r.tensors == len(reference_tree())
    assert (tmp_path / "a.rawdir" / "params" / "emb.bin").read_bytes()[:2] == b"XY"
    p = run_cli("convert", src, tmp_path / "b.rawdir", "--magic", "XY", "--quiet")
    assert p.returncode == 0, p.stderr
    got, want = read_rawdir(tmp_path / "b.rawdir"), reference_tree()
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in want.items()}
    help_text = run_cli("convert", "--help").stdout
    assert "raw directory output" in help_text and "--magic TEXT" in help_text


def test_an_option_of_another_format_is_one_line_naming_the_flag(src, tmp_path):
    p = run_cli("convert", src, tmp_path / "o.npz", "--magic", "XY")
    assert p.returncode == 2 and p.stderr.strip() == (
        "shardconv: error: output format 'npz' does not take the option(s) --magic"), p.stderr
    with pytest.raises(UsageError, match=r"does not take the option\(s\) magic$"):
        api.convert(src, tmp_path / "o.npz", sink_options={"magic": "XY"})
    assert not list(tmp_path.glob("o.npz*"))


def test_option_text_is_parsed_as_on_the_command_line_and_checked():
    assert sink_for("x.npz", max_file_size="2MiB").options() == {"max_file_size": 2 << 20}
    assert sink_for("x.zarr", zarr_format="2").options()["zarr_format"] == 2
    with pytest.raises(UsageError, match="1 MiB minimum"):
        sink_for("x.npz", max_file_size=1000)
    with pytest.raises(UsageError, match="must be one of 2, 3"):
        sink_for("x.zarr", zarr_format=4)
    with pytest.raises(UsageError, match="orbax"):
        sink_for("x.zarr", orbax_step=3)


# -- attach is non-destructive ---------------------------------------------------------------


def _digests(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("name, options", [("orbax.zarr", {"layout": "orbax", "chunk_mib": 1 / 32}),
                                           ("step.zarr", {"layout": "orbax", "orbax_step": 3, "chunk_mib": 1 / 32})])
def test_attaching_to_a_committed_output_leaves_its_sha256_unchanged(src, tmp_path, name, options):
    """A late duplicate worker (or a resume) attaching to a finished output (SinkTests checks
    every suite's sink; these are the Orbax layouts no suite runs): before the new contract the
    Zarr sink deleted the root marker (and NpzSink re-truncated its file, cutting off the zip
    directory)."""
    pytest.importorskip("tensorstore")
    dest = tmp_path / name
    r = api.convert(src, dest, max_memory="1MiB", sink_options=options)
    before = _digests(dest)
    sink = sink_for(dest, **options)
    outputs = api.plan(src).leave_out(sink.leave_out).outputs
    sink.open(dest, outputs, SinkContext(Destination.parse(dest), chunk_bytes=r.chunk_bytes, resume=True))
    sink.close()
    assert _digests(dest) == before


def test_a_chunk_written_after_attaching_to_a_finished_zarr_store_unpublishes_it_first(src, tmp_path):
    pytest.importorskip("tensorstore")
    dest = tmp_path / "o.zarr"
    r = api.convert(src, dest, max_memory="1MiB", sink_options={"chunk_mib": 1 / 32})
    sink = sink_for(dest, chunk_mib=1 / 32)
    plan = api.plan(src)
    sink.open(dest, plan.outputs, SinkContext(Destination.parse(dest), chunk_bytes=r.chunk_bytes, resume=True))
    try:
        assert (dest / "zarr.json").exists()
        chunk = engine.chunk_plan(plan.outputs, r.chunk_bytes, sink.chunk_grid)[0]
        sink.write(chunk, memoryview(bytearray(chunk.length)))
        assert not (dest / "zarr.json").exists()  # no longer complete-looking
    finally:
        sink.close()


# -- the engine's side of the contract --------------------------------------------------------


def test_finish_gets_a_manifest_it_does_not_edit_and_the_sink_is_closed_once(src, tmp_path, monkeypatch):
    from shardconv.sinks.npz import NpzSink

    seen, closes = [], []
    finish, close = NpzSink.finish, NpzSink.close

    def spy_finish(self, receipts, manifest):
        given = copy.deepcopy(manifest)
        finish(self, receipts, manifest)
        seen.append(manifest == given)
        raise DurabilityError("fsync failed (simulated)")

    monkeypatch.setattr(NpzSink, "finish", spy_finish)
    monkeypatch.setattr(NpzSink, "close", lambda self: (closes.append(1), close(self)))
    with pytest.raises(DurabilityError):
        api.convert(src, tmp_path / "o.npz")
    assert seen == [True] and len(closes) == 1
    assert not os.path.lexists(tmp_path / "o.npz.partial") and not os.path.lexists(tmp_path / "o.npz")


def test_a_url_for_a_local_only_sink_is_refused_before_anything_is_written(src, tmp_path):
    with pytest.raises(UsageError, match="local path only"):
        api.convert(src, "memory://bucket/o.npz")
    assert not (tmp_path / "state").exists()


def test_destinations_parse_once():
    local = Destination.parse("some/dir/o.npz")
    assert not local.is_url and local.path == Path("some/dir/o.npz").absolute() and local.shown == local.path
    f = Destination.parse("file:///tmp/x/o.zarr")
    assert not f.is_url and f.path == Path("/tmp/x/o.zarr") and f.shown == "file:///tmp/x/o.zarr"
    s3 = Destination.parse("S3://Bucket/run/m.zarr/")
    assert s3.is_url and s3.url == "s3://Bucket/run/m.zarr" and s3.label == s3.url
    assert s3.path.parent == state_dir() / "remote" and s3.path.name.startswith("m.zarr-")
    assert Destination.parse(s3) is s3


def test_manifest_lists_the_checksums_of_each_outputs_inputs_in_source_order(src):
    plan = api.plan(src)
    manifest = engine.manifest_for(plan, sink_for("x.npz"))
    units = plan.source.units()
    for entry in manifest["tensors"]:
        inputs = set(entry["source_dtypes"])
        want = {k: f"{u.algorithm}:{u.expected}" for k, u in units.items() if u.tensor in inputs}
        assert entry.get("source_checksums", {}) == want
        assert list(entry.get("source_checksums", {})) == list(want)


# -- the front ends -----------------------------------------------------------------------------


def test_one_default_memory_bound():
    from shardconv.cli import build_parser

    for argv in (["convert", "a", "b"], ["plan", "a"], ["verify", "a"]):
        assert build_parser().parse_args(argv).max_memory == api.DEFAULT_MAX_MEMORY
    assert Budget.for_limit(shardconv.api.parse_size(api.DEFAULT_MAX_MEMORY)).chunk_bytes > 0


def test_verify_closes_the_output_when_the_source_cannot_be_opened(src, tmp_path, monkeypatch):
    import importlib

    from shardconv.errors import SourceError
    from shardconv.sources import open_source

    api.convert(src, tmp_path / "o.npz")
    opened = []

    def failing_second(path, **kw):
        if opened:
            raise SourceError(f"{path}: cannot open (simulated)")
        opened.append(open_source(path, **kw))
        return opened[-1]

    monkeypatch.setattr(importlib.import_module("shardconv.verification"), "open_source", failing_second)
    closed = []
    monkeypatch.setattr(type(open_source(tmp_path / "o.npz")), "close", lambda self: closed.append(self))
    with pytest.raises(SourceError, match="simulated"):
        shardconv.verify(tmp_path / "o.npz", src)
    assert closed == opened


def test_plan_closes_its_source(src, monkeypatch):
    from shardconv.sources import open_source

    closed = []
    monkeypatch.setattr(type(open_source(src)), "close", lambda self: closed.append(self))
    plan = shardconv.plan(src)
    assert closed == [plan.source]


def test_shardconv_verify_is_the_function_of_shardconv_verification():
    code = ("import sys, shardconv\n"
            "assert 'numpy' not in sys.modules\n"
            "import shardconv.verification\n"
            "from shardconv.verification import verify\n"
            "assert shardconv.verify is verify and shardconv.verification.verify is verify\n")
    assert_python_runs(code)


def test_throwaway_module_is_only_a_plugin():
    """Nothing in shardconv names the throwaway format: its module registers it."""
    package = Path(shardconv.__file__).parent
    assert not [p for p in package.rglob("*.py") if "rawdir" in p.read_text()]
    assert throwaway_sink.RawDirSink.name == "rawdir"
