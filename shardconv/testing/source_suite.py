"""What every source must do. Subclass ``SourceTests`` and implement ``make``."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .. import api
from ..core import engine
from ..core.integrity import IntegrityTracker
from ..core.journal import describe_changes
from ..errors import ChecksumError, ResumeError, SourceChangedError, SourceError
from ..sources.base import Source
from .caselog import log_case


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
        with pytest.raises((SourceError, KeyError)):
            src.read_into("no/such/tensor", 0, memoryview(bytearray(1)))

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
        hook = engine._hook

        def mutate_once(point: str, *args: Any) -> None:
            if point == "journal:0":
                self.mutate_input(src, tmp_path)
            hook(point, *args)

        monkeypatch.setattr(engine, "_hook", mutate_once)
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
        proc = subprocess.run(argv, capture_output=True, text=True)
        assert proc.returncode != 0 and not dest.exists(), proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], proc.stderr
        with pytest.raises((ResumeError, SourceError)):  # a damaged index may no longer be listed at all
            api.convert(path, dest, max_memory="1MiB", fsync=False, allow_unmapped=True)
        if "input changed since it was started" in lines[0]:
            assert os.path.basename(changed) in lines[0], lines[0]
        log_case("source-changed-between-kill-and-resume", src.format)


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
