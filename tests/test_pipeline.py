"""The pipeline's paths between source and sink: verbatim chunks copied in cache-sized parts,
the receipt checksum computed once, and pending receipts kept in flight."""
from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from throwaway_sink import RawDirSink, read_rawdir

import shardconv
from shardconv.api import make_plan
from shardconv.core import engine, pipeline
from shardconv.core.journal import Journal
from shardconv.errors import ChecksumError, FormatError, SourceChangedError
from shardconv.sinks.npz import NpzSink
from shardconv.sinks.safetensors import SafetensorsSink
from shardconv.sources import open_source
from shardconv.util.checksums import crc32
from shardconv.util.uncached import ALIGN


@pytest.fixture
def src(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    tree = {"emb": rng.standard_normal((700, 1000)).astype(np.float32),   # 2.7 MiB: several chunks
            "b": rng.standard_normal(333).astype(np.float64), "s": np.array(7, np.int32),
            "none": np.zeros((0, 4), np.float32)}
    np.savez(tmp_path / "in.npz", **tree)
    return tmp_path / "in.npz", tree


@pytest.mark.parametrize("sink_cls", [NpzSink, SafetensorsSink])
def test_verbatim_chunks_are_copied_in_cache_sized_parts(src, tmp_path, monkeypatch, sink_cls):
    """Every chunk of a stored npz reaches a piecewise sink through ``write_part`` in pieces of
    at most PIECE bytes that tile it in order, never through ``write``; a chunk's pieces are
    widened to the whole pages of the output file around it, so neighbouring chunks' pieces
    overlap by at most a page (the same bytes, written twice); the values are exact."""
    path, tree = src
    monkeypatch.setattr(pipeline, "PIECE", 64 << 10)  # smaller than the chunks a 4 MiB budget makes
    parts: list[tuple[int, int, int]] = []
    real_part = sink_cls.write_part
    monkeypatch.setattr(sink_cls, "write_part", lambda self, c, d: (parts.append((c.index, c.offset, len(d))),
                                                                    real_part(self, c, d))[1])
    real_write = sink_cls.write
    monkeypatch.setattr(sink_cls, "write", lambda self, c, d, crc=None: real_write(self, c, d, crc) if not c.length
                        else pytest.fail("a verbatim chunk went through write"))
    suffix = ".npz" if sink_cls is NpzSink else ".safetensors"
    r = shardconv.convert(path, tmp_path / f"o{suffix}", max_memory="4MiB")
    assert r.chunks_written > 3 and pipeline.PIECE // 2 < max(n for *_, n in parts) <= pipeline.PIECE
    ends = []
    for i in {i for i, *_ in parts}:
        mine = [(o, n) for j, o, n in parts if j == i]
        assert all(0 <= o + n - o2 <= ALIGN for (o, n), (o2, _) in zip(mine, mine[1:]))  # in order, no gap
        assert mine[0][0] == 0
        ends.append(sum(mine[-1]))
    assert sorted(ends) == sorted(v.nbytes for v in tree.values())  # each tensor whole, no more
    got = dict(np.load(tmp_path / "o.npz")) if sink_cls is NpzSink else safetensors.numpy.load_file(tmp_path / "o.safetensors")
    assert set(got) == set(tree) and all(np.array_equal(got[k], v) and got[k].dtype == v.dtype for k, v in tree.items())


def test_a_corrupt_byte_on_the_direct_path_is_a_checksum_error(src, tmp_path):
    path, _ = src
    data = bytearray(path.read_bytes())
    at = data.index(np.load(path)["emb"][350].tobytes()[:64])  # a byte in the middle of 'emb'
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"in\.npz: checksum mismatch in tensor 'emb'"):
        shardconv.convert(path, tmp_path / "o.npz", max_memory="4MiB")
    assert not (tmp_path / "o.npz").exists()


def test_a_source_cut_short_during_a_direct_copy_is_one_line(src, tmp_path, monkeypatch):
    """The input truncated while the run holds it open: one line naming the file and the tensor,
    and saying that the input changed during the run (the cause, not a damaged checkpoint)."""
    path, _ = src
    real = pipeline._prefetch

    def cut_then_prefetch(raw, length):
        if os.path.getsize(path) > raw.offset + 100:  # once: a later call would extend it with zeros
            os.truncate(path, raw.offset + 100)
        real(raw, length)

    monkeypatch.setattr(pipeline, "_prefetch", cut_then_prefetch)
    with pytest.raises(SourceChangedError, match=r"in\.npz: file ends inside tensor '\w+' \(truncated\?\); the input "
                       r"changed while it was being converted \(file 'in\.npz' changed \([^)]*size\)\)") as e:
        shardconv.convert(path, tmp_path / "o.npz", max_memory="4MiB")
    assert "\n" not in str(e.value) and isinstance(e.value.__cause__, FormatError)
    assert not (tmp_path / "o.npz").exists()


def test_short_reads_on_the_direct_path_are_continued_and_exact(src, tmp_path, monkeypatch):
    """A file system may return fewer bytes than asked without being at the end (network
    file systems, signals): the copy continues the read where it stopped; values exact."""
    path, tree = src
    monkeypatch.setattr(pipeline, "PIECE", 64 << 10)
    real = os.preadv
    short = [0]

    def half(fd, buffers, offset):
        (view,) = buffers
        if len(view) > 1:
            short[0] += 1
            return real(fd, [view[: len(view) // 2]], offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", half)
    shardconv.convert(path, tmp_path / "o.npz", max_memory="4MiB")
    monkeypatch.undo()
    got = dict(np.load(tmp_path / "o.npz"))
    assert short[0] > 40 and all(np.array_equal(got[k], v) and got[k].dtype == v.dtype for k, v in tree.items())


class _LateSink(RawDirSink):
    """Writes each chunk later, on another thread, reading ``data`` only then: a pending receipt."""

    pool = ThreadPoolExecutor(3)

    def write(self, chunk, data, crc=None):
        def later():
            time.sleep(random.random() * 0.02)
            return RawDirSink.write(self, chunk, data)
        return self.pool.submit(later)


def test_pending_receipts_keep_their_buffers_and_are_journaled_in_order(src, tmp_path, monkeypatch):
    """A sink whose writes complete later, out of order: the engine leaves each buffer alone
    until its write is done (else the bytes written would be another chunk's) and journals
    chunks in plan order with the receipts the futures return."""
    path, tree = src
    journaled: list[dict] = []
    real = Journal.append
    monkeypatch.setattr(Journal, "append", lambda self, rec: (journaled.append(rec), real(self, rec))[1])
    with open_source(path) as source:
        plan = make_plan(source)
        r = engine.run(plan, _LateSink(), tmp_path / "o.rawdir", max_memory=1 << 22, progress=False)
    chunks = [rec for rec in journaled if "i" in rec]
    assert [c["i"] for c in chunks] == list(range(r.chunks_written)) and r.chunks_written > 3
    assert all(isinstance(c["r"], int) for c in chunks)
    got = read_rawdir(tmp_path / "o.rawdir")
    assert all(np.array_equal(got[k], v) for k, v in tree.items())


def test_the_receipt_checksum_is_computed_by_the_reader_for_buffered_chunks(src, tmp_path, monkeypatch):
    """A cast output goes through a buffer; the sink gets the CRC32 of exactly what it writes."""
    path, tree = src
    seen: list[bool] = []
    real = NpzSink.write
    monkeypatch.setattr(NpzSink, "write", lambda self, c, d, crc=None: (seen.append(crc == crc32(d)),
                                                                         real(self, c, d, crc))[1])
    shardconv.convert(path, tmp_path / "o.npz", max_memory="4MiB", dtype="float16")
    assert seen and all(seen)
    got = np.load(tmp_path / "o.npz")
    assert np.array_equal(got["emb"], tree["emb"].astype(np.float16))


@pytest.mark.parametrize("dest", ["out.npz", "out.safetensors"])
def test_a_direct_copy_from_a_tf_checkpoint_imports_no_numpy(tmp_path, dest):
    """A TF checkpoint copied verbatim needs no NumPy (~0.2 CPU s of start-up, with its BLAS
    threads): neither the CLI's sink modules nor the engine's buffers may import it."""
    from procs import assert_python_runs

    small = Path(__file__).parent / "data" / "tf-serving" / "saved_model_half_plus_two_cpu" / "00000123"
    assert_python_runs(f"import sys\nfrom shardconv.cli import main\n"
                       f"assert main(['convert', {str(small)!r}, {str(tmp_path / dest)!r}, '--quiet']) == 0\n"
                       "assert 'numpy' not in sys.modules, 'numpy imported'\n")
    assert (tmp_path / dest).stat().st_size > 0


def test_a_failed_write_mid_chunk_stops_the_reader_and_leaves_nothing(src, tmp_path, monkeypatch):
    """The writer fails while the reader is pieces ahead of it in the same chunk: the error is
    raised, the reader thread stops (it does not wait for slots forever), nothing is published,
    and a rerun resumes to the exact values."""
    import threading

    from shardconv.errors import DestinationError

    path, tree = src
    monkeypatch.setattr(pipeline, "PIECE", 64 << 10)  # many pieces per chunk
    calls = []
    real_part = NpzSink.write_part

    def failing(self, c, d):
        calls.append(c)
        if len(calls) == 5:
            raise DestinationError("disk full (simulated)")
        return real_part(self, c, d)

    monkeypatch.setattr(NpzSink, "write_part", failing)
    raised: list[BaseException] = []

    def convert() -> None:
        try:
            shardconv.convert(path, tmp_path / "o.npz", max_memory="4MiB")
        except BaseException as e:
            raised.append(e)

    run = threading.Thread(target=convert, daemon=True)
    run.start()
    run.join(60)  # a reader left waiting for a slot would hold the run here
    assert not run.is_alive(), "the run did not end after its write failed"
    assert len(raised) == 1 and isinstance(raised[0], DestinationError) and "disk full" in str(raised[0])
    assert not any(t.name == "shardconv-reader" for t in threading.enumerate())
    assert not (tmp_path / "o.npz").exists()
    monkeypatch.setattr(NpzSink, "write_part", real_part)
    shardconv.convert(path, tmp_path / "o.npz", max_memory="4MiB")
    got = dict(np.load(tmp_path / "o.npz"))
    assert set(got) == set(tree) and all(np.array_equal(got[k], v) for k, v in tree.items())
