"""Convert a pytree of large ``jax.Array``s living on the default JAX device (a GPU where
there is one) to npz, measuring from outside how much host memory the conversion adds.

The child builds the arrays on the device, reports its RSS, converts, reports again,
then checks every output value against the device arrays (slice by slice). The parent
samples the child's RSS between the two reports, so the peak is the conversion's own:
a gather of any array to the host would show as its full size.

    python bench/device_pytree.py --gib 4 --max-memory 256MiB
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, sys, time
import numpy as np
import jax, jax.numpy as jnp
import shardconv

gib, budget, out = float(sys.argv[1]), sys.argv[2], sys.argv[3]
dev = jax.devices()[0]
n = int(gib * (1 << 30)) // 2 // 4  # half bf16, half float32 by bytes
rows = 4096
key = jax.random.PRNGKey(0)
tree = {"params": {"emb": jax.random.normal(key, (rows, 2 * n // rows), jnp.bfloat16),
                   "dense": {"kernel": jax.random.normal(key, (rows, n // rows), jnp.float32)},
                   "odd": jnp.arange(7 * 13, dtype=jnp.int32).reshape(7, 13)}}
jax.block_until_ready(tree)
print(json.dumps({"ready": True, "platform": dev.platform, "device": str(dev)}), flush=True)
sys.stdin.readline()
t0 = time.monotonic()
r = shardconv.convert(tree, out, max_memory=budget, progress=False, fsync=False)
secs = time.monotonic() - t0
print(json.dumps({"done": True, "seconds": secs, "bytes": r.bytes_total}), flush=True)
sys.stdin.readline()
# every value, compared slice by slice with the device array
step = 256
from shardconv.sources import open_source
src = open_source(out)
for name, a in (("params/emb", tree["params"]["emb"]), ("params/dense/kernel", tree["params"]["dense"]["kernel"]),
                ("params/odd", tree["params"]["odd"])):
    info = src.info(name)
    row = info.nbytes // a.shape[0]
    buf = np.empty(step * row, np.uint8)
    for r0 in range(0, a.shape[0], step):
        r1 = min(a.shape[0], r0 + step)
        got = buf[: (r1 - r0) * row]
        src.read_into(name, r0 * row, memoryview(got))
        want = np.asarray(a[r0:r1]).reshape(-1).view(np.uint8)
        if not np.array_equal(got, want):
            print(json.dumps({"mismatch": name, "rows": [r0, r1]}), flush=True)
            sys.exit(1)
print(json.dumps({"checked": True}), flush=True)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--max-memory", default="256MiB")
    ap.add_argument("--out", default=None, help="output .npz (default: a temporary file)")
    args = ap.parse_args()
    import psutil

    tmp = tempfile.mkdtemp(prefix="device-pytree-")
    out = args.out or os.path.join(tmp, "out.npz")
    proc = psutil.Popen([sys.executable, "-c", CHILD, str(args.gib), args.max_memory, out],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = json.loads(proc.stdout.readline())
    before = proc.memory_info().rss
    proc.stdin.write("\n")
    proc.stdin.flush()
    peak, samples = before, 0
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    done = None
    while done is None:
        if sel.select(timeout=0.005):
            done = json.loads(proc.stdout.readline())
            break
        peak = max(peak, proc.memory_info().rss)
        samples += 1
    proc.stdin.write("\n")
    proc.stdin.flush()
    checked = proc.stdout.readline().strip()
    rc = proc.wait()
    out_bytes = os.path.getsize(out)
    t0 = time.monotonic()
    subprocess.run(["cp", out, out + ".cp"], check=True)
    cp = time.monotonic() - t0
    row = {"device": ready["device"], "platform": ready["platform"], "gib": args.gib, "max_memory": args.max_memory,
           "convert_s": round(done["seconds"], 3), "gib_per_s": round(done["bytes"] / 2**30 / done["seconds"], 2),
           "cp_of_output_s": round(cp, 3), "rss_before_mib": before >> 20, "rss_peak_mib": peak >> 20,
           "rss_grew_mib": (peak - before) >> 20, "samples": samples, "output_bytes": out_bytes,
           "values": "equal" if "checked" in checked else checked, "rc": rc}
    print(json.dumps(row, indent=1))
    return 0 if rc == 0 and "checked" in checked else 1


if __name__ == "__main__":
    sys.exit(main())
