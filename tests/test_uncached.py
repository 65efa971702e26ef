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
from reference import assert_exact, load_reference, reference_prefix, write_fixture

import shardconv
from shardconv.core import pipeline
from shardconv.core.budget import HUGE, HUGE_FROM, Budget, BufferPool
from shardconv.errors import DestinationError
from shardconv.formats import bundle_entries as be
from shardconv.formats.sstable import SSTable
from shardconv.sinks.npz import ALIGN_FROM, NpzSink
from shardconv.testing.faults import Fault, injected
from shardconv.util import uncached
from shardconv.util.uncached import ALIGN, MIN_BYTES, UncachedWrites, address

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
    if not uncached.huge_pages():
        pytest.skip("the kernel gives no transparent huge pages: nothing is written direct")
    return tmp_path


@contextmanager
def counted(fail_direct: int | None = None) -> Iterator[dict[str, int]]:
    """Bytes written by ``os.pwrite`` through O_DIRECT descriptors and through the others;
    ``fail_direct``: each O_DIRECT write fails with that errno instead."""
    real = os.pwrite
    counts = {"direct": 0, "cached": 0, "cached under a page": 0, "direct writes": 0}

    def pwrite(fd: int, data, offset: int) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)
        if direct and fail_direct is not None:
            raise OSError(fail_direct, os.strerror(fail_direct))
        n = real(fd, data, offset)
        counts["direct" if direct else "cached"] += n
        counts["direct writes"] += direct
        counts["cached under a page"] += not direct and n < ALIGN
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
    assert_exact(_load(path), want)


@pytest.mark.parametrize("budget", ["64MiB", "4MiB"])
def test_npz_tensors_of_a_mib_go_past_the_page_cache_and_land_exactly(ckpt, out, budget):
    """An npz member of ``ALIGN_FROM`` bytes or more starts on a page; with a small budget,
    chunks of 333-column rows start anywhere in a page: the pieces are laid out in memory at
    their file's page offset and widened to whole pages, so all but each such tensor's last
    page goes direct, and nothing else does."""
    prefix, want = ckpt
    dest = out / "model.npz"
    with counted() as n:
        r = shardconv.convert(prefix, dest, max_memory=budget)
    _assert_exact(dest, want)
    big = [v.nbytes for v in want.values() if v.nbytes >= ALIGN_FROM]
    assert len(big) >= 5
    # (With 4MiB, a chunk that ends a tensor can be under MIN_BYTES: cached whole.)
    edge = ALIGN if budget == "64MiB" else MIN_BYTES + ALIGN
    assert sum(big) - edge * len(big) <= n["direct"] <= sum(big), n
    # Through the page cache go the headers, the smaller tensors whole, and each big tensor's
    # last page; a chunk is not cut into pages at its edges (~150 writes under a page here with
    # a 4MiB budget's small chunks, were they not widened): under a page go three headers per
    # tensor (npy twice, zip) and a big tensor's last page.
    small = sum(v.nbytes for v in want.values() if v.nbytes < ALIGN_FROM)
    assert n["cached"] <= small + edge * len(big) + (16 << 10), n
    assert n["cached under a page"] <= 4 * len(want) + 8, n
    # One write per chunk (``pipeline.PIECE``): the disk gets the longest requests it takes.
    assert 0 < n["direct writes"] <= r.chunks_written, (n, r.chunks_written)


def _huge_advised(view: memoryview) -> bool:
    """Whether the mapping holding ``view`` was advised to use huge pages (``hg`` in its
    VmFlags, /proc/self/smaps)."""
    addr = address(view)
    assert addr is not None
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            mapping = lo <= addr < hi
        elif mapping and line.startswith("VmFlags:"):
            return " hg" in line
    raise AssertionError("the buffer's mapping is not in /proc/self/smaps")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="no /proc/self/smaps")
def test_pool_buffers_of_a_chunk_are_huge_pages_charged_whole():
    """A pool buffer of ``HUGE_FROM`` bytes or more starts on a huge page, is advised to use
    them (direct writes from 4 KiB pages reach the disk cut into short requests), and the
    budget charges all of its huge pages; smaller buffers are plain pages."""
    budget = Budget.for_limit(256 << 20)
    assert budget.chunk_bytes == 16 << 20 and budget.buffer_bytes == 18 << 20
    assert budget.n_buffers * budget.buffer_bytes <= budget.max_memory
    buf = BufferPool(1, budget.buffer_bytes).get()
    assert len(buf) == budget.buffer_bytes and address(buf) % HUGE == 0 and _huge_advised(buf)
    buf[:] = b"\x01" * len(buf)  # writable all through
    small = Budget.for_limit(4 << 20)
    assert small.buffer_bytes < HUGE_FROM and small.buffer_bytes == small.chunk_bytes + 2 * ALIGN
    assert not _huge_advised(BufferPool(1, small.buffer_bytes).get())


@pytest.mark.parametrize("to", ["model.safetensors", "ck"])
def test_outputs_whose_tensors_start_inside_a_page_are_written_through_the_cache(ckpt, out, to):
    """safetensors and TF bundles lay tensors out back to back: a tensor that does not start on
    a page goes through the page cache whole (direct writes beside cached pages of the same
    tensor fragment the file), in pieces, not page by page; values exact."""
    prefix, want = ckpt
    with counted() as n:
        shardconv.convert(prefix, out / to, max_memory="4MiB", to="tf-checkpoint" if to == "ck" else None)
    data = sum(v.nbytes for v in want.values())
    if to == "ck":  # only the tensors that happen to start on a page go direct
        with SSTable(out / "ck" / "ckpt.index") as table:
            entries = [be.parse_entry(k.decode(), v, "ck") for k, v in table.items() if k]
        on_page = sum(e.size for e in entries if e.offset % ALIGN == 0)
        assert any(e.offset % ALIGN for e in entries if e.size) and n["direct"] <= on_page, (n, on_page)
        shardconv.convert(out / to, out / "back.npz")
        _assert_exact(out / "back.npz", want)
    else:
        assert n["direct"] == 0, n
        _assert_exact(out / to, want)
    assert n["direct"] + n["cached"] >= data and n["cached under a page"] <= 2 * len(want) + 8, n


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


def test_without_huge_pages_every_file_is_written_through_the_cache(ckpt, out, monkeypatch):
    """A kernel that gives no transparent huge pages ("never"): direct writes from 4 KiB pages
    reach the disk cut short, slower than writeback, so nothing goes direct, tensors go in
    1 MiB pieces (``pipeline.BUFFERED_PIECE``), and the bytes are those of a direct run."""
    prefix, want = ckpt
    with counted() as n:
        shardconv.convert(prefix, out / "direct.npz", max_memory="64MiB")
    assert n["direct"] > 0
    setting = out / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(uncached, "THP_SETTING", str(setting))
    uncached.huge_pages.cache_clear()
    try:
        sizes: list[int] = []
        real = NpzSink.write_part
        monkeypatch.setattr(NpzSink, "write_part", lambda self, c, d: (sizes.append(len(d)), real(self, c, d))[1])
        with counted() as n:
            shardconv.convert(prefix, out / "cached.npz", max_memory="64MiB")
    finally:
        uncached.huge_pages.cache_clear()
    assert n["direct"] == 0 and sizes and max(sizes) <= pipeline.BUFFERED_PIECE, (n, max(sizes))
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


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_conversion_leaves_no_descriptor_open(ckpt, out, suffix):
    """The sink closes its direct descriptors with its own (one per output file per run
    otherwise, until the process runs out)."""
    prefix, _ = ckpt
    shardconv.convert(prefix, out / f"warm{suffix}", max_memory="64MiB")  # imports and caches settle
    before = sorted(os.listdir("/proc/self/fd"))
    with counted() as n:
        shardconv.convert(prefix, out / f"model{suffix}", max_memory="64MiB")
    assert n["direct"] > 0 or suffix != ".npz", n
    assert sorted(os.listdir("/proc/self/fd")) == before


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
