"""Zarr writes in flight: the sink's write returns a pending receipt, so the engine keeps more
than one chunk's write (TensorStore's encoding and file writes) going while it reads the next;
the values stay exact (the engine's buffers are untouched until each commit), a store error
surfaces as one line from ``result()``, ``close`` waits for writes nobody waited for, and
``sync`` makes committed chunks durable so a resume keeps them without reading them back."""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from procs import run_cli, tree_digest
from test_zarr import SMALL, ArraySource, assert_same, read_zarr_python

import shardconv
from shardconv.errors import DestinationError
from shardconv.sinks import zarr as zarr_sink
from shardconv.sources.zarr import ZarrSource
from shardconv.testing.sink_suite import BEFORE_RESTART, reference_tree, write_reference_npz

pytest.importorskip("tensorstore")
pytest.importorskip("zarr")


@pytest.fixture
def npz_in(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    tree = reference_tree()
    write_reference_npz(tmp_path / "in.npz", tree)
    return tmp_path / "in.npz", tree


@pytest.mark.parametrize("pending", [zarr_sink.PendingFiles, zarr_sink._PendingWrite], ids=["local", "object-store"])
def test_two_writes_in_flight_and_the_values_exact(tmp_path, monkeypatch, pending):
    """8 MiB through 64 KiB chunks (128 writes): at some moment two writes are pending at once,
    and the store holds exactly the input (a buffer reused before its write is done would show).
    A local store's chunk files are written by the sink's threads, an object store's by TensorStore."""
    live: set[int] = set()
    peak = [0]
    init, result = pending.__init__, pending.result

    def counted_init(self: Any, *args: Any) -> None:
        init(self, *args)
        live.add(id(self))
        peak[0] = max(peak[0], len(live))

    def counted_result(self: Any) -> int:
        r = result(self)
        live.discard(id(self))
        return r

    monkeypatch.setattr(pending, "__init__", counted_init)
    monkeypatch.setattr(pending, "result", counted_result)
    rng = np.random.default_rng(11)
    tree = {"w": rng.standard_normal((2048, 1024), dtype=np.float32)}
    local = pending is zarr_sink.PendingFiles
    dest = tmp_path / "f.zarr" if local else "memory://inflight/f.zarr"
    r = shardconv.convert(ArraySource(tree), dest, max_memory="1MiB",
                          sink_options={"chunk_mib": 1 / 16, "compression": "zstd"})
    assert r.chunks_written >= 100 and not live
    assert peak[0] >= 2, peak
    if local:
        assert_same(read_zarr_python(dest), tree)
    else:
        with ZarrSource(dest) as src:
            assert_same({t.name: src.read(t.name) for t in src.tensors()}, tree)
    assert shardconv.verify(dest)["tensors"] == 1


class _Failed:
    """A TensorStore future that failed."""

    def done(self) -> bool:
        return True

    def result(self) -> None:
        raise ValueError("NOT_FOUND: Error writing local file \"/x/c/0\": No such file or directory "
                         "[source locations='tensorstore/kvstore/file/file_key_value_store.cc:1']")


def test_a_failed_write_is_one_line_from_result_and_close_does_not_raise_it_again():
    w = zarr_sink._PendingWrite(_Failed(), "out.zarr: array 'w'", lambda: 7)
    assert w.done()
    with pytest.raises(DestinationError) as e:
        w.result()
    assert str(e.value) == "out.zarr: array 'w': NOT_FOUND: Error writing local file \"/x/c/0\": No such file or directory"
    sink = zarr_sink.ZarrSink()
    sink._in_flight = [w]
    sink.close()  # the run failed already: close waits, and reports nothing twice
    assert sink._in_flight == []


def test_durable_marks_follow_fsyncs_of_the_chunk_files_and_a_resume_reads_only_what_follows(npz_in, tmp_path,
                                                                                              monkeypatch):
    """Syncs as often as they can be (SHARDCONV_TEST_MARK_BYTES=1): in process, each mark comes
    after fsyncs of the chunk files committed since the last one and of their directories;
    killed after the first mark on an earlier boot, the resume reads back no marked chunk and
    the store equals an uninterrupted run's file for file."""
    from shardconv.core import pipeline
    from shardconv.core.journal import Journal

    src, _ = npz_in
    opts = {"chunk_mib": SMALL, "compression": "zstd"}
    clean = tmp_path / "clean.zarr"
    monkeypatch.setattr(pipeline, "MARK_BYTES", 1)
    events: list[str] = []
    real_fsync, real_append = os.fsync, Journal.append

    def fsync(fd: int) -> None:
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def append(self: Journal, rec: dict[str, Any]) -> None:
        events.append("mark" if "d" in rec else "chunk")
        real_append(self, rec)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Journal, "append", append)
    r = shardconv.convert(src, clean, max_memory="1MiB", sink_options=opts)
    marks = [k for k, e in enumerate(events) if e == "mark"]
    assert events.count("chunk") == r.chunks_written and marks  # syncs run beside the copy: not one per chunk
    partial = f"{clean}.partial/{clean.name}"
    for k, prev in zip(marks, [-1, *marks]):
        synced = [e for e in events[prev + 1:k] if e != "chunk"]
        files = [p for p in synced if re.search(r"/c([./]\d+)*$", p)]  # the chunk files (v3 keys), then their dirs
        assert files and synced[-1] == partial and synced.index(files[-1]) < synced.index(partial), synced
    monkeypatch.undo()
    dest = tmp_path / "o.zarr"
    p = run_cli("convert", src, dest, "--max-memory", "1MiB", "--chunk-mib", str(SMALL), "--compression", "zstd",
                "--quiet", env={"SHARDCONV_TEST_KILL": "mark:1", "SHARDCONV_TEST_MARK_BYTES": "1", **BEFORE_RESTART})
    assert p.returncode == -signal.SIGKILL, p.stderr
    recs = [json.loads(ln) for ln in (Path(f"{dest}.partial") / "journal.jsonl").read_text().splitlines()[1:] if ln]
    (t,) = [r["d"] for r in recs if "d" in r]
    journaled = sum(1 for r in recs if "i" in r)
    checked: list[int] = []
    real_check = zarr_sink.ZarrSink.check

    def check(self: zarr_sink.ZarrSink, c: Any, receipt: Any) -> bool:
        checked.append(c.offset)
        return real_check(self, c, receipt)

    monkeypatch.setattr(zarr_sink.ZarrSink, "check", check)
    r = shardconv.convert(src, dest, max_memory="1MiB", sink_options=opts)
    assert r.chunks_resumed == journaled and len(checked) == journaled - t  # only chunks after the mark read back
    assert {k.split("/", 1)[1]: v for k, v in tree_digest(dest).items()} == \
        {k.split("/", 1)[1]: v for k, v in tree_digest(clean).items()}
