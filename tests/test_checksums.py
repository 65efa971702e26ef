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
