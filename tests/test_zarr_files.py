"""A local Zarr store's chunk files written by the sink itself (sinks/zarr_files.py), not by
TensorStore: edge chunks padded to the full chunk shape as Zarr requires, values exact in
zarr-python and TensorStore (v3 and v2, every codec), int4 still through TensorStore, no
TensorStore import for a local run, and a failed chunk write reported on one line."""
from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from test_zarr import ArraySource, assert_same, read_tensorstore, read_zarr_python

import shardconv
from shardconv.errors import DestinationError
from shardconv.sinks import zarr_files
from shardconv.sources.zarr import ZarrSource

pytest.importorskip("tensorstore")
pytest.importorskip("zarr")


def _edge_tree() -> dict[str, np.ndarray]:
    """Arrays whose last chunk is partial at 1 KiB chunks, of several ranks and dtypes."""
    rng = np.random.default_rng(5)
    return {"w": rng.standard_normal((100, 70), dtype=np.float32),        # chunks [3, 70]: last has 1 row
            "t": rng.standard_normal((33, 4, 3)),                         # float64, chunks [10, 4, 3]
            "h": (rng.standard_normal(1000) * 0.02).astype(ml_dtypes.bfloat16),  # chunks [512]
            "m": rng.standard_normal(1500) > 0,                           # bool, chunks [1024]
            "s": np.float32(3.5).reshape(()),                            # a scalar: one chunk
            "q": (np.arange(50) % 16 - 8).astype(ml_dtypes.int4)}        # TensorStore writes it


def _meta(dest: Path, name: str, fmt: int) -> dict:
    return json.loads((dest / name / ("zarr.json" if fmt == 3 else ".zarray")).read_text())


@pytest.mark.parametrize("fmt", [3, 2])
@pytest.mark.parametrize("compression", ["none", "zstd", "blosc"])
def test_edge_chunks_padded_and_values_exact(tmp_path, fmt, compression):
    tree = _edge_tree()
    dest = tmp_path / "e.zarr"
    shardconv.convert(ArraySource(tree), dest, max_memory="1MiB",
                      sink_options={"chunk_mib": 1 / 1024, "zarr_format": fmt, "compression": compression})
    for name, v in tree.items():
        md = _meta(dest, name, fmt)
        chunks = md["chunk_grid"]["configuration"]["chunk_shape"] if fmt == 3 else md["chunks"]
        files = [p for p in (dest / name).rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray",
                                                                                          ".zattrs")]
        assert len(files) == math.prod(-(-n // c) for n, c in zip(v.shape, chunks)), name
        if compression == "none":  # every chunk file holds a whole chunk, the edge ones padded
            assert {p.stat().st_size for p in files} == {math.prod(chunks) * v.dtype.itemsize}, name
    assert_same(read_zarr_python(dest), tree)
    assert_same(read_tensorstore({"driver": "file", "path": str(dest) + "/"}, list(tree), fmt), tree)
    with ZarrSource(dest) as src:
        assert_same({t.name: src.read(t.name) for t in src.tensors()}, tree)
    assert shardconv.verify(dest)["tensors"] == len(tree)


def test_a_local_run_imports_no_tensorstore(tmp_path):
    """TensorStore's import brings ml_dtypes' (over a second of CPU): a local store of plain
    dtypes is written without it."""
    src = tmp_path / "in.npz"
    np.savez(src, w=np.arange(300_000, dtype=np.float32), b=np.ones(7, np.int64))
    code = ("import sys, shardconv; shardconv.convert(sys.argv[1], sys.argv[2], "
            "sink_options={'compression': 'zstd'}); print(sorted(m for m in sys.modules if m == 'tensorstore'))")
    p = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "o.zarr")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
    assert_same(read_zarr_python(tmp_path / "o.zarr"), {"w": np.arange(300_000, dtype=np.float32),
                                                        "b": np.ones(7, np.int64)})


def test_a_failed_chunk_write_is_one_line_and_nothing_is_published(tmp_path, monkeypatch):
    real = os.makedirs

    def full(path: str | os.PathLike, *args: object, **kw: object) -> None:
        if str(path).endswith("/w") or "/w/c" in str(path):  # the directories of the first chunk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(zarr_files.os, "makedirs", full)
    dest = tmp_path / "f.zarr"
    with pytest.raises(DestinationError) as e:
        shardconv.convert(ArraySource({"w": np.zeros((64, 64), np.float32)}), dest, sink_options={"compression": "zstd"})
    msg = str(e.value)
    assert "\n" not in msg and "array 'w'" in msg and msg.endswith("No space left on device"), msg
    assert not dest.exists()


def test_close_writes_no_chunk_file_not_yet_started(tmp_path):
    """After a failure the engine closes the sink without waiting for its writes: the file being
    written is finished, the queued ones are never written."""
    import threading
    import time

    started, go = threading.Event(), threading.Event()

    def slow(view: memoryview) -> memoryview:
        started.set()
        go.wait(30)
        return view

    files = zarr_files.ChunkFiles(tmp_path, 3, durable=False, workers=1)
    data = memoryview(np.arange(40, dtype=np.float32).tobytes())
    pending = files.write("w", (10, 4), [2, 4], 4, slow, (slice(0, 10), slice(0, 4)), data, None, "out: array 'w'")
    assert started.wait(30)
    closer = threading.Thread(target=files.close)
    closer.start()
    deadline = time.monotonic() + 30
    while not all(f.cancelled() for f in pending._futures[1:]) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.set()
    closer.join(30)
    pending.wait()
    assert [p.name for p in (tmp_path / "w" / "c").iterdir()] == ["0"]
