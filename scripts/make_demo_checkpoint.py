"""Write a real TensorFlow checkpoint for the demo: a Keras 3 model trained one step
with Adam(use_ema=True), saved with tf.train.Checkpoint (model + optimizer).

usage: python scripts/make_demo_checkpoint.py OUTDIR [--params-m 50]
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--params-m", type=float, default=50.0, help="approximate model size, millions of parameters")
    args = ap.parse_args()
    import numpy as np
    import tensorflow as tf

    keras = tf.keras
    vocab, width = 32000, 512
    hidden = max(256, int((args.params_m * 1e6 - vocab * width * 2) / (4 * width * 2)))
    inputs = keras.Input(shape=(16,), dtype="int32")
    x = keras.layers.Embedding(vocab, width, name="embed")(inputs)
    for i in range(4):
        h = keras.layers.Dense(hidden, activation="gelu", name=f"block{i}_up")(x)
        x = x + keras.layers.Dense(width, name=f"block{i}_down")(h)
        x = keras.layers.LayerNormalization(name=f"block{i}_norm")(x)
    logits = keras.layers.Dense(vocab, name="unembed")(x)
    model = keras.Model(inputs, logits, name="demo_lm")
    opt = keras.optimizers.Adam(1e-3, use_ema=True)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(4, 16)).astype("int32")
    model.train_on_batch(tokens, tokens)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    path = ckpt.save(os.path.join(args.outdir, "ckpt"))
    print(f"{path}: {model.count_params() / 1e6:.1f} M parameters (plus Adam moments and EMA)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
