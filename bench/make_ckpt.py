"""Fallback checkpoint writer for the benchmark (used when
``tests/tf_fixtures.py big`` is missing or fails, or with
``run.py --generator bench``).

    python bench/make_ckpt.py OUTDIR --mib N --shards K [--big-mib B]

Writes a TF1 sharded Saver checkpoint ``OUTDIR/model.ckpt`` of float32
variables totalling about N MiB over K data shards, and
``OUTDIR/reference/index.json`` with ``{"prefix": "model.ckpt", "tensors":
{name: {"dtype": "float32", "shape": [...]}}}`` (the same fields run.py reads
from the test fixture). Tensor sizes are mixed: one ``big/embedding`` of
``max(0.3 * N, B)`` MiB (capped at 0.6 * N; pass B above the memory budget so
one tensor must be streamed), several mid-size kernels, small biases and a
scalar. Values come from ``tf.random`` ops run in graph mode, so the writer
holds each variable once (no second numpy copy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf  # noqa: E402


def shapes_for(mib: float, big_mib: float) -> list[tuple[str, tuple[int, ...]]]:
    total = int(mib * (1 << 20)) // 4  # float32 elements
    big = max(int(total * 0.3), int(big_mib * (1 << 20)) // 4)
    big = min(big, int(total * 0.6))
    big_rows = max(1, big // 1024)
    out = [("big/embedding", (big_rows, 1024))]
    rest = max(0, total - big_rows * 1024)
    parts = [
        ("layer_0/kernel", 0.30, lambda e: (max(1, e // 768), 768)),
        ("layer_0/bias", 0.01, lambda e: (max(1, e),)),
        ("conv/kernel", 0.20, lambda e: (3, 3, 64, max(1, e // 576))),
        ("layer_1/kernel", 0.25, lambda e: (max(1, e // 333), 333)),
        ("attn/qkv", 0.15, lambda e: (max(1, e // 512), 8, 64)),
        ("layer_1/bias", 0.01, lambda e: (max(1, e),)),
        ("head/kernel", 0.08, lambda e: (max(1, e // 10), 10)),
    ]
    for name, frac, mk in parts:
        out.append((name, mk(int(rest * frac))))
    out.append(("global_step", ()))
    return out


def _n(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--mib", type=float, default=64.0)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--big-mib", type=float, default=0.0,
                   help="minimum size of the largest tensor in MiB")
    a = p.parse_args(argv)
    outdir = a.outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    shapes = shapes_for(a.mib, a.big_mib)
    load = [0] * a.shards
    placement = {}
    for name, shape in sorted(shapes, key=lambda s: -_n(s[1])):
        d = load.index(min(load))
        placement[name] = d
        load[d] += _n(shape)
    g = tf.Graph()
    with g.as_default():
        for i, (name, shape) in enumerate(shapes):
            with tf.compat.v1.device(f"/cpu:{placement[name]}"):
                if shape == ():
                    tf.compat.v1.get_variable(name, initializer=tf.constant(1000.0))
                else:
                    tf.compat.v1.get_variable(
                        name, shape=list(shape), dtype=tf.float32,
                        initializer=tf.compat.v1.random_normal_initializer(seed=1000 + i))
        saver = tf.compat.v1.train.Saver(sharded=True)
        config = tf.compat.v1.ConfigProto(device_count={"CPU": a.shards})
        with tf.compat.v1.Session(graph=g, config=config) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            prefix = saver.save(sess, str(outdir / "model.ckpt"), write_meta_graph=False)
    ref = outdir / "reference"
    ref.mkdir(exist_ok=True)
    index = {
        "kind": "bench",
        "prefix": os.path.relpath(prefix, outdir),
        "mib": a.mib,
        "shards": a.shards,
        "tensors": {name: {"dtype": "float32", "shape": list(shape)}
                    for name, shape in shapes},
    }
    (ref / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
