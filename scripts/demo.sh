#!/usr/bin/env bash
# One command from a fresh clone: set up .venv, write a real TensorFlow checkpoint
# (a Keras model trained one step with Adam + EMA), and convert its EMA weights to NPZ within a
# 256 MiB memory budget, printing wall time and peak memory.
set -euo pipefail
SHARDCONV_EXTRAS=tf
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
OUT="${DEMO_OUT:-$ROOT/demo-out}"
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== writing a TensorFlow checkpoint with Keras (TensorFlow is only used for this step)"
python scripts/make_demo_checkpoint.py "$OUT/ckpt"
du -sh "$OUT/ckpt"

echo "== shardconv ls (reads the index only; model names from the checkpoint's object graph, role, raw key)"
shardconv ls "$OUT/ckpt" | head -n 8

echo "== shardconv plan --preset keras-ema (EMA weights under model names, optimizer state left out)"
shardconv plan "$OUT/ckpt" --preset keras-ema --max-memory 256MiB | tail -n 8

echo "== shardconv convert --preset keras-ema --max-memory 256MiB"
python scripts/measure.py "convert" -- shardconv convert "$OUT/ckpt" "$OUT/model.npz" --preset keras-ema --max-memory 256MiB

echo "== shardconv verify (every value against the checkpoint, through the same mapping)"
python scripts/measure.py "verify" -- shardconv verify "$OUT/model.npz" "$OUT/ckpt"

python - "$OUT/model.npz" <<'PY'
import sys, numpy as np
with np.load(sys.argv[1]) as z:
    print(f"np.load reads {len(z.files)} arrays, e.g. {z.files[0]} {z[z.files[0]].shape}")
PY
