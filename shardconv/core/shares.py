"""Shares: the plan's chunk list cut into contiguous runs balanced by bytes.

A share is the unit of work one worker takes when a conversion is split over
processes or machines. The cut depends only on the chunk list, the target size
and the forced boundaries (e.g. one output file per share), never on how many
workers there are, so a rerun with another worker count, or a resumed run,
finds the same shares and the same journals.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .plan import Chunk

GiB = 1 << 30
#: Default share size bounds: big enough that per-task overhead is noise, small
#: enough that a lost worker costs little and N workers stay busy to the end.
MIN_SHARE_BYTES = 256 << 20
MAX_SHARE_BYTES = 4 * GiB
#: Aim for at least this many shares per checkpoint (load balance over workers).
SHARES_PER_CHECKPOINT = 64


@dataclass(frozen=True)
class Share:
    """Chunks ``[start, stop)`` of the plan's chunk list: ``nbytes`` output bytes."""

    index: int
    start: int
    stop: int
    nbytes: int

    def __len__(self) -> int:
        return self.stop - self.start


def default_share_bytes(total: int) -> int:
    """The target share size for ``total`` output bytes: total/64 clamped to [256 MiB, 4 GiB]."""
    return min(MAX_SHARE_BYTES, max(MIN_SHARE_BYTES, math.ceil(total / SHARES_PER_CHECKPOINT)))


def cut_shares(chunks: Sequence[Chunk], share_bytes: int | None = None,
               boundaries: Iterable[int] = ()) -> list[Share]:
    """Cut ``chunks`` into shares of about ``share_bytes`` each.

    Each run between forced ``boundaries`` (chunk indices where a share must start)
    is cut into ``ceil(bytes / share_bytes)`` shares at the chunk boundaries nearest
    to equal byte fractions, so shares differ by at most about one chunk. Every chunk
    is in exactly one share; empty runs give no share.

    Raises:
        ValueError: ``share_bytes`` is not positive or a boundary is out of range.
    """
    total = sum(c.length for c in chunks)
    target = default_share_bytes(total) if share_bytes is None else share_bytes
    if target <= 0:
        raise ValueError(f"share size must be positive, not {target}")
    edges = sorted({0, len(chunks), *boundaries})
    if edges[0] < 0 or edges[-1] > len(chunks):
        raise ValueError(f"share boundaries must lie in [0, {len(chunks)}]: {edges}")
    ends = _cumulative(chunks)
    shares: list[Share] = []
    for lo, hi in zip(edges, edges[1:]):
        for start, stop in _balanced(ends, lo, hi, target):
            shares.append(Share(len(shares), start, stop, ends[stop] - ends[start]))
    return shares


def _cumulative(chunks: Sequence[Chunk]) -> list[int]:
    """``ends[i]``: bytes in chunks ``[0, i)``."""
    ends = [0]
    for c in chunks:
        ends.append(ends[-1] + c.length)
    return ends


def _balanced(ends: list[int], lo: int, hi: int, target: int) -> list[tuple[int, int]]:
    """Cut chunks ``[lo, hi)`` into runs of about equal bytes, none empty."""
    if lo == hi:
        return []
    nbytes = ends[hi] - ends[lo]
    count = max(1, min(hi - lo, math.ceil(nbytes / target)))
    cuts = [lo]
    for k in range(1, count):
        goal = ends[lo] + nbytes * k // count
        at = bisect.bisect_left(ends, goal, cuts[-1] + 1, hi)
        if at > cuts[-1] + 1 and goal - ends[at - 1] < ends[at] - goal:
            at -= 1           # the boundary just before the goal is nearer
        # At least one chunk for this share and for each one still to cut.
        cuts.append(max(cuts[-1] + 1, min(at, hi - (count - k))))
    cuts.append(hi)
    return list(zip(cuts, cuts[1:]))


def share_of(shares: Sequence[Share], chunk: int) -> Share:
    """The share holding chunk number ``chunk``."""
    i = bisect.bisect_right([s.start for s in shares], chunk) - 1
    if i < 0 or not shares[i].start <= chunk < shares[i].stop:
        raise IndexError(f"chunk {chunk} is in no share")
    return shares[i]
