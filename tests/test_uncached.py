"""Writes past the page cache (``shardconv/util/uncached.py``).

The page-aligned middle of each piece a file sink writes goes through an ``O_DIRECT``
descriptor, the rest through the page cache. The output holds exactly what TensorFlow reads
from the checkpoint. Where the filesystem refuses ``O_DIRECT``, the same bytes are written
through the page cache; any other error is a write error naming the file.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from reference import load_reference, reference_prefix, write_fixture

import shardconv
from shardconv.errors import DestinationError
from shardconv.testing.faults import Fault, injected
from shardconv.util.uncached import ALIGN, UncachedWrites

O_DIRECT = getattr(os, "O_DIRECT", 0)


def _refuses_o_direct(where: Path) -> bool:
    """Whether the filesystem holding ``where`` refuses an aligned O_DIRECT write."""
    path = where / "probe"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | O_DIRECT)
    except OSError:
        return True
    try:
        os.pwrite(fd, mmap.mmap(-1, ALIGN), 0)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
        path.unlink()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    d = write_fixture("big", tmp_path_factory.mktemp("uncached"), "--mib", "24", "--shards", "2")
    return reference_prefix(d), load_reference(d)  # type: ignore[return-value]


@pytest.fixture
def out(tmp_path) -> Path:
    if not O_DIRECT or _refuses_o_direct(tmp_path):
        pytest.skip("the temporary directory's filesystem refuses O_DIRECT")
    return tmp_path


@contextmanager
def counted(fail_direct: int | None = None) -> Iterator[dict[str, int]]:
    """Bytes written by ``os.pwrite`` through O_DIRECT descriptors and through the others;
    ``fail_direct``: each O_DIRECT write fails with that errno instead."""
    real = os.pwrite
    counts = {"direct": 0, "cached": 0}

    def pwrite(fd: int, data, offset: int) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)
        if direct and fail_direct is not None:
            raise OSError(fail_direct, os.strerror(fail_direct))
        n = real(fd, data, offset)
        counts["direct" if direct else "cached"] += n
        return n

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "pwrite", pwrite)
        yield counts


def _load(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from safetensors.numpy import load_file

    return load_file(path)


def _assert_exact(path: Path, want: dict[str, np.ndarray]) -> None:
    got = _load(path)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].tobytes() == v.tobytes(), k


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("budget", ["64MiB", "4MiB"])
def test_most_bytes_go_past_the_page_cache_and_land_exactly(ckpt, out, suffix, budget):
    """npz data starts anywhere in a page, safetensors' too; with a small budget, chunks of
    333-column rows start anywhere as well: the pieces are laid out in memory at their file's
    page offset, so all but the edges of each piece go direct."""
    prefix, want = ckpt
    dest = out / f"model{suffix}"
    with counted() as n:
        shardconv.convert(prefix, dest, max_memory=budget)
    _assert_exact(dest, want)
    data = sum(v.nbytes for v in want.values())
    assert n["direct"] >= 0.9 * data, n


def test_a_tf_checkpoint_is_written_past_the_page_cache_too(ckpt, out):
    """The bundle writer (``--to tf-checkpoint``, SavedModel variables) lays its tensors out
    back to back, so most pieces start inside a page; its values read back exactly."""
    prefix, want = ckpt
    with counted() as n:
        shardconv.convert(prefix, out / "ck", to="tf-checkpoint", max_memory="64MiB")
    assert n["direct"] >= 0.9 * sum(v.nbytes for v in want.values()), n
    shardconv.convert(out / "ck", out / "back.npz")
    _assert_exact(out / "back.npz", want)


def test_a_filesystem_that_refuses_o_direct_gets_the_same_bytes(ckpt, out):
    prefix, want = ckpt
    with counted() as n:
        shardconv.convert(prefix, out / "direct.npz", max_memory="64MiB")
    assert n["direct"] > 0
    with counted() as n, injected([Fault("open", errno.EINVAL, path="/proc/self/fd/")]) as opens:
        shardconv.convert(prefix, out / "cached.npz", max_memory="64MiB")
    assert opens[0] > 0 and n["direct"] == 0, (opens, n)
    assert (out / "cached.npz").read_bytes() == (out / "direct.npz").read_bytes()
    _assert_exact(out / "cached.npz", want)


def test_a_direct_write_refused_as_invalid_is_written_through_the_cache(ckpt, out):
    prefix, want = ckpt
    with counted(fail_direct=errno.EINVAL) as n:
        shardconv.convert(prefix, out / "model.safetensors", max_memory="64MiB")
    assert n["direct"] == 0 and n["cached"] >= sum(v.nbytes for v in want.values())
    _assert_exact(out / "model.safetensors", want)


def test_a_full_disk_on_a_direct_write_is_one_error_and_nothing_at_dest(ckpt, out):
    prefix, _ = ckpt
    dest = out / "model.npz"
    with counted(fail_direct=errno.ENOSPC), pytest.raises(DestinationError) as e:
        shardconv.convert(prefix, dest, max_memory="64MiB")
    assert "write failed at offset" in str(e.value) and os.strerror(errno.ENOSPC) in str(e.value)
    assert "\n" not in str(e.value) and not dest.exists()


def test_a_reused_descriptor_number_writes_to_the_file_it_now_names(out):
    """A sink may close a file and open another that gets the same descriptor number: the
    direct descriptor must follow the number to the new file."""
    data = memoryview(mmap.mmap(-1, 1 << 20))
    data[:] = b"\x01" * len(data)
    writes = UncachedWrites()
    fd = os.open(out / "a", os.O_RDWR | os.O_CREAT)
    assert writes.write(fd, data, 0, "a") == (0, len(data))
    os.close(fd)
    fd2 = os.open(out / "b", os.O_RDWR | os.O_CREAT)
    assert fd2 == fd
    data[:] = b"\x02" * len(data)
    assert writes.write(fd2, data, ALIGN, "b") == (0, len(data))
    os.close(fd2)
    writes.close()
    assert (out / "a").read_bytes() == b"\x01" * len(data)
    assert (out / "b").read_bytes() == bytes(ALIGN) + b"\x02" * len(data)


def test_only_whole_aligned_pages_go_direct(out):
    buf = memoryview(mmap.mmap(-1, 2 << 20))
    writes = UncachedWrites()
    fd = os.open(out / "f", os.O_RDWR | os.O_CREAT)
    try:
        # the piece starts 100 bytes into a page in its file and in memory: its middle goes
        assert writes.write(fd, buf[100:100 + (1 << 20)], 100, "f") == (ALIGN - 100, (1 << 20) - ALIGN)
        # memory and file disagree on where a page starts: nothing goes direct
        assert writes.write(fd, buf[100:100 + (1 << 20)], 200, "f") == (0, 0)
        # read-only memory, or a write under the minimum: nothing goes direct
        assert writes.write(fd, memoryview(bytes(1 << 20)), 0, "f") == (0, 0)
        assert writes.write(fd, buf[:ALIGN], 0, "f") == (0, 0)
    finally:
        os.close(fd)
        writes.close()
