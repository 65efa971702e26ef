"""util.fileio and util.safefs: the one fsync of a tree, the one CRC of a file range, the one
atomic JSON write, and one-line errors from os.fsync / os.open / os.replace / os.listdir
themselves (patched here, not our wrappers)."""
from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from shardconv.core.staging import Staging
from shardconv.errors import DestinationError, DurabilityError
from shardconv.util import fileio, safefs
from shardconv.util.checksums import crc32, crc32c


def _fail(err: int):
    def f(*a, **k):
        raise OSError(err, os.strerror(err))
    return f


def test_range_crc_of_a_descriptor_or_a_path_and_none_when_short(tmp_path):
    p = tmp_path / "f"
    data = os.urandom(3 << 20)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert fileio.range_crc(fd, 5, len(data) - 5) == crc32(data[5:])
        assert fileio.range_crc(fd, 100, 0) == 0
        assert fileio.range_crc(fd, 10, len(data)) is None          # past the end
    finally:
        os.close(fd)
    assert fileio.range_crc(p, 7, 1 << 20, crc32c) == crc32c(data[7:7 + (1 << 20)])
    assert fileio.range_crc(tmp_path / "missing", 0, 1) is None


def test_range_crc_read_error_is_none(tmp_path, monkeypatch):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10)
    monkeypatch.setattr(os, "preadv", _fail(errno.EIO))
    assert fileio.range_crc(p, 0, 10) is None


def test_fsync_tree_fsyncs_every_file_and_directory(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("x", "a/y", "a/b/z"):
        (tmp_path / rel).write_bytes(b"1")
    (tmp_path / "link").symlink_to(tmp_path / "x")
    seen = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (seen.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    fileio.fsync_tree(tmp_path)
    want = {str(tmp_path / r) for r in ("x", "a/y", "a/b/z", "", "a", "a/b")}
    assert {s.rstrip("/") for s in seen} == {w.rstrip("/") for w in want}


@pytest.mark.parametrize("what", ["fsync", "open"])
def test_fsync_tree_failure_is_one_durability_line_naming_the_path(tmp_path, monkeypatch, what):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"1")
    monkeypatch.setattr(os, what, _fail(errno.EIO))
    with pytest.raises(DurabilityError) as e:
        fileio.fsync_tree(tmp_path / "d")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "d") in msg and "Input/output error" in msg, msg


def test_write_json_is_atomic_sorted_and_fsynced(tmp_path, monkeypatch):
    p = tmp_path / "m.json"
    p.write_text("old")
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    safefs.write_json(p, {"b": 1, "a": [1, 2]})
    assert p.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=1, sort_keys=True) + "\n"
    assert synced == [str(tmp_path / "m.json.tmp")] and not (tmp_path / "m.json.tmp").exists()
    monkeypatch.setattr(os, "replace", _fail(errno.EIO))
    with pytest.raises(DestinationError, match=r"m\.json: cannot write: Input/output error"):
        safefs.write_json(p, {"c": 3}, fsync=False)
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}   # the old file, never a torn one


def test_write_json_never_writes_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "m.json.tmp").symlink_to(victim)
    with pytest.raises(DestinationError, match="symbolic link"):
        safefs.write_json(tmp_path / "m.json", {})
    assert victim.read_text() == "precious"


def test_lstat_and_listing_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "lstat", _fail(errno.EACCES))
    with pytest.raises(DestinationError, match=r"x: cannot look at it: Permission denied"):
        safefs.lstat(tmp_path / "x")
    monkeypatch.undo()
    s = Staging(tmp_path / "out.npz")
    s.acquire()
    try:
        monkeypatch.setattr(os, "listdir", _fail(errno.EIO))
        with pytest.raises(DestinationError, match=r"out\.npz\.partial: cannot list: Input/output error"):
            s.reset()
    finally:
        monkeypatch.undo()
        s.release(remove=True)
    assert not (tmp_path / "out.npz.partial").exists()


def test_a_lock_that_cannot_be_opened_is_one_line(tmp_path, monkeypatch):
    real = os.open

    def refuse_lock(path, *a, **k):
        if os.fspath(path) == "lock":
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", refuse_lock)
    s = Staging(tmp_path / "o")
    with pytest.raises(DestinationError, match=r"o\.partial/lock: cannot open for writing: Too many open files"):
        s.acquire()
    assert s._dir_fd == -1 and not (tmp_path / "o.partial").exists()   # nothing left behind


def test_staging_dir_fsync_failure_is_a_durability_error(tmp_path, monkeypatch):
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DurabilityError, match=f"{tmp_path}: fsync failed"):
        safefs.fsync_dir(tmp_path)


def test_injected_faults_match_paths_count_calls_and_fail_after(tmp_path):
    from shardconv.testing.faults import Fault, injected

    (tmp_path / "d").mkdir()
    dfd = os.open(tmp_path / "d", os.O_RDONLY)
    try:
        with injected([Fault("open", errno.EMFILE, after=1, path="d/x"), Fault("fsync", after=None)]) as counts:
            os.close(os.open("x", os.O_WRONLY | os.O_CREAT, dir_fd=dfd))       # matched (dir_fd joined), allowed
            os.close(os.open(tmp_path / "y", os.O_WRONLY | os.O_CREAT))         # not matched
            with pytest.raises(OSError, match="Too many open files"):
                os.open(tmp_path / "d" / "x", os.O_RDONLY)                      # the second matching call fails
            os.fsync(dfd)
        assert counts == [2, 1]
    finally:
        os.close(dfd)
    assert os.open.__module__ == "posix" or os.open.__name__ == "open"         # restored


def test_preallocate_allocates_blocks_without_changing_size_or_bytes(tmp_path):
    """A new output's blocks are allocated up front where the filesystem can; its size and
    its bytes (zeros, and what was written) stay as they are."""
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"head", 0)
        fileio.truncate(fd, 3 << 20, path)
        assert os.fstat(fd).st_blocks * 512 < 1 << 20  # sparse before
        fileio.preallocate(fd, 3 << 20)
        st = os.fstat(fd)
        assert st.st_size == 3 << 20
        if fileio._fallocate is not None and fileio._fallocate(fd, 0, 0, 1) == 0:  # this filesystem allocates
            assert st.st_blocks * 512 >= 3 << 20
        assert os.pread(fd, 8, 0) == b"head\0\0\0\0" and os.pread(fd, 4, (3 << 20) - 4) == bytes(4)
    finally:
        os.close(fd)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_file_sinks_preallocate_each_new_output_file(tmp_path, monkeypatch, suffix):
    import numpy as np

    import shardconv
    from shardconv.sinks import npz, safetensors

    calls: list[int] = []
    for module in (npz, safetensors):
        real = module.preallocate
        monkeypatch.setattr(module, "preallocate", lambda fd, size, real=real: (calls.append(size), real(fd, size))[1])
    np.savez(tmp_path / "in.npz", a=np.arange(1000, dtype=np.float32), b=np.ones((3, 4), np.int64))
    shardconv.convert(tmp_path / "in.npz", tmp_path / f"out{suffix}", max_memory="4MiB")
    assert len(calls) == 1 and calls[0] >= 4000 + 96
