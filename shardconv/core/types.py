"""The values that travel between layers: what a source knows about a tensor
(`TensorInfo`, with the `SourceRole` a source may have recorded for it), what a tensor is
to the model (`Role`), and the checksum bookkeeping of its stored bytes (`Unit`, `Segment`).

Core, sources, mapping and sinks all import these; this module imports nothing
above `util`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

from ..util.dtypes import STRING, itemsize


class Role(str, Enum):
    """What a tensor is to the model. A ``str``: compares, prints and serializes as its value."""

    PARAM = "param"          # a model weight or statistic: written by default
    OPTIMIZER = "optimizer"  # optimizer slots, moments, hyperparameters
    EMA = "ema"              # an exponential moving average of a param (``ema_of``)
    META = "meta"            # training counters, metrics, checkpoint bookkeeping

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class SourceRole(NamedTuple):
    """The role a source itself recorded for a tensor (TF2's object graph does), which the
    mapping layer takes over its own guesses from names and tree structure. (A NamedTuple:
    a source makes one per tensor, and a frozen dataclass costs 2-3x as much to make.)

    ``model_name``: the model-facing name (``dense/kernel``), None to keep the tensor's name;
    ``ema_of`` / ``slot_of``: the model name of the param an EMA averages / a slot belongs to.
    """

    role: Role
    model_name: str | None = None
    ema_of: str | None = None
    slot_of: str | None = None


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What a source knows about one tensor before reading it. (Slotted: a listing of 100 000
    tensors holds one each, a third the size of one with a ``__dict__``.)"""

    name: str
    dtype: str                    # canonical dtype name, or "string"
    shape: tuple[int, ...]
    nbytes: int                   # bytes of the C-order array (strings: stored bytes)
    checksum: str | None = None   # e.g. "crc32c:1234" over the tensor's stored bytes
    #: Informational details for listings (``shard``, ``value_type``, ``sharding``, ...); nothing
    #: decides on them. What the tensor is to the model travels in ``role``.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    role: SourceRole | None = field(default=None, compare=False, hash=False)

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


class RawRange(NamedTuple):
    """Bytes of a source tensor stored verbatim at ``offset`` of an open file (a source's
    ``raw_range``): the engine copies them in cache-sized pieces, each read, checksummed and
    written while it is in cache, instead of through a chunk buffer."""

    fd: int                   # open for reading; owned (and closed) by the source
    offset: int               # where the bytes start in the file
    file: str                 # the file, for messages
    tensor: str               # the source tensor, for messages
    unit: str | None          # the checksum unit the bytes belong to (None: not checksummed)
    unit_offset: int          # where the bytes start within that unit
    algorithm: str | None     # the unit's checksum: "crc32c" or "crc32"
