"""The checksums every conversion computes: known answers, continuation, combining, and a
start-up that does not pay for the crc32c package's version lookup."""
from __future__ import annotations

import os

from procs import assert_python_runs

from shardconv.util import checksums


def test_known_answers_continuation_and_combining():
    data = os.urandom(1 << 20)
    assert checksums.crc32c(b"123456789") == 0xE3069283 and checksums.crc32(b"123456789") == 0xCBF43926
    for name, poly in (("crc32c", checksums.CRC32C_POLY), ("crc32", checksums.CRC32_POLY)):
        fn = checksums.BY_NAME[name]
        a, b = data[:300_001], data[300_001:]
        assert fn(b, fn(a)) == fn(data)
        assert checksums.combine(fn(a), fn(b), len(b), poly) == fn(data)


def test_the_crc32c_extension_loads_without_importlib_metadata():
    assert_python_runs("import sys; from shardconv.util import checksums as c; "
                       "assert c.crc32c(b'123456789') == 0xE3069283; "
                       "assert c._crc32c.__name__ == 'crc32c._crc32c', c._crc32c; "
                       "assert 'importlib.metadata' not in sys.modules, 'importlib.metadata imported'")


def test_crc32_is_libdeflate_and_matches_zlib_over_the_buffers_the_pipeline_passes():
    """The zip CRC of every npz member and receipt comes from libdeflate (twice ISA-L's speed
    here); a silent fall-back to zlib would cost ~0.4 CPU s/GiB, so the choice is checked, and
    its answers against zlib's over pieces of an anonymous mmap, as the pipeline's pool holds."""
    import mmap
    import zlib

    assert checksums._crc32_impl.__module__.startswith("deflate"), checksums._crc32_impl
    data = os.urandom(3 * (1 << 20) + 17)
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    view = memoryview(buf)
    crc = 0
    for start in range(0, len(data), 1 << 20):
        crc = checksums.crc32(view[start:start + (1 << 20)], crc)
    assert crc == zlib.crc32(data)
    assert checksums.crc32(b"", 0xDEADBEEF) == 0xDEADBEEF and checksums.crc32(b"a", 0xFFFFFFFF) == zlib.crc32(b"a", 0xFFFFFFFF)
    view.release()
    buf.close()
