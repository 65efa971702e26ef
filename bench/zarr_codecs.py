"""Zarr v3 codecs on float weights: compression ratio and CPU seconds per GB written and read
(all threads, so the figures hold on a busy machine), the measurements behind the Zarr sink's
``--compression`` choices (docs/zarr.md, "Compression").

    python bench/zarr_codecs.py [--mib 64] [--repeat 4] [--through numcodecs|tensorstore]

``--through numcodecs`` (default): each 4 MiB chunk encoded by the sink's own encoder
(``shardconv.sinks.zarr_files.encoder``: numcodecs' Blosc and zstd, as a local store is written)
on one thread, and decoded by numcodecs. ``--through tensorstore``: one array of 4 MiB chunks
written in 16 MiB writes (as a conversion at ``--max-memory 256MiB`` writes them) to a memory
kvstore, as an object store is written. Every codec in turn, ``--repeat`` times; the table shows
the smallest CPU times. Kinds: float32 N(0,1) (the TF input of bench/run.py is such noise),
float32 holding bfloat16 values, bfloat16 N(0, 0.02), int8.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

CHUNK = 4 << 20
WRITE = 16 << 20


def kinds(mib: int) -> Iterator[tuple[str, np.ndarray]]:
    """The data kinds, ``mib`` MiB of each (bfloat16 and int8: the same element count x2, x4)."""
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal(mib << 18, dtype=np.float32)
    yield "float32 N(0,1)", f32
    yield "float32 holding bfloat16", (f32 * 0.02).astype(ml_dtypes.bfloat16).astype(np.float32)
    yield "bfloat16 N(0,0.02)", (rng.standard_normal(mib << 19, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    yield "int8 (rounded N(0,20))", np.clip(np.round(rng.standard_normal(mib << 20) * 20), -127, 127).astype(np.int8)


def _blosc(cname: str, clevel: int, shuffle: str, isz: int, blocksize: int = 0) -> list[dict[str, Any]]:
    return [{"name": "blosc", "configuration": {"cname": cname, "clevel": clevel, "shuffle": shuffle,
                                                "typesize": isz, "blocksize": blocksize}}]


def codecs(isz: int) -> dict[str, list[dict[str, Any]]]:
    """The compared codec chains (after the ``bytes`` codec)."""
    return {"zstd 1": [{"name": "zstd", "configuration": {"level": 1, "checksum": False}}],
            "zstd 3": [{"name": "zstd", "configuration": {"level": 3, "checksum": False}}],
            "zstd -1": [{"name": "zstd", "configuration": {"level": -1, "checksum": False}}],
            "blosc zstd 1 bitshuffle auto": _blosc("zstd", 1, "bitshuffle", isz),
            "blosc zstd 1 bitshuffle 128K": _blosc("zstd", 1, "bitshuffle", isz, 128 << 10),
            "blosc zstd 1 bitshuffle 256K": _blosc("zstd", 1, "bitshuffle", isz, 256 << 10),
            "blosc zstd 1 bitshuffle 1M": _blosc("zstd", 1, "bitshuffle", isz, 1 << 20),
            "blosc zstd 1 shuffle 1M": _blosc("zstd", 1, "shuffle", isz, 1 << 20),
            "blosc lz4 5 bitshuffle": _blosc("lz4", 5, "bitshuffle", isz)}


def measure(arr: np.ndarray, chain: list[dict[str, Any]], ctx: Any) -> tuple[float, float, float]:
    """One write then one read of ``arr``: (CPU s writing, CPU s reading, ratio)."""
    kv = {"driver": "memory", "path": "bench/"}
    md = {"zarr_format": 3, "node_type": "array", "shape": [arr.size], "data_type": str(arr.dtype),
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [CHUNK // arr.itemsize]}},
          "chunk_key_encoding": {"name": "default"}, "fill_value": 0,
          "codecs": [{"name": "bytes", "configuration": {"endian": "little"}} if arr.itemsize > 1
                     else {"name": "bytes"}] + chain}
    t = ts.open({"driver": "zarr3", "kvstore": kv, "metadata": md, "create": True, "delete_existing": True},
                context=ctx).result()
    step = WRITE // arr.itemsize
    c0 = time.process_time()
    for i in range(0, arr.size, step):
        t[i:min(i + step, arr.size)].write(arr[i:i + step], can_reference_source_data_indefinitely=True).result()
    c1 = time.process_time()
    t[...].read().result()
    c2 = time.process_time()
    store = ts.KvStore.open(kv, context=ctx).result()
    stored = sum(len(store.read(k).result().value) for k in store.list().result())
    store.delete_range(ts.KvStore.KeyRange()).result()
    return c1 - c0, c2 - c1, arr.nbytes / stored


def measure_numcodecs(arr: np.ndarray, chain: list[dict[str, Any]], ctx: Any = None) -> tuple[float, float, float]:
    """Each chunk encoded by the sink's encoder, then decoded, on one thread: (CPU s writing,
    CPU s reading, ratio)."""
    from numcodecs import blosc, zstd

    from shardconv.sinks.zarr_files import encoder

    md = {"zarr_format": 3, "codecs": [{"name": "bytes"}] + chain}
    encode = encoder(md, arr.itemsize)
    assert encode is not None, chain
    decode = blosc.decompress if chain[0]["name"] == "blosc" else zstd.decompress
    u8 = arr.reshape(-1).view(np.uint8)
    out: list[Any] = []

    def run() -> None:
        c0 = time.process_time()
        blobs = [encode(u8[i:i + CHUNK].data) for i in range(0, u8.size, CHUNK)]
        c1 = time.process_time()
        for b in blobs:
            decode(b)
        out.extend([c1 - c0, time.process_time() - c1, u8.size / sum(map(len, blobs))])

    t = threading.Thread(target=run)  # numcodecs' Blosc uses its own threads when called from the main one
    t.start()
    t.join()
    return out[0], out[1], out[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="MiB of each kind (default 64)")
    ap.add_argument("--repeat", type=int, default=4, help="runs of each codec; minimum CPU shown (default 4)")
    ap.add_argument("--through", choices=("numcodecs", "tensorstore"), default="numcodecs",
                    help="the sink's own encoder (local stores, default) or TensorStore (object stores)")
    a = ap.parse_args()
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    run = measure_numcodecs if a.through == "numcodecs" else measure
    print(f"{a.mib} MiB per kind, through {a.through}, min of {a.repeat}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}")
    print("| data | codec | ratio | saved | write CPU s/GB | read CPU s/GB |\n|---|---|---:|---:|---:|---:|")
    for kind, arr in kinds(a.mib):
        chains = codecs(arr.itemsize)
        best = {name: [1e9, 1e9, 0.0] for name in chains}
        for _ in range(a.repeat):
            for name, chain in chains.items():  # interleaved: load changes hit every codec alike
                w, r, ratio = run(arr, chain, ctx)
                b = best[name]
                b[0], b[1], b[2] = min(b[0], w), min(b[1], r), ratio
        gb = arr.nbytes / 1e9
        for name, (w, r, ratio) in best.items():
            print(f"| {kind} | {name} | {ratio:.3f} | {100 * (1 - 1 / ratio):.1f}% | {w / gb:.2f} | {r / gb:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
