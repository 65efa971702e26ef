"""Faults while converting: a full disk, write and fsync errors, a read error mid-shard.
Each fails cleanly with one line; the partial is kept for resume where that is safe
(and discarded after a failed fsync); the next run, once the fault is gone, finishes
with output identical to an uninterrupted run."""
from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess

import pytest
from procs import shardconv_cmd
from reference import reference_prefix, write_fixture

import shardconv
from shardconv.errors import DestinationError, DurabilityError, SourceError
from shardconv.sinks import npz as npz_sink
from shardconv.sources import tf_bundle


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return reference_prefix(write_fixture("big", tmp_path_factory.mktemp("faults"), "--mib", "4", "--shards", "2",
                                          "--no-reference"))


@pytest.fixture(scope="module")
def clean(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "clean.npz"
    shardconv.convert(ckpt, out, max_memory="1MiB")
    return out.read_bytes()


def _fail_after(n: int, err: int, real):
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(err, os.strerror(err))
        return real(*a, **k)
    return wrapper


def test_file_size_limit_fails_cleanly_and_a_later_run_succeeds(ckpt, clean, tmp_path):
    dest = tmp_path / "o.npz"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    p = subprocess.run(shardconv_cmd("convert", ckpt, dest, "--max-memory", "1MiB", "--quiet"),
                       preexec_fn=limit, capture_output=True, text=True)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0], p.stderr
    assert not dest.exists()
    shardconv.convert(ckpt, dest, max_memory="1MiB")
    assert dest.read_bytes() == clean


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_write_error_keeps_the_partial_and_the_next_run_resumes(ckpt, clean, tmp_path, monkeypatch, err):
    dest = tmp_path / "o.npz"
    monkeypatch.setattr(os, "pwrite", _fail_after(20, err, os.pwrite))
    with pytest.raises(DestinationError, match=os.strerror(err)):
        shardconv.convert(ckpt, dest, max_memory="1MiB")
    assert not dest.exists() and (tmp_path / "o.npz.partial" / "journal.jsonl").exists()
    monkeypatch.undo()
    r = shardconv.convert(ckpt, dest, max_memory="1MiB")
    assert r.chunks_resumed > 0
    assert dest.read_bytes() == clean


def test_failed_fsync_discards_the_partial(ckpt, clean, tmp_path, monkeypatch):
    """os.fsync itself fails on the output file (not a wrapper of ours): the partial is
    discarded and the next run starts over. (SinkTests checks the same for every sink.)"""
    dest = tmp_path / "o.npz"
    monkeypatch.setattr(os, "fsync", _fsync_fails_on("file", "o.npz.partial/o.npz"))
    with pytest.raises(DurabilityError, match=r"o\.npz\.partial/o\.npz: fsync failed \(Input/output error\)"):
        shardconv.convert(ckpt, dest, max_memory="1MiB")
    assert not dest.exists()
    assert not (tmp_path / "o.npz.partial").exists()
    monkeypatch.undo()
    r = shardconv.convert(ckpt, dest, max_memory="1MiB")
    assert r.chunks_resumed == 0
    assert dest.read_bytes() == clean


def test_read_error_mid_shard_is_reported_and_the_next_run_resumes(ckpt, clean, tmp_path, monkeypatch):
    dest = tmp_path / "o.npz"
    monkeypatch.setattr(tf_bundle.os, "preadv", _fail_after(25, errno.EIO, os.preadv))
    with pytest.raises(SourceError, match=r"data-0000\d-of-00002: read error in tensor .*Input/output error"):
        shardconv.convert(ckpt, dest, max_memory="1MiB")
    monkeypatch.undo()
    assert not dest.exists()
    r = shardconv.convert(ckpt, dest, max_memory="1MiB")
    assert r.chunks_resumed > 0
    assert dest.read_bytes() == clean


def _fsync_fails_on(kind: str, under: str = ""):
    """os.fsync that fails with EIO on directories or on regular files (whose path holds ``under``)."""
    import stat

    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode) == (kind == "directory") and under in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)
    return fsync


def test_failed_fsync_closes_the_sink_once(ckpt, tmp_path, monkeypatch):
    closes = []
    real_close = npz_sink.NpzSink.close
    monkeypatch.setattr(npz_sink.NpzSink, "close", lambda self: (closes.append(1), real_close(self))[1])
    monkeypatch.setattr(os, "fsync", _fsync_fails_on("file", "o.npz.partial/o.npz"))
    with pytest.raises(DurabilityError):
        shardconv.convert(ckpt, tmp_path / "o.npz", max_memory="1MiB")
    assert len(closes) == 1


def test_failed_fsync_of_the_journal_is_one_line_and_discards_the_partial(ckpt, clean, tmp_path, monkeypatch):
    dest = tmp_path / "o.npz"
    monkeypatch.setattr(os, "fsync", _fsync_fails_on("file"))
    with pytest.raises(DurabilityError, match=r"journal\.jsonl\.tmp: fsync failed \(Input/output error\)"):
        shardconv.convert(ckpt, dest, max_memory="1MiB")
    assert not dest.exists() and not (tmp_path / "o.npz.partial").exists()
    monkeypatch.undo()
    shardconv.convert(ckpt, dest, max_memory="1MiB")
    assert dest.read_bytes() == clean


def test_failed_fsync_of_a_directory_is_a_durability_error(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", _fsync_fails_on("directory"))
    with pytest.raises(DurabilityError, match=f"{tmp_path}: fsync failed"):
        shardconv.convert(ckpt, tmp_path / "o.npz", max_memory="1MiB")


def test_a_lock_that_cannot_be_opened_is_one_line(ckpt, tmp_path):
    dest = tmp_path / "o.npz"
    (tmp_path / "o.npz.partial" / "lock").mkdir(parents=True)
    with pytest.raises(DestinationError, match=r"o\.npz\.partial/lock: cannot open for writing: Is a directory"):
        shardconv.convert(ckpt, dest, max_memory="1MiB")


def test_a_partial_that_cannot_be_removed_is_one_line(tmp_path, monkeypatch):
    """--restart must remove the old partial output (a directory here: split npz); when the
    filesystem refuses, the error names it in one line."""
    import shutil

    import numpy as np

    np.savez(tmp_path / "in.npz", a=np.arange(1 << 18))
    dest = tmp_path / "split"
    argv = shardconv_cmd("convert", tmp_path / "in.npz", dest, "--to", "npz", "--max-file-size", "1MiB", "--quiet",
                         "--max-memory", "1MiB")
    p = subprocess.run(argv, env={**os.environ, "SHARDCONV_TEST_KILL": "journal:0"}, capture_output=True)
    assert p.returncode == -signal.SIGKILL and (tmp_path / "split.partial" / "split").is_dir()
    monkeypatch.setattr(shutil, "rmtree", _fail_after(0, errno.EBUSY, shutil.rmtree))
    with pytest.raises(DestinationError, match=r"split\.partial.*cannot remove: Device or resource busy"):
        shardconv.convert(tmp_path / "in.npz", dest, to="npz", sink_options={"max_file_size": 1 << 20}, restart=True)
    monkeypatch.undo()
    shardconv.convert(tmp_path / "in.npz", dest, to="npz", sink_options={"max_file_size": 1 << 20}, restart=True)
    assert dest.is_dir()


@pytest.mark.parametrize("fault", ["fsync", "pwrite"])
def test_an_os_fault_at_the_command_line_is_one_line(ckpt, tmp_path, fault):
    """The same faults the sink suite injects, in the CLI's own process: one line on stderr,
    exit 1, no traceback, nothing at DEST."""
    import sys

    dest = tmp_path / "o.npz"
    spec = (f"Fault('fsync', path='{dest.name}.partial/{dest.name}')" if fault == "fsync"
            else "Fault('pwrite', errno.ENOSPC, after=30)")
    code = ("import errno, sys; from shardconv.testing.faults import Fault, injected; from shardconv import cli\n"
            f"with injected([{spec}]):\n    rc = cli.main(sys.argv[1:])\nsys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "convert", str(ckpt), str(dest), "--max-memory", "1MiB", "--quiet"],
                       capture_output=True, text=True)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("shardconv: error: "), p.stderr
    assert ("fsync failed" if fault == "fsync" else "No space left on device") in lines[0], lines[0]
    assert not dest.exists()
    assert (tmp_path / "o.npz.partial").exists() == (fault == "pwrite")  # discarded after a failed fsync only


@pytest.mark.parametrize("to,name", [("npz", "o.npz"), ("safetensors", "o.safetensors"), ("zarr", "o.zarr"),
                                     ("tf-checkpoint", "o")])
def test_too_little_free_space_is_refused_before_anything_is_written(ckpt, tmp_path, monkeypatch, to, name):
    """Every local file sink checks the output's size against the file system's free space
    before writing: one message with both figures, nothing at DEST, no partial output."""
    real = os.statvfs

    def statvfs(path):
        st = real(path)
        return os.statvfs_result((*st[:4], 3, *st[5:]))  # 3 blocks available to us

    dest = tmp_path / name
    monkeypatch.setattr(os, "statvfs", statvfs)
    with pytest.raises(DestinationError, match=r"needs [0-9.]+ [KMG]iB for the output, only [0-9.]+ (KiB|B) free"):
        shardconv.convert(ckpt, dest, to=to, max_memory="64MiB")
    assert list(tmp_path.iterdir()) == []
