"""Shares (core/shares.py): every chunk in exactly one share, contiguous, balanced by
bytes, forced boundaries kept, the same cut however often it is computed."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardconv.core.plan import Chunk, OutputTensor, chunk_plan
from shardconv.core.shares import MAX_SHARE_BYTES, MIN_SHARE_BYTES, cut_shares, default_share_bytes, share_of

lengths = st.lists(st.integers(0, 5000), min_size=0, max_size=60)


def _chunks(ls: list[int]) -> list[Chunk]:
    return [Chunk(i, 0, n) for i, n in enumerate(ls)]


@settings(max_examples=300, deadline=None)
@given(lengths, st.integers(1, 20000), st.lists(st.integers(0, 60), max_size=5))
def test_shares_cover_every_chunk_once_in_order_and_keep_boundaries(ls, target, forced):
    chunks = _chunks(ls)
    forced = [b for b in forced if b <= len(chunks)]
    shares = cut_shares(chunks, target, forced)
    covered = [i for s in shares for i in range(s.start, s.stop)]
    assert covered == list(range(len(chunks)))
    assert all(len(s) > 0 for s in shares)
    assert [s.index for s in shares] == list(range(len(shares)))
    starts = {s.start for s in shares}
    assert {b for b in forced if b < len(chunks)} <= starts
    for s in shares:
        assert s.nbytes == sum(c.length for c in chunks[s.start:s.stop])
        assert share_of(shares, s.start) == s and share_of(shares, s.stop - 1) == s
    assert cut_shares(chunks, target, forced) == shares     # deterministic


@settings(max_examples=300, deadline=None)
@given(lengths, st.integers(1, 20000))
def test_shares_are_balanced_by_bytes(ls, target):
    chunks = _chunks(ls)
    shares = cut_shares(chunks, target)
    if not chunks:
        assert shares == []
        return
    total, biggest = sum(ls), max(ls)
    mean = total / len(shares)
    # Equal byte fractions of at most ``target`` each, each end moved by at most one chunk.
    for s in shares:
        assert s.nbytes <= min(mean, target) + biggest
        assert s.nbytes >= mean - 2 * biggest or len(s) == 1


def test_a_big_tensor_spreads_over_several_shares_and_small_ones_share_one():
    outputs = [OutputTensor(name=f"t{i}", dtype="float32", shape=shape, producer=None)  # type: ignore[arg-type]
               for i, shape in enumerate([(4096, 1024), (10,), (3, 3), (512, 1024)])]
    chunks = chunk_plan(outputs, 1 << 20)
    shares = cut_shares(chunks, 4 << 20)
    assert sum(s.nbytes for s in shares) == sum(o.nbytes for o in outputs)
    first_tensor = {share_of(shares, i).index for i, c in enumerate(chunks) if c.index == 0}
    assert len(first_tensor) >= 4        # 16 MiB over shares of at most 4 MiB
    small = {share_of(shares, i).index for i, c in enumerate(chunks) if c.index in (1, 2)}
    assert len(small) == 1


def test_default_share_size_is_a_64th_clamped():
    assert default_share_bytes(0) == MIN_SHARE_BYTES
    assert default_share_bytes(64 << 30) == 1 << 30
    assert default_share_bytes(2 << 40) == MAX_SHARE_BYTES


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        cut_shares(_chunks([1, 2]), 0)
    with pytest.raises(ValueError):
        cut_shares(_chunks([1, 2]), 10, [3])
    with pytest.raises(IndexError):
        share_of(cut_shares(_chunks([1, 2]), 10), 2)
