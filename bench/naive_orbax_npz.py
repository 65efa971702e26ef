"""The naive baseline for Orbax -> npz: what a user without shardconv writes.

    python bench/naive_orbax_npz.py CKPT_DIR DEST.npz

Restores the whole checkpoint with Orbax's own ``StandardCheckpointer().restore``
(onto the devices named in its ``_sharding`` file, so run it with as many devices
as the checkpoint was saved from) and saves every leaf with one ``np.savez`` call:
the whole model is in memory at once (peak RSS ~ JAX + Orbax + the model).
"""

import sys

import numpy as np


def main() -> int:
    src, dest = sys.argv[1], sys.argv[2]
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(src)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = ["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
             for path, _ in flat]
    np.savez(dest, **{n: np.asarray(v) for n, (_, v) in zip(names, flat)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
