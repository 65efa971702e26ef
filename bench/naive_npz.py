"""The naive baseline: what a user without shardconv writes.

    python bench/naive_npz.py PREFIX DEST.npz

Loads every tensor of the TF checkpoint with TensorFlow's reader and saves
them all with one ``np.savez`` call, so every tensor is in memory at once
(peak RSS ~ TensorFlow's import + the whole model). No fsync, like np.savez.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main() -> int:
    prefix, dest = sys.argv[1], sys.argv[2]
    reader = tf.train.load_checkpoint(prefix)
    names = sorted(reader.get_variable_to_shape_map())
    np.savez(dest, **{name: reader.get_tensor(name) for name in names})
    return 0


if __name__ == "__main__":
    sys.exit(main())
