"""Write a TF2 object-based checkpoint of about ``--mib`` MiB of float32 variables, as
``tf.train.Checkpoint(model=...).write`` saves a Keras-free ``tf.Module`` model: an
embedding of ~30 % of the total, dense and conv kernels, biases and a step counter,
held in nested modules so the index carries an object graph that names them.

    python bench/tf2_checkpoint.py OUTDIR --mib 1024      # writes OUTDIR/ckpt.index, .data-*

Used by bench/run.py for its ``tf2-npz`` row (the other TF rows use the TF1 sharded Saver
checkpoint of tests/tf_fixtures.py). Values are seeded random normals, one variable
materialized at a time on the NumPy side.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MIB = 1 << 20


def shapes(mib: float) -> list[tuple[str, str, tuple[int, ...]]]:
    """(module, variable, shape) of float32 variables adding up to about ``mib`` MiB."""
    total = int(mib * MIB) // 4
    emb_rows = max(1, int(total * 0.3) // 1024)
    out: list[tuple[str, str, tuple[int, ...]]] = [("embed", "embeddings", (emb_rows, 1024))]
    rest = max(0, total - emb_rows * 1024)
    layers = max(1, min(24, rest // (1 << 20)))  # layers of >= 4 MiB each
    per = rest // layers
    for i in range(layers):
        out += [(f"layer_{i}", "kernel", (max(1, per * 3 // 4 // 1024), 1024)),
                (f"layer_{i}", "conv", (3, 3, 32, max(1, per // 4 // 288))),
                (f"layer_{i}", "bias", (1024,))]
    return out


def write(outdir: Path, mib: float) -> Path:
    """Build the model one variable at a time and write it; returns the prefix."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    root = tf.Module(name="model")
    for module, var, shape in shapes(mib):
        if not hasattr(root, module):
            setattr(root, module, tf.Module(name=module))
        value = rng.standard_normal(shape, dtype=np.float32)
        setattr(getattr(root, module), var, tf.Variable(value, name=var))
        del value
    root.step = tf.Variable(1000, dtype=tf.int64, name="step")
    return Path(tf.train.Checkpoint(model=root).write(str(outdir / "ckpt")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--mib", type=float, default=64.0, help="total MiB of variables (default 64)")
    a = p.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    print(write(a.outdir, a.mib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
