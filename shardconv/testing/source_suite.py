"""What every source must do. Subclass ``SourceTests`` and implement ``make``."""
from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest

from ..errors import SourceError
from ..integrity import IntegrityTracker
from ..sources.base import Source


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

    def test_fingerprint_is_json_and_stable(self, case):
        src, _ = case
        a = json.dumps(src.fingerprint(), sort_keys=True)
        assert a == json.dumps(src.fingerprint(), sort_keys=True)
