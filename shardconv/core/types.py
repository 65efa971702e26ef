"""The values that travel between layers: what a source knows about a tensor
(`TensorInfo`) and the checksum bookkeeping of its stored bytes (`Unit`, `Segment`).

Core, sources, mapping and sinks all import these; this module imports nothing
above `util`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..util.dtypes import STRING, itemsize


@dataclass(frozen=True)
class TensorInfo:
    """What a source knows about one tensor before reading it."""

    name: str
    dtype: str                    # canonical dtype name, or "string"
    shape: tuple[int, ...]
    nbytes: int                   # bytes of the C-order array (strings: stored bytes)
    checksum: str | None = None   # e.g. "crc32c:1234" over the tensor's stored bytes
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_string(self) -> bool:
        return self.dtype == STRING

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along axis 0 (the whole tensor for scalars)."""
        if not self.shape:
            return self.nbytes
        return math.prod(self.shape[1:]) * self.itemsize


class Segment(NamedTuple):
    """Bytes [offset, offset+length) of checksum unit ``unit``, whose CRC is ``crc``."""

    unit: str
    offset: int
    length: int
    crc: int


class Unit(NamedTuple):
    """A range of stored bytes with a recorded checksum."""

    nbytes: int
    algorithm: str    # "crc32c" or "crc32"
    expected: int     # the CRC itself (unmasked)
    tensor: str       # tensor the unit belongs to (for messages)
    file: str         # file holding it (for messages)
