"""Verifies source checksums from the segments reads report, as units complete."""
from __future__ import annotations

from ..errors import ChecksumError
from ..util.checksums import CRC32_POLY, CRC32C_POLY, combine
from .types import Segment, Unit

_POLY = {"crc32c": CRC32C_POLY, "crc32": CRC32_POLY}


class IntegrityTracker:
    def __init__(self, units: dict[str, Unit]) -> None:
        self.units = units
        self._parts: dict[str, dict[int, tuple[int, int]]] = {}
        self._covered: dict[str, int] = {}
        self.verified: set[str] = set()
        for key, unit in units.items():
            if unit.nbytes == 0:  # nothing will be read; the CRC of no bytes is 0
                self._check(key, unit, {})

    def add(self, segments: list[Segment] | list[list]) -> None:
        for seg in segments:
            key, off, length, crc = seg
            unit = self.units.get(key)
            if unit is None or key in self.verified:
                continue
            parts = self._parts.setdefault(key, {})
            if off in parts:
                continue
            parts[off] = (length, crc)
            self._covered[key] = self._covered.get(key, 0) + length
            if self._covered[key] >= unit.nbytes:
                self._check(key, unit, parts)

    def _check(self, key: str, unit: Unit, parts: dict[int, tuple[int, int]]) -> None:
        pos = 0
        crc = 0
        for off in sorted(parts):
            length, c = parts[off]
            if off != pos:
                return  # overlapping reads; wait for an exact tiling
            crc = combine(crc, c, length, _POLY[unit.algorithm])
            pos += length
        if pos != unit.nbytes:
            return
        self._parts.pop(key, None)
        if crc != unit.expected:
            raise ChecksumError(f"{unit.file}: checksum mismatch in tensor {unit.tensor!r}: the stored data is "
                                f"corrupt ({unit.algorithm} 0x{crc:08x}, recorded 0x{unit.expected:08x})")
        self.verified.add(key)

    def reset(self, tensor: str) -> None:
        """Forget partial reads of a tensor's units (before re-reading it sequentially)."""
        for key, unit in self.units.items():
            if unit.tensor == tensor and key not in self.verified:
                self._parts.pop(key, None)
                self._covered.pop(key, None)

    def unverified(self) -> list[str]:
        """Units read in part only (a plan that reads some of a tensor)."""
        return sorted(self._parts)
