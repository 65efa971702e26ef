"""What every source must do. Subclass ``SourceTests`` and implement ``make``."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .. import api
from ..core import pipeline
from ..core.integrity import IntegrityTracker
from ..core.journal import describe_changes
from ..errors import ChecksumError, ResumeError, SourceChangedError, SourceError
from ..sources import open_source
from ..sources.base import Source
from .caselog import log_case
from .reads import record_reads


def as_bytes(v: Any) -> bytes:
    return np.ascontiguousarray(v).tobytes()


class SourceTests:
    """``make(tmp_path)`` returns (source, reference) where reference maps every tensor
    name to the value the format's own library returns (np.ndarray, or list of bytes)."""

    def make(self, tmp_path) -> tuple[Source, dict[str, Any]]:
        raise NotImplementedError

    @pytest.fixture
    def case(self, tmp_path):
        src, ref = self.make(tmp_path)
        try:
            yield src, ref
        finally:
            src.close()

    def test_lists_every_tensor_with_dtype_and_shape(self, case):
        src, ref = case
        listed = {t.name: t for t in src.tensors()}
        assert set(listed) == set(ref)
        for name, want in ref.items():
            t = listed[name]
            if isinstance(want, list):
                assert t.is_string, name
                continue
            assert t.dtype == want.dtype.name, name
            assert tuple(t.shape) == want.shape, name
            assert t.nbytes == want.nbytes, name

    def test_reads_every_tensor_exactly(self, case):
        src, ref = case
        for name, want in ref.items():
            got = src.read(name)
            if isinstance(want, list):
                assert got == want, name
            else:
                assert got.dtype == want.dtype and got.shape == want.shape, name
                assert as_bytes(got) == as_bytes(want), name

    def test_reads_arbitrary_regions(self, case):
        src, ref = case
        rng = random.Random(0)
        for name, want in ref.items():
            if isinstance(want, list) or want.nbytes == 0:
                continue
            b = as_bytes(want)
            isz = want.dtype.itemsize
            n = len(b) // isz
            for _ in range(8):
                lo = rng.randrange(n)
                hi = rng.randrange(lo, n) + 1
                out = bytearray((hi - lo) * isz)
                src.read_into(name, lo * isz, memoryview(out))
                assert bytes(out) == b[lo * isz:hi * isz], (name, lo, hi)

    def test_sequential_chunked_reads_verify_every_checksum(self, case):
        src, ref = case
        tracker = IntegrityTracker(src.units())
        for t in src.tensors():
            if t.is_string or t.nbytes == 0:
                continue
            step = max(t.itemsize, (t.nbytes // 3) // t.itemsize * t.itemsize)
            for off in range(0, t.nbytes, step):
                out = bytearray(min(step, t.nbytes - off))
                tracker.add(src.read_into(t.name, off, memoryview(out)))
        array_units = {k for k, u in src.units().items() if not src.info(u.tensor).is_string}
        assert array_units <= tracker.verified
        assert not tracker.unverified()

    def test_out_of_range_and_unknown_reads_raise(self, case):
        src, ref = case
        arrays = [t for t in src.tensors() if not t.is_string]
        if arrays:
            t = max(arrays, key=lambda t: t.nbytes)
            with pytest.raises(SourceError):
                src.read_into(t.name, t.nbytes, memoryview(bytearray(max(t.itemsize, 1))))
        with pytest.raises(SourceError, match="no/such/tensor"):
            src.read_into("no/such/tensor", 0, memoryview(bytearray(1)))

    def test_unknown_names_and_wrong_kinds_are_source_errors(self, case):
        """info, read_into and read_strings of a name the source lacks, and read_strings of an
        array, raise SourceError naming the tensor (one line at the CLI, never a KeyError)."""
        src, _ = case
        for call in (lambda: src.info("no/such/tensor"), lambda: src.read_strings("no/such/tensor")):
            with pytest.raises(SourceError, match="no/such/tensor") as e:
                call()
            assert "\n" not in str(e.value)
        arrays = [t for t in src.tensors() if not t.is_string]
        if arrays:
            with pytest.raises(SourceError, match=re.escape(repr(arrays[0].name))):
                src.read_strings(arrays[0].name)

    def mutate_input(self, src: Source, tmp_path) -> str:
        """Rewrite one file ``src`` reads with other bytes of the same size, its mtime restored
        (what size and mtime cannot see); return its path. Default: the largest input file
        with one byte flipped in place. Override where another file matters more."""
        path = max(src.input_files(), key=os.path.getsize)
        assert Path(path).is_relative_to(tmp_path), f"{path}: make() must build the source under tmp_path"
        flip_byte_keeping_mtime(path, os.path.getsize(path) // 2)
        return path

    def test_input_files_exist_and_are_absolute(self, case):
        src, _ = case
        files = src.input_files()
        assert len(set(files)) == len(files)
        for f in files:
            assert os.path.isabs(f) and os.path.isfile(f), f
        if isinstance(src.location, str) and os.path.exists(src.location):
            assert files, "a source on disk lists the files it reads"

    def test_fingerprint_changes_when_an_input_file_is_rewritten(self, case, tmp_path):
        """Same size, same mtime, other bytes: the fingerprint still changes (ctime)."""
        src, _ = case
        before = json.dumps(src.fingerprint(), sort_keys=True)
        assert before == json.dumps(src.fingerprint(), sort_keys=True)
        if not src.input_files():
            pytest.skip("in-memory source: no input file to change")
        path = self.mutate_input(src, tmp_path)
        after = src.fingerprint()
        assert json.dumps(after, sort_keys=True) != before, path
        changes = describe_changes(json.loads(before), after)
        assert any(c.startswith("file '") and f"{os.path.basename(path)}' changed (ctime_ns)" in c
                   for c in changes), changes

    def test_fingerprint_survives_json_and_a_fresh_open_and_changes_with_the_input(self, case, tmp_path):
        """Resume compares the fingerprint journaled (as JSON) with the one a new process takes:
        it must survive JSON, be equal for a fresh open of the unchanged input, and differ from
        the journaled one once an input file is rewritten (same size and mtime)."""
        src, _ = case
        if not src.input_files():
            pytest.skip("in-memory source: no input file to change")
        journaled = json.loads(json.dumps(src.fingerprint()))
        assert journaled == src.fingerprint()
        with self.reopen(src) as fresh:
            assert fresh.fingerprint() == journaled
        path = self.mutate_input(src, tmp_path)
        try:
            with self.reopen(src) as fresh:
                changed = fresh.fingerprint()
        except SourceError:  # a damaged header may no longer be listed at all: also refused
            return
        assert changed != journaled, path
        assert describe_changes(journaled, changed), path

    @contextmanager
    def reopen(self, src: Source) -> Iterator[Source]:
        """A fresh source over the same input, as a later run opens it (``open_source`` of its
        location); the same kind of source as ``src``."""
        fresh = open_source(src.location)
        assert type(fresh) is type(src), src.location
        try:
            yield fresh
        finally:
            fresh.close()

    #: The format ``open_source`` must detect for this class's input (default: the source's own).
    format: str | None = None

    def test_open_source_detects_the_format(self, case):
        src, _ = case
        if not src.input_files():
            pytest.skip("in-memory source: detected by its type")
        detected = open_source(src.location)
        try:
            assert detected.format == (self.format or src.format), src.location
            assert type(detected) is type(src), src.location
        finally:
            detected.close()

    #: Whether this input stores checksums of its tensor data (a corrupt byte is then a
    #: ChecksumError). None: the formats in ``CHECKSUM_FORMATS`` always do; for the others
    #: the source's own ``units()`` decides (safetensors with shardconv's sidecar, zarr with CRCs).
    stores_checksums: bool | None = None

    def corrupt_input(self, src: Source, tmp_path: Path, name: str) -> str:
        """Flip one byte of tensor ``name``'s stored data, found by recording the reads of the
        tensor (the middle of the largest range read); the default ``mutate_input`` where
        nothing Python can see is read (a native library). Return the file's path."""
        info = src.info(name)
        with record_reads() as log:
            src.read_into(name, 0, memoryview(bytearray(info.nbytes)))
        if not log.reads:
            return self.mutate_input(src, tmp_path)
        key, off, n = max(log.reads, key=lambda r: r[2])
        path = next(f for f in src.input_files() if (os.stat(f).st_dev, os.stat(f).st_ino) == key)
        flip_byte_keeping_mtime(path, off + n // 2)
        return path

    def test_a_corrupt_byte_of_tensor_data_is_a_checksum_error(self, case, tmp_path):
        """For every format that stores checksums: one flipped byte of a tensor's data is a
        ChecksumError naming the file and the tensor, from reading it and from a conversion
        (which leaves nothing at DEST)."""
        src, _ = case
        units = src.units()
        stores = self.stores_checksums
        if stores is None:
            stores = src.format in CHECKSUM_FORMATS or bool(units)
        if not stores:
            assert not units, "the source reports checksums: set stores_checksums = True"
            pytest.skip(f"{src.format}: this input stores no checksums")
        arrays = [u for u in units.values() if not src.info(u.tensor).is_string and u.nbytes]
        assert arrays, f"{src.format} stores checksums but the source reports none for its arrays"
        unit = max(arrays, key=lambda u: u.nbytes)
        path = self.corrupt_input(src, tmp_path, unit.tensor)
        with pytest.raises(ChecksumError) as e:
            read_all_verified(src)
        assert unit.tensor in str(e.value) or os.path.basename(path) in str(e.value), str(e.value)
        if src.input_files():
            dest = tmp_path / "corrupt.npz"
            with pytest.raises(ChecksumError):
                api.convert(src.location, dest, max_memory="1MiB", fsync=False, allow_unmapped=True)
            assert not dest.exists()
        log_case("corrupt-byte", src.format)

    #: Bytes of tensor data a listing may read; None: ``LISTING_WINDOW`` per input file and per
    #: tensor (a zip's end-of-file search, a header probe that runs into a small tensor's data),
    #: or the format's entry in ``LISTING_READ_SLACK``. A listing that reads a large tensor fails.
    listing_read_slack: int | None = None

    def test_listing_reads_no_tensor_data(self, case):
        """Listing (open, tensors, infos, units, fingerprint) reads no byte that reading the
        tensors reads, through any read path Python has (pread, preadv, read, readv, file
        objects, mmap)."""
        src, _ = case
        if not src.input_files():
            pytest.skip("in-memory source: nothing is read from files")
        with record_reads() as listing:
            with self.reopen(src) as fresh:
                for t in fresh.tensors():
                    fresh.info(t.name)
                fresh.units()
                fresh.fingerprint()
        with record_reads() as data:
            for t in src.tensors():
                if not t.is_string and t.nbytes:
                    src.read_into(t.name, 0, memoryview(bytearray(t.nbytes)))
        slack = self.listing_read_slack
        if slack is None:
            slack = LISTING_READ_SLACK.get(src.format, LISTING_WINDOW * (len(src.input_files()) + len(src.tensors())))
        assert listing.overlap(data) <= slack, (listing.overlap(data), slack)

    def source_path(self, src: Source) -> str:
        """What a user passes to ``convert`` for this source; skips for in-memory sources."""
        if not src.input_files():
            pytest.skip("in-memory source: no input file to change")
        return src.location

    def test_input_changed_during_the_run_leaves_nothing_at_dest(self, case, tmp_path, monkeypatch):
        """An input file rewritten (same size and mtime) after the first chunk is journaled: the
        run fails (the fingerprint taken again before the rename, or a stored checksum) and
        nothing appears at DEST."""
        src, _ = case
        path, dest = self.source_path(src), tmp_path / "changed-during.npz"
        hook = pipeline.hook

        def mutate_once(point: str, *args: Any) -> None:
            if point == "journal:0":
                self.mutate_input(src, tmp_path)
            hook(point, *args)

        monkeypatch.setattr(pipeline, "hook", mutate_once)
        with pytest.raises((SourceChangedError, ChecksumError)):
            api.convert(path, dest, max_memory="1MiB", fsync=False, allow_unmapped=True)
        assert not dest.exists()
        log_case("source-changed-during-run", src.format)

    def test_input_changed_between_kill_and_resume_is_refused(self, case, tmp_path):
        """Killed after its first chunk, the input then rewritten (same size and mtime): the
        resume is refused in one line naming the file, and nothing appears at DEST."""
        src, _ = case
        path, dest = self.source_path(src), tmp_path / "changed-resume.npz"
        argv = [sys.executable, "-m", "shardconv", "convert", path, str(dest), "--max-memory", "1MiB",
                "--quiet", "--no-fsync", "--allow-unmapped"]
        proc = subprocess.run(argv, env={**os.environ, "SHARDCONV_TEST_KILL": "journal:0"}, capture_output=True)
        assert proc.returncode == -9, proc.stderr.decode()
        changed = self.mutate_input(src, tmp_path)
        again = subprocess.run(argv, capture_output=True, text=True)
        assert again.returncode != 0 and not dest.exists(), again.stderr
        lines = again.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], again.stderr
        with pytest.raises((ResumeError, SourceError)):  # a damaged index may no longer be listed at all
            api.convert(path, dest, max_memory="1MiB", fsync=False, allow_unmapped=True)
        if "input changed since it was started" in lines[0]:
            assert os.path.basename(changed) in lines[0], lines[0]
        log_case("source-changed-between-kill-and-resume", src.format)


#: Formats whose files always store checksums of the tensor data (zip CRC32, TF CRC32C).
CHECKSUM_FORMATS = frozenset({"npz", "tf-checkpoint"})


#: See ``SourceTests.listing_read_slack``.
LISTING_WINDOW = 1 << 16
#: Formats whose listing reads no byte of tensor data at all (a TF bundle's index is a file of its own).
LISTING_READ_SLACK = {"tf-checkpoint": 0}


def read_all_verified(src: Source) -> None:
    """Read every array tensor whole, checking each checksum unit as it completes."""
    tracker = IntegrityTracker(src.units())
    for t in src.tensors():
        if not t.is_string and t.nbytes:
            tracker.add(src.read_into(t.name, 0, memoryview(bytearray(t.nbytes))))


def flip_byte_keeping_mtime(path: str, offset: int) -> None:
    """Flip the bits of byte ``offset`` of ``path`` in place and restore its atime and mtime,
    after waiting out the clock tick the file was last changed in (so its ctime moves)."""
    st = os.stat(path)
    while time.time_ns() - st.st_ctime_ns < 20_000_000:
        time.sleep(0.005)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
