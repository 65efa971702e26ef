"""CRC32C (TensorFlow bundles) and CRC32 (zip), fast, plus combining per-chunk CRCs.

Combining lets a tensor's or a zip member's CRC be computed from the CRCs of its
chunks, in any order of arrival and across a resumed run, without re-reading.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import threading
from collections.abc import Callable
from typing import Any


def _load_crc32c() -> Any:
    """The ``crc32c`` package's C extension, loaded without the package's ``__init__``, which
    imports ``importlib.metadata`` to read its own version: ~50 ms of every command's start-up
    (``shardconv ls`` reads block checksums). Falls back to a plain import."""
    try:
        spec = importlib.util.find_spec("crc32c")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for name in sorted(os.listdir(folder)):
                if name.startswith("_crc32c.") and name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
                    loader = importlib.machinery.ExtensionFileLoader("crc32c._crc32c", os.path.join(folder, name))
                    ext = importlib.util.spec_from_file_location("crc32c._crc32c", loader.path, loader=loader)
                    if ext is not None:
                        module = importlib.util.module_from_spec(ext)
                        loader.exec_module(module)
                        return module
    except (ImportError, OSError):
        pass
    import crc32c

    return crc32c


_crc32c = _load_crc32c()

try:  # libdeflate: folds with 256-bit VPCLMULQDQ where the CPU has it (17.5 GiB/s here, against
    # 8.9 for ISA-L and 2 for zlib), so the zip CRC of a direct copy costs half what it did.
    from deflate import crc32 as _crc32_impl
except ImportError:  # pragma: no cover - deflate is a core dependency
    from zlib import crc32 as _crc32_impl  # type: ignore[assignment]

_MASK_DELTA = 0xA282EAD8
CRC32_POLY = 0xEDB88320      # zlib, reflected
CRC32C_POLY = 0x82F63B78     # Castagnoli, reflected


def crc32c(data, value: int = 0) -> int:
    """CRC32C of a bytes-like object, continuing from ``value``."""
    return _crc32c.crc32c(data, value)


def crc32(data, value: int = 0) -> int:
    """zlib CRC32 of a bytes-like object, continuing from ``value``."""
    return _crc32_impl(data, value)


#: The checksums by the names units, segments and sinks use: ``f(data, value=0) -> int``, the C
#: functions themselves (the copy loop calls two per MiB piece; no Python frame in between).
BY_NAME: dict[str, Callable[..., int]] = {"crc32c": _crc32c.crc32c, "crc32": _crc32_impl}


def mask(crc: int) -> int:
    """TensorFlow/LevelDB masked CRC, as stored in bundle entries and block trailers."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    """The CRC a TensorFlow masked CRC stands for (inverse of ``mask``)."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _times(mat: tuple[int, ...], vec: int) -> int:
    s = 0
    i = 0
    while vec:
        if vec & 1:
            s ^= mat[i]
        vec >>= 1
        i += 1
    return s


def _square(mat: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_times(mat, mat[n]) for n in range(32))


#: poly -> operators that append 2**k zero bytes to a CRC, k = 0, 1, ...; grown on demand,
#: as far as the longest length combined so far (each costs 32 squarings in Python).
_ZERO_OPERATORS: dict[int, list[tuple[int, ...]]] = {}
_GROWING = threading.Lock()


def _zero_operators(poly: int, n: int) -> list[tuple[int, ...]]:
    """At least the first ``n`` operators of ``_ZERO_OPERATORS[poly]``."""
    ops = _ZERO_OPERATORS.get(poly)
    if ops is not None and len(ops) >= n:
        return ops
    with _GROWING:  # threads combine CRCs too: one grows the list at a time
        ops = _ZERO_OPERATORS.setdefault(poly, [])
        if not ops:
            odd = (poly,) + tuple(1 << k for k in range(31))  # one zero bit
            ops.append(_square(_square(_square(odd))))  # eight zero bits = one byte
        while len(ops) < n:
            ops.append(_square(ops[-1]))
    return ops


def combine(crc1: int, crc2: int, len2: int, poly: int = CRC32_POLY) -> int:
    """CRC of A+B from crc(A), crc(B) and len(B) (zlib's crc32_combine, any reflected poly)."""
    if len2 <= 0:
        return crc1
    ops = _zero_operators(poly, len2.bit_length())
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _times(ops[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


def combine_crc32c(crc1: int, crc2: int, len2: int) -> int:
    """CRC32C of A+B from crc32c(A), crc32c(B) and len(B)."""
    return combine(crc1, crc2, len2, CRC32C_POLY)


def combine_crc32(crc1: int, crc2: int, len2: int) -> int:
    """zlib CRC32 of A+B from crc32(A), crc32(B) and len(B)."""
    return combine(crc1, crc2, len2, CRC32_POLY)
