"""Zarr writes in flight: the sink's write returns a pending receipt, so the engine keeps more
than one chunk's write (TensorStore's encoding and file writes) going while it reads the next;
the values stay exact (the engine's buffers are untouched until each commit), a store error
surfaces as one line from ``result()``, and ``close`` waits for writes nobody waited for."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_zarr import ArraySource, assert_same, read_zarr_python

import shardconv
from shardconv.errors import DestinationError
from shardconv.sinks import zarr as zarr_sink

pytest.importorskip("tensorstore")
pytest.importorskip("zarr")


def test_two_writes_in_flight_and_the_values_exact(tmp_path, monkeypatch):
    """8 MiB through 64 KiB chunks (128 writes): at some moment two writes are pending at once,
    and the store holds exactly the input (a buffer reused before its commit would show)."""
    live: set[int] = set()
    peak = [0]
    init, result = zarr_sink._PendingWrite.__init__, zarr_sink._PendingWrite.result

    def counted_init(self: Any, *args: Any) -> None:
        init(self, *args)
        live.add(id(self))
        peak[0] = max(peak[0], len(live))

    def counted_result(self: Any) -> int:
        r = result(self)
        live.discard(id(self))
        return r

    monkeypatch.setattr(zarr_sink._PendingWrite, "__init__", counted_init)
    monkeypatch.setattr(zarr_sink._PendingWrite, "result", counted_result)
    rng = np.random.default_rng(11)
    tree = {"w": rng.standard_normal((2048, 1024), dtype=np.float32)}
    dest = tmp_path / "f.zarr"
    r = shardconv.convert(ArraySource(tree), dest, max_memory="1MiB",
                          sink_options={"chunk_mib": 1 / 16, "compression": "zstd"})
    assert r.chunks_written >= 100 and not live
    assert peak[0] >= 2, peak
    assert_same(read_zarr_python(dest), tree)
    assert shardconv.verify(dest)["tensors"] == 1


class _Failed:
    """A TensorStore future that failed."""

    def done(self) -> bool:
        return True

    def result(self) -> None:
        raise ValueError("NOT_FOUND: Error writing local file \"/x/c/0\": No such file or directory "
                         "[source locations='tensorstore/kvstore/file/file_key_value_store.cc:1']")


def test_a_failed_write_is_one_line_from_result_and_close_does_not_raise_it_again():
    w = zarr_sink._PendingWrite(_Failed(), "out.zarr: array 'w'", lambda: 7)
    assert w.done()
    with pytest.raises(DestinationError) as e:
        w.result()
    assert str(e.value) == "out.zarr: array 'w': NOT_FOUND: Error writing local file \"/x/c/0\": No such file or directory"
    sink = zarr_sink.ZarrSink()
    sink._in_flight = [w]
    sink.close()  # the run failed already: close waits, and reports nothing twice
    assert sink._in_flight == []
